"""ConvCRF inference in PyTorch (README, "The algorithm"), device-neutral and differentiable.

:func:`crf_kernel` builds the Gaussian weights on the coarse grid (differentiable by autograd);
:func:`mean_field` runs the iterations in the pooling-phase layout of :mod:`convcrf_cli.phases`,
with a hand-written backward when a gradient is needed. Message passing loops over the ``k²``
window offsets (:mod:`convcrf_cli.window`), so the ``C·k²·h·w`` im2col buffer of the original
implementation is never materialised, neither forward nor backward.

Every tensor is floating point, one dtype throughout (float32 in the backends and the module,
float64 where the tests compare with the reference); results have the inputs' dtype and device.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from convcrf_cli import fused_meanfield, phases
from convcrf_cli.backends import cuda_autograd
from convcrf_cli.backends.cuda_plan import ModuleError
from convcrf_cli.grid import pool_padding
from convcrf_cli.params import CRFParams
from convcrf_cli.underflow import exp_or_zero_


def pool(x: torch.Tensor, blur: int) -> torch.Tensor:
    """Average-pool ``[N,C,H,W]`` to ``[N,C,ceil(H/b),ceil(W/b)]``, padded cells not counted."""
    if blur == 1:
        return x
    height, width = x.shape[-2:]
    padding = (pool_padding(height, blur), pool_padding(width, blur))
    return F.avg_pool2d(x, blur, stride=blur, padding=padding, count_include_pad=False)


def gaussian_kernel(
    features: torch.Tensor,
    filter_size: int,
    scale: float | torch.Tensor,
    weight: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Truncated Gaussian weights ``[N,k,k,h,w]`` from coarse features ``[N,F,h,w]`` (step 3).

    ``G[n,a,c,x,y] = weight·exp(-0.5·||(f[:,x+a-s,y+c-s] - f[:,x,y]) / scale||²)``, 0 where
    the neighbour lies outside the grid, and where the exponential is below
    ``exp(EXP_CUTOFF)`` (:func:`exp_or_zero_`); the centre weight is ``weight``. ``features``
    are unscaled (raw pooled values): the differences are divided by ``scale``, not the
    features, so that large features keep their float32 precision and a tiny ``scale`` gives
    0 off the centre instead of ``inf - inf``. Computed one window row ``a`` at a time, so the
    temporary buffer is ``N·F·k·h·w``, held in the ``[N,F,k,h,w]`` order of the result so that
    every pass over it runs along contiguous ``w`` rows.
    """
    n, f, h, w = features.shape
    s = filter_size // 2
    windows = F.pad(features, (s, s, s, s)).unfold(2, h, 1).unfold(3, w, 1)  # [N,F,k,k,h,w]
    inside = F.pad(features.new_ones(1, h, w), (s, s, s, s)).unfold(1, h, 1).unfold(2, w, 1)
    centre = features.unsqueeze(2)  # [N,F,1,h,w]
    buffer = None if _needs_grad(features, scale) else features.new_empty(n, f, filter_size, h, w)
    rows = []
    for a in range(filter_size):
        diff = _difference(windows[:, :, a], centre, buffer)  # [N,F,k,h,w]
        exponent = diff.div_(scale).square_().sum(dim=1).mul_(-0.5)  # [N,k,h,w]
        rows.append(exp_or_zero_(exponent) * (weight * inside[:, a]))
    return torch.stack(rows, dim=1)


def _difference(
    window: torch.Tensor, centre: torch.Tensor, buffer: torch.Tensor | None
) -> torch.Tensor:
    """``window - centre`` (``[N,F,k,h,w]`` view, ``[N,F,1,h,w]``) as a contiguous tensor,
    written into ``buffer`` if one is given (when autograd records nothing).

    The window view's ``k`` and ``w`` axes both have stride 1, and torch would lay a result of
    its own out with the short ``k`` axis innermost, which every later pass would run along.
    """
    if buffer is None:
        return (window - centre).contiguous()
    return torch.sub(window, centre, out=buffer)


