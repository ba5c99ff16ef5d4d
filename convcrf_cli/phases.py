"""Mean-field inference (steps 4–5 of README's "The algorithm") in the pooling-phase layout,
and its adjoint.

Full-resolution tensors are held as ``[b,b,N,C,h,w]``: pixel ``(x·b + i - p, y·b + j - q)`` at
``[i,j,:,:,x,y]`` (``p``, ``q`` the pooling paddings). Pooling is then a sum over the ``b²``
phase slices divided by the cell counts, and the bilinear upsampling of the message followed
by the crop is, per phase, a fixed blend of a cell and one neighbour along each axis. The
forward pass runs phase by phase on ``[N,C,h,w]`` slices small enough to stay in cache; with
``record=True`` it keeps what :func:`mean_field_backward` needs (the log-unary and every
step's probabilities at full resolution, the pooled Q and the messages on the coarse grid).

Every tensor is floating point, one dtype throughout (float32 in the backends and the module,
float64 where the tests compare with the reference); results have the inputs' dtype and device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from convcrf_cli.grid import coarse_size, pool_padding
from convcrf_cli.params import CRFParams
from convcrf_cli.underflow import exp_or_zero
from convcrf_cli.window import window_products, window_sum, window_sum_adjoint


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


def upsample_phases(blur: int) -> list[tuple[int, float]]:
    """Bilinear ×``blur`` weights per output phase ``i``: ``(step, t)`` such that the upsampled
    value is ``(1 - t)·m[x] + t·m[x + step]`` (half-pixel centres, source clamped at the edges)."""
    offsets = [(i + 0.5) / blur - 0.5 for i in range(blur)]
    return [(1 if d > 0 else -1, abs(d)) for d in offsets]


class PhaseLayout:
    """Geometry of the phase layout of an ``height × width`` image pooled by ``blur``.

    ``phases`` lists the non-empty phases as ``(i, j, (r0, r1, rs), (c0, c1, cs))``: phase
    ``(i, j)`` holds cells ``r0:r1, c0:c1``, whose pixels are rows ``rs::b``, columns ``cs::b``;
    ``empty_phases`` the ``(i, j)`` of the others (images shorter than the blur along an axis).
    ``counts [h,w]`` is the number of pixels pooled into each cell (dtype/device of ``like``).
    """

    def __init__(self, height: int, width: int, blur: int, like: torch.Tensor) -> None:
        self.blur = blur
        self.height, self.width = height, width
        self.h, self.w = coarse_size(height, blur), coarse_size(width, blur)
        rows, cols = phase_ranges(height, blur), phase_ranges(width, blur)
        self.phases = [
            (i, j, r, c)
            for i, r in enumerate(rows)
            for j, c in enumerate(cols)
            if r[1] > r[0] and c[1] > c[0]
        ]
        self.empty_phases = [
            (i, j)
            for i, r in enumerate(rows)
            for j, c in enumerate(cols)
            if not (r[1] > r[0] and c[1] > c[0])
        ]
        self.blends = upsample_phases(blur)
        self.counts = like.new_zeros(self.h, self.w)
        for _, _, (r0, r1, _), (c0, c1, _) in self.phases:
            self.counts[r0:r1, c0:c1] += 1

    def new_phases(self, n: int, classes: int, like: torch.Tensor) -> torch.Tensor:
        """Zeros ``[b,b,N,C,h,w]``."""
        return like.new_zeros(self.blur, self.blur, n, classes, self.h, self.w)

    def gather(self, full: torch.Tensor) -> torch.Tensor:
        """``[N,C,H,W]`` -> ``[b,b,N,C,h,w]``, zero in cells outside the image."""
        b = self.blur
        out = full.new_empty(b, b, *full.shape[:2], self.h, self.w)
        for i, j in self.empty_phases:
            out[i, j] = 0
        for i, j, (r0, r1, rs), (c0, c1, cs) in self.phases:
            phase = out[i, j]
            _zero_outside(phase, r0, r1, c0, c1)
            phase[:, :, r0:r1, c0:c1] = full[:, :, rs::b, cs::b]
        return out

    def scatter(self, phases: torch.Tensor) -> torch.Tensor:
        """``[b,b,N,C,h,w]`` -> ``[N,C,H,W]`` (the inverse of :meth:`gather`)."""
        b = self.blur
        out = phases.new_empty(*phases.shape[2:4], self.height, self.width)
        for i, j, (r0, r1, rs), (c0, c1, cs) in self.phases:
            out[:, :, rs::b, cs::b] = phases[i, j, :, :, r0:r1, c0:c1]
        return out

    def spread(self, coarse: torch.Tensor) -> torch.Tensor:
        """The adjoint of pooling's sum: ``[N,C,h,w]`` -> ``[b,b,N,C,h,w]`` holding each cell's
        value at every pixel pooled into it, zero elsewhere."""
        out = self.new_phases(*coarse.shape[:2], coarse)
        for i, j, (r0, r1, _), (c0, c1, _) in self.phases:
            out[i, j, :, :, r0:r1, c0:c1] = coarse[:, :, r0:r1, c0:c1]
        return out

    def blend_adjoint(self, phases: torch.Tensor) -> torch.Tensor:
        """The adjoint of the message upsampling: ``[b,b,N,C,h,w]`` -> ``[N,C,h,w]``.

        Undoes, in reverse, the column blend, the row blend and the edge replication of
        :func:`mean_field`'s upsampling (each blend tap's weight sends the gradient back to
        the cell it read; replicated border cells send theirs to the edge they copied).
        """
        h, w = self.h, self.w
        padded = phases.new_zeros(*phases.shape[2:4], h + 2, w + 2)
        rows = phases.new_empty(*phases.shape[2:4], h, w + 2)
        for i, (row_step, row_t) in enumerate(self.blends):
            rows.zero_()
            for j, (col_step, col_t) in enumerate(self.blends):
                rows[..., 1 : w + 1].add_(phases[i, j], alpha=1 - col_t)
                if col_t > 0:
                    rows[..., 1 + col_step : w + 1 + col_step].add_(phases[i, j], alpha=col_t)
            padded[:, :, 1 : h + 1].add_(rows, alpha=1 - row_t)
            if row_t > 0:
                padded[:, :, 1 + row_step : h + 1 + row_step].add_(rows, alpha=row_t)
        padded[:, :, 1] += padded[:, :, 0]
        padded[:, :, h] += padded[:, :, h + 1]
        padded[..., 1] += padded[..., 0]
        padded[..., w] += padded[..., w + 1]
        return padded[:, :, 1 : h + 1, 1 : w + 1]


@dataclass
class MeanFieldRecord:
    """What the forward pass keeps for :func:`mean_field_backward`."""

    layout: PhaseLayout
    log_unary: torch.Tensor
    """``L = log_softmax(logits)`` as ``[b,b,N,C,h,w]`` (``−log C`` in the cells outside the
    image, which are never pooled and get no gradient)."""
    probabilities: list[torch.Tensor] = field(default_factory=list)
    """``softmax`` of step ``i``'s scores, ``[b,b,N,C,h,w]``, for every step but the last."""
    pooled: list[torch.Tensor] = field(default_factory=list)
    """Each step's pooled Q ``[N,C,h,w]``."""
    messages: list[torch.Tensor] = field(default_factory=list)
    """Each step's window sum ``[N,C,h,w]``, before the compatibility transform."""
    transformed: list[torch.Tensor] = field(default_factory=list)
    """Each step's message after the compatibility transform (the same tensor without one)."""


