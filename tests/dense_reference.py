"""Plain single-process dense references for the divergence losses (float64, autograd gradients).

Written from the definitions in DESIGN.md §2 with no knowledge of sharding, chunking or closed-form
gradients: full-vocabulary log-softmax, explicit supports, the textbook formulas.
"""

from __future__ import annotations

import torch


def generalized_jsd(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL's generalized JSD over the last dim of log-probabilities s (student), t (teacher)."""
    p_s, p_t = s.exp(), t.exp()
    if beta == 0:
        return (p_t * (t - s)).sum(-1)
    if beta == 1:
        return (p_s * (s - t)).sum(-1)
    mixture = (1 - beta) * p_s + beta * p_t
    log_m = mixture.log()
    return beta * (p_t * (t - log_m)).sum(-1) + (1 - beta) * (p_s * (s - log_m)).sum(-1)


def full_vocab_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, tau: float, vocab_size: int
) -> torch.Tensor:
    s = torch.log_softmax(student_logits[..., :vocab_size].double() / tau, -1)
    t = torch.log_softmax(teacher_logits[..., :vocab_size].double() / tau, -1)
    return generalized_jsd(s, t, beta)


def topk_jsd(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor,
    beta: float,
    tau: float,
    tail: str,
    vocab_size: int,
) -> torch.Tensor:
    """Per position: build the support (present teacher ids, plus the tail bucket), then the JSD."""
    student = student_logits[..., :vocab_size].double()
    teacher = teacher_logprobs.double()
    losses = []
    for pos in range(student.shape[0]):
        present = torch.isfinite(teacher[pos])
        ids = teacher_ids[pos][present]
        t_k = teacher[pos][present]
        if tail == "tail":
            p_s = torch.softmax(student[pos] / tau, -1)
            s_support = torch.cat([p_s[ids], (1 - p_s[ids].sum()).reshape(1)]).log()
            t_tail = (1 - t_k.exp().sum()).log().reshape(1)
            t_support = torch.log_softmax(torch.cat([t_k, t_tail]) / tau, -1)
        else:
            if ids.numel() == 0:
                losses.append(student.new_zeros(()) * student[pos].sum())
                continue
            s_support = torch.log_softmax(student[pos][ids] / tau, -1)
            t_support = torch.log_softmax(t_k / tau, -1)
        losses.append(generalized_jsd(s_support, t_support, beta))
    return torch.stack(losses)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / max(‖expected‖, 1e-3): norm-wise relative error, float64.

    The floor compares an (almost) exactly zero reference absolutely: with K = 1 and ``renorm``
    both sides are a point mass and the loss is 0 up to the rounding of log(1).
    """
    diff = (actual.double() - expected.double()).norm()
    return float(diff / expected.double().norm().clamp_min(1e-3))

