"""The differentiable mean field of :class:`convcrf_cli.torch.ConvCRF` as fused CUDA kernels.

Forward: ``convcrf_init``, then per iteration ``convcrf_window_sum`` (the message from the
module's kernel tensor, which carries the learned scales and colour transform) and
``convcrf_step`` or, last, ``convcrf_final`` — the inference kernels of
:mod:`convcrf_cli.backends.cuda`, so the full-resolution Q is never stored. The record for the
backward pass holds only coarse tensors: each step's pooled Q and messages. Backward, per step
from the last: ``convcrf_upsample_adjoint`` (the gradient of ``w·msg``),
``convcrf_window_products`` (of the kernel), ``convcrf_window_sum`` transposed (of the pooled
Q), then ``convcrf_softmax_adjoint``, which recomputes the step's Q from the logits and the
previous message, or, for the first Q, ``convcrf_unary_adjoint`` (of the logits). The "+C"
transform and the message term's adjoint (the weight's and the matrix's gradients) are the
torch operations of :mod:`convcrf_cli.phases` (``add_compat``, ``message_adjoint``).

The functions work on torch tensors of one device and take the ``launch`` callable of
:func:`convcrf_cli.backends.cuda_plan.run_plan`, given the tensors themselves: CUDA tensors through
:func:`cuda_launcher`, CPU tensors through the C++ shim in the tests. Same contract as
:func:`convcrf_cli.phases.mean_field` and :func:`convcrf_cli.phases.mean_field_backward`.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from convcrf_cli.backends.cuda_plan import (
    Launch,
    LaunchConfig,
    MeanFieldPlan,
    balanced_class_block,
)
from convcrf_cli.params import CRFParams
from convcrf_cli.phases import add_compat, message_adjoint


def class_block(num_classes: int) -> int:
    """Classes per thread of the window and upsampling kernels: at most
    :data:`~convcrf_cli.backends.cuda_plan.MAX_CLASS_BLOCK`, balanced over the chunks (the
    module is compiled per value)."""
    return balanced_class_block(num_classes)


@dataclasses.dataclass
class FusedRecord:
    """What :func:`mean_field` keeps for :func:`mean_field_backward` (coarse tensors and lse)."""

    plan: MeanFieldPlan
    lse: torch.Tensor
    """``logsumexp`` of the logits over classes, ``[N,H,W]``."""
    pooled: list[torch.Tensor] = dataclasses.field(default_factory=list)
    """Each step's pooled Q ``[N,C,h,w]``."""
    messages: list[torch.Tensor] = dataclasses.field(default_factory=list)
    """Each step's window sum ``[N,C,h,w]``, before the compatibility transform."""
    transformed: list[torch.Tensor] = dataclasses.field(default_factory=list)
    """Each step's message after the compatibility transform (the same tensor without one)."""


def mean_field(
    logits: torch.Tensor,
    kernel: torch.Tensor,
    params: CRFParams,
    weight: float,
    compat_matrix: torch.Tensor | None,
    launch: Launch,
    class_block: int,
    config: LaunchConfig | None = None,
) -> tuple[torch.Tensor, FusedRecord]:
    """``params.iterations`` mean-field steps: ``logits [N,C,H,W]``, ``kernel [N,k,k,h,w]``
    (contiguous float32), ``compat_matrix [C,C]`` or None -> (scores ``[N,C,H,W]``, record).
    ``config``: the launch configuration (default :class:`LaunchConfig`)."""
    n, c, height, width = logits.shape
    plan = MeanFieldPlan.for_kernel(logits.shape, params, config or LaunchConfig(), class_block)
    record = FusedRecord(plan, logits.new_empty(n, height, width))
    pooled = logits.new_empty(n, c, plan.coarse_h, plan.coarse_w)
    plan.launch_init(launch, logits, record.lse, pooled)
    for step in range(params.iterations):
        msg = torch.empty_like(pooled)
        _window_sum(plan, launch, kernel, pooled, msg, adjoint=False)
        transformed = msg if compat_matrix is None else add_compat(compat_matrix, msg)
        record.pooled.append(pooled)
        record.messages.append(msg)
        record.transformed.append(transformed)
        if step < params.iterations - 1:
            pooled = torch.empty_like(pooled)
            plan.launch_step(launch, logits, record.lse, transformed, pooled, weight)
    scores = torch.empty_like(logits)
    plan.launch_final(launch, logits, record.lse, record.transformed[-1], scores, weight)
    return scores, record


