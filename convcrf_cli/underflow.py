"""``exp`` kept off torch's slow path for results below the normal float32 range.

torch's vectorised ``exp`` on the CPU is about a hundred times slower on inputs whose result
lies below the normal float32 range (exponents below about −87.3, results denormal or 0): the
colour weights of distant neighbours, and the probabilities of hopeless classes in confident
logits. Such values are flushed to zero where the CPU backend computes anyway
(:mod:`convcrf_cli.denormals`). These functions clamp the exponents at :data:`EXP_CUTOFF` and
set what the cutoff gives to 0, so every other value is exactly ``exp``'s.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EXP_CUTOFF = -87.0
"""Exponents at or below which the functions here give 0: ``exp(-87) ≈ 1.6e-38``, just above
the smallest normal float32 (1.2e-38)."""
_CUTOFF_VALUE = math.exp(EXP_CUTOFF)


def exp_or_zero_(x: torch.Tensor) -> torch.Tensor:
    """``exp(x)``, but 0 where it is at most ``exp(EXP_CUTOFF)`` (any shape, floating dtype);
    ``x`` is overwritten (clamped and exponentiated in place; autograd allows it)."""
    return F.threshold(x.clamp_(min=EXP_CUTOFF).exp_(), _CUTOFF_VALUE, 0.0)


def exp_or_zero(x: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    """``exp(x)`` into ``out`` (same shape and dtype), 0 where it is at most
    ``exp(EXP_CUTOFF)``; returns ``out``. Not for tensors autograd records."""
    torch.clamp(x, min=EXP_CUTOFF, out=out).exp_()
    return F.threshold_(out, _CUTOFF_VALUE, 0.0)
