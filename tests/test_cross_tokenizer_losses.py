"""Specification: the cross-tokenizer losses on vocab-sharded logits equal a dense reference at TP = 1, 2, 4.

P-KL (``projected_kl``) and GOLD (``gold_loss``), for β ∈ {0, 0.5, 1}, τ ∈ {1, 2} and both tail modes:
the per-chunk loss and the gradient of the chunk mean with respect to the student logits match the
float64 reference of ``cross_tokenizer_reference.py`` within 1e-5 relative error (norm-wise). The
projection mixes one-hot (exact) rows, multi-token rows and unmapped rows; the student vocabulary is
padded (190 real ids in 256: at TP = 4 the last rank holds no real id); chunks span several student
positions and several teacher rows, some positions and rows belong to no chunk, and one teacher row
has only part of its K entries. Half of the cases use a 2-token chunk of rows.

A second batch gives the student -inf logits (probability 0): at some positions all of ids 128..189
(the whole real part of rank 1 at TP = 2 and of rank 2 at TP = 4) and the padding, at others a random
fifth of ids 0..127, never all sources of a teacher id in one chunk (the projected probability stays
positive). Loss and gradient match the reference, are finite, and the gradient at a -inf logit is 0.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

import cross_tokenizer_reference as reference
from dense_reference import rel_err
from megatron_mopd.crosstok.projection import ProjectionStats, VocabProjection
from megatron_mopd.demo.tokenizers import sentencepiece_bpe
from megatron_mopd.losses import gold_loss, projected_kl, topk_generalized_jsd
from megatron_mopd.testing import run_on_ranks

TP_SIZES = (1, 2, 4)
VOCAB_SIZE, PADDED_VOCAB, TEACHER_VOCAB, K = 190, 256, 150, 8
TOLERANCE = 1e-5


@dataclass(frozen=True)
class Case:
    loss: str  # "pkl" or "gold"
    beta: float
    temperature: float
    tail: str
    chunk_size: int | None = None
    weights: tuple[float, float] | None = None
    threshold: float = 0.6
    scale_tau2: bool = False
    batch: str = "finite"  # or "student_minus_inf"


def all_cases() -> list[Case]:
    grid = [
        Case(loss, beta, tau, tail, chunk_size=2 if i % 2 else None)
        for i, (loss, beta, tau, tail) in enumerate(
            itertools.product(("pkl", "gold"), (0.0, 0.5, 1.0), (1.0, 2.0), ("tail", "renorm"))
        )
    ]
    minus_inf = [
        Case(loss, beta, 2.0 if i % 3 else 1.0, tail, chunk_size=2 if i % 2 else None, batch="student_minus_inf")
        for i, (loss, beta, tail) in enumerate(
            itertools.product(("pkl", "gold"), (0.0, 0.5, 1.0), ("tail", "renorm"))
        )
    ]
    return grid + [
        Case("gold", 0.5, 1.0, "tail", weights=(0.7, 0.3), threshold=0.95),
        Case("pkl", 0.0, 2.0, "tail", scale_tau2=True),
    ] + minus_inf


def synthetic_projection(seed: int = 0) -> VocabProjection:
    """Rows 0-99 exact (one-hot), 100-169 split into 2-4 teacher pieces (β·γ^i), 170-189 unmapped."""
    gen = torch.Generator().manual_seed(seed)
    indices = torch.full((VOCAB_SIZE, 4), -1, dtype=torch.long)
    weights = torch.zeros((VOCAB_SIZE, 4))
    indices[:100, 0] = torch.randperm(TEACHER_VOCAB, generator=gen)[:100]
    weights[:100, 0] = 1.0
    for row in range(100, 170):
        pieces = torch.randperm(TEACHER_VOCAB, generator=gen)[: 2 + row % 3]
        raw = 0.9 * 0.1 ** torch.arange(len(pieces), dtype=torch.float32)
        indices[row, : len(pieces)] = pieces
        weights[row, : len(pieces)] = raw / raw.sum()
    exact = torch.zeros(VOCAB_SIZE, dtype=torch.bool)
    exact[:100] = True
    stats = ProjectionStats(exact=100, multi_token=70, reverse=0, special=0, unmapped=20)
    return VocabProjection(indices, weights, exact, TEACHER_VOCAB, {"synthetic": seed}, "student", "teacher", stats)


def dense_projection(projection: VocabProjection) -> torch.Tensor:
    dense = torch.zeros(projection.student_vocab_size, projection.teacher_vocab_size, dtype=torch.float64)
    for row, (ids, ws) in enumerate(zip(projection.indices.tolist(), projection.weights.tolist())):
        for teacher_id, weight in zip(ids, ws):
            if teacher_id >= 0:
                dense[row, teacher_id] += weight
    return dense


@dataclass
class Batch:
    student: torch.Tensor  # [B, T, PADDED_VOCAB]
    student_chunks: torch.Tensor  # [B, T]
    teacher_logprobs: torch.Tensor  # [B, Tt, K]
    teacher_ids: torch.Tensor  # [B, Tt, K]
    teacher_chunks: torch.Tensor  # [B, Tt]
    num_chunks: int


def make_batch(seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 7, PADDED_VOCAB, generator=gen) * 2.0
    # Chunk ids as align_batch gives them: contiguous runs, global over the batch, -1 off the chunks.
    student_chunks = torch.tensor([[0, 0, 1, 2, 2, 2, -1], [-1, 3, 4, 4, 5, -1, -1]])
    teacher_chunks = torch.tensor([[0, 1, 1, 1, 2, -1, -1, -1, -1], [3, 3, 4, 5, 5, 5, -1, -1, -1]])
    teacher_logp = torch.log_softmax(torch.randn(2, 9, TEACHER_VOCAB, generator=gen) * 2.5, dim=-1)
    logprobs, ids = teacher_logp.topk(K, dim=-1)
    logprobs[0, 2, K // 2 :] = -torch.inf  # a row with only part of its K entries
    return Batch(student, student_chunks, logprobs, ids, teacher_chunks, 6)


def make_student_minus_inf_batch(seed: int = 1) -> Batch:
    """``make_batch`` with -inf student logits, at most one position of a chunk -inf at any id."""
    batch = make_batch()
    student = batch.student.clone()
    for position in [(0, 0), (0, 3), (1, 2)]:  # chunks 0, 2 and 4, each with another position
        student[position][128:] = -torch.inf
    scattered = torch.rand(student.shape, generator=torch.Generator().manual_seed(seed)) < 0.2
    scattered[..., 128:] = False
    for position in [(0, 1), (0, 4), (1, 3)]:  # the same chunks' other positions
        student[position][scattered[position]] = -torch.inf
    batch.student = student
    return batch


def all_batches() -> dict[str, Batch]:
    return {"finite": make_batch(), "student_minus_inf": make_student_minus_inf_batch()}


def per_chunk_loss(batch: Batch, projection: VocabProjection, student: torch.Tensor, case: Case, group):
    common = dict(
        num_chunks=batch.num_chunks, beta=case.beta, temperature=case.temperature, tail=case.tail,
        vocab_size=VOCAB_SIZE, tp_group=group, chunk_size=case.chunk_size,
        scale_by_temperature_squared=case.scale_tau2,
    )
    args = (student, batch.student_chunks, batch.teacher_logprobs, batch.teacher_ids, batch.teacher_chunks, projection)
    if case.loss == "pkl":
        return projected_kl(*args, **common)
    weights = {} if case.weights is None else dict(matched_weight=case.weights[0], unmatched_weight=case.weights[1])
    return gold_loss(*args, common_threshold=case.threshold, **weights, **common)


def run_shard(batches: dict[str, Batch], cases: list[Case], rank: int, world_size: int, group) -> list[tuple]:
    projection = synthetic_projection()
    width = PADDED_VOCAB // world_size
    results = []
    for case in cases:
        batch = batches[case.batch]
        student = batch.student[..., rank * width : (rank + 1) * width].clone().requires_grad_(True)
        loss = per_chunk_loss(batch, projection, student, case, group)
        loss.mean().backward()
        results.append((loss.detach(), student.grad))
    return results


def _rank_worker(batches: dict[str, Batch], cases: list[Case]) -> list[tuple]:
    return run_shard(batches, cases, dist.get_rank(), dist.get_world_size(), dist.group.WORLD)


@functools.lru_cache(maxsize=None)
def results_at(tp: int):
    batches, cases = all_batches(), all_cases()
    if tp == 1:
        per_rank = [run_shard(batches, cases, 0, 1, None)]
    else:
        per_rank = run_on_ranks(_rank_worker, tp, args=(batches, cases))
    assembled = []
    for i in range(len(cases)):
        losses = [rank_results[i][0] for rank_results in per_rank]
        for other in losses[1:]:
            assert torch.equal(other, losses[0]), "every TP rank must compute the same loss"
        assembled.append((losses[0], torch.cat([r[i][1] for r in per_rank], dim=-1)))
    return batches, cases, assembled


def reference_loss(batch: Batch, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    projection = synthetic_projection()
    student = batch.student.double().requires_grad_(True)
    if case.loss == "pkl":
        allowed = set(torch.nonzero(projection.teacher_reachable()).flatten().tolist())
        teacher = reference.chunk_teacher(
            batch.teacher_logprobs, batch.teacher_ids, batch.teacher_chunks, batch.num_chunks,
            case.temperature, case.tail, K, allowed,
        )
        loss = reference.projected_kl(
            student, batch.student_chunks, dense_projection(projection), teacher, case.beta,
            case.temperature, case.tail, VOCAB_SIZE,
        )
    else:
        teacher = reference.chunk_teacher(
            batch.teacher_logprobs, batch.teacher_ids, batch.teacher_chunks, batch.num_chunks,
            case.temperature, case.tail, K,
        )
        student_ids, teacher_ids = projection.common_pairs(case.threshold)
        pairs = dict(zip(teacher_ids.tolist(), student_ids.tolist()))
        matched, unmatched = case.weights or (len(pairs) / TEACHER_VOCAB, 1 - len(pairs) / TEACHER_VOCAB)
        loss = reference.gold(
            student, batch.student_chunks, pairs, teacher, case.beta, case.temperature, case.tail,
            VOCAB_SIZE, matched, unmatched,
        )
    if case.scale_tau2:
        loss = loss * case.temperature**2
    loss.mean().backward()
    return loss.detach(), student.grad


def mismatches(tp: int, batch_name: str) -> list[str]:
    """The cases on ``batch_name`` that miss the reference, are not finite, or move a -inf logit."""
    batches, cases, results = results_at(tp)
    batch = batches[batch_name]
    failures = []
    for case, (loss, grad) in zip(cases, results):
        if case.batch != batch_name:
            continue
        expected_loss, expected_grad = reference_loss(batch, case)
        errors = (rel_err(loss, expected_loss), rel_err(grad, expected_grad))
        finite = bool(torch.isfinite(loss).all() and torch.isfinite(grad).all())
        zero_at_minus_inf = bool(torch.all(grad[batch.student == -torch.inf] == 0))
        if not (max(errors) <= TOLERANCE and finite and zero_at_minus_inf):
            failures.append(
                f"{case}: loss rel err {errors[0]:.2e}, grad rel err {errors[1]:.2e}, finite {finite}, "
                f"0 gradient at -inf {zero_at_minus_inf}"
            )
    return failures


@pytest.mark.parametrize("tp", TP_SIZES)
def test_losses_and_gradients_match_the_dense_reference(tp: int) -> None:
    failures = mismatches(tp, "finite")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("tp", TP_SIZES)
def test_student_minus_inf_logits_match_the_dense_reference(tp: int) -> None:
    failures = mismatches(tp, "student_minus_inf")
    assert not failures, "\n".join(failures)


def test_padding_and_positions_off_the_chunks_get_no_gradient() -> None:
    batches, cases, results = results_at(1)
    batch = batches["finite"]
    for _, grad in results:
        assert torch.all(grad[..., VOCAB_SIZE:] == 0)
        assert torch.all(grad[batch.student_chunks < 0] == 0)


def test_the_teacher_beta_is_used_and_losses_are_non_negative() -> None:
    _, cases, results = results_at(1)
    by_case = {case: loss for case, (loss, _) in zip(cases, results)}
    for case, loss in by_case.items():
        assert torch.all(loss >= -1e-6), case
    gold = [by_case[Case("gold", beta, 1.0, "tail")] for beta in (0.0, 0.5)]
    assert not torch.allclose(gold[0], gold[1])


@pytest.mark.parametrize("tail", ["tail", "renorm"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_identical_tokenizers_reduce_to_the_same_vocabulary_topk_jsd(tail: str, beta: float) -> None:
    """With the teacher's tokenizer equal to the student's, the projection built from them is the
    identity, every token is its own chunk, and P-KL and GOLD equal the plain top-K JSD."""
    tokenizer = sentencepiece_bpe()
    identity = VocabProjection.build(tokenizer, tokenizer)
    vocab = len(tokenizer)
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, vocab, generator=gen) * 2
    teacher_logprobs, teacher_ids = torch.log_softmax(torch.randn(2, 5, vocab, generator=gen) * 2, -1).topk(K, -1)
    chunks = torch.arange(10).view(2, 5)
    same_vocab = topk_generalized_jsd(logits, teacher_logprobs, teacher_ids, beta=beta, temperature=2.0, tail=tail)
    for loss_fn in (projected_kl, gold_loss):
        cross = loss_fn(logits, chunks, teacher_logprobs, teacher_ids, chunks, identity, beta=beta, temperature=2.0,
                        tail=tail)
        torch.testing.assert_close(cross, same_vocab.reshape(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_fn", [projected_kl, gold_loss])
def test_bf16_logits_use_float32_math_and_get_a_bf16_gradient(loss_fn) -> None:
    batch, projection = make_batch(), synthetic_projection()
    args = (batch.student_chunks, batch.teacher_logprobs, batch.teacher_ids, batch.teacher_chunks, projection)
    low = batch.student.bfloat16().requires_grad_(True)
    high = low.detach().float().requires_grad_(True)
    losses = [loss_fn(x, *args, vocab_size=VOCAB_SIZE, chunk_size=2) for x in (low, high)]
    for loss in losses:
        loss.mean().backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-7)
    assert low.grad.dtype == torch.bfloat16
    assert rel_err(low.grad.float(), high.grad) < 1e-2
