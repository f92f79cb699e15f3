"""Specification: the fused output layer + loss equals "output layer, then the logits loss".

``linear_topk_generalized_jsd``, ``linear_generalized_jsd`` and ``linear_cross_entropy`` on this rank's
rows of the output layer ``W [V_local, H]`` give the per-position loss, the gradient of the hidden
states and the gradient of W of ``logits = hidden @ W.T`` followed by ``topk_generalized_jsd``,
``generalized_jsd`` and ``-vocab_parallel_token_logprobs`` on the whole problem in one process
(float32, relative error <= 1e-5 norm-wise), at TP = 1, 2, 4 with the hidden states replicated and at
TP = 2, 4 with sequence parallel (each rank holds a slice of the sequence and gets its slice's
gradient). The vocabulary is padded (190 real ids in 256: at TP = 4 the last rank holds no real id),
some labels are -100, a teacher position has only part of its K entries and one has none.

Each case is run with the upstream gradient of a masked token mean (with and without the
``loss_mask`` hint: the gradients computed in forward are reused, resp. recomputed) and of a weighted
sum (always recomputed), with the automatic chunk and with 5-position chunks (a ragged last chunk);
unchecked (``validate=False``: no host sync) with the masked mean, and with ``gradient_in_forward=False``
under the weighted sum. Unchecked, an upstream gradient that breaks the masked-sum contract makes the
gradients NaN, never silently wrong.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.distributed as dist

import dense_reference as dense
from megatron_mopd.losses import (
    generalized_jsd,
    linear_cross_entropy,
    linear_generalized_jsd,
    linear_topk_generalized_jsd,
    masked_sum_and_count,
    topk_generalized_jsd,
    vocab_parallel_token_logprobs,
)
from megatron_mopd.losses import linear as linear_module
from megatron_mopd.testing import run_on_ranks

SEQ, BATCH, HIDDEN, TEACHER_HIDDEN = 8, 2, 16, 24
VOCAB_SIZE, PADDED_VOCAB = 190, 256
TOLERANCE = 1e-5


@dataclass(frozen=True)
class Problem:
    hidden: torch.Tensor  # [SEQ, BATCH, HIDDEN]
    weight: torch.Tensor  # [PADDED_VOCAB, HIDDEN]
    teacher_hidden: torch.Tensor  # [SEQ, BATCH, TEACHER_HIDDEN]
    teacher_weight: torch.Tensor  # [PADDED_VOCAB, TEACHER_HIDDEN]
    labels: torch.Tensor  # [SEQ, BATCH], -100 where masked
    topk: dict[int, tuple[torch.Tensor, torch.Tensor]]  # K -> (logprobs, ids) [SEQ, BATCH, K]
    weights: torch.Tensor  # [SEQ, BATCH] per-position weights of the "weighted" upstream gradient


def make_problem(seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    weight = torch.randn(PADDED_VOCAB, HIDDEN, generator=gen) * 0.6
    teacher_hidden = torch.randn(SEQ, BATCH, TEACHER_HIDDEN, generator=gen)
    teacher_weight = torch.randn(PADDED_VOCAB, TEACHER_HIDDEN, generator=gen) * 0.5
    labels = torch.randint(0, VOCAB_SIZE, (SEQ, BATCH), generator=gen)
    labels[0, 1] = labels[3, 0] = labels[6, 1] = -100
    teacher_logp = torch.log_softmax((teacher_hidden @ teacher_weight.T)[..., :VOCAB_SIZE], dim=-1)
    topk = {}
    for k in (1, 8):
        logprobs, ids = teacher_logp.topk(k, dim=-1)
        if k > 1:
            logprobs[1, 0, k // 2 :] = -torch.inf  # a position with only part of its K entries
        logprobs[3, 0, :] = -torch.inf  # a masked position with no teacher entry at all
        ids[3, 0, :] = 0
        topk[k] = (logprobs, ids)
    weights = torch.rand(SEQ, BATCH, generator=gen) + 0.5
    return Problem(hidden, weight, teacher_hidden, teacher_weight, labels, topk, weights)


@dataclass(frozen=True)
class Case:
    loss: str  # "topk", "full" or "ce"
    beta: float = 0.5
    temperature: float = 1.0
    k: int = 8
    tail: str = "tail"
    chunk_size: Optional[int] = None
    upstream: str = "masked_mean"  # or "weighted"
    mask_hint: bool = False  # pass loss_mask = labels != -100
    squared: bool = False  # scale_by_temperature_squared
    gradient_in_forward: bool = True
    validate: bool = True


def all_cases() -> list[Case]:
    cases = []
    for beta, temperature in ((0.0, 1.0), (0.1, 2.0), (0.5, 1.0), (0.9, 0.5), (1.0, 2.0)):
        for k, tail in ((8, "tail"), (1, "tail"), (8, "renorm")):
            cases.append(Case("topk", beta, temperature, k, tail))
        cases.append(Case("full", beta, temperature))
    cases += [Case("ce", temperature=t) for t in (1.0, 0.5)]
    variants = []
    for i, case in enumerate(cases):  # every case under each upstream gradient, chunks alternating
        for j, (upstream, hint) in enumerate((("masked_mean", True), ("masked_mean", False), ("weighted", True))):
            variants.append(Case(**{**case.__dict__, "upstream": upstream, "mask_hint": hint,
                                    "chunk_size": 5 if (i + j) % 2 else None}))
    variants += [Case("topk", 0.5, 2.0, squared=True), Case("full", 0.5, 2.0, squared=True, chunk_size=5)]
    for loss in ("topk", "full", "ce"):  # unchecked (no host sync): trusted masked mean; any weights, recomputed
        variants += [Case(loss, 0.5, 2.0, mask_hint=True, validate=False, chunk_size=5),
                     Case(loss, 0.5, 2.0, upstream="weighted", gradient_in_forward=False, validate=False)]
    return variants


def loss_of(problem: Problem, case: Case, hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
            teacher_weight: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """The fused loss on this rank's inputs (the rows of W, the hidden states as the layout says)."""
    common = dict(vocab_size=VOCAB_SIZE, tp_group=group, chunk_size=case.chunk_size,
                  sequence_parallel=sequence_parallel,
                  loss_mask=problem.labels != -100 if case.mask_hint else None,
                  gradient_in_forward=case.gradient_in_forward, validate=case.validate)
    if case.loss == "topk":
        logprobs, ids = problem.topk[case.k]
        return linear_topk_generalized_jsd(hidden, weight, logprobs, ids, beta=case.beta, temperature=case.temperature,
                                           tail=case.tail, scale_by_temperature_squared=case.squared, **common)
    if case.loss == "full":
        return linear_generalized_jsd(hidden, weight, teacher_hidden, teacher_weight, beta=case.beta,
                                      temperature=case.temperature, scale_by_temperature_squared=case.squared,
                                      **common)
    return linear_cross_entropy(hidden, weight, problem.labels, temperature=case.temperature, **common)


