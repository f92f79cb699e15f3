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

Zero probabilities: a log-probability may be -inf on either side (a masked or banned token, an
entry absent from a support). Every term whose weight is 0 contributes 0·log 0 = 0 to the loss and
exactly 0 to g: for β = 0 the entries with p_t = 0, for β = 1 those with p_s = 0, and in the mixture,
in each of its two sums, the entries where that sum's weight (p_t, resp. p_s) is 0 — m stays finite
there as long as one side is positive. A probability that rounds to 0 in float32 counts as 0.
Two divergences are genuinely infinite and come out as +inf (with a non-finite g for β = 1):
β = 0 when the student is -inf where the teacher has mass, β = 1 when the teacher is -inf where the
student has mass. For 0 < β < 1 the loss is finite whenever both rows are distributions.
NaN and +inf are not log-probabilities: a NaN input gives a NaN loss (never a finite one); the
callers turn logits into log-probabilities, where a NaN or +inf logit puts a NaN in the row.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch


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
        student_logp, teacher_logp: float32 ``[..., S]`` log-probabilities over one support, -inf
            for probability 0 (S may be a vocabulary shard: then the returned sums are partial sums).
        beta: interpolation in [0, 1].
    Returns:
        ``(loss [...], g [..., S])`` with ``loss = Σ_j ℓ_j`` and ``g_j = ∂loss/∂student_logp_j``.
    """
    s, t = student_logp, teacher_logp
    # The KLs drop the entries whose weight is exactly 0 (0·log 0 = 0) with masked_fill_ on ``== 0``:
    # a NaN weight is not 0 and still propagates. The mixture needs no mask (log_ratios_to_mixture_).
    if beta == 0.0:
        p_t = t.exp()
        loss = rowdot(p_t, (t - s).masked_fill_(p_t == 0, 0.0))
        return loss, p_t.neg_()
    p_s = s.exp()
    if beta == 1.0:
        log_ratio = (s - t).masked_fill_(p_s == 0, 0.0)
        loss = rowdot(p_s, log_ratio)
        return loss, log_ratio.add_(1.0).mul_(p_s)
    m_minus_s, t_minus_m = log_ratios_to_mixture_((t - s).nan_to_num_(), beta, torch.empty_like(s))
    student_term = m_minus_s.mul_(p_s)  # p_s (m − s)
    loss = rowdot(t.exp(), t_minus_m).mul_(beta).sub_(student_term.sum(-1), alpha=1.0 - beta)
    return loss, student_term.mul_(beta - 1.0)


def log_ratios_to_mixture_(
    d: torch.Tensor, beta: float, workspace: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(m − s, t − m) for m = log((1−β)e^s + βe^t), given d = t − s, without cancellation when s ≈ t.

    With w = β if d < 0 else 1 − β and l = log1p(w · expm1(−|d|)):
    m − s = max(d, 0) + l and t − m = min(d, 0) − l. Both are exactly 0 when s = t; expm1(−|d|)
    never overflows. w · expm1(−|d|) = (½ + (½ − β)·sign(d)) · expm1(−|d|): at d = 0 the weight does
    not matter.

    In place: t − m is written into ``d``; ``workspace`` (float32, d's shape) holds l. Returns
    (m − s, t − m).

    Zero probabilities: the caller takes d with NaN → 0 (both sides -inf, ``nan_to_num_``) and
    ±inf → ±float32 max (one side -inf). Then the ratio of a side with mass is exact (d = +max gives
    l = log β, d = −max gives l = log(1 − β)) and the ratio of a side at -inf is finite, so its 0
    weight zeroes its term (a ratio of ±inf would give 0·∞ = NaN). A NaN input still propagates,
    through its weight e^s or e^t.
    """
    log_weight = torch.abs(d, out=workspace).neg_().expm1_()
    if beta == 0.5:
        log_weight.mul_(0.5)
    else:
        log_weight.mul_(0.5).addcmul_(log_weight, torch.sign(d), value=1.0 - 2.0 * beta)
    log_weight.log1p_()
    m_minus_s = torch.clamp_min(d, 0.0).add_(log_weight)
    return m_minus_s, d.clamp_max_(0.0).sub_(log_weight)


@functools.cache
def fused_generalized_jsd_terms() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``generalized_jsd_terms`` compiled by ``torch.compile`` into fused kernels (built on first use).

    Same math, one pass over the support instead of ~17 elementwise ones. Compiling takes a few
    seconds per β branch and needs Inductor's back end: a C++ compiler on CPU, Triton on CUDA.
    """
    return torch.compile(generalized_jsd_terms, dynamic=True)


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
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
