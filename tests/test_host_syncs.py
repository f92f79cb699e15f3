"""Specification: no host sync in the hot path (issue 10 §4).

A host sync (``.item()``, ``bool(tensor)``, ``int(tensor)``, ``if tensor.any()``) waits for the
accelerator to drain its queue: a pipeline stall every micro-batch. Each one goes through
``aten._local_scalar_dense``, on the CPU as well, so counting that op under a ``TorchDispatchMode``
finds them without a GPU.

- Every loss (top-K JSD in both modes, full-vocabulary JSD, token log-probabilities, P-KL, GOLD, their
  modules, several teachers) with ``validate=False`` makes none in its forward and backward; with
  ``validate=True`` (the default) it checks its inputs, which syncs (the counter sees it), and the two
  give the same loss and gradient. So do the fused output-layer losses, for a masked sum (gradients
  computed in forward, scaled in backward by a value read on the device) and for per-position weights
  (recomputed in backward).
- The trainer's loss forward and backward (``forward_step.loss_func`` on a Megatron-Core student at
  TP=2, with a remote top-K teacher scored by a vLLM-speaking server, the sampled-token MOPD loss on the
  same scores, teachers with another tokenizer through a vocabulary projection (GOLD and P-KL), a
  colocated Megatron teacher's full sharded logits, SFT, and behaviour log-probabilities at another
  temperature) makes none with ``loss.validate_inputs`` off, and syncs with it on.
- With validation off a bad input still never passes silently: a teacher that left a trained token
  unscored, or a NaN score, makes the loss NaN, and the step's one check of its reduced loss (host
  floats, after the schedule, before the optimizer) raises naming the teacher and the fix.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_mopd.losses import (
    CrossTokenizerTeacher,
    GeneralizedJSDLoss,
    GOLDLoss,
    ProjectedKLLoss,
    SameTokenizerTeacher,
    TopKGeneralizedJSDLoss,
    generalized_jsd,
    gold_loss,
    linear_cross_entropy,
    linear_generalized_jsd,
    linear_topk_generalized_jsd,
    projected_kl,
    route_by_sample,
    teacher_losses,
    topk_generalized_jsd,
    vocab_parallel_token_logprobs,
)
from megatron_mopd.teachers import TeacherLogprobs
from megatron_mopd.trainer.config import TeacherConfig
from megatron_mopd.trainer.forward_step import NonFiniteLossError, StepContext, StepTeacherScores, loss_func
from megatron_mopd.trainer.step import check_finite_sums
from test_cross_tokenizer_losses import VOCAB_SIZE, make_batch, synthetic_projection

SCALAR_READ = torch.ops.aten._local_scalar_dense.default


class HostSyncCounter(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense`` calls (every ``.item()`` / ``bool(t)`` / ``int(t)``) under it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is SCALAR_READ:
            self.count += 1
        return func(*args, **(kwargs or {}))


def syncs_of(run: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """(host syncs in ``run()`` and the backward of its sum, the loss)."""
    with HostSyncCounter() as counter:
        loss = run()
        loss.sum().backward()
    return counter.count, loss.detach()


# ---- every loss, unit level ---------------------------------------------------------------------

BATCH, PROJECTION = make_batch(), synthetic_projection()
LABELS = torch.tensor([[5, 6, 7, 8, 9, 10, -100], [11, 12, 13, 14, 15, -100, -100]])


def same_tokenizer_topk() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    logprobs, ids = torch.log_softmax(torch.randn(2, 7, VOCAB_SIZE, generator=gen), -1).topk(4, -1)
    logprobs[0, 1, 2:] = -torch.inf  # a position with only part of its K entries
    return logprobs, ids


def teacher_logits() -> torch.Tensor:
    logits = torch.randn(BATCH.student.shape, generator=torch.Generator().manual_seed(8))
    logits[..., VOCAB_SIZE:] = 0.0  # padding (ignored)
    logits[1, 2, :50] = -torch.inf  # tokens of probability 0
    return logits


def cross_args() -> tuple:
    b = BATCH
    return b.student_chunks, b.teacher_logprobs, b.teacher_ids, b.teacher_chunks, PROJECTION


LOSSES: dict[str, Callable[[torch.Tensor, bool], torch.Tensor]] = {
    "topk_jsd tail": lambda z, v: topk_generalized_jsd(z, *same_tokenizer_topk(), vocab_size=VOCAB_SIZE, validate=v),
    "topk_jsd renorm": lambda z, v: topk_generalized_jsd(z, *same_tokenizer_topk(), tail="renorm",
                                                         vocab_size=VOCAB_SIZE, validate=v),
    "jsd": lambda z, v: generalized_jsd(z, teacher_logits(), vocab_size=VOCAB_SIZE, validate=v),
    "token logprobs": lambda z, v: vocab_parallel_token_logprobs(z, LABELS, temperature=2.0, vocab_size=VOCAB_SIZE,
                                                                 validate=v),
    "pkl": lambda z, v: projected_kl(z, *cross_args(), num_chunks=BATCH.num_chunks, vocab_size=VOCAB_SIZE,
                                     validate=v),
    "gold renorm": lambda z, v: gold_loss(z, *cross_args(), num_chunks=BATCH.num_chunks, tail="renorm",
                                          vocab_size=VOCAB_SIZE, chunk_size=2, validate=v),
    "jsd module": lambda z, v: GeneralizedJSDLoss(vocab_size=VOCAB_SIZE, validate=v)(z, teacher_logits(), LABELS)[0],
    "topk_jsd module": lambda z, v: TopKGeneralizedJSDLoss(vocab_size=VOCAB_SIZE, validate=v)(
        z, *same_tokenizer_topk(), labels=LABELS)[0],
    "pkl module": lambda z, v: ProjectedKLLoss(PROJECTION, vocab_size=VOCAB_SIZE, validate=v)(
        z, *cross_args()[:4], num_chunks=BATCH.num_chunks)[0],
    "gold module": lambda z, v: GOLDLoss(PROJECTION, vocab_size=VOCAB_SIZE, validate=v)(
        z, *cross_args()[:4], num_chunks=BATCH.num_chunks)[0],
    "routed teachers": lambda z, v: torch.stack([s for s, _ in teacher_losses(
        z, LABELS, routed_teachers(), routes=route_by_sample(["same", "cross"], ["same", "cross"]),
        vocab_size=VOCAB_SIZE, validate=v).values()]),
}


def routed_teachers() -> dict[str, Any]:
    """Sample 0 to a teacher of the student's tokenizer, sample 1 to one with another (its chunks 3-5)."""
    b = BATCH
    student_chunks = torch.where(b.student_chunks >= 3, b.student_chunks - 3, -1)
    teacher_chunks = torch.where(b.teacher_chunks >= 3, b.teacher_chunks - 3, -1)
    return {"same": SameTokenizerTeacher(*same_tokenizer_topk()),
            "cross": CrossTokenizerTeacher(b.teacher_logprobs, b.teacher_ids, teacher_chunks, student_chunks, 3,
                                           PROJECTION, loss="gold")}


