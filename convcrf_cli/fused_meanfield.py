"""The mean field of :func:`convcrf_cli.meanfield.mean_field` on the fused CUDA kernels.

Forward: ``convcrf_init``, then per iteration ``convcrf_window_sum`` (the message from the
module's kernel tensor, which carries the learned scales and colour transform) and
``convcrf_step`` or, last, ``convcrf_final`` — the inference kernels of
:mod:`convcrf_cli.backends.cuda`, so the full-resolution Q is never stored. The record for the
backward pass holds only coarse tensors: each step's pooled Q and messages. Backward, per step
from the last: ``convcrf_upsample_adjoint`` (the gradient of ``w·msg``),
``convcrf_window_products`` (of the kernel), ``convcrf_window_sum`` transposed (of the pooled
Q), then ``convcrf_softmax_adjoint``, which recomputes the step's Q from the logits and the
previous message, or, for the first Q, ``convcrf_unary_adjoint`` (of the logits). The kernels
are launched by :mod:`convcrf_cli.backends.cuda_autograd` and
:class:`~convcrf_cli.backends.cuda_plan.MeanFieldPlan`; the "+C" transform and the message
term's adjoint (the weight's and the matrix's gradients) between them are the torch operations
of :mod:`convcrf_cli.phases` (``add_compat``, ``message_adjoint``).

The functions work on contiguous float32 torch tensors of one device and take the ``launch``
callable of :func:`convcrf_cli.backends.cuda_plan.run_plan`, given the tensors themselves: CUDA
tensors through :func:`~convcrf_cli.backends.cuda_autograd.cuda_launcher`, CPU tensors through
the C++ shim in the tests. Same contract as :func:`convcrf_cli.phases.mean_field` and
:func:`convcrf_cli.phases.mean_field_backward`.
"""

from __future__ import annotations

import dataclasses

import torch

from convcrf_cli.backends import cuda_autograd
from convcrf_cli.backends.cuda_plan import Launch, LaunchConfig, MeanFieldPlan
from convcrf_cli.params import CRFParams
from convcrf_cli.phases import add_compat, message_adjoint


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
    ``class_block``: that of the module ``launch`` runs
    (:func:`~convcrf_cli.backends.cuda_autograd.class_block`); ``config``: the launch
    configuration (default :class:`LaunchConfig`)."""
    n, c, height, width = logits.shape
    plan = MeanFieldPlan.for_kernel(logits.shape, params, config or LaunchConfig(), class_block)
    record = FusedRecord(plan, logits.new_empty(n, height, width))
    pooled = logits.new_empty(n, c, plan.coarse_h, plan.coarse_w)
    plan.launch_init(launch, logits, record.lse, pooled)
    for step in range(params.iterations):
        msg = torch.empty_like(pooled)
        cuda_autograd.window_sum(plan, launch, kernel, pooled, msg, adjoint=False)
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
    grad_unary = grad.clone()  # Σ over steps of d scores; the kernels add each step's
    grad_scores = grad
    grad_kernel = torch.zeros_like(kernel)
    grad_weight = grad.new_zeros(())
    grad_matrix = None if compat_matrix is None else torch.zeros_like(compat_matrix)
    grad_logits = None
    coarse = record.pooled[0]
    for step in reversed(range(plan.params.iterations)):
        grad_scaled_msg = torch.empty_like(coarse)  # d (w·msg)
        cuda_autograd.upsample_adjoint(plan, launch, grad_scores, grad_scaled_msg)
        grad_msg, step_weight, step_matrix = message_adjoint(
            grad_scaled_msg, record.transformed[step], record.messages[step], weight, compat_matrix
        )
        grad_weight += step_weight
        if grad_matrix is not None:
            grad_matrix += step_matrix
        cuda_autograd.window_products(plan, launch, grad_msg, record.pooled[step], grad_kernel)
        if step == 0 and not needs_logits:
            break
        grad_pooled = torch.empty_like(coarse)
        cuda_autograd.window_sum(plan, launch, kernel, grad_msg, grad_pooled, adjoint=True)
        if step > 0:
            grad_scores = torch.empty_like(grad)
            cuda_autograd.softmax_adjoint(
                plan,
                launch,
                logits,
                record.lse,
                record.transformed[step - 1],
                grad_pooled,
                grad_scores,
                grad_unary,
                weight,
            )
        else:
            grad_logits = torch.empty_like(grad)
            cuda_autograd.unary_adjoint(
                plan, launch, logits, record.lse, grad_pooled, grad_unary, grad_logits, weight
            )
    log_unary = logits - record.lse.unsqueeze(1)
    grad_weight -= torch.sum(grad_unary * log_unary)
    return grad_logits, grad_kernel, grad_weight, grad_matrix