def mean_field(
    logits: torch.Tensor,
    kernel: torch.Tensor,
    params: CRFParams,
    weight: float,
    compat_matrix: torch.Tensor | None = None,
    *,
    record: bool = False,
) -> tuple[torch.Tensor, MeanFieldRecord | None]:
    """Run ``params.iterations`` mean-field steps (step 5) without autograd.

    ``logits [N,C,H,W]``, ``kernel [N,k,k,h,w]``; ``compat_matrix [C,C]`` (optional) adds
    ``M·msg`` to every message (the "+C" transform, applied on the coarse grid, where it
    commutes with the upsampling). Returns the final Q ``[N,C,H,W]`` (contiguous) and, with
    ``record``, a :class:`MeanFieldRecord` (else None). Each step: message, ``(u - w)·L +
    w·msg``, softmax and its contribution to the pooled next Q, phase by phase, in a cache-sized
    scratch slice; the last step copies its scores from there into the result.
    """
    n, classes, height, width = logits.shape
    blur, w, u = params.blur, weight, params.unary_weight
    layout = PhaseLayout(height, width, blur, logits)
    h, wc = layout.h, layout.w
    pooled = logits.new_zeros(n, classes, h, wc)
    scratch, probabilities = torch.empty_like(pooled), torch.empty_like(pooled)
    record_ = MeanFieldRecord(layout, layout.new_phases(n, classes, logits)) if record else None

    def next_message() -> torch.Tensor:
        pooled.div_(layout.counts)
        msg = window_sum(pooled, kernel)
        transformed = msg if compat_matrix is None else add_compat(compat_matrix, msg)
        if record_ is not None:
            record_.pooled.append(pooled.clone())
            record_.messages.append(msg)
            record_.transformed.append(transformed)
        return transformed

    # (u - w)·log_softmax(unary) per phase; cells outside the image hold logits 0 (−log C
    # after the log-softmax) and are never pooled
    scaled_unary = layout.gather(logits)
    for i, j, (r0, r1, _), (c0, c1, _) in layout.phases:
        phase = scaled_unary[i, j]
        log_q = scratch if record_ is None else record_.log_unary[i, j]
        torch.ops.aten._log_softmax.out(phase, 1, False, out=log_q)
        torch.mul(log_q, u - w, out=phase)
        q = log_q if params.init == "log" else exp_or_zero(log_q, out=probabilities)
        pooled[:, :, r0:r1, c0:c1].add_(q[:, :, r0:r1, c0:c1])  # in place, no copy back
    msg = next_message()

    # views fixed for the whole run, so that each step only launches operations
    result = logits.new_empty(n, classes, height, width)
    padded = logits.new_empty(n, classes, h + 2, wc + 2)  # w·msg, edges replicated
    row_blends = []  # per row phase i: [N,C,h,w+2], the message blended along rows
    for step_, t in layout.blends:
        centre = padded[:, :, 1 : h + 1]
        blend = centre if t == 0 else torch.empty_like(centre)
        row_blends.append((blend, centre, padded[:, :, 1 + step_ : h + 1 + step_], t))
    steps = [
        (
            (i, j, slice(r0, r1), slice(c0, c1)),
            scaled_unary[i, j],
            row_blends[i][0][:, :, :, 1 : wc + 1],
            row_blends[i][0][:, :, :, 1 + layout.blends[j][0] : wc + 1 + layout.blends[j][0]],
            layout.blends[j][1],
            result[:, :, rs::blur, cs::blur],
        )
        for i, j, (r0, r1, rs), (c0, c1, cs) in layout.phases
    ]
    for step in range(params.iterations):
        last = step == params.iterations - 1
        torch.ops.aten.replication_pad2d.out(msg, [1, 1, 1, 1], out=padded).mul_(w)
        for blend, centre, neighbour, t in row_blends:
            if t > 0:
                torch.lerp(centre, neighbour, t, out=blend)
        kept = None if last or record_ is None else layout.new_phases(n, classes, logits)
        pooled.zero_()
        for (i, j, rows, cols), unary, centre, neighbour, t, target in steps:
            torch.add(unary, centre, alpha=1 - t, out=scratch)
            if t > 0:
                scratch.add_(neighbour, alpha=t)
            if last:
                target.copy_(scratch[:, :, rows, cols])
                continue
            q = probabilities if kept is None else kept[i, j]
            torch.ops.aten._softmax.out(scratch, 1, False, out=q)
            pooled[:, :, rows, cols].add_(q[:, :, rows, cols])
        if kept is not None:
            record_.probabilities.append(kept)
        if not last:
            msg = next_message()
    return result, record_


