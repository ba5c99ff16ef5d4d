"""The window sum of ConvCRF message passing (step 4 of README's "The algorithm") and its two
adjoints.

All three loop over the ``k²`` window offsets and work on ``[N,C,h,w]`` planes, so the
``C·k²·h·w`` im2col buffer of the original implementation is never materialised.

Every tensor is floating point, one dtype throughout (float32 in the backends and the module,
float64 where the tests compare with the reference); results have the inputs' dtype and device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PRODUCT_BUDGET = 1 << 22
"""Most elements of the temporary product in :func:`window_products` (16 MB in float32)."""


def window_sum(q: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``Σ_{a,c} K[a,c]·Pad0(q)[:, x+a-s, y+c-s]`` for ``q [N,C,h,w]``, ``kernel [N,k,k,h,w]``.

    Returns a new ``[N,C,h,w]`` tensor. The mean field's hand-written backward uses
    :func:`window_sum_adjoint` and :func:`window_products` instead of autograd through the
    ``k²`` in-place products.
    """
    weights = kernel.unsqueeze(3).flatten(1, 2).unbind(1)  # k² × [N,1,h,w], row-major offsets
    shifted = [window for row in _windows(q, kernel.shape[1]).unbind(2) for window in row.unbind(2)]
    out = weights[0] * shifted[0]
    for weight, window in zip(weights[1:], shifted[1:], strict=True):
        out.addcmul_(weight, window)  # unbound views: cheaper to issue than indexing per offset
    return out


def window_sum_adjoint(grad: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The transpose of :func:`window_sum` in ``q``: ``dL/dq`` for ``grad = dL/d out``.

    Each offset's weighted ``grad [N,C,h,w]`` is added into the zero-padded grid at that
    offset, which is then cropped back to ``[N,C,h,w]``.
    """
    k = kernel.shape[1]
    s = k // 2
    n, classes, h, w = grad.shape
    padded = grad.new_zeros(n, classes, h + 2 * s, w + 2 * s)
    for a in range(k):
        for c in range(k):
            padded[:, :, a : a + h, c : c + w].addcmul_(kernel[:, a, c].unsqueeze(1), grad)
    return padded[:, :, s : s + h, s : s + w]


def window_products(grad: torch.Tensor, q: torch.Tensor, filter_size: int) -> torch.Tensor:
    """The transpose of :func:`window_sum` in the kernel: ``dL/dK [N,k,k,h,w]``, where
    ``dL/dK[a,c] = Σ_classes grad · Pad0(q)[:, x+a-s, y+c-s]`` for ``grad, q [N,C,h,w]``.

    Computed for a run of offsets of one window row at a time, as many as keep the product
    buffer (``N·C·run·h·w``) within :data:`PRODUCT_BUDGET` elements.
    """
    n, classes, h, w = q.shape
    k = filter_size
    out = grad.new_empty(n, k, k, h, w)
    windows = _windows(q, k)
    run = max(1, min(k, PRODUCT_BUDGET // max(1, n * classes * h * w)))
    product = grad.new_empty(n, classes, run, h, w)
    for a in range(k):
        for c0 in range(0, k, run):
            c1 = min(k, c0 + run)
            taken = product[:, :, : c1 - c0]
            torch.mul(grad.unsqueeze(2), windows[:, :, a, c0:c1], out=taken)
            torch.sum(taken, dim=1, out=out[:, a, c0:c1])
    return out


def _windows(q: torch.Tensor, filter_size: int) -> torch.Tensor:
    """The view ``[N,C,k,k,h,w]`` of ``q [N,C,h,w]`` whose ``[:, :, a, c]`` is
    ``Pad0(q)[:, :, a : a+h, c : c+w]``: every window offset's shifted copy, without copying."""
    s = filter_size // 2
    h, w = q.shape[-2:]
    return F.pad(q, (s, s, s, s)).unfold(2, h, 1).unfold(3, w, 1)