def mean_field_backward(
    record: FusedRecord,
    logits: torch.Tensor,
    grad: torch.Tensor,
    kernel: torch.Tensor,
    weight: float,
    compat_matrix: torch.Tensor | None,
    needs_logits: bool,
    launch: Launch,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of :func:`mean_field` from ``grad = dL/d scores [N,C,H,W]`` (contiguous).

    Returns ``(d logits [N,C,H,W] or None, d kernel [N,k,k,h,w], d weight (0-d),
    d compat_matrix [C,C] or None)``, as :func:`convcrf_cli.phases.mean_field_backward`.
    """
    plan = record.plan
    i32 = np.int32
    grad_unary = grad.clone()  # Σ over steps of d scores; the kernels add each step's
    grad_scores = grad
    grad_kernel = torch.zeros_like(kernel)
    grad_weight = grad.new_zeros(())
    grad_matrix = None if compat_matrix is None else torch.zeros_like(compat_matrix)
    grad_logits = None
    coarse = record.pooled[0]
    cell_block = (*plan.config.cell_block, 1)
    for step in reversed(range(plan.params.iterations)):
        grad_scaled_msg = torch.empty_like(coarse)  # d (w·msg)
        args = (grad_scores, grad_scaled_msg, i32(plan.classes), *plan.geometry)
        args += (i32(plan.num_chunks),)
        launch("convcrf_upsample_adjoint", plan.message_grid, cell_block, args, 0)
        grad_msg, step_weight, step_matrix = message_adjoint(
            grad_scaled_msg, record.transformed[step], record.messages[step], weight, compat_matrix
        )
        grad_weight += step_weight
        if grad_matrix is not None:
            grad_matrix += step_matrix
        args = (grad_msg, record.pooled[step], grad_kernel, i32(plan.classes))
        args += (i32(plan.coarse_h), i32(plan.coarse_w), i32(plan.params.filter_size))
        grid = (*plan.cell_grid[:2], plan.batch * plan.params.filter_size)
        launch("convcrf_window_products", grid, cell_block, args, 0)
        if step == 0 and not needs_logits:
            break
        grad_pooled = torch.empty_like(coarse)
        _window_sum(plan, launch, kernel, grad_msg, grad_pooled, adjoint=True)
        if step > 0:
            grad_scores = torch.empty_like(grad)
            args = (logits, record.lse, record.transformed[step - 1], grad_pooled)
            args += (grad_scores, grad_unary, i32(plan.classes), *plan.geometry)
            args += plan.scales(weight)
            launch("convcrf_softmax_adjoint", plan.pixel_grid, plan.pixel_block, args, 0)
        else:
            grad_logits = torch.empty_like(grad)
            args = (logits, record.lse, grad_pooled, grad_unary, grad_logits)
            args += (i32(plan.classes), *plan.geometry, plan.scales(weight)[0])
            args += (i32(plan.params.init == "log"),)
            launch("convcrf_unary_adjoint", plan.pixel_grid, plan.pixel_block, args, 0)
    log_unary = logits - record.lse.unsqueeze(1)
    grad_weight -= torch.sum(grad_unary * log_unary)
    return grad_logits, grad_kernel, grad_weight, grad_matrix


def _window_sum(plan: MeanFieldPlan, launch: Launch, kernel, q, out, *, adjoint: bool) -> None:
    """``convcrf_window_sum`` (or its transpose) of ``q [N,C,h,w]`` into ``out``."""
    i32 = np.int32
    args = (kernel, q, out, i32(plan.classes), i32(plan.coarse_h), i32(plan.coarse_w))
    args += (i32(plan.params.filter_size), i32(plan.num_chunks), i32(adjoint))
    launch("convcrf_window_sum", plan.message_grid, (*plan.config.cell_block, 1), args, 0)


def cuda_launcher(device_index: int, class_block: int) -> Launch:
    """``launch`` on the compiled module of ``cuda:device_index`` for torch CUDA tensors:
    each launch runs on torch's current stream, the tensors shared through DLPack."""
    from convcrf_cli.backends import cuda

    cupy = cuda._import_cupy()
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