@pytest.mark.parametrize("name", list(LOSSES))
def test_an_unvalidated_loss_makes_no_host_sync_in_forward_and_backward(name: str) -> None:
    logits = BATCH.student.clone().requires_grad_(True)
    syncs, loss = syncs_of(lambda: LOSSES[name](logits, False))
    assert syncs == 0
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("name", list(LOSSES))
def test_a_validated_loss_checks_with_host_syncs_and_gives_the_same_loss_and_gradient(name: str) -> None:
    unvalidated = BATCH.student.clone().requires_grad_(True)
    _, expected = syncs_of(lambda: LOSSES[name](unvalidated, False))
    validated = BATCH.student.clone().requires_grad_(True)
    syncs, loss = syncs_of(lambda: LOSSES[name](validated, True))
    assert syncs > 0  # the counter sees the checks
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    torch.testing.assert_close(validated.grad, unvalidated.grad, rtol=0, atol=0)


def fused_output_layer_losses() -> dict[str, Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]]:
    """The fused output-layer losses on (hidden, weight): a masked sum (gradients computed in forward)
    and, for the cross-entropy, per-position weights (recomputed in backward)."""
    import test_linear_losses as fused

    problem = fused.make_problem()
    mask = problem.labels != -100
    common = dict(vocab_size=fused.VOCAB_SIZE, chunk_size=5, loss_mask=mask)
    return {
        "linear topk_jsd": lambda h, w, v: linear_topk_generalized_jsd(h, w, *problem.topk[8], validate=v,
                                                                       **common) * mask,
        "linear jsd": lambda h, w, v: linear_generalized_jsd(h, w, problem.teacher_hidden, problem.teacher_weight,
                                                             validate=v, **common) * mask,
        "linear cross-entropy": lambda h, w, v: linear_cross_entropy(h, w, problem.labels, validate=v,
                                                                     **common) * mask,
        "linear cross-entropy, weighted": lambda h, w, v: linear_cross_entropy(
            h, w, problem.labels, validate=v, gradient_in_forward=False, **common) * problem.weights,
    }


