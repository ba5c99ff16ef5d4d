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
    """Combined kernel ``pos_compat·G_pos + col_compat·G_col`` as ``[N,k,k,h,w]``.

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
    return pos_compat * g_pos + col_compat * gaussian_kernel(col, params.filter_size)


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
    row_kernel = gaussian_kernel(rows.view(1, 1, -1, 1), filter_size)[0, :, filter_size // 2, :, 0]
    col_kernel = gaussian_kernel(cols.view(1, 1, 1, -1), filter_size)[0, filter_size // 2, :, 0]
    return (row_kernel[:, None, :, None] * col_kernel[None, :, None, :]).unsqueeze(0)


def _pooled_positions(length: int, blur: int, like: torch.Tensor) -> torch.Tensor:
    """Mean pixel index of each coarse cell along an axis of ``length``: ``[ceil(length/b)]``."""
    index = torch.arange(length, dtype=like.dtype, device=like.device).view(1, 1, 1, length)
    return pool(index, blur).view(-1)


def window_sum(q: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``Σ_{a,c} K[a,c]·Pad0(q)[:, x+a-s, y+c-s]`` for ``q [N,C,h,w]``, ``kernel [N,k,k,h,w]``."""
    k = kernel.shape[1]
    s = k // 2
    h, w = q.shape[-2:]
    padded = F.pad(q, (s, s, s, s))
    out = torch.zeros_like(q)
    grad = torch.is_grad_enabled() and (q.requires_grad or kernel.requires_grad)
    for a in range(k):
        for c in range(k):
            shifted = padded[:, :, a : a + h, c : c + w]
            weight = kernel[:, a, c].unsqueeze(1)
            if grad:
                out = out + weight * shifted
            else:
                out.addcmul_(weight, shifted)
    return out


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
    Returns ``[N,C,H,W]`` (a channels-last view: full-resolution work runs with classes
    innermost, where softmax and pooling are fastest).

    When no gradient is needed (and there is no ``compat_transform``), the full-resolution
    steps write into buffers allocated once per call instead of new tensors per step (same
    operations, same results).
    """
    w = params.weight if weight is None else weight
    u = params.unary_weight if unary_weight is None else unary_weight
    log_unary = torch.log_softmax(logits.permute(0, 2, 3, 1), dim=-1)  # [N,H,W,C]
    if compat_transform is None and not _needs_grad(logits, kernel, w, u):
        return _mean_field_buffered(log_unary, kernel, params, float(w), float(u))
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


def _mean_field_buffered(
    log_unary: torch.Tensor, kernel: torch.Tensor, params: CRFParams, w: float, u: float
) -> torch.Tensor:
    """:func:`mean_field` without autograd: ``log_unary [N,H,W,C]`` -> Q ``[N,C,H,W]``.

    Per step: pool and window sum on the coarse grid, bilinear upsampling into one reused
    channels-last buffer, ``(u - w)·L + w·msg`` and softmax into two reused buffers.
    """
    n, height, width, classes = log_unary.shape
    blur = params.blur
    q = log_unary if params.init == "log" else torch.softmax(log_unary, dim=-1)
    msg = coarse_message(q.permute(0, 3, 1, 2), kernel, blur)
    scaled_unary = log_unary.mul_(u - w)  # log_unary (and q, for init "log") is not used again
    top, left = pool_padding(height, blur), pool_padding(width, blur)
    up_size = (msg.shape[-2] * blur, msg.shape[-1] * blur)
    # [N,C,h·b,w·b] stored channels-last, like the message it is made from
    up = scaled_unary.new_empty(n, *up_size, classes).permute(0, 3, 1, 2) if blur > 1 else None
    scores = torch.empty_like(scaled_unary)
    q = torch.empty_like(scaled_unary) if params.init == "log" else q
    for i in range(params.iterations):
        if i > 0:
            torch.ops.aten._softmax.out(scores, -1, False, out=q)
            msg = coarse_message(q.permute(0, 3, 1, 2), kernel, blur)
        if blur > 1:
            msg = msg.contiguous(memory_format=torch.channels_last)
            torch.ops.aten.upsample_bilinear2d.out(msg, up_size, False, blur, blur, out=up)
            msg = up[:, :, top : top + height, left : left + width]
        torch.add(scaled_unary, msg.permute(0, 2, 3, 1), alpha=w, out=scores)
    return scores.permute(0, 3, 1, 2)


def _needs_grad(*values) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(v, torch.Tensor) and v.requires_grad for v in values
    )


def _is_number(value) -> bool:
    return isinstance(value, (int, float))