def reference_loss(problem: Problem, case: Case, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Output layer, then the logits loss, on the whole problem in one process."""
    logits = hidden @ weight.T
    common = dict(temperature=case.temperature, vocab_size=VOCAB_SIZE)
    if case.loss == "topk":
        logprobs, ids = problem.topk[case.k]
        return topk_generalized_jsd(logits, logprobs, ids, beta=case.beta, tail=case.tail,
                                    scale_by_temperature_squared=case.squared, **common)
    if case.loss == "full":
        teacher_logits = problem.teacher_hidden @ problem.teacher_weight.T
        return generalized_jsd(logits, teacher_logits, beta=case.beta, scale_by_temperature_squared=case.squared,
                               **common)
    return -vocab_parallel_token_logprobs(logits, problem.labels, **common)


def backward(problem: Problem, case: Case, loss: torch.Tensor) -> None:
    if case.upstream == "weighted":
        (loss * problem.weights).sum().backward()
    else:
        total, count = masked_sum_and_count(loss, problem.labels)
        (total / count).backward()


def run_rank(problem: Problem, cases: list[Case], rank: int, world_size: int, group, sequence_parallel: bool):
    """This rank's (loss, hidden gradient, weight-shard gradient) per case."""
    rows = slice(rank * PADDED_VOCAB // world_size, (rank + 1) * PADDED_VOCAB // world_size)
    positions = slice(rank * SEQ // world_size, (rank + 1) * SEQ // world_size) if sequence_parallel else slice(None)
    results = []
    for case in cases:
        hidden = problem.hidden[positions].clone().requires_grad_(True)
        weight = problem.weight[rows].clone().requires_grad_(True)
        loss = loss_of(problem, case, hidden, weight, problem.teacher_hidden[positions], problem.teacher_weight[rows],
                       group, sequence_parallel)
        backward(problem, case, loss)
        results.append((loss.detach(), hidden.grad, weight.grad))
    return results


def _rank_worker(problem: Problem, cases: list[Case], sequence_parallel: bool):
    return run_rank(problem, cases, dist.get_rank(), dist.get_world_size(), dist.group.WORLD, sequence_parallel)


@functools.lru_cache(maxsize=None)
def results_at(tp: int, sequence_parallel: bool) -> tuple[Problem, list[Case], list[tuple]]:
    """Per case: (loss, hidden gradient, weight gradient), assembled from the ranks; one launch."""
    problem, cases = make_problem(), all_cases()
    if tp == 1:
        per_rank = [run_rank(problem, cases, 0, 1, None, sequence_parallel)]
    else:
        per_rank = run_on_ranks(_rank_worker, tp, args=(problem, cases, sequence_parallel))
    assembled = []
    for i in range(len(cases)):
        losses = [r[i][0] for r in per_rank]
        assert all(torch.equal(other, losses[0]) for other in losses[1:]), "every TP rank computes the same loss"
        hidden_grads = [r[i][1] for r in per_rank]
        if sequence_parallel:
            hidden_grad = torch.cat(hidden_grads, dim=0)
        else:
            assert all(torch.equal(other, hidden_grads[0]) for other in hidden_grads[1:]), (
                "the replicated hidden states get the same (all-reduced) gradient on every rank"
            )
            hidden_grad = hidden_grads[0]
        assembled.append((losses[0], hidden_grad, torch.cat([r[i][2] for r in per_rank], dim=0)))
    return problem, cases, assembled


def reference(problem: Problem, case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = problem.hidden.clone().requires_grad_(True)
    weight = problem.weight.clone().requires_grad_(True)
    loss = reference_loss(problem, case, hidden, weight)
    backward(problem, case, loss)
    return loss.detach(), hidden.grad, weight.grad


def mismatches(tp: int, sequence_parallel: bool) -> list[str]:
    problem, cases, results = results_at(tp, sequence_parallel)
    failures = []
    for case, (loss, hidden_grad, weight_grad) in zip(cases, results):
        ref_loss, ref_hidden_grad, ref_weight_grad = reference(problem, case)
        errors = (dense.rel_err(loss, ref_loss), dense.rel_err(hidden_grad, ref_hidden_grad),
                  dense.rel_err(weight_grad, ref_weight_grad))
        padded_rows_zero = bool(torch.all(weight_grad[VOCAB_SIZE:] == 0))
        if max(errors) > TOLERANCE or not padded_rows_zero:
            failures.append(f"{case}: rel err loss {errors[0]:.2e}, hidden grad {errors[1]:.2e}, weight grad "
                            f"{errors[2]:.2e}, padded rows' gradient 0: {padded_rows_zero}")
    return failures


@pytest.mark.parametrize("tp", (1, 2, 4))
def test_equals_output_layer_then_logits_loss(tp: int) -> None:
    assert mismatches(tp, sequence_parallel=False) == []


@pytest.mark.parametrize("tp", (2, 4))
def test_sequence_parallel_equals_output_layer_then_logits_loss(tp: int) -> None:
    assert mismatches(tp, sequence_parallel=True) == []


def test_cases_cover_every_loss_and_upstream_gradient() -> None:
    cases = all_cases()
    assert {(c.loss, c.upstream, c.mask_hint) for c in cases} >= {
        (loss, upstream, hint)
        for loss in ("topk", "full", "ce")
        for upstream, hint in (("masked_mean", True), ("masked_mean", False), ("weighted", True))
    }
    assert {(c.loss, c.upstream, c.gradient_in_forward, c.validate) for c in cases} >= {
        (loss, upstream, upstream == "masked_mean", False) for loss in ("topk", "full", "ce")
        for upstream in ("masked_mean", "weighted")
    }
    assert {c.chunk_size for c in cases} == {None, 5}


@pytest.mark.parametrize("beta, temperature", [(0.5, 2.0), (0.0, 1.0), (1.0, 0.5)])
def test_fused_full_vocab_jsd_equals_output_layer_then_logits_loss(beta: float, temperature: float) -> None:
    """``fused=True``: the same passes as torch.compile-fused kernels (compiled on first use)."""
    problem = make_problem()
    case = Case("full", beta, temperature, chunk_size=5)
    hidden = problem.hidden.clone().requires_grad_(True)
    weight = problem.weight.clone().requires_grad_(True)
    loss = linear_generalized_jsd(hidden, weight, problem.teacher_hidden, problem.teacher_weight, beta=beta,
                                  temperature=temperature, vocab_size=VOCAB_SIZE, chunk_size=5, fused=True)
    backward(problem, case, loss)
    ref_loss, ref_hidden_grad, ref_weight_grad = reference(problem, case)
    assert dense.rel_err(loss.detach(), ref_loss) <= TOLERANCE
    assert dense.rel_err(hidden.grad, ref_hidden_grad) <= TOLERANCE
    assert dense.rel_err(weight.grad, ref_weight_grad) <= TOLERANCE


def _grads(case: Case, problem: Problem, retain: bool = False):
    hidden = problem.hidden.clone().requires_grad_(True)
    weight = problem.weight.clone().requires_grad_(True)
    loss = loss_of(problem, case, hidden, weight, problem.teacher_hidden, problem.teacher_weight, None, False)
    total, count = masked_sum_and_count(loss, problem.labels)
    (total / count).backward(retain_graph=retain)
    return loss, total / count, hidden, weight


@pytest.mark.parametrize("loss_kind", ["topk", "full", "ce"])
def test_masked_mean_with_loss_mask_reuses_the_forward_gradients(loss_kind: str, monkeypatch) -> None:
    """No second pass over the vocabulary when the upstream gradient is c · loss_mask."""

    def refuse(*args, **kwargs):
        raise AssertionError("backward recomputed the logits")

    monkeypatch.setattr(linear_module, "_recompute_grads", refuse)
    problem = make_problem()
    _grads(Case(loss_kind, mask_hint=True), problem)
    hidden = problem.hidden.clone().requires_grad_(True)
    weight = problem.weight.clone().requires_grad_(True)
    loss_of(problem, Case(loss_kind), hidden, weight, problem.teacher_hidden, problem.teacher_weight, None,
            False).sum().backward()


@pytest.mark.parametrize("loss_kind", ["topk", "full", "ce"])
def test_unchecked_an_upstream_gradient_other_than_c_times_the_mask_gives_nan_gradients(loss_kind: str) -> None:
    """validate=False trusts the masked-sum contract without a host sync, but never silently breaks it."""
    problem = make_problem()
    hidden = problem.hidden.clone().requires_grad_(True)
    weight = problem.weight.clone().requires_grad_(True)
    case = Case(loss_kind, mask_hint=True, validate=False)
    loss = loss_of(problem, case, hidden, weight, problem.teacher_hidden, problem.teacher_weight, None, False)
    (loss * problem.weights).sum().backward()
    assert torch.isnan(hidden.grad).all() and torch.isnan(weight.grad).all()


@pytest.mark.parametrize("loss_kind", ["topk", "full", "ce"])
def test_without_gradient_in_forward_the_forward_computes_only_the_loss(loss_kind: str, monkeypatch) -> None:
    accumulated = []
    original = linear_module._accumulate_grads
    monkeypatch.setattr(linear_module, "_accumulate_grads",
                        lambda *args: accumulated.append(1) or original(*args))
    problem = make_problem()
    hidden = problem.hidden.clone().requires_grad_(True)
    weight = problem.weight.clone().requires_grad_(True)
    case = Case(loss_kind, upstream="weighted", gradient_in_forward=False, chunk_size=5)
    loss = loss_of(problem, case, hidden, weight, problem.teacher_hidden, problem.teacher_weight, None, False)
    assert accumulated == []
    backward(problem, case, loss)
    assert len(accumulated) == 4  # 16 positions in chunks of 5, in backward
    ref_loss, ref_hidden_grad, ref_weight_grad = reference(problem, case)
    assert dense.rel_err(hidden.grad, ref_hidden_grad) <= TOLERANCE
    assert dense.rel_err(weight.grad, ref_weight_grad) <= TOLERANCE


def test_second_backward_recomputes_the_same_gradients() -> None:
    problem = make_problem()
    _, mean, hidden, weight = _grads(Case("topk", mask_hint=True), problem, retain=True)
    first = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad, weight.grad = None, None
    mean.backward()
    torch.testing.assert_close(hidden.grad, first[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad, first[1], rtol=1e-5, atol=1e-7)


def test_without_grad_only_the_loss_is_computed(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(linear_module, "_accumulate_grads", lambda *args: calls.append(args))
    problem = make_problem()
    hidden, weight = problem.hidden.clone().requires_grad_(True), problem.weight.clone().requires_grad_(True)
    logprobs, ids = problem.topk[8]
    with torch.no_grad():
        loss = linear_topk_generalized_jsd(hidden, weight, logprobs, ids, vocab_size=VOCAB_SIZE)
    expected = topk_generalized_jsd(problem.hidden @ problem.weight.T, logprobs, ids, vocab_size=VOCAB_SIZE)
    assert calls == [] and not loss.requires_grad
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_frozen_output_layer_gets_no_gradient() -> None:
    problem = make_problem()
    hidden = problem.hidden.clone().requires_grad_(True)
    loss = linear_cross_entropy(hidden, problem.weight, problem.labels, vocab_size=VOCAB_SIZE)
    loss.sum().backward()
    ref_hidden = problem.hidden.clone().requires_grad_(True)
    ref_logp = vocab_parallel_token_logprobs(ref_hidden @ problem.weight.T, problem.labels, vocab_size=VOCAB_SIZE)
    (-ref_logp).sum().backward()
    assert dense.rel_err(hidden.grad, ref_hidden.grad) <= TOLERANCE


def test_batch_first_view_gives_the_same_result() -> None:
    """A [b, s, H] transpose of Megatron's [s, b, H] hidden states is accepted as is."""
    problem = make_problem()
    logprobs, ids = problem.topk[8]

    def run(hidden: torch.Tensor, lp: torch.Tensor, ix: torch.Tensor):
        hidden = hidden.detach().requires_grad_(True)
        loss = linear_topk_generalized_jsd(hidden, problem.weight, lp, ix, vocab_size=VOCAB_SIZE)
        loss.sum().backward()
        return loss, hidden.grad

    seq_first = run(problem.hidden, logprobs, ids)
    batch_first = run(*(x.transpose(0, 1) for x in (problem.hidden, logprobs, ids)))
    torch.testing.assert_close(batch_first[0], seq_first[0].transpose(0, 1))
    torch.testing.assert_close(batch_first[1], seq_first[1].transpose(0, 1))


@pytest.mark.parametrize("loss_kind", ["topk", "full", "ce"])
def test_bfloat16_matches_the_bfloat16_output_layer(loss_kind: str) -> None:
    """bf16 hidden states and weight: bf16 matmuls, float32 loss math, gradients in bf16."""
    problem = make_problem()
    hidden = problem.hidden.bfloat16().requires_grad_(True)
    weight = problem.weight.bfloat16().requires_grad_(True)
    teacher = (problem.teacher_hidden.bfloat16(), problem.teacher_weight.bfloat16())
    loss = loss_of(problem, Case(loss_kind), hidden, weight, *teacher, None, False)
    loss.sum().backward()
    ref_hidden = problem.hidden.bfloat16().requires_grad_(True)
    ref_weight = problem.weight.bfloat16().requires_grad_(True)
    logits = ref_hidden @ ref_weight.T
    if loss_kind == "topk":
        ref = topk_generalized_jsd(logits, *problem.topk[8], vocab_size=VOCAB_SIZE)
    elif loss_kind == "full":
        ref = generalized_jsd(logits, teacher[0] @ teacher[1].T, vocab_size=VOCAB_SIZE)
    else:
        ref = -vocab_parallel_token_logprobs(logits, problem.labels, vocab_size=VOCAB_SIZE)
    ref.sum().backward()
    assert loss.dtype == torch.float32
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert dense.rel_err(hidden.grad, ref_hidden.grad) <= 1e-2
    assert dense.rel_err(weight.grad, ref_weight.grad) <= 1e-2


# --- bad input -----------------------------------------------------------------------------------


def _topk(problem: Problem, **options) -> torch.Tensor:
    logprobs, ids = problem.topk[8]
    options = {"vocab_size": VOCAB_SIZE, **options}
    hidden = options.pop("hidden", problem.hidden)
    weight = options.pop("weight", problem.weight)
    return linear_topk_generalized_jsd(hidden, weight, options.pop("logprobs", logprobs), options.pop("ids", ids),
                                       **options)


def test_weight_of_another_hidden_size() -> None:
    problem = make_problem()
    with pytest.raises(ValueError, match=r"output_weight must be \[V_local, H\] with the hidden size H=16"):
        _topk(problem, weight=problem.weight[:, :8])
    with pytest.raises(ValueError, match="output_weight must be"):
        linear_cross_entropy(problem.hidden, problem.weight[None], problem.labels)


def test_hidden_without_position_dimension() -> None:
    problem = make_problem()
    with pytest.raises(ValueError, match="hidden must be"):
        _topk(problem, hidden=problem.hidden[0, 0])


def test_mixed_dtypes() -> None:
    problem = make_problem()
    with pytest.raises(ValueError, match="must have the same floating dtype"):
        _topk(problem, weight=problem.weight.bfloat16())
    with pytest.raises(ValueError, match="must have the same floating dtype"):
        linear_cross_entropy(problem.hidden.long(), problem.weight.long(), problem.labels)


def test_options_are_checked_like_the_logits_losses() -> None:
    problem = make_problem()
    with pytest.raises(ValueError, match="beta must be in"):
        _topk(problem, beta=1.5)
    with pytest.raises(ValueError, match="temperature must be"):
        _topk(problem, temperature=0.0)
    with pytest.raises(ValueError, match="tail must be one of"):
        _topk(problem, tail="bucket")
    with pytest.raises(ValueError, match="vocab_size=300 does not fit"):
        _topk(problem, vocab_size=300)
    with pytest.raises(ValueError, match="chunk_size must be a positive number"):
        _topk(problem, chunk_size=0)
    with pytest.raises(ValueError, match="beta must be in"):
        linear_generalized_jsd(problem.hidden, problem.weight, problem.teacher_hidden, problem.teacher_weight, beta=-1)


def test_teacher_topk_is_validated_unless_told_not_to() -> None:
    problem = make_problem()
    logprobs, ids = problem.topk[8]
    bad = ids.clone()
    bad[2, 1, 0] = VOCAB_SIZE
    with pytest.raises(ValueError, match=rf"teacher_topk_ids\[2, 1, 0\] = {VOCAB_SIZE} is outside"):
        _topk(problem, ids=bad)
    with pytest.raises(ValueError, match="leading shape"):
        _topk(problem, logprobs=logprobs[:4], ids=ids[:4])
    with pytest.raises(ValueError, match="sum to probability"):
        _topk(problem, logprobs=logprobs + 1.0)
    _topk(problem, logprobs=logprobs + 1.0, validate=False)  # the values are the caller's contract


def test_teacher_of_another_layout() -> None:
    problem = make_problem()
    with pytest.raises(ValueError, match="same vocabulary, same tensor-parallel sharding"):
        linear_generalized_jsd(problem.hidden, problem.weight, problem.teacher_hidden[:4], problem.teacher_weight)
    with pytest.raises(ValueError, match="same vocabulary, same tensor-parallel sharding"):
        linear_generalized_jsd(problem.hidden, problem.weight, problem.teacher_hidden, problem.teacher_weight[:128])
    with pytest.raises(ValueError, match="teacher_weight must be"):
        linear_generalized_jsd(problem.hidden, problem.weight, problem.teacher_hidden, problem.teacher_weight[:, :8])


def test_invalid_teacher_logits_raise_unless_told_not_to() -> None:
    problem = make_problem()
    teacher_hidden = problem.teacher_hidden.clone()
    teacher_hidden[5, 1, 3] = torch.nan
    with pytest.raises(ValueError, match=r"teacher_hidden @ teacher_weight.T\) at position \[5, 1\] has a NaN logit"):
        linear_generalized_jsd(problem.hidden, problem.weight, teacher_hidden, problem.teacher_weight,
                               vocab_size=VOCAB_SIZE)
    loss = linear_generalized_jsd(problem.hidden, problem.weight, teacher_hidden, problem.teacher_weight,
                                  vocab_size=VOCAB_SIZE, validate=False)
    assert torch.isnan(loss[5, 1]) and torch.isfinite(loss[:5]).all()


def test_labels_are_checked() -> None:
    problem = make_problem()
    with pytest.raises(ValueError, match="labels .* must have the shape"):
        linear_cross_entropy(problem.hidden, problem.weight, problem.labels[:4])
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        linear_cross_entropy(problem.hidden, problem.weight, problem.labels.float())
    labels = problem.labels.clone()
    labels[1, 1] = VOCAB_SIZE
    with pytest.raises(ValueError, match="outside the vocabulary"):
        linear_cross_entropy(problem.hidden, problem.weight, labels, vocab_size=VOCAB_SIZE)


def test_loss_mask_of_another_shape() -> None:
    problem = make_problem()
    with pytest.raises(ValueError, match="loss_mask .* must have the shape"):
        _topk(problem, loss_mask=problem.labels[:4] != -100)