@pytest.mark.parametrize("name", list(fused_output_layer_losses()))
def test_an_unvalidated_fused_output_layer_loss_makes_no_host_sync(name: str) -> None:
    import test_linear_losses as fused

    problem = fused.make_problem()
    runs = []
    for validate in (False, True):
        hidden = problem.hidden.clone().requires_grad_(True)
        weight = problem.weight.clone().requires_grad_(True)
        syncs, loss = syncs_of(lambda: fused_output_layer_losses()[name](hidden, weight, validate))
        runs.append((syncs, loss, hidden.grad, weight.grad))
    (unvalidated_syncs, *unvalidated), (validated_syncs, *validated) = runs
    assert unvalidated_syncs == 0 and validated_syncs > 0
    for got, expected in zip(unvalidated, validated):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_an_unvalidated_cross_tokenizer_loss_needs_the_number_of_chunks() -> None:
    with pytest.raises(ValueError, match="num_chunks is required with validate=False .* pass the num_chunks of "
                                         "align_batch"):
        projected_kl(BATCH.student, *cross_args(), vocab_size=VOCAB_SIZE, validate=False)


def test_an_unvalidated_nan_teacher_score_gives_a_nan_loss_not_a_finite_one() -> None:
    """Without validation a NaN (or +inf) log-probability is not dropped as an absent entry."""
    logprobs, ids = same_tokenizer_topk()
    logprobs[1, 3, 0] = torch.nan
    for tail in ("tail", "renorm"):
        loss = topk_generalized_jsd(BATCH.student, logprobs, ids, tail=tail, vocab_size=VOCAB_SIZE, validate=False)
        assert torch.isnan(loss[1, 3]) and torch.isfinite(loss[0]).all()
    teacher = BATCH.teacher_logprobs.clone()
    teacher[1, 1, 0] = torch.inf  # a row of chunk 4
    loss = projected_kl(BATCH.student, BATCH.student_chunks, teacher, BATCH.teacher_ids, BATCH.teacher_chunks,
                        PROJECTION, num_chunks=BATCH.num_chunks, vocab_size=VOCAB_SIZE, validate=False)
    assert not torch.isfinite(loss[3]) and torch.isfinite(loss[:3]).all()


def test_an_unvalidated_chunk_without_a_teacher_row_has_a_nan_loss() -> None:
    teacher_chunks = torch.where(BATCH.teacher_chunks == 2, -1, BATCH.teacher_chunks)  # chunk 2 loses its row
    for loss_fn in (projected_kl, gold_loss):
        loss = loss_fn(BATCH.student, BATCH.student_chunks, BATCH.teacher_logprobs, BATCH.teacher_ids,
                       teacher_chunks, PROJECTION, num_chunks=BATCH.num_chunks, vocab_size=VOCAB_SIZE,
                       validate=False)
        assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3, 4, 5]]).all()


# ---- the trainer's loss forward and backward ----------------------------------------------------

TP, B, S, K, TEACHER_VOCAB = 2, 2, 16, 4, 150
LENGTHS, PROMPT = (16, 12), 5  # tokens per sample; the completion starts at token PROMPT
CROSS_RUNS = ((2, 1, 3, 1, 2, 1, 1), (1, 2, 1, 2, 1))  # student tokens per chunk of each completion
TEACHER_RUNS = ((1, 2, 2, 1, 3, 1, 2), (2, 1, 1, 3, 1))  # teacher tokens per chunk
TEACHER_PROMPT = 4


