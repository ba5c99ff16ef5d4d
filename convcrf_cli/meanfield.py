"""ConvCRF mean-field inference in PyTorch (DESIGN §2), device-neutral and differentiable.

Every function takes batched tensors. Message passing loops over the k² window offsets and
accumulates shifted, weighted copies of the pooled Q, so the ``C·k²·h·w`` im2col buffer of the
original implementation is never materialised (memory is ``k²·h·w`` for the kernel weights plus
a few ``C·h·w`` buffers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from convcrf_cli.params import CRFParams


def pool_padding(length: int, blur: int) -> int:
    """Padding on each side of an axis of ``length`` pixels for pooling by ``blur`` (§2.2)."""
    return math.ceil(((blur - length % blur) % blur) / 2)


def coarse_size(length: int, blur: int) -> int:
    """Length of the coarse grid: ``ceil(length / blur)``."""
    return -(-length // blur)


def pool(x: torch.Tensor, blur: int) -> torch.Tensor:
    """Average-pool ``[N,C,H,W]`` to ``[N,C,ceil(H/b),ceil(W/b)]``, padded cells not counted."""
    if blur == 1:
        return x
    height, width = x.shape[-2:]
    padding = (pool_padding(height, blur), pool_padding(width, blur))
    return F.avg_pool2d(x, blur, stride=blur, padding=padding, count_include_pad=False)


def upsample_crop(x: torch.Tensor, blur: int, height: int, width: int) -> torch.Tensor:
    """Bilinear ×``blur`` upsampling (half-pixel centres) of ``[N,C,h,w]``, cropped to H×W."""
    if blur == 1:
        return x
    up = F.interpolate(x, scale_factor=blur, mode="bilinear", align_corners=False)
    top, left = pool_padding(height, blur), pool_padding(width, blur)
    return up[:, :, top : top + height, left : left + width]


def position_features(n: int, height: int, width: int, pos_sdims, *, like: torch.Tensor):
    """Positional features ``(row, col) / pos_sdims`` as ``[N,2,H,W]``, dtype/device of ``like``."""
    rows = torch.arange(height, dtype=like.dtype, device=like.device)
    cols = torch.arange(width, dtype=like.dtype, device=like.device)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))
    return (grid / pos_sdims).unsqueeze(0).expand(n, 2, height, width)


def gaussian_kernel(features: torch.Tensor, filter_size: int) -> torch.Tensor:
    """Truncated Gaussian weights ``[N,k,k,h,w]`` from coarse features ``[N,F,h,w]`` (§2.3).

    ``G[n,a,c,x,y] = exp(-0.5·||f[:,x+a-s,y+c-s] - f[:,x,y]||²)``, 0 where the neighbour lies
    outside the grid; the centre weight is 1. Computed one window row ``a`` at a time, so the
    temporary buffer is ``F·k·h·w``.
    """
    n, _, h, w = features.shape
    s = filter_size // 2
    padded = F.pad(features, (s, s, s, s))
    inside = F.pad(features.new_ones(1, h, w), (s, s, s, s))
    centre = features.unsqueeze(3)  # [N,F,h,1,w]
    rows = []
    for a in range(filter_size):
        window = padded[:, :, a : a + h].unfold(3, w, 1)  # view [N,F,h,k,w]
        dist2 = (window - centre).square().sum(dim=1)  # [N,h,k,w]
        mask = inside[:, a : a + h].unfold(2, w, 1)  # [1,h,k,w]
        rows.append((torch.exp(-0.5 * dist2) * mask).transpose(1, 2))  # [N,k,h,w]
    return torch.stack(rows, dim=1)


def crf_kernel(
    image: torch.Tensor,
    params: CRFParams,
    *,
    pos_sdims=None,
    col_schan=None,
    pos_compat=None,
    col_compat=None,
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
    col = pool(image / col_schan, params.blur)
    kernel = pos_compat * g_pos + col_compat * gaussian_kernel(col, params.filter_size)
    return kernel.contiguous()  # the window sum reads [h,w] planes of it


def position_kernel(
    height: int, width: int, blur: int, filter_size: int, pos_sdims, *, like: torch.Tensor
) -> torch.Tensor:
    """The positional Gaussian of :func:`gaussian_kernel` as ``[1,k,k,h,w]``, built separably.

    The pooled row feature of a coarse cell depends only on its row and the column feature only
    on its column, so ``G[a,c,x,y] = R[a,x]·S[c,y]`` with 1-D truncated Gaussians ``R [k,h]``
    and ``S [k,w]``: equal (up to rounding) to ``gaussian_kernel(P(position_features))`` for one
    ``k²·h·w`` product. dtype/device of ``like``; differentiable in ``pos_sdims``.
    """
    rows = _pooled_positions(height, blur, like) / pos_sdims
    cols = _pooled_positions(width, blur, like) / pos_sdims
    row_kernel, col_kernel = _gaussian_1d(rows, filter_size), _gaussian_1d(cols, filter_size)
    return (row_kernel[:, None, :, None] * col_kernel[None, :, None, :]).unsqueeze(0)


def _gaussian_1d(values: torch.Tensor, filter_size: int) -> torch.Tensor:
    """:func:`gaussian_kernel` along one axis: ``values [n]`` -> ``[k,n]`` weights
    ``exp(-0.5·(v[x+a-s] - v[x])²)``, 0 where ``x+a-s`` lies outside ``[0,n)``."""
    s = filter_size // 2
    n = values.shape[0]
    windows = F.pad(values, (s, s)).unfold(0, n, 1)  # view [k,n]: windows[a,x] = v[x+a-s]
    inside = F.pad(values.new_ones(n), (s, s)).unfold(0, n, 1)
    return torch.exp(-0.5 * (windows - values).square()) * inside


def _pooled_positions(length: int, blur: int, like: torch.Tensor) -> torch.Tensor:
    """Mean pixel index of each coarse cell along an axis of ``length``: ``[ceil(length/b)]``."""
    index = torch.arange(length, dtype=like.dtype, device=like.device).view(1, 1, 1, length)
    return pool(index, blur).view(-1)


def window_sum(q: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``Σ_{a,c} K[a,c]·Pad0(q)[:, x+a-s, y+c-s]`` for ``q [N,C,h,w]``, ``kernel [N,k,k,h,w]``.

    Returns ``[N,C,h,w]``. Differentiable in both inputs through :class:`_WindowSum`, whose
    hand-written backward never materialises the ``C·k²·h·w`` buffer either.
    """
    if torch.is_grad_enabled() and (q.requires_grad or kernel.requires_grad):
        return _WindowSum.apply(q, kernel)
    return _window_sum(q, kernel)


