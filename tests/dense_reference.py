"""Plain single-process dense references for the divergence losses (float64, autograd gradients).

Written from the definitions in docs/design.md §2 with no knowledge of sharding, chunking or closed-form
gradients: full-vocabulary log-softmax, explicit supports, the textbook formulas.
"""

from __future__ import annotations

import torch


def generalized_jsd(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL's generalized JSD over the last dim of log-probabilities s (student), t (teacher).

    -inf is probability 0, and 0·log 0 = 0: entries with p = 0 add nothing to a sum (``kl_sum``).
    """
    p_s, p_t = s.exp(), t.exp()
    if beta == 0:
        return kl_sum(p_t, t, s)
    if beta == 1:
        return kl_sum(p_s, s, t)
    mixture = (1 - beta) * p_s + beta * p_t
    log_m = torch.where(mixture > 0, mixture, 1.0).log()  # mixture 0: p_s = p_t = 0, skipped below
    return beta * kl_sum(p_t, t, log_m) + (1 - beta) * kl_sum(p_s, s, log_m)


def kl_sum(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) over the last dim, skipping the entries where p = 0.

    Every operand is replaced by 0 where p = 0 before it is used, so the skipped entries pass no
    NaN into autograd (0 · ∞ in a product's backward) and get exactly 0 gradient; +inf where q = 0 < p.
    """
    kept = p > 0
    p, log_p, log_q = (torch.where(kept, x, 0.0) for x in (p, log_p, log_q))
    return (p * (log_p - log_q)).sum(-1)


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
            s = torch.log_softmax(student[pos] / tau, -1)  # -inf at a -inf logit, with a finite gradient
            s_support = torch.cat([s[ids], (1 - s[ids].exp().sum()).log().reshape(1)])
            t_tail = (1 - t_k.exp().sum()).log().reshape(1)
            t_support = torch.log_softmax(torch.cat([t_k, t_tail]) / tau, -1)
        else:
            if ids.numel() == 0:
                losses.append(student[pos][ids].sum())  # no entry: 0, still in the graph
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