def student_sequences() -> list[list[int]]:
    rng = np.random.default_rng(5)
    return [rng.integers(0, 100, length).tolist() for length in LENGTHS]


def teacher_sequences() -> list[list[int]]:
    rng = np.random.default_rng(6)
    return [rng.integers(0, TEACHER_VOCAB, TEACHER_PROMPT + sum(runs)).tolist() for runs in TEACHER_RUNS]


def alignment(student_runs: tuple[int, ...], teacher_runs: tuple[int, ...]) -> Any:
    from megatron_mopd.crosstok import SequenceAlignment

    def tokens(prompt: int, runs: tuple[int, ...]) -> np.ndarray:
        return np.array([-1] * prompt + [c for c, n in enumerate(runs) for _ in range(n)], dtype=np.int64)

    return SequenceAlignment(tokens(PROMPT, student_runs), tokens(TEACHER_PROMPT, teacher_runs),
                             np.zeros((len(student_runs), 3), dtype=np.int64))


def student_projection() -> Any:
    """Student ids 0-59 exact, 60-89 split into 2-3 teacher pieces, 90-99 unmapped (teacher vocabulary 150)."""
    from megatron_mopd.crosstok.projection import ProjectionStats, VocabProjection

    gen = torch.Generator().manual_seed(3)
    indices, weights = torch.full((100, 3), -1, dtype=torch.long), torch.zeros((100, 3))
    indices[:60, 0], weights[:60, 0] = torch.randperm(TEACHER_VOCAB, generator=gen)[:60], 1.0
    for row in range(60, 90):
        pieces = torch.randperm(TEACHER_VOCAB, generator=gen)[: 2 + row % 2]
        raw = 0.9 * 0.1 ** torch.arange(len(pieces), dtype=torch.float32)
        indices[row, : len(pieces)], weights[row, : len(pieces)] = pieces, raw / raw.sum()
    exact = torch.arange(100) < 60
    stats = ProjectionStats(exact=60, multi_token=30, reverse=0, special=0, unmapped=10)
    return VocabProjection(indices, weights, exact, TEACHER_VOCAB, {"synthetic": 3}, "student", "teacher", stats)


def config(name: str, loss: str, **options: Any) -> TeacherConfig:
    placement = {"placement": "colocated", "model": "unused"} if loss == "jsd" else {"urls": ["http://unused"]}
    cross = {"tokenizer": "unused", "projection": "unused.safetensors"} if loss in ("ctkd", "gold") else {}
    return TeacherConfig(name=name, loss=loss, topk=K, temperature=1.0, **placement, **cross, **options)


class Arrived:
    """Scores already delivered (the step's ``teacher_wait`` is over), as ``PendingTeacherScores.wait`` gives."""

    def __init__(self, scores: TeacherLogprobs) -> None:
        self.scores = scores

    def wait(self) -> TeacherLogprobs:
        return self.scores