def _shifted_windows(q: torch.Tensor, filter_size: int) -> list[torch.Tensor]:
    """The ``k²`` views ``Pad0(q)[:, :, a : a+h, c : c+w]`` of ``q [N,C,h,w]``, offsets ``(a, c)``
    in row-major order (the order of ``kernel.flatten(1, 2)``)."""
    s = filter_size // 2
    h, w = q.shape[-2:]
    windows = F.pad(q, (s, s, s, s)).unfold(2, h, 1).unfold(3, w, 1)  # view [N,C,k,k,h,w]
    return [window for row in windows.unbind(2) for window in row.unbind(2)]


def _window_sum(q: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """:func:`window_sum` as ``k²`` in-place multiply-adds of shifted views (no autograd)."""
    weights = kernel.unsqueeze(3).flatten(1, 2).unbind(1)  # k² × [N,1,h,w]
    shifted = _shifted_windows(q, kernel.shape[1])
    out = weights[0] * shifted[0]
    for weight, window in zip(weights[1:], shifted[1:], strict=True):
        out.addcmul_(weight, window)
    return out


class _WindowSum(torch.autograd.Function):
    """:func:`window_sum` with its adjoint written out.

    With ``g = dL/d out``: ``dL/dq`` is the transposed window sum, each offset's weighted ``g``
    added into the padded grid at that offset, then cropped; ``dL/dK[a,c] = Σ_classes g ·
    window(a,c)``. Both loop over the ``k²`` offsets on ``[N,C,h,w]`` planes.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, kernel)
        return _window_sum(q, kernel)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        q, kernel = ctx.saved_tensors
        k = kernel.shape[1]
        s = k // 2
        h, w = q.shape[-2:]
        grad = grad.contiguous()
        grad_q = grad_kernel = None
        if ctx.needs_input_grad[0]:
            padded = grad.new_zeros(q.shape[0], q.shape[1], h + 2 * s, w + 2 * s)
            for a in range(k):
                for c in range(k):
                    target = padded[:, :, a : a + h, c : c + w]
                    target.addcmul_(kernel[:, a, c].unsqueeze(1), grad)
            grad_q = padded[:, :, s : s + h, s : s + w]
        if ctx.needs_input_grad[1]:
            grad_kernel = torch.empty_like(kernel)
            product = torch.empty_like(grad)
            planes = grad_kernel.flatten(1, 2).unbind(1)  # k² × [N,h,w], row-major offsets
            for plane, window in zip(planes, _shifted_windows(q, k), strict=True):
                torch.sum(torch.mul(grad, window, out=product), dim=1, out=plane)
        return grad_q, grad_kernel


def coarse_message(q: torch.Tensor, kernel: torch.Tensor, blur: int) -> torch.Tensor:
    """``window_sum(P(q))`` as a contiguous ``[N,C,h,w]`` for full-resolution ``q [N,C,H,W]``.

    The window sum runs on a contiguous (classes-outermost) copy of the pooled grid, where its
    shifted multiply-adds run along contiguous rows.
    """
    return window_sum(pool(q, blur).contiguous(), kernel)


def message(q: torch.Tensor, kernel: torch.Tensor, blur: int) -> torch.Tensor:
    """Message ``crop(up_b(window_sum(P(q))))`` for full-resolution ``q [N,C,H,W]`` (§2.4)."""
    height, width = q.shape[-2:]
    return upsample_crop(coarse_message(q, kernel, blur), blur, height, width)


def mean_field(
    logits: torch.Tensor,
    kernel: torch.Tensor,
    params: CRFParams,
    *,
    weight=None,
    unary_weight=None,
    compat_transform=None,
) -> torch.Tensor:
    """Run ``params.iterations`` mean-field steps (§2.5); returns the final unnormalised Q.

    ``logits`` ``[N,C,H,W]``; ``kernel`` from :func:`crf_kernel`. ``compat_transform``, if given,
    maps a message ``[N,C,H,W]`` to the added term of the "+C" compatibility transform.
    Returns ``[N,C,H,W]``: a channels-last view when a gradient is needed (full-resolution work
    runs with classes innermost there), else a contiguous tensor.

    When no gradient is needed (and there is no ``compat_transform``), the same steps run
    in the pooling-phase layout of :func:`_mean_field_phases`.
    """
    w = params.weight if weight is None else weight
    u = params.unary_weight if unary_weight is None else unary_weight
    if compat_transform is None and not _needs_grad(logits, kernel, w, u):
        return _mean_field_phases(logits, kernel, params, float(w), float(u))
    log_unary = torch.log_softmax(logits.permute(0, 2, 3, 1), dim=-1)  # [N,H,W,C]
    scaled_unary = (u - w) * log_unary
    q = log_unary if params.init == "log" else torch.softmax(log_unary, dim=-1)
    for i in range(params.iterations):
        msg = message(q.permute(0, 3, 1, 2), kernel, params.blur)
        if compat_transform is not None:
            msg = msg + compat_transform(msg)
        msg = msg.permute(0, 2, 3, 1)
        q = torch.add(scaled_unary, msg, alpha=w) if _is_number(w) else scaled_unary + w * msg
        if i < params.iterations - 1:
            q = torch.softmax(q, dim=-1)
    return q.permute(0, 3, 1, 2)


def phase_ranges(length: int, blur: int) -> list[tuple[int, int, int]]:
    """Where each pooling phase of an axis of ``length`` pixels lies, one tuple per phase ``i``.

    Coarse cell ``x`` pools pixels ``x·b + i - p`` for ``i`` in ``[0,b)`` (``p`` from
    :func:`pool_padding`), and bilinear upsampling followed by the crop maps the same pixels
    back to cell ``x``. Phase ``i`` is valid in cells ``first:stop``, whose pixels are
    ``source, source + b, ...``; ``stop <= first`` where the axis is too short for the phase.
    """
    pad = pool_padding(length, blur)
    cells = coarse_size(length, blur)
    ranges = []
    for i in range(blur):
        first = 1 if i < pad else 0
        stop = min(cells, (length - 1 + pad - i) // blur + 1)
        ranges.append((first, stop, first * blur + i - pad))
    return ranges


def _upsample_phases(blur: int) -> list[tuple[int, float]]:
    """Bilinear ×``blur`` weights per output phase ``i``: ``(step, t)`` such that the upsampled
    value is ``(1 - t)·m[x] + t·m[x + step]`` (half-pixel centres, source clamped at the edges)."""
    offsets = [(i + 0.5) / blur - 0.5 for i in range(blur)]
    return [(1 if d > 0 else -1, abs(d)) for d in offsets]


def _mean_field_phases(
    logits: torch.Tensor, kernel: torch.Tensor, params: CRFParams, w: float, u: float
) -> torch.Tensor:
    """:func:`mean_field` without autograd, ``logits [N,C,H,W]`` -> Q ``[N,C,H,W]`` contiguous.

    Full-resolution tensors are held as ``[b,b,N,C,h,w]``: pixel ``(x·b + i - p, y·b + j - q)``
    at ``[i,j,:,:,x,y]``. Pooling is then a sum over the ``b²`` phase slices, and the bilinear
    upsampling of the message is, per phase, a fixed blend of the cell and one neighbour along
    each axis. Each step runs phase by phase on ``[N,C,h,w]`` slices small enough to stay in
    cache: message, ``(u - w)·L + w·msg``, softmax and its contribution to the pooled next Q;
    the last step adds the message into the unary buffer in place and copies each phase of
    these scores into the ``[N,C,H,W]`` result.
    """
    n, classes, height, width = logits.shape
    blur = params.blur
    h, wc = kernel.shape[-2:]
    rows, cols = phase_ranges(height, blur), phase_ranges(width, blur)
    valid = [
        (i, j, r, c)
        for i, r in enumerate(rows)
        for j, c in enumerate(cols)
        if r[1] > r[0] and c[1] > c[0]
    ]
    pooled = logits.new_zeros(n, classes, h, wc)
    scratch, probabilities = torch.empty_like(pooled), torch.empty_like(pooled)
    counts = logits.new_zeros(h, wc)

    def add_to_pool(q: torch.Tensor, r0: int, r1: int, c0: int, c1: int) -> None:
        pooled[:, :, r0:r1, c0:c1] += q[:, :, r0:r1, c0:c1]

    # (u - w)·log_softmax(unary) per phase; cells outside the image hold 0 and are never pooled
    scaled_unary = logits.new_empty(blur, blur, n, classes, h, wc)
    for i, j, (r0, r1, rs), (c0, c1, cs) in valid:
        phase = scaled_unary[i, j]
        _zero_outside(phase, r0, r1, c0, c1)
        phase[:, :, r0:r1, c0:c1] = logits[:, :, rs::blur, cs::blur]
        log_q = torch.ops.aten._log_softmax.out(phase, 1, False, out=scratch)
        torch.mul(log_q, u - w, out=phase)
        add_to_pool(log_q if params.init == "log" else log_q.exp_(), r0, r1, c0, c1)
        counts[r0:r1, c0:c1] += 1
    msg = window_sum(pooled.div_(counts), kernel)

    # views fixed for the whole run, so that each step only launches operations
    result = logits.new_empty(n, classes, height, width)
    padded = logits.new_empty(n, classes, h + 2, wc + 2)  # w·msg, edges replicated
    row_blends = []  # per row phase i: [N,C,h,w+2], the message blended along rows
    for step_, t in _upsample_phases(blur):
        centre = padded[:, :, 1 : h + 1]
        blend = centre if t == 0 else torch.empty_like(centre)
        row_blends.append((blend, centre, padded[:, :, 1 + step_ : h + 1 + step_], t))
    col_blends = _upsample_phases(blur)
    steps = [
        (
            scaled_unary[i, j],
            row_blends[i][0][:, :, :, 1 : wc + 1],
            row_blends[i][0][:, :, :, 1 + col_blends[j][0] : wc + 1 + col_blends[j][0]],
            col_blends[j][1],
            (scaled_unary[i, j, :, :, r0:r1, c0:c1], result[:, :, rs::blur, cs::blur]),
            (probabilities[:, :, r0:r1, c0:c1], pooled[:, :, r0:r1, c0:c1]),
        )
        for i, j, (r0, r1, rs), (c0, c1, cs) in valid
    ]
    for step in range(params.iterations):
        last = step == params.iterations - 1
        torch.ops.aten.replication_pad2d.out(msg.mul_(w), [1, 1, 1, 1], out=padded)
        for blend, centre, neighbour, t in row_blends:
            if t > 0:
                torch.lerp(centre, neighbour, t, out=blend)
        pooled.zero_()
        for unary, centre, neighbour, t, (scores, target), (q, pool_cells) in steps:
            out = unary if last else scratch
            torch.add(unary, centre, alpha=1 - t, out=out)
            if t > 0:
                out.add_(neighbour, alpha=t)
            if last:
                target.copy_(scores)
            else:
                torch.ops.aten._softmax.out(out, 1, False, out=probabilities)
                pool_cells += q
        if not last:
            msg = window_sum(pooled.div_(counts), kernel)
    return result


def _zero_outside(phase: torch.Tensor, r0: int, r1: int, c0: int, c1: int) -> None:
    """Set the cells of ``phase [N,C,h,w]`` outside rows ``r0:r1`` and columns ``c0:c1`` to 0."""
    phase[:, :, :r0] = 0
    phase[:, :, r1:] = 0
    phase[:, :, :, :c0] = 0
    phase[:, :, :, c1:] = 0


def _needs_grad(*values) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(v, torch.Tensor) and v.requires_grad for v in values
    )


def _is_number(value) -> bool:
    return isinstance(value, (int, float))