def mean_field_backward(
    record: MeanFieldRecord,
    grad: torch.Tensor,
    kernel: torch.Tensor,
    params: CRFParams,
    weight: float,
    compat_matrix: torch.Tensor | None,
    needs_logits: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of :func:`mean_field` from ``grad = dL/dQ [N,C,H,W]``.

    Returns ``(d logits [N,C,H,W] or None, d kernel [N,k,k,h,w], d weight (0-d),
    d compat_matrix [C,C] or None)``. Walks the steps backwards: the upsampling's adjoint
    gives the gradient of ``w·msg``, the window sum's two adjoints those of the pooled Q and
    of the kernel, pooling's adjoint spreads it back to full resolution, and the softmax's
    Jacobian (``q ⊙ (g - Σ_c q·g)``) carries it to the previous step's scores.
    """
    layout = record.layout
    u = params.unary_weight
    grad_scores = layout.gather(grad)
    grad_unary = torch.zeros_like(grad_scores)  # Σ over steps of d scores: d ((u - w)·L)
    grad_kernel = torch.zeros_like(kernel)
    grad_weight = grad.new_zeros(())
    grad_matrix = None if compat_matrix is None else torch.zeros_like(compat_matrix)
    unary_q = None  # softmax(logits), once the softmax init's adjoint has needed it
    for step in reversed(range(params.iterations)):
        grad_unary += grad_scores
        grad_scaled_msg = layout.blend_adjoint(grad_scores)  # d (w·msg)
        grad_msg, step_weight, step_matrix = message_adjoint(
            grad_scaled_msg, record.transformed[step], record.messages[step], weight, compat_matrix
        )
        grad_weight += step_weight
        if grad_matrix is not None:
            grad_matrix += step_matrix
        grad_kernel += window_products(grad_msg, record.pooled[step], kernel.shape[1])
        if step == 0 and not needs_logits:
            break
        grad_q = layout.spread(window_sum_adjoint(grad_msg, kernel).div_(layout.counts))
        if step > 0:
            grad_scores = _softmax_adjoint(record.probabilities[step - 1], grad_q)
        elif params.init == "log":
            grad_scores = grad_q
        else:
            unary_q = _unary_probabilities(record)
            grad_scores = _softmax_adjoint(unary_q, grad_q)
    grad_weight -= torch.sum(grad_unary * record.log_unary)
    grad_logits = None
    if needs_logits:
        grad_log_unary = grad_unary.mul_(u - weight).add_(grad_scores)
        total = grad_log_unary.sum(dim=3, keepdim=True)
        if unary_q is None:
            unary_q = _unary_probabilities(record)
        grad_log_unary -= unary_q * total  # log_softmax's Jacobian
        grad_logits = layout.scatter(grad_log_unary)
    return grad_logits, grad_kernel, grad_weight, grad_matrix


def _unary_probabilities(record: MeanFieldRecord) -> torch.Tensor:
    """``softmax(logits)`` as ``[b,b,N,C,h,w]``: the exp of the recorded log-unary."""
    return exp_or_zero(record.log_unary, out=torch.empty_like(record.log_unary))


def _softmax_adjoint(q: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``q ⊙ (grad - Σ_classes q·grad)`` for ``[b,b,N,C,h,w]`` (classes on dim 3)."""
    product = q * grad
    return product.sub_(q * product.sum(dim=3, keepdim=True))


def add_compat(matrix: torch.Tensor, msg: torch.Tensor) -> torch.Tensor:
    """``msg + M·msg`` at every cell, contiguous: ``[C,C]``, ``[N,C,h,w]`` -> ``[N,C,h,w]``
    (the "+C" compatibility transform)."""
    return (msg + torch.einsum("dc,nchw->ndhw", matrix, msg)).contiguous()


def message_adjoint(
    grad_scaled_msg: torch.Tensor,
    transformed: torch.Tensor,
    message: torch.Tensor,
    weight: float,
    compat_matrix: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One step's message term ``w·T(msg)`` (``T``: :func:`add_compat`, or none) backwards.

    From ``grad_scaled_msg = d (w·T(msg)) [N,C,h,w]`` (overwritten), the step's
    ``transformed = T(msg)`` and ``message = msg``: returns ``(d msg [N,C,h,w], the step's
    share of d w (0-d), its share of d M [C,C] or None)``.
    """
    grad_weight = torch.sum(grad_scaled_msg * transformed)
    grad_msg = grad_scaled_msg.mul_(weight)
    if compat_matrix is None:
        return grad_msg, grad_weight, None
    grad_matrix = torch.einsum("ndhw,nchw->dc", grad_msg, message)
    return add_compat(compat_matrix.t(), grad_msg), grad_weight, grad_matrix


def _zero_outside(phase: torch.Tensor, r0: int, r1: int, c0: int, c1: int) -> None:
    """Set the cells of ``phase [N,C,h,w]`` outside rows ``r0:r1`` and columns ``c0:c1`` to 0."""
    phase[:, :, :r0] = 0
    phase[:, :, r1:] = 0
    phase[:, :, :, :c0] = 0
    phase[:, :, :, c1:] = 0
