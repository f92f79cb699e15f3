"""The generalized Jensen-Shannon divergence on a support, with its closed-form gradient.

This is the one place the divergence math lives; every loss (full vocabulary, top-k with a tail
bucket, renormalized top-k, cross-tokenizer) builds the student and teacher log-probabilities over its
own support and calls ``generalized_jsd_terms``.

With S, T the student and teacher distributions over a support and β ∈ [0, 1] (TRL's convention):

    β = 0:  KL(T‖S) = Σ_j p_t (t − s)                               (forward KL)
    β = 1:  KL(S‖T) = Σ_j p_s (s − t)                               (reverse KL)
    else:   m = log((1−β)·p_s + β·p_t),  β·KL(T‖M) + (1−β)·KL(S‖M)  (mixture JSD)

where s, t are log-probabilities. Treating s as free, g_j = ∂loss/∂s_j is

    β = 0:  g = −p_t
    β = 1:  g = p_s (s − t + 1)
    else:   g = (1−β) · p_s (s − m)

(in the mixture case the terms through m cancel: ∂m/∂s = (1−β)p_s / M and β p_t + (1−β) p_s = M).
A caller turns g into logit gradients with the Jacobian of its own normalization; for a softmax
s = z/τ − logsumexp(z/τ) that is ∂loss/∂z = (g − p_s · Σ_j g_j) / τ.

Inputs must be finite: callers represent an entry that is absent on both sides by the same very
negative log-probability on both sides (``ABSENT_LOGPROB``), which contributes exactly 0.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch

# exp(ABSENT_LOGPROB) == 0 in float32 and float64, and ABSENT − ABSENT == 0: an entry set to this on
# both sides adds nothing to the loss or its gradient, without -inf arithmetic (which yields NaN).
ABSENT_LOGPROB = -1.0e4


def validate_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0: forward KL, 1: reverse KL), got {beta}")


def validate_temperature(temperature: float) -> None:
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def generalized_jsd_terms(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss summed over the support and its gradient with respect to the student log-probs.

    Args:
        student_logp, teacher_logp: float32 ``[..., S]`` finite log-probabilities over one support
            (S may be a vocabulary shard: then the returned sums are partial sums).
        beta: interpolation in [0, 1].
    Returns:
        ``(loss [...], g [..., S])`` with ``loss = Σ_j ℓ_j`` and ``g_j = ∂loss/∂student_logp_j``.
    """
    s, t = student_logp, teacher_logp
    if beta == 0.0:
        p_t = t.exp()
        loss = _rowdot(p_t, t - s)
        return loss, p_t.neg_()
    p_s = s.exp()
    if beta == 1.0:
        log_ratio = s - t
        loss = _rowdot(p_s, log_ratio)
        return loss, log_ratio.add_(1.0).mul_(p_s)
    m_minus_s, t_minus_m = _log_ratios_to_mixture(s, t, beta)
    student_term = m_minus_s.mul_(p_s)  # p_s (m − s)
    loss = _rowdot(t.exp(), t_minus_m).mul_(beta).sub_(student_term.sum(-1), alpha=1.0 - beta)
    return loss, student_term.mul_(beta - 1.0)


def _log_ratios_to_mixture(
    s: torch.Tensor, t: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(m − s, t − m) for m = log((1−β)e^s + βe^t), without cancellation when s ≈ t.

    With d = t − s and w = β if d < 0 else 1 − β:  m − s = max(d, 0) + log1p(w · expm1(−|d|))
    and t − m = d − (m − s). Both are exactly 0 when s = t; expm1(−|d|) never overflows.
    w · expm1(−|d|) = (½ + (½ − β)·sign(d)) · expm1(−|d|): at d = 0 the weight does not matter.
    """
    d = t - s
    weighted = d.abs().neg_().expm1_()
    weighted.mul_(0.5).addcmul_(weighted, torch.sign(d), value=1.0 - 2.0 * beta)
    m_minus_s = d.clamp_min(0.0).add_(weighted.log1p_())
    return m_minus_s, d.sub_(m_minus_s)


@functools.cache
def fused_generalized_jsd_terms() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``generalized_jsd_terms`` compiled by ``torch.compile`` into fused kernels (built on first use).

    Same math, one pass over the support instead of ~17 elementwise ones. Compiling takes a few
    seconds per β branch and needs Inductor's back end: a C++ compiler on CPU, Triton on CUDA.
    """
    return torch.compile(generalized_jsd_terms, dynamic=True)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ over the last dimension of a·b, without materializing the product."""
    return torch.linalg.vecdot(a, b)


class _SupportDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:  # type: ignore[override]
        loss, g = generalized_jsd_terms(student_logp, teacher_logp, beta)
        ctx.save_for_backward(g)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        (g,) = ctx.saved_tensors
        return g * grad_loss.unsqueeze(-1), None, None


def generalized_jsd_on_support(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float
) -> torch.Tensor:
    """Differentiable (in ``student_logp``) form of ``generalized_jsd_terms`` for small supports.

    For losses that build their supports from a few values per position (cross-tokenizer chunks):
    autograd carries the gradient back through however the caller built ``student_logp``.
    Returns float32 ``[...]``, the loss summed over the last dimension.
    """
    return _SupportDivergence.apply(student_logp, teacher_logp.detach(), beta)