def trainer_loss_on_rank(validations: tuple[bool, ...]) -> list[dict[str, Any]]:
    """On each of TP=2 ranks: a Megatron-Core student, its teachers (a remote vLLM-speaking server for the
    student's vocabulary and one for another, a colocated Megatron teacher), then per validation setting
    the loss forward and backward of one micro-batch under the counter."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_mopd.platform import destroy_parallel, initialize_parallel
    from megatron_mopd.teachers import ColocatedTeacher, RemoteTeacher, submit_teacher_scores
    from megatron_mopd.testing.canned_server import CannedServer
    from megatron_mopd.testing.gpt import TinyGPT
    from megatron_mopd.trainer.forward_step import MicroBatch

    torch.set_num_threads(1)
    tiny = TinyGPT()
    initialize_parallel(TP, 1, device="cpu", seed=11)
    try:
        student = tiny.build(TP, 1)
        teacher_model = ColocatedTeacher(tiny.build(TP, 1), topk=K, vocab_size=tiny.vocab_size, micro_batch_size=B)
        sequences = student_sequences()
        tokens = torch.zeros(B, S, dtype=torch.long)
        labels = torch.full((B, S), -100, dtype=torch.long)
        for b, sequence in enumerate(sequences):
            tokens[b, : len(sequence)] = torch.tensor(sequence)
            labels[b, PROMPT - 1 : len(sequence) - 1] = torch.tensor(sequence[PROMPT:])
        position_ids = torch.arange(S).expand(B, S)
        fetching = parallel_state.get_tensor_model_parallel_rank() == 0
        with CannedServer(vocab_size=tiny.vocab_size, max_logprobs=K) as same_server, \
                CannedServer(vocab_size=TEACHER_VOCAB, max_logprobs=K, seed=1) as cross_server:
            same_client = RemoteTeacher(same_server.url, "vllm", topk=K, vocab_size=tiny.vocab_size) if fetching \
                else None
            cross_client = RemoteTeacher(cross_server.url, "vllm", topk=K, vocab_size=TEACHER_VOCAB) if fetching \
                else None
            same = submit_teacher_scores(same_client, sequences, seq_length=S).wait()
            cross = submit_teacher_scores(cross_client, teacher_sequences()).wait()
            for client in (same_client, cross_client):
                if client is not None:
                    client.close()
        colocated_logits = [torch.nn.functional.pad(part, (0, 0, 0, S - part.shape[1]))
                            for part in teacher_model.iter_logits(sequences)]
        behaviour = torch.log_softmax(torch.randn(B, S, generator=torch.Generator().manual_seed(2)), -1)
        rows = torch.arange(B)
        every, first = torch.ones(B, dtype=torch.bool), torch.tensor([True, False])
        alignments = [alignment(s, t) for s, t in zip(CROSS_RUNS, TEACHER_RUNS)]
        logits = student(tokens, position_ids, None).detach()
        results = []
        for validate in validations:
            teachers = [
                StepTeacherScores(config("topk", "topk_jsd"), Arrived(same), rows),
                StepTeacherScores(config("topk_renorm", "topk_jsd", tail="renorm", beta=0.0), Arrived(same), rows),
                StepTeacherScores(config("mopd", "mopd"), Arrived(same), rows),
                StepTeacherScores(config("gold", "gold"), Arrived(cross), rows, student_projection(), alignments),
                StepTeacherScores(config("ctkd", "ctkd", beta=0.5), Arrived(cross), rows, student_projection(),
                                  alignments),
                StepTeacherScores(config("colocated", "jsd"), None, rows, logits=colocated_logits),
            ]
            routes = {"topk": every, "topk_renorm": first, "mopd": ~first, "gold": every, "ctkd": first,
                      "colocated": every}
            context = StepContext(3, teachers, routes, 0.5, tiny.vocab_size, dist.get_rank(),
                                  validate_inputs=validate, check_loss_per_micro_batch=validate)
            batch = MicroBatch(tokens, position_ids, labels, torch.tensor([True, False]), 0, context, behaviour, 0.7)
            leaf = logits.clone().requires_grad_(True)
            with HostSyncCounter() as counter:
                loss, num_tokens, logs = loss_func(batch, leaf)
                loss.backward()
            results.append({"syncs": counter.count, "loss": loss.detach(), "grad": leaf.grad,
                            "logs": {name: value.tolist() for name, value in logs.items()}})
        return results
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def trainer_runs() -> list[list[dict[str, Any]]]:
    from megatron_mopd.testing import run_on_ranks

    return run_on_ranks(trainer_loss_on_rank, TP, args=((False, True),), timeout_s=300)


def test_the_trainers_loss_forward_and_backward_make_no_host_sync_with_validation_off(trainer_runs) -> None:
    for rank in trainer_runs:
        unvalidated = rank[0]
        assert unvalidated["syncs"] == 0
        assert math.isfinite(unvalidated["loss"].item())
        assert set(unvalidated["logs"]) == {"loss", "sft/nll", *(f"divergence/{name}" for name in (
            "topk", "topk_renorm", "mopd", "gold", "ctkd", "colocated"))}
        assert all(count > 0 for _, count in unvalidated["logs"].values())  # every part has tokens


def test_the_trainers_loss_with_validation_on_checks_with_host_syncs_and_gives_the_same_loss(trainer_runs) -> None:
    for rank in trainer_runs:
        unvalidated, validated = rank
        assert validated["syncs"] > 0
        torch.testing.assert_close(validated["loss"], unvalidated["loss"], rtol=0, atol=0)
        torch.testing.assert_close(validated["grad"], unvalidated["grad"], rtol=0, atol=0)
    torch.testing.assert_close(trainer_runs[0][0]["loss"], trainer_runs[1][0]["loss"])  # the TP ranks agree


# ---- a bad input without validation: NaN, then the step's one check ------------------------------


def small_context(scores: TeacherLogprobs, *, validate: bool) -> StepContext:
    every = torch.ones(2, dtype=torch.bool)
    teachers = [StepTeacherScores(config("good", "topk_jsd"), Arrived(small_scores(0)), torch.arange(2)),
                StepTeacherScores(config("bad", "topk_jsd"), Arrived(scores), torch.arange(2))]
    return StepContext(5, teachers, {"good": every, "bad": every}, 0.0, 40, rank=0, validate_inputs=validate,
                       check_loss_per_micro_batch=validate)


def small_scores(seed: int) -> TeacherLogprobs:
    logp = torch.log_softmax(torch.randn(2, 6, 40, generator=torch.Generator().manual_seed(seed)), -1)
    top, ids = logp.topk(K, -1)
    return TeacherLogprobs(top, ids, top[..., 0], torch.ones(2, 6, dtype=torch.bool), ((), ()))


def small_loss(scores: TeacherLogprobs, *, validate: bool) -> tuple[int, dict[str, tuple[float, float]]]:
    from megatron_mopd.trainer.forward_step import MicroBatch

    tokens = torch.zeros(2, 6, dtype=torch.long)
    labels = torch.tensor([[-100, 3, 4, 5, 6, -100], [-100, -100, 7, 8, 9, 10]])
    context = small_context(scores, validate=validate)
    batch = MicroBatch(tokens, tokens, labels, torch.ones(2, dtype=torch.bool), 0, context)
    logits = torch.randn(2, 6, 40, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    with HostSyncCounter() as counter:
        loss, _, logs = loss_func(batch, logits)
        loss.backward()
    return counter.count, {name: tuple(value.tolist()) for name, value in logs.items()}


def unscored(scores: TeacherLogprobs) -> TeacherLogprobs:
    valid = scores.valid.clone()
    valid[1, 4] = False  # a trained token the teacher did not score
    return TeacherLogprobs(scores.topk_logprobs, scores.topk_ids, scores.token_logprobs, valid, scores.sequences)


def nan_score(scores: TeacherLogprobs) -> TeacherLogprobs:
    logprobs = scores.topk_logprobs.clone()
    logprobs[0, 2, 1] = torch.nan
    return TeacherLogprobs(logprobs, scores.topk_ids, scores.token_logprobs, scores.valid, scores.sequences)


@pytest.mark.parametrize("defect", [unscored, nan_score])
def test_without_validation_a_bad_teacher_input_is_a_non_finite_loss_the_step_check_names(defect) -> None:
    syncs, sums = small_loss(defect(small_scores(2)), validate=False)
    assert syncs == 0
    assert math.isfinite(sums["divergence/good"][0]) and not math.isfinite(sums["divergence/bad"][0])
    with pytest.raises(NonFiniteLossError, match=r"step 5: the loss is not finite \(teacher\(s\) \['bad'\]\); "
                                                 r"nothing was updated\. Set loss\.validate_inputs=true to locate "
                                                 r"the position"):
        check_finite_sums(sums, "step 5", validated=False)


def test_with_validation_the_bad_teacher_input_is_located() -> None:
    with pytest.raises(ValueError, match="teacher 'bad' returned no score for position 4 of micro-batch sample 1"):
        small_loss(unscored(small_scores(2)), validate=True)
    with pytest.raises(ValueError, match="teacher_topk_logprobs contains NaN or \\+inf"):
        small_loss(nan_score(small_scores(2)), validate=True)


def test_the_step_check_passes_finite_sums_and_other_pipeline_stages() -> None:
    check_finite_sums({"loss": (1.5, 4.0), "divergence/a": (0.5, 4.0)}, "step 0", validated=False)
    check_finite_sums(None, "step 0", validated=False)  # not the last pipeline stage: no loss here
    with pytest.raises(NonFiniteLossError, match=r"step 0: the loss is not finite \(\['loss', 'sft/nll'\]\)"):
        check_finite_sums({"loss": (math.inf, 4.0), "sft/nll": (math.inf, 4.0)}, "step 0", validated=False)
