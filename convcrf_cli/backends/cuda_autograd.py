"""Launches of the CUDA kernels that only the differentiable mean field runs.

:mod:`convcrf_cli.fused_meanfield` composes them, with ``convcrf_init``, ``convcrf_step`` and
``convcrf_final`` (:meth:`MeanFieldPlan.launch_init` and the like, shared with inference) and
the torch operations of :mod:`convcrf_cli.phases`, into the forward and backward pass of
:class:`convcrf_cli.torch.ConvCRF`'s mean field. Each function here runs one kernel of
``cuda/*.cu`` on the tensors it is given, writing (or, where it says so, adding) into the output
tensors the caller allocated; none computes anything itself.

The tensors are contiguous float32 torch tensors of one device, and ``launch`` is the callable
of :func:`convcrf_cli.backends.cuda_plan.run_plan`, given the tensors themselves: for CUDA
tensors :func:`cuda_launcher`, for CPU tensors the C++ shim in the tests. ``plan`` is the
:meth:`MeanFieldPlan.for_kernel` of the logits' shape; ``[N,C,h,w]`` is its coarse grid.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from convcrf_cli.backends.cuda_plan import Launch, MeanFieldPlan, balanced_class_block


def class_block(num_classes: int) -> int:
    """Classes per thread of the window and upsampling kernels: at most
    :data:`~convcrf_cli.backends.cuda_plan.MAX_CLASS_BLOCK`, balanced over the chunks (the
    module is compiled per value)."""
    return balanced_class_block(num_classes)


def window_sum(
    plan: MeanFieldPlan,
    launch: Launch,
    kernel: torch.Tensor,
    q: torch.Tensor,
    out: torch.Tensor,
    *,
    adjoint: bool,
) -> None:
    """``convcrf_window_sum``: the message ``out [N,C,h,w]`` from ``q [N,C,h,w]`` and
    ``kernel [N,k,k,h,w]``, or with ``adjoint`` its transpose (``q`` the message's gradient,
    ``out`` the pooled Q's)."""
    i32 = np.int32
    args = (kernel, q, out, i32(plan.classes), i32(plan.coarse_h), i32(plan.coarse_w))
    args += (i32(plan.params.filter_size), i32(plan.num_chunks), i32(adjoint))
    launch("convcrf_window_sum", plan.message_grid, _cell_block(plan), args, 0)


def upsample_adjoint(
    plan: MeanFieldPlan, launch: Launch, grad_scores: torch.Tensor, out: torch.Tensor
) -> None:
    """``convcrf_upsample_adjoint``: ``out [N,C,h,w] = d (w·msg)`` from the gradient of a
    step's scores ``grad_scores [N,C,H,W]`` (the adjoint of the upsampling and the crop)."""
    args = (grad_scores, out, np.int32(plan.classes), *plan.geometry, np.int32(plan.num_chunks))
    launch("convcrf_upsample_adjoint", plan.message_grid, _cell_block(plan), args, 0)


def window_products(
    plan: MeanFieldPlan,
    launch: Launch,
    grad_msg: torch.Tensor,
    pooled: torch.Tensor,
    grad_kernel: torch.Tensor,
) -> None:
    """``convcrf_window_products``: adds a step's share of the kernel's gradient to
    ``grad_kernel [N,k,k,h,w]``, from ``grad_msg`` and the step's ``pooled`` Q
    (both ``[N,C,h,w]``)."""
    i32 = np.int32
    k = plan.params.filter_size
    args = (grad_msg, pooled, grad_kernel, i32(plan.classes))
    args += (i32(plan.coarse_h), i32(plan.coarse_w), i32(k))
    grid = (*plan.cell_grid[:2], plan.batch * k)
    launch("convcrf_window_products", grid, _cell_block(plan), args, 0)


def softmax_adjoint(
    plan: MeanFieldPlan,
    launch: Launch,
    logits: torch.Tensor,
    lse: torch.Tensor,
    previous_message: torch.Tensor,
    grad_pooled: torch.Tensor,
    grad_scores: torch.Tensor,
    grad_unary: torch.Tensor,
    weight: float,
) -> None:
    """``convcrf_softmax_adjoint``: the gradient of the previous step's scores
    ``grad_scores [N,C,H,W]`` from that of a step's pooled Q ``grad_pooled [N,C,h,w]``,
    recomputing the step's Q from ``logits [N,C,H,W]``, ``lse [N,H,W]`` and the previous step's
    (transformed) ``previous_message [N,C,h,w]``; adds ``grad_scores`` to ``grad_unary
    [N,C,H,W]``."""
    args = (logits, lse, previous_message, grad_pooled, grad_scores, grad_unary)
    args += (np.int32(plan.classes), *plan.geometry, *plan.scales(weight))
    launch("convcrf_softmax_adjoint", plan.pixel_grid, plan.pixel_block, args, 0)


def unary_adjoint(
    plan: MeanFieldPlan,
    launch: Launch,
    logits: torch.Tensor,
    lse: torch.Tensor,
    grad_pooled: torch.Tensor,
    grad_unary: torch.Tensor,
    grad_logits: torch.Tensor,
    weight: float,
) -> None:
    """``convcrf_unary_adjoint``: ``grad_logits [N,C,H,W]`` from the gradient of the first
    pooled Q ``grad_pooled [N,C,h,w]`` and ``grad_unary [N,C,H,W]`` (the summed gradient of
    every step's scores), through the initialisation and the log-softmax of ``logits``."""
    args = (logits, lse, grad_pooled, grad_unary, grad_logits)
    args += (np.int32(plan.classes), *plan.geometry, plan.scales(weight)[0])
    args += (np.int32(plan.params.init == "log"),)
    launch("convcrf_unary_adjoint", plan.pixel_grid, plan.pixel_block, args, 0)


def _cell_block(plan: MeanFieldPlan) -> tuple[int, int, int]:
    """The block of the coarse-grid kernels: :attr:`LaunchConfig.cell_block` by 1."""
    return (*plan.config.cell_block, 1)


def cuda_launcher(device_index: int, class_block: int) -> Launch:
    """``launch`` on the compiled module of ``cuda:device_index`` for torch CUDA tensors:
    each launch runs on torch's current stream, the tensors shared through DLPack.
    :class:`~convcrf_cli.backends.cuda_plan.ModuleError` where the module does not compile
    or load."""
    from convcrf_cli.backends import cuda

    cupy = cuda.import_cupy()
    launcher = cuda.module_launcher(device_index, class_block)

    def launch(name, grid, block, args, shared_mem) -> None:
        with cupy.cuda.Device(device_index), cuda.torch_stream(cupy, device_index):
            launcher(name, grid, block, tuple(_as_cupy(cupy, arg) for arg in args), shared_mem)

    return launch


def _as_cupy(cupy, arg):
    """A kernel argument as CuPy takes it: tensors shared through DLPack, numbers unchanged."""
    if not isinstance(arg, torch.Tensor):
        return arg
    if arg.dtype != torch.float32 or not arg.is_contiguous():
        raise TypeError(f"kernel tensors must be contiguous float32, got {arg.dtype}")
    return cupy.from_dlpack(arg.detach())


@functools.cache
def fused_available(device_index: int) -> bool:
    """Whether the CUDA kernels run on ``cuda:device_index`` (CuPy, a device, the module)."""
    from convcrf_cli.backends.cuda import cuda_unavailable_reason

    return cuda_unavailable_reason(device_index) is None
