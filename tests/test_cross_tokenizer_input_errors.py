"""Specification: bad input to the cross-tokenizer losses fails with a message naming the cause and fix.

Never a NaN, a silent −inf fill or a silently dropped chunk: a projection built for another student
vocabulary, teacher ids outside the teacher vocabulary, non-finite teacher log-probabilities, chunk
ids that leave a chunk without a student position or a teacher row, and inconsistent options.
"""

from __future__ import annotations

import pytest
import torch

from megatron_mopd.losses import gold_loss, projected_kl
from test_cross_tokenizer_losses import PADDED_VOCAB, TEACHER_VOCAB, VOCAB_SIZE, make_batch, synthetic_projection


def call(loss_fn=projected_kl, **overrides):
    batch = make_batch()
    args = dict(
        student_logits=batch.student,
        student_chunk_ids=batch.student_chunks,
        teacher_topk_logprobs=batch.teacher_logprobs,
        teacher_topk_ids=batch.teacher_ids,
        teacher_chunk_ids=batch.teacher_chunks,
        projection=synthetic_projection(),
        vocab_size=VOCAB_SIZE,
    )
    args.update(overrides)
    return loss_fn(
        args.pop("student_logits"), args.pop("student_chunk_ids"), args.pop("teacher_topk_logprobs"),
        args.pop("teacher_topk_ids"), args.pop("teacher_chunk_ids"), args.pop("projection"), **args,
    )


@pytest.mark.parametrize("loss_fn", [projected_kl, gold_loss])
def test_well_formed_input_gives_finite_losses(loss_fn) -> None:
    loss = call(loss_fn)
    assert loss.shape == (6,) and torch.isfinite(loss).all()


def test_projection_for_a_larger_student_vocabulary_is_refused() -> None:
    with pytest.raises(ValueError, match="built for another student tokenizer.*mopd build-projection"):
        call(vocab_size=VOCAB_SIZE - 10)


def test_teacher_ids_outside_the_teacher_vocabulary_are_refused() -> None:
    ids = make_batch().teacher_ids.clone()
    ids[1, 2, 0] = TEACHER_VOCAB
    with pytest.raises(ValueError, match=r"outside the teacher vocabulary \[0, 150\)"):
        call(teacher_topk_ids=ids)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_teacher_logprobs_are_refused(bad: float) -> None:
    logprobs = make_batch().teacher_logprobs.clone()
    logprobs[0, 1, 3] = bad
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        call(gold_loss, teacher_topk_logprobs=logprobs)


def test_a_chunk_without_teacher_rows_is_refused() -> None:
    chunks = make_batch().teacher_chunks.clone()
    chunks[chunks == 4] = -1  # the teacher's scores miss the rows of chunk 4
    with pytest.raises(ValueError, match="chunk 4 has no teacher row"):
        call(teacher_chunk_ids=chunks)


def test_a_chunk_without_student_positions_is_refused() -> None:
    chunks = make_batch().student_chunks.clone()
    chunks[chunks == 1] = -1
    with pytest.raises(ValueError, match="chunk 1 has no student position"):
        call(student_chunk_ids=chunks)


def test_chunk_ids_beyond_num_chunks_are_refused() -> None:
    with pytest.raises(ValueError, match="chunk id 5 >= num_chunks=5"):
        call(num_chunks=5)


def test_student_chunk_ids_must_match_the_logits_positions() -> None:
    with pytest.raises(ValueError, match="leading shape"):
        call(student_chunk_ids=make_batch().student_chunks[:, :-1])
    with pytest.raises(ValueError, match="integer tensor"):
        call(student_chunk_ids=make_batch().student_chunks.float())


def test_teacher_rows_must_match_their_chunk_ids() -> None:
    with pytest.raises(ValueError, match="leading shape"):
        call(teacher_chunk_ids=make_batch().teacher_chunks[:, :-1])


def test_gold_weights_come_in_pairs_and_threshold_is_a_probability() -> None:
    with pytest.raises(ValueError, match="given together"):
        call(gold_loss, matched_weight=0.5)
    with pytest.raises(ValueError, match="common_threshold"):
        call(gold_loss, common_threshold=1.5)


def test_bad_divergence_options_are_refused() -> None:
    with pytest.raises(ValueError, match="beta"):
        call(beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=0.0)
    with pytest.raises(ValueError, match="tail"):
        call(tail="none")


def test_logits_of_another_padded_vocabulary_are_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        call(student_logits=make_batch().student[..., : PADDED_VOCAB // 2])