def crf_kernel(
    image: torch.Tensor,
    params: CRFParams,
    *,
    pos_sdims: float | torch.Tensor | None = None,
    col_schan: float | torch.Tensor | None = None,
    pos_compat: float | torch.Tensor | None = None,
    col_compat: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Combined kernel ``pos_compat·G_pos + col_compat·G_col`` as contiguous ``[N,k,k,h,w]``.

    ``image`` is ``[N,F,H,W]`` in its raw value range. Keyword overrides (tensors or numbers)
    replace the corresponding fields of ``params``; the differentiable module passes learnable
    tensors through them.
    """
    pos_sdims = params.pos_sdims if pos_sdims is None else pos_sdims
    col_schan = params.col_schan if col_schan is None else col_schan
    pos_compat = params.pos_compat if pos_compat is None else pos_compat
    col_compat = params.col_compat if col_compat is None else col_compat
    height, width = image.shape[-2:]
    g_pos = position_kernel(height, width, params.blur, params.filter_size, pos_sdims, like=image)
    col = pool(image, params.blur)
    kernel = gaussian_kernel(col, params.filter_size, col_schan, col_compat)
    return kernel.add_(g_pos.mul_(pos_compat))  # in place: neither is saved for autograd


def position_kernel(
    height: int,
    width: int,
    blur: int,
    filter_size: int,
    pos_sdims: float | torch.Tensor,
    *,
    like: torch.Tensor,
) -> torch.Tensor:
    """The positional Gaussian of :func:`gaussian_kernel` as ``[1,k,k,h,w]``, built separably.

    The pooled row feature of a coarse cell depends only on its row and the column feature only
    on its column, so ``G[a,c,x,y] = R[a,x]·S[c,y]`` with 1-D truncated Gaussians ``R [k,h]``
    and ``S [k,w]``: equal (up to rounding) to ``gaussian_kernel(P(pos))`` with the
    features ``pos = (row, col) / pos_sdims`` of step 1, for one ``k²·h·w`` product. The pooled
    pixel indices are exact in float32 (means of consecutive integers), and so are their
    differences, which alone are divided by ``pos_sdims``: far from the origin of a large
    image the weights keep full precision. dtype/device of ``like``; differentiable in
    ``pos_sdims``.
    """
    rows = _pooled_positions(height, blur, like)
    cols = _pooled_positions(width, blur, like)
    row_kernel = _gaussian_1d(rows, filter_size, pos_sdims)
    col_kernel = _gaussian_1d(cols, filter_size, pos_sdims)
    return (row_kernel[:, None, :, None] * col_kernel[None, :, None, :]).unsqueeze(0)


def _gaussian_1d(
    values: torch.Tensor, filter_size: int, scale: float | torch.Tensor
) -> torch.Tensor:
    """:func:`gaussian_kernel` along one axis: ``values [n]`` -> contiguous ``[k,n]`` weights
    ``exp(-0.5·((v[x+a-s] - v[x]) / scale)²)``, 0 where ``x+a-s`` lies outside ``[0,n)``.

    Contiguous so that the outer product of :func:`position_kernel`, and the kernel sums that
    read it, run along ``w`` rows: torch lays the result of the window view (both axes of
    stride 1) out with the short ``k`` axis innermost.
    """
    s = filter_size // 2
    n = values.shape[0]
    windows = F.pad(values, (s, s)).unfold(0, n, 1)  # view [k,n]: windows[a,x] = v[x+a-s]
    inside = F.pad(values.new_ones(n), (s, s)).unfold(0, n, 1)
    return (torch.exp(-0.5 * ((windows - values) / scale).square()) * inside).contiguous()


def _pooled_positions(length: int, blur: int, like: torch.Tensor) -> torch.Tensor:
    """Mean pixel index of each coarse cell along an axis of ``length``: ``[ceil(length/b)]``."""
    index = torch.arange(length, dtype=like.dtype, device=like.device).view(1, 1, 1, length)
    return pool(index, blur).view(-1)


def mean_field(
    logits: torch.Tensor,
    kernel: torch.Tensor,
    params: CRFParams,
    *,
    weight: float | torch.Tensor | None = None,
    compat_matrix: torch.Tensor | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """Run ``params.iterations`` mean-field steps (step 5); returns the final Q ``[N,C,H,W]``.

    ``logits [N,C,H,W]``; ``kernel [N,k,k,h,w]`` from :func:`crf_kernel`; ``weight`` (a
    number or a 0-d tensor) replaces ``params.weight``; ``compat_matrix [C,C]``, if given,
    adds ``M·msg`` to every message (the "+C" transform). Differentiable in ``logits``,
    ``kernel``, ``weight`` and ``compat_matrix`` through :class:`_MeanField`.

    ``fused=True`` (the default) runs the fused CUDA kernels of
    :mod:`convcrf_cli.fused_meanfield` where they can run: on float32 CUDA tensors, CuPy able
    to launch them on their device; other inputs take the PyTorch implementation of
    :mod:`convcrf_cli.phases`, as do those whose module (compiled per class count) does not
    compile, with a RuntimeWarning. ``fused=False`` always takes the PyTorch implementation.
    """
    w = params.weight if weight is None else weight
    launcher = _fused_launcher(logits, kernel, compat_matrix) if fused else None
    if launcher is not None:  # the kernels read dense [N,C,H,W] and [N,k,k,h,w] arrays
        logits, kernel = logits.contiguous(), kernel.contiguous()
    if _needs_grad(logits, kernel, w, compat_matrix):
        w = w if isinstance(w, torch.Tensor) else logits.new_tensor(float(w))
        return _MeanField.apply(logits, kernel, w, compat_matrix, params, launcher)
    w = float(w.detach()) if isinstance(w, torch.Tensor) else float(w)
    if launcher is not None:
        launch, block = launcher
        scores, _ = fused_meanfield.mean_field(
            logits, kernel, params, w, compat_matrix, launch, block
        )
        return scores
    scores, _ = phases.mean_field(logits, kernel, params, w, compat_matrix)
    return scores


class _MeanField(torch.autograd.Function):
    """The mean field with a hand-written backward: :func:`phases.mean_field` and
    :func:`phases.mean_field_backward`, or their fused CUDA counterparts of
    :mod:`convcrf_cli.fused_meanfield` when a launcher for the fused kernels is given
    (``(launch, class_block)``)."""

    @staticmethod
    def forward(ctx, logits, kernel, weight, compat_matrix, params, launcher):
        ctx.params, ctx.weight, ctx.launcher = params, float(weight), launcher
        if launcher is None:
            scores, ctx.record = phases.mean_field(
                logits, kernel, params, ctx.weight, compat_matrix, record=True
            )
            ctx.save_for_backward(kernel, compat_matrix)
        else:
            launch, block = launcher
            scores, ctx.record = fused_meanfield.mean_field(
                logits, kernel, params, ctx.weight, compat_matrix, launch, block
            )
            ctx.save_for_backward(kernel, compat_matrix, logits)
        return scores

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        needs_logits = ctx.needs_input_grad[0]
        if ctx.launcher is None:
            kernel, compat_matrix = ctx.saved_tensors
            grads = phases.mean_field_backward(
                ctx.record,
                grad.contiguous(),
                kernel,
                ctx.params,
                ctx.weight,
                compat_matrix,
                needs_logits=needs_logits,
            )
        else:
            kernel, compat_matrix, logits = ctx.saved_tensors
            grads = fused_meanfield.mean_field_backward(
                ctx.record,
                logits,
                grad.contiguous(),
                kernel,
                ctx.weight,
                compat_matrix,
                needs_logits,
                ctx.launcher[0],
            )
        grad_logits, grad_kernel, grad_weight, grad_matrix = grads
        return grad_logits, grad_kernel, grad_weight, grad_matrix, None, None


def _fused_launcher(logits: torch.Tensor, kernel: torch.Tensor, compat_matrix) -> tuple | None:
    """``(launch, class_block)`` for the fused CUDA kernels when the inputs are float32 CUDA
    tensors and CuPy can run the kernels on their device, else None (with a RuntimeWarning
    where the module of their class count does not compile or load)."""
    tensors = [logits, kernel] + ([] if compat_matrix is None else [compat_matrix])
    if not all(t.is_cuda and t.dtype == torch.float32 for t in tensors):
        return None
    index = logits.device.index if logits.device.index is not None else 0
    if not cuda_autograd.fused_available(index):
        return None
    block = cuda_autograd.class_block(logits.shape[1])
    try:
        return cuda_autograd.cuda_launcher(index, block), block
    except ModuleError as exc:
        message = f"{exc.problem}; the mean field runs as PyTorch operations"
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return None


def _needs_grad(*values: float | torch.Tensor | None) -> bool:
    """Whether autograd records operations on any of ``values``."""
    return torch.is_grad_enabled() and any(
        isinstance(v, torch.Tensor) and v.requires_grad for v in values
    )
