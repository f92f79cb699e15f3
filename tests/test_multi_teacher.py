"""Specification: several teachers — per-sample routing and static weights.

A teacher with the student's tokenizer is scored with the plain top-K JSD (no projection), a teacher
with another tokenizer with P-KL or GOLD on aligned chunks. Routed: each sample counts once, under
its own teacher; weighted: each teacher's mean, weighted.
"""

from __future__ import annotations

import pytest
import torch

from megatron_mopd.losses import (
    CrossTokenizerTeacher,
    GOLDLoss,
    ProjectedKLLoss,
    SameTokenizerTeacher,
    combine_teacher_losses,
    gold_loss,
    masked_sum_and_count,
    projected_kl,
    route_by_sample,
    teacher_losses,
    topk_generalized_jsd,
)
from test_cross_tokenizer_losses import VOCAB_SIZE, make_batch, synthetic_projection


def teachers(routed: bool):
    batch = make_batch()
    gen = torch.Generator().manual_seed(7)
    same_logprobs, same_ids = torch.log_softmax(torch.randn(2, 7, VOCAB_SIZE, generator=gen), -1).topk(4, -1)
    student_chunks, teacher_chunks, num_chunks = batch.student_chunks, batch.teacher_chunks, batch.num_chunks
    if routed:  # the cross-tokenizer teacher is aligned with sample 1 only (chunks 3-5, renumbered)
        student_chunks = torch.where(student_chunks >= 3, student_chunks - 3, -1)
        student_chunks[0] = -1
        teacher_chunks = torch.where(teacher_chunks >= 3, teacher_chunks - 3, -1)
        num_chunks = 3
    return batch, {
        "same": SameTokenizerTeacher(same_logprobs, same_ids, options=dict(beta=0.5)),
        "cross": CrossTokenizerTeacher(
            batch.teacher_logprobs, batch.teacher_ids, teacher_chunks, student_chunks, num_chunks,
            synthetic_projection(), loss="pkl",
        ),
    }


LABELS = torch.tensor([[5, 6, 7, 8, 9, 10, -100], [11, 12, 13, 14, 15, -100, -100]])


def test_routing_scores_each_sample_with_its_own_teacher_only() -> None:
    batch, inputs = teachers(routed=True)
    routes = route_by_sample(["same", "cross"], ["same", "cross"])
    logits = batch.student.clone().requires_grad_(True)
    per_teacher = teacher_losses(logits, LABELS, inputs, routes=routes, vocab_size=VOCAB_SIZE)

    same = inputs["same"]
    expected_same = masked_sum_and_count(
        topk_generalized_jsd(batch.student, same.topk_logprobs, same.topk_ids, beta=0.5, vocab_size=VOCAB_SIZE),
        LABELS, loss_mask=torch.tensor([[1] * 7, [0] * 7]),
    )
    cross = inputs["cross"]
    expected_cross = projected_kl(
        batch.student, cross.student_chunk_ids, cross.topk_logprobs, cross.topk_ids, cross.teacher_chunk_ids,
        cross.projection, num_chunks=3, vocab_size=VOCAB_SIZE,
    ).sum()
    torch.testing.assert_close(per_teacher["same"][0], expected_same[0])
    assert per_teacher["same"][1] == 6  # sample 0's labelled positions
    torch.testing.assert_close(per_teacher["cross"][0], expected_cross)
    assert per_teacher["cross"][1] == 3  # sample 1's chunks

    total = combine_teacher_losses(per_teacher)
    torch.testing.assert_close(total, (expected_same[0] + expected_cross) / 9)
    total.backward()
    assert logits.grad[0].abs().sum() > 0 and logits.grad[1].abs().sum() > 0


def test_static_weights_average_each_teachers_mean() -> None:
    batch, inputs = teachers(routed=False)
    per_teacher = teacher_losses(batch.student, LABELS, inputs, vocab_size=VOCAB_SIZE)
    weights = {"same": 0.25, "cross": 0.75}
    expected = sum(w * per_teacher[n][0] / per_teacher[n][1] for n, w in weights.items())
    torch.testing.assert_close(combine_teacher_losses(per_teacher, weights), expected)
    assert per_teacher["same"][1] == 11 and per_teacher["cross"][1] == 6


def test_routing_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"unknown teacher\(s\) \['math'\]"):
        route_by_sample(["same", "math"], ["same", "cross"])
    batch, inputs = teachers(routed=False)  # the cross teacher is aligned with both samples
    routes = route_by_sample(["same", "cross"], ["same", "cross"])
    with pytest.raises(ValueError, match="sample 0, which is routed to another teacher"):
        teacher_losses(batch.student, LABELS, inputs, routes=routes, vocab_size=VOCAB_SIZE)
    with pytest.raises(ValueError, match=r"no weight given for teacher\(s\) \['cross'\]"):
        combine_teacher_losses(teacher_losses(batch.student, LABELS, inputs, vocab_size=VOCAB_SIZE), {"same": 1.0})


def test_cross_tokenizer_modules_reduce_to_sum_and_chunk_count() -> None:
    batch = make_batch()
    args = (batch.student, batch.student_chunks, batch.teacher_logprobs, batch.teacher_ids, batch.teacher_chunks)
    projection = synthetic_projection()
    for module, loss_fn in ((ProjectedKLLoss(projection, vocab_size=VOCAB_SIZE), projected_kl),
                            (GOLDLoss(projection, beta=0.3, vocab_size=VOCAB_SIZE), gold_loss)):
        total, count = module(*args)
        options = dict(beta=0.3) if loss_fn is gold_loss else {}
        torch.testing.assert_close(total, loss_fn(*args, projection, vocab_size=VOCAB_SIZE, **options).sum())
        assert count == batch.num_chunks
