"""Specification: the vocab-parallel losses equal a plain dense reference at TP = 1, 2 and 4.

For every β ∈ {0, 0.1, 0.5, 0.9, 1}, τ ∈ {0.5, 1, 2}, and for the top-k loss every K ∈ {1, 8, 64} and
both tail modes, the per-position loss and the gradient of the masked token-mean with respect to the
student logits match the dense float64 reference of ``dense_reference.py`` within 1e-5 relative error
(norm-wise). The batch has positions masked with label -100, a padded vocabulary (190 real ids in 256,
so at TP = 4 the last rank holds no real id), teacher rows with absent (-inf) entries and a masked row
with no teacher entry at all. Half of the cases use a 4-token chunk so the chunked path is covered.
Three full-vocabulary cases use the torch.compile-fused core.

-inf logits are tokens of probability 0 (0·log 0 = 0). Four more batches put -inf in the student, the
teacher, both at the same ids, or the student at the teacher's top-k ids; each also has a position
whose ids 128..189 are all -inf (the whole real part of rank 1 at TP = 2 and of rank 2 at TP = 4) and
-inf padding. They run for every β whose divergence is finite on them (β = 0 needs no student -inf
where the teacher has mass, β = 1 no teacher -inf where the student has mass): loss and gradient
match the reference, everything is finite, and the gradient at a student -inf logit is exactly 0.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.distributed as dist

import dense_reference as dense
from megatron_mopd.losses import generalized_jsd, masked_sum_and_count, topk_generalized_jsd
from megatron_mopd.testing import run_on_ranks

TP_SIZES = (1, 2, 4)
VOCAB_SIZE, PADDED_VOCAB = 190, 256
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
TEMPERATURES = (0.5, 1.0, 2.0)
TOPK_SIZES = (1, 8, 64)
TAIL_MODES = ("tail", "renorm")
TOLERANCE = 1e-5


@dataclass(frozen=True)
class Case:
    loss: str  # "full" or "topk"
    beta: float
    temperature: float
    k: int = 0
    tail: str = ""
    chunk_size: Optional[int] = None
    fused: bool = False
    batch: str = "finite"  # a key of all_batches()


# Batches with -inf logits -> (the β whose divergence is finite on them, the top-k tail modes run).
# "student_at_teacher_ids" puts a student -inf at the teacher's top-1 id, where the renormalized
# student over K = 1 ids does not exist: it runs in tail mode only.
MASKED_BATCHES: dict[str, tuple[tuple[float, ...], tuple[str, ...]]] = {
    "student": ((0.1, 0.5, 0.9, 1.0), TAIL_MODES),
    "teacher": ((0.0, 0.1, 0.5, 0.9), TAIL_MODES),
    "both": ((0.0, 0.1, 0.5, 0.9, 1.0), TAIL_MODES),
    "student_at_teacher_ids": ((0.1, 0.5, 0.9), ("tail",)),
}


def all_cases() -> list[Case]:
    full = [Case("full", b, t) for b, t in itertools.product(BETAS, TEMPERATURES)]
    topk = [
        Case("topk", b, t, k, tail)
        for b, t, k, tail in itertools.product(BETAS, TEMPERATURES, TOPK_SIZES, TAIL_MODES)
    ]
    fused = [Case("full", b, 2.0, fused=True) for b in (0.0, 0.5, 1.0)]
    masked = [
        case
        for name, (betas, tails) in MASKED_BATCHES.items()
        for i, beta in enumerate(betas)
        for case in [Case("full", beta, TEMPERATURES[i % 3], batch=name)]
        + [Case("topk", beta, TEMPERATURES[(i + j) % 3], k, tail, batch=name)
           for j, (k, tail) in enumerate(itertools.product(TOPK_SIZES, tails))]
    ]
    masked_fused = [Case("full", 0.5, 2.0, fused=True, batch="both")]
    cases = full + topk + fused + masked + masked_fused
    return [Case(**{**c.__dict__, "chunk_size": 4 if i % 2 else None}) for i, c in enumerate(cases)]


@dataclass
class Batch:
    student: torch.Tensor  # [seq, batch, PADDED_VOCAB] float32
    teacher: torch.Tensor  # [seq, batch, PADDED_VOCAB] float32
    labels: torch.Tensor  # [seq, batch], -100 where masked
    topk: dict[int, tuple[torch.Tensor, torch.Tensor]]  # K -> (logprobs, ids), [seq, batch, K]


def make_batch(seq: int = 6, batch: int = 2, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(seq, batch, PADDED_VOCAB, generator=gen) * 2.0
    teacher = torch.randn(seq, batch, PADDED_VOCAB, generator=gen) * 2.0
    labels = torch.randint(0, VOCAB_SIZE, (seq, batch), generator=gen)
    labels[0, 1] = labels[3, 0] = -100
    return with_teacher_topk(student, teacher, labels)


def with_teacher_topk(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> Batch:
    """The batch, with the teacher's top-K of every K taken from ``teacher``."""
    teacher_logp = torch.log_softmax(teacher[..., :VOCAB_SIZE], dim=-1)
    topk = {}
    for k in TOPK_SIZES:
        logprobs, ids = teacher_logp.topk(k, dim=-1)
        if k > 1:
            logprobs[1, 0, k // 2 :] = -torch.inf  # a position with only part of its K entries
        logprobs[3, 0, :] = -torch.inf  # a masked position with no teacher entry at all
        ids[3, 0, :] = 0
        topk[k] = (logprobs, ids)
    return Batch(student, teacher, labels, topk)


RANK_BLOCK = slice(128, VOCAB_SIZE)  # the real ids of rank 1 at TP = 2 (of rank 2 at TP = 4)
BLOCK_POSITION = (1, 1)  # a position whose ids in RANK_BLOCK are all -inf


def make_masked_batch(kind: str, seed: int = 1) -> Batch:
    """The finite batch with -inf logits placed as ``kind`` (a key of MASKED_BATCHES) says.

    A random ~20% of the real ids of every position, all of RANK_BLOCK at BLOCK_POSITION and all
    padding go to -inf: in the student ("student"), the teacher ("teacher"), or both at the same ids
    ("both"). The student is never -inf at the teacher's most probable id, so a renormalized top-K
    student always has mass. "student_at_teacher_ids": the student is -inf at the teacher's top-1
    id on batch row 0, at its top-2 id on row 1, and the teacher -inf at other random ids.
    """
    base = make_batch()
    gen = torch.Generator().manual_seed(seed)
    masked = torch.rand(base.student.shape, generator=gen) < 0.2
    masked[BLOCK_POSITION][RANK_BLOCK] = True
    masked[..., VOCAB_SIZE:] = True
    teacher_top = base.teacher[..., :VOCAB_SIZE].topk(2, dim=-1).indices
    assert teacher_top[BLOCK_POSITION][0] < RANK_BLOCK.start, "the block must leave the teacher's mode"
    student, teacher = base.student.clone(), base.teacher.clone()
    if kind == "student_at_teacher_ids":
        teacher[masked] = -torch.inf
        teacher_top = teacher[..., :VOCAB_SIZE].topk(2, dim=-1).indices
        student[:, 0].scatter_(-1, teacher_top[:, 0, :1], -torch.inf)
        student[:, 1].scatter_(-1, teacher_top[:, 1, 1:], -torch.inf)
        return with_teacher_topk(student, teacher, base.labels)
    masked.scatter_(-1, teacher_top[..., :1], False)
    if kind in ("student", "both"):
        student[masked] = -torch.inf
    if kind in ("teacher", "both"):
        teacher[masked] = -torch.inf
    return with_teacher_topk(student, teacher, base.labels)


def all_batches() -> dict[str, Batch]:
    return {"finite": make_batch(), **{kind: make_masked_batch(kind) for kind in MASKED_BATCHES}}


def per_token_loss(batch: Batch, student_shard: torch.Tensor, teacher_shard: torch.Tensor, case: Case, group):
    common = dict(beta=case.beta, temperature=case.temperature, vocab_size=VOCAB_SIZE, tp_group=group)
    if case.loss == "full":
        return generalized_jsd(
            student_shard, teacher_shard, chunk_size=case.chunk_size, fused=case.fused, **common
        )
    logprobs, ids = batch.topk[case.k]
    return topk_generalized_jsd(
        student_shard, logprobs, ids, tail=case.tail, chunk_size=case.chunk_size, **common
    )


def run_shard(batches: dict[str, Batch], cases: list[Case], rank: int, world_size: int, group) -> list[tuple]:
    """This rank's (per-token loss, gradient of the masked mean w.r.t. its logits shard) per case."""
    width = PADDED_VOCAB // world_size
    columns = slice(rank * width, (rank + 1) * width)
    results = []
    for case in cases:
        batch = batches[case.batch]
        student = batch.student[..., columns].clone().requires_grad_(True)
        loss = per_token_loss(batch, student, batch.teacher[..., columns], case, group)
        total, count = masked_sum_and_count(loss, batch.labels)
        (total / count).backward()
        results.append((loss.detach(), student.grad))
    return results


def _rank_worker(batches: dict[str, Batch], cases: list[Case]) -> list[tuple]:
    return run_shard(batches, cases, dist.get_rank(), dist.get_world_size(), dist.group.WORLD)


@functools.lru_cache(maxsize=None)
def results_at(tp: int) -> tuple[dict[str, Batch], list[Case], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per case: (loss, full-vocabulary gradient assembled from the TP shards); one launch per TP."""
    batches, cases = all_batches(), all_cases()
    if tp == 1:  # in-process, without any process group
        per_rank = [run_shard(batches, cases, 0, 1, None)]
    else:
        per_rank = run_on_ranks(_rank_worker, tp, args=(batches, cases))
    assembled = []
    for i in range(len(cases)):
        losses = [rank_results[i][0] for rank_results in per_rank]
        for other in losses[1:]:
            assert torch.equal(other, losses[0]), "every TP rank must compute the same loss"
        grad = torch.cat([rank_results[i][1] for rank_results in per_rank], dim=-1)
        assembled.append((losses[0], grad))
    return batches, cases, assembled


def reference(batch: Batch, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    student = batch.student.double().requires_grad_(True)
    flat_student = student.reshape(-1, PADDED_VOCAB)
    if case.loss == "full":
        loss = dense.full_vocab_jsd(
            flat_student, batch.teacher.reshape(-1, PADDED_VOCAB), case.beta, case.temperature, VOCAB_SIZE
        )
    else:
        logprobs, ids = batch.topk[case.k]
        loss = dense.topk_jsd(
            flat_student,
            logprobs.reshape(-1, case.k),
            ids.reshape(-1, case.k),
            case.beta,
            case.temperature,
            case.tail,
            VOCAB_SIZE,
        )
    loss = loss.view(batch.labels.shape)
    kept = batch.labels != -100
    loss[kept].mean().backward()
    return loss.detach(), student.grad


def mismatches(tp: int, kind: str, with_minus_inf: bool) -> list[str]:
    """The ``kind`` cases on the finite batch (``with_minus_inf`` False) or on the -inf batches that
    miss the reference, give a non-finite loss or gradient, or a gradient at a student -inf logit."""
    batches, cases, results = results_at(tp)
    failures = []
    for case, (loss, grad) in zip(cases, results):
        if case.loss != kind or (case.batch != "finite") != with_minus_inf:
            continue
        batch = batches[case.batch]
        ref_loss, ref_grad = reference(batch, case)
        kept = batch.labels != -100
        loss_err = dense.rel_err(loss[kept], ref_loss[kept])
        grad_err = dense.rel_err(grad, ref_grad)
        finite = bool(torch.isfinite(loss).all() and torch.isfinite(grad).all())
        zero_at_minus_inf = bool(torch.all(grad[batch.student == -torch.inf] == 0))
        if not (loss_err <= TOLERANCE and grad_err <= TOLERANCE and finite and zero_at_minus_inf):
            failures.append(
                f"{case}: loss rel err {loss_err:.2e}, grad rel err {grad_err:.2e}, finite {finite}, "
                f"0 gradient at student -inf {zero_at_minus_inf}"
            )
    return failures


@pytest.mark.parametrize("tp", TP_SIZES)
def test_full_vocab_jsd_equals_dense_reference(tp: int) -> None:
    assert mismatches(tp, "full", with_minus_inf=False) == []


@pytest.mark.parametrize("tp", TP_SIZES)
def test_topk_jsd_equals_dense_reference(tp: int) -> None:
    assert mismatches(tp, "topk", with_minus_inf=False) == []


@pytest.mark.parametrize("tp", TP_SIZES)
def test_full_vocab_jsd_with_minus_inf_logits_equals_dense_reference(tp: int) -> None:
    assert mismatches(tp, "full", with_minus_inf=True) == []


@pytest.mark.parametrize("tp", TP_SIZES)
def test_topk_jsd_with_minus_inf_logits_equals_dense_reference(tp: int) -> None:
    assert mismatches(tp, "topk", with_minus_inf=True) == []


def test_minus_inf_batches_cover_what_they_claim() -> None:
    """Each -inf batch has -inf where its docstring says, and only on the side it names."""
    batches = all_batches()
    for kind in ("student", "teacher", "both"):
        batch = batches[kind]
        student_inf, teacher_inf = (x[..., :VOCAB_SIZE] == -torch.inf for x in (batch.student, batch.teacher))
        assert student_inf.any() == (kind != "teacher") and teacher_inf.any() == (kind != "student")
        side = batch.teacher if kind == "teacher" else batch.student
        assert torch.all(side[BLOCK_POSITION][RANK_BLOCK] == -torch.inf)
        assert torch.all(side[..., VOCAB_SIZE:] == -torch.inf)
        if kind == "both":
            assert torch.equal(student_inf, teacher_inf)
    at_ids = batches["student_at_teacher_ids"]
    for k in TOPK_SIZES:
        logprobs, ids = at_ids.topk[k]
        student_at_ids = at_ids.student.gather(-1, ids)[torch.isfinite(logprobs)]
        assert (student_at_ids == -torch.inf).any()


def test_issue_reproduction_teacher_minus_inf_logit() -> None:
    """A teacher -inf logit (β < 1) gave NaN; the loss is the float64 reference's finite value."""
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(1, 8, generator=gen)
    teacher[0, 3] = -torch.inf
    student = torch.randn(1, 8, generator=gen)
    loss = generalized_jsd(student, teacher, beta=0.5)
    expected = dense.full_vocab_jsd(student.double(), teacher.double(), 0.5, 1.0, 8)
    assert torch.isfinite(expected).all()
    assert abs(float(loss) - float(expected)) <= 1e-5


def test_padded_vocabulary_ids_get_no_gradient() -> None:
    _, _, results = results_at(1)
    for _, grad in results:
        assert torch.all(grad[..., VOCAB_SIZE:] == 0)


def test_masked_positions_get_no_gradient() -> None:
    batches, _, results = results_at(1)
    masked = batches["finite"].labels == -100
    for _, grad in results:
        assert torch.all(grad[masked] == 0)


@pytest.mark.parametrize("tail", TAIL_MODES)
def test_temperature_squared_scaling_multiplies_loss_and_gradient(tail: str) -> None:
    batch = make_batch()
    logprobs, ids = batch.topk[8]

    def loss_and_grad(scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
        student = batch.student.clone().requires_grad_(True)
        loss = topk_generalized_jsd(
            student, logprobs, ids, temperature=2.0, tail=tail, vocab_size=VOCAB_SIZE,
            scale_by_temperature_squared=scale,
        )
        loss.sum().backward()
        return loss.detach(), student.grad

    (plain_loss, plain_grad), (scaled_loss, scaled_grad) = loss_and_grad(False), loss_and_grad(True)
    torch.testing.assert_close(scaled_loss, 4.0 * plain_loss)
    torch.testing.assert_close(scaled_grad, 4.0 * plain_grad)


@pytest.mark.parametrize("loss_kind", ["full", "tail", "renorm"])
def test_bfloat16_logits_use_float32_math(loss_kind: str) -> None:
    """bf16 logits give the fp32 loss up to the rounding of the inputs, and a bf16 gradient."""
    batch = make_batch()
    logprobs, ids = batch.topk[8]

    def run(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        student = batch.student.to(dtype).requires_grad_(True)
        if loss_kind == "full":
            loss = generalized_jsd(student, batch.teacher.to(dtype), vocab_size=VOCAB_SIZE)
        else:
            loss = topk_generalized_jsd(student, logprobs, ids, tail=loss_kind, vocab_size=VOCAB_SIZE)
        loss.sum().backward()
        return loss, student.grad

    batch.student = batch.student.to(torch.bfloat16).float()  # the same values in both dtypes
    batch.teacher = batch.teacher.to(torch.bfloat16).float()
    (loss16, grad16), (loss32, grad32) = run(torch.bfloat16), run(torch.float32)
    assert loss16.dtype == torch.float32 and grad16.dtype == torch.bfloat16
    torch.testing.assert_close(loss16, loss32, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad16.float(), grad32, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("loss_kind", ["full", "tail", "renorm"])
def test_non_contiguous_batch_first_views_give_the_same_result(loss_kind: str) -> None:
    """A [b, s, v] transpose of Megatron's [s, b, v] logits is accepted as is."""
    batch = make_batch()
    logprobs, ids = batch.topk[8]

    def run(student: torch.Tensor, teacher: torch.Tensor, lp: torch.Tensor, ix: torch.Tensor):
        student = student.detach().requires_grad_(True)
        if loss_kind == "full":
            loss = generalized_jsd(student, teacher, vocab_size=VOCAB_SIZE)
        else:
            loss = topk_generalized_jsd(student, lp, ix, tail=loss_kind, vocab_size=VOCAB_SIZE)
        loss.sum().backward()
        return loss, student.grad

    seq_first = run(batch.student, batch.teacher, logprobs, ids)
    batch_first = run(*(x.transpose(0, 1) for x in (batch.student, batch.teacher, logprobs, ids)))
    torch.testing.assert_close(batch_first[0], seq_first[0].transpose(0, 1))
    torch.testing.assert_close(batch_first[1], seq_first[1].transpose(0, 1))


def test_full_vocab_jsd_backward_runs_once() -> None:
    """Its gradient buffer is scaled in place: a second backward through the graph is refused."""
    batch = make_batch()
    student = batch.student.clone().requires_grad_(True)
    loss = generalized_jsd(student, batch.teacher, vocab_size=VOCAB_SIZE).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs only once"):
        loss.backward()


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_fused_full_vocab_jsd_equals_the_eager_loss(beta: float) -> None:
    """fused=True (torch.compile'd chunks) gives the eager loss and gradient, banned (-inf) tokens included."""
    batch = make_batch()
    student, teacher = batch.student.clone(), batch.teacher.clone()
    for logits in (student, teacher):  # banned on both sides: a finite loss for every β
        logits[0, 0, :5] = -torch.inf
        logits[1, 0, 3:9] = -torch.inf

    def run(fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = student.detach().requires_grad_(True)
        loss = generalized_jsd(leaf, teacher, beta=beta, temperature=0.8, vocab_size=VOCAB_SIZE, fused=fused)
        loss.sum().backward()
        return loss.detach(), leaf.grad

    (fused_loss, fused_grad), (loss, grad) = run(True), run(False)
    assert dense.rel_err(fused_loss, loss) <= 1e-5 and dense.rel_err(fused_grad, grad) <= 1e-5
