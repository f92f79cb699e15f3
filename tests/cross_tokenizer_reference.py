"""Plain single-process dense references for the cross-tokenizer losses (float64, autograd gradients).

Written from the definitions (docs/design.md §4, losses/cross_tokenizer.py docstring) with Python loops
and dense matrices: the full student softmax, the dense projection matrix W [V_student, V_teacher],
per-chunk dictionaries for the teacher. No sharding, chunking, sparse kernels or closed forms.
"""

from __future__ import annotations

import torch

from dense_reference import generalized_jsd


def chunk_teacher(
    logprobs: torch.Tensor,
    ids: torch.Tensor,
    chunk_ids: torch.Tensor,
    num_chunks: int,
    tau: float,
    tail: str,
    keep: int,
    allowed: set[int] | None = None,
) -> list[tuple[dict[int, float], float]]:
    """Per chunk: ({teacher id: probability} of the kept ids, tail mass)."""
    logprobs, ids = logprobs.reshape(-1, logprobs.shape[-1]).double(), ids.reshape(-1, ids.shape[-1])
    chunk_ids = chunk_ids.reshape(-1)
    chunks = []
    for c in range(num_chunks):
        rows = [r for r in range(len(chunk_ids)) if int(chunk_ids[r]) == c]
        mixture: dict[int, float] = {}
        for r in rows:
            present = torch.isfinite(logprobs[r])
            t = logprobs[r][present]
            if tail == "tail":
                support = torch.cat([t, (1 - t.exp().sum()).log().reshape(1)])
                probs = torch.softmax(support / tau, -1)[:-1]
            else:
                probs = torch.softmax(t / tau, -1)
            for token, prob in zip(ids[r][present].tolist(), probs.tolist()):
                if allowed is None or token in allowed:
                    mixture[token] = mixture.get(token, 0.0) + prob / len(rows)
        kept = dict(sorted(mixture.items(), key=lambda item: (-item[1], item[0]))[:keep])
        if tail == "renorm":
            total = sum(kept.values())
            kept = {token: prob / total for token, prob in kept.items()}
            chunks.append((kept, 0.0))
        else:
            chunks.append((kept, 1.0 - sum(kept.values())))
    return chunks


def _divergence(student: torch.Tensor, teacher: list[float], teacher_tail: float, beta: float, tail: str):
    """JSD(β) between student probabilities [n] (differentiable) and the teacher's, on the support."""
    t = torch.tensor(teacher, dtype=torch.float64)
    if tail == "tail":
        s = torch.cat([student, (1 - student.sum()).reshape(1)])
        t = torch.cat([t, torch.tensor([teacher_tail], dtype=torch.float64)])
    else:
        s = student / student.sum()
    return generalized_jsd(s.log(), t.log(), beta)


def projected_kl(
    student_logits: torch.Tensor,
    student_chunks: torch.Tensor,
    projection_dense: torch.Tensor,
    teacher: list[tuple[dict[int, float], float]],
    beta: float,
    tau: float,
    tail: str,
    vocab_size: int,
) -> torch.Tensor:
    """[C]: P-KL per chunk; ``projection_dense`` is W [vocab_size, V_teacher]."""
    p = torch.softmax(student_logits.reshape(-1, student_logits.shape[-1])[:, :vocab_size] / tau, -1)
    projected = p @ projection_dense.double()
    chunks = student_chunks.reshape(-1)
    losses = []
    for c, (kept, teacher_tail) in enumerate(teacher):
        mean = projected[chunks == c].mean(0)
        ids = list(kept)
        if not ids and tail == "renorm":
            losses.append(mean.sum() * 0.0)
            continue
        losses.append(_divergence(mean[ids], [kept[i] for i in ids], teacher_tail, beta, tail))
    return torch.stack(losses)


def gold(
    student_logits: torch.Tensor,
    student_chunks: torch.Tensor,
    common_pairs: dict[int, int],
    teacher: list[tuple[dict[int, float], float]],
    beta: float,
    tau: float,
    tail: str,
    vocab_size: int,
    matched_weight: float,
    unmatched_weight: float,
) -> torch.Tensor:
    """[C]: GOLD per chunk; ``common_pairs`` maps teacher id -> its common student id."""
    p = torch.softmax(student_logits.reshape(-1, student_logits.shape[-1])[:, :vocab_size] / tau, -1)
    chunks = student_chunks.reshape(-1)
    common_students = set(common_pairs.values())
    rest_ids = [v for v in range(vocab_size) if v not in common_students]
    losses = []
    for c, (kept, _) in enumerate(teacher):
        mean = p[chunks == c].mean(0)
        matched = [j for j in kept if j in common_pairs]
        teacher_matched = [kept[j] for j in matched]
        if tail == "renorm":
            total = sum(teacher_matched)
            teacher_matched = [t / total for t in teacher_matched]
        if matched:
            student = mean[[common_pairs[j] for j in matched]]
            matched_loss = _divergence(student, teacher_matched, 1.0 - sum(teacher_matched), beta, tail)
        else:
            matched_loss = mean.sum() * 0.0
        teacher_rest = sorted((prob for j, prob in kept.items() if j not in common_pairs), reverse=True)
        student_rest = mean[rest_ids].sort(descending=True).values[: len(teacher_rest)]
        n = min(len(teacher_rest), student_rest.numel())
        unmatched_loss = (student_rest[:n] - torch.tensor(teacher_rest[:n], dtype=torch.float64)).abs().sum()
        losses.append(matched_weight * matched_loss + unmatched_weight * unmatched_loss)
    return torch.stack(losses)
