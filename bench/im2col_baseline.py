"""The original ConvCRF's im2col approach, written plainly for comparison.

NCHW tensors throughout; the message unfolds the pooled Q with ``torch.nn.functional.unfold``
into the full ``[N, C·k², h·w]`` buffer, multiplies it by the kernel and sums over the window,
as the original implementation does. Pooling, upsampling (``F.interpolate`` and a crop) and
softmax are plain tensor operations on full-resolution NCHW tensors; its output is checked
against the CPU backend's before it is timed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from convcrf_cli.grid import pool_padding
from convcrf_cli.meanfield import pool
from convcrf_cli.params import CRFParams


def unfold_window(x: torch.Tensor, k: int) -> torch.Tensor:
    """``[N,C,h,w]`` -> ``[N,C,k,k,h,w]``: every window of the zero-padded grid (im2col)."""
    n, c, h, w = x.shape
    return F.unfold(x, k, padding=k // 2).view(n, c, k, k, h, w)


def position_features(n: int, height: int, width: int, pos_sdims: float, like: torch.Tensor):
    """Positional features ``(row, col) / pos_sdims`` as ``[N,2,H,W]``, dtype/device of ``like``."""
    rows = torch.arange(height, dtype=like.dtype, device=like.device)
    cols = torch.arange(width, dtype=like.dtype, device=like.device)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))
    return (grid / pos_sdims).unsqueeze(0).expand(n, 2, height, width)


def upsample_crop(x: torch.Tensor, blur: int, height: int, width: int) -> torch.Tensor:
    """Bilinear ×``blur`` upsampling (half-pixel centres) of ``[N,C,h,w]``, cropped to H×W."""
    if blur == 1:
        return x
    up = F.interpolate(x, scale_factor=blur, mode="bilinear", align_corners=False)
    top, left = pool_padding(height, blur), pool_padding(width, blur)
    return up[:, :, top : top + height, left : left + width]


def gaussian_kernel(features: torch.Tensor, k: int) -> torch.Tensor:
    """``[N,F,h,w]`` -> ``[N,k,k,h,w]``, 0 outside the grid, through the unfolded features."""
    n, _, h, w = features.shape
    windows = unfold_window(features, k)
    dist2 = (windows - features[:, :, None, None]).square().sum(dim=1)
    inside = unfold_window(features.new_ones(1, 1, h, w), k)[:, 0]
    return torch.exp(-0.5 * dist2) * inside


def crf_kernel(image: torch.Tensor, params: CRFParams) -> torch.Tensor:
    """``image [N,F,H,W]`` -> the combined kernel ``[N,k,k,h,w]`` on the coarse grid."""
    n, _, height, width = image.shape
    k, b = params.filter_size, params.blur
    pos = pool(position_features(n, height, width, params.pos_sdims, image), b)
    col = pool(image / params.col_schan, b)
    return params.pos_compat * gaussian_kernel(pos, k) + params.col_compat * gaussian_kernel(col, k)


def mean_field(logits: torch.Tensor, kernel: torch.Tensor, params: CRFParams) -> torch.Tensor:
    """``logits [N,C,H,W]``, ``kernel [N,k,k,h,w]`` -> final Q ``[N,C,H,W]``; differentiable
    by autograd (which then keeps every iteration's unfolded buffer)."""
    height, width = logits.shape[-2:]
    k, b = params.filter_size, params.blur
    log_unary = torch.log_softmax(logits, dim=1)
    q = log_unary if params.init == "log" else torch.softmax(log_unary, dim=1)
    for i in range(params.iterations):
        windows = unfold_window(pool(q, b), k)  # the C·k²·h·w buffer
        summed = (windows * kernel[:, None]).sum(dim=(2, 3))
        msg = upsample_crop(summed, b, height, width)
        q = (params.unary_weight - params.weight) * log_unary + params.weight * msg
        if i < params.iterations - 1:
            q = torch.softmax(q, dim=1)
    return q


def refine(image: torch.Tensor, logits: torch.Tensor, params: CRFParams) -> torch.Tensor:
    """``image [N,F,H,W]``, ``logits [N,C,H,W]`` float32 -> final Q ``[N,C,H,W]``."""
    return mean_field(logits, crf_kernel(image, params), params)
