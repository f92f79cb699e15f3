"""One optimizer step as named, timed phases:

    rollout          the step's sequences (``trainer.rollout``): dataset completions (off-policy), the
                     student's samples of the prompts (on-policy, with probability lmbda), or a
                     teacher's (seq_kd)
    teacher_submit   each teacher's requests start now (remote: on the fetching rank, in the background;
                     colocated: the teacher's forward-only pass runs now, on every rank)
    forward_backward Megatron's schedule over the micro-batches; the loss waits for the teachers
                     (``teacher_wait``, timed inside it) only when it first needs their scores
    optimizer        the Megatron optimizer's step and the learning-rate schedule

Every rank runs every phase; the losses exist only on the last pipeline stage. ``StepResult`` holds
the step's sums reduced over the data-parallel ranks (on the last stage; elsewhere None). The loss is
checked once per step, on those reduced sums, before the optimizer: a NaN or infinite loss (or a
teacher's part of it) raises ``NonFiniteLossError`` naming the teachers, and nothing is updated. With
``validate_inputs`` (``loss.validate_inputs``) every loss also checks its inputs on the device and the
loss of each micro-batch is checked, naming the position, micro-batch and rank; both cost host syncs,
so it is off by default, and then the loss's forward and backward make none.
``evaluate`` runs the same phases forward-only, without the optimizer, on held-out prompts.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_mopd.teachers import submit_teacher_scores
from megatron_mopd.teachers.placement import local_rows
from megatron_mopd.trainer.cross_tokenizer import CrossTokenizerSide
from megatron_mopd.trainer.data import DataStats, Example, TokenizedSample, collate
from megatron_mopd.trainer.forward_step import (
    MicroBatch,
    StepContext,
    StepTeacherScores,
    forward_step,
    non_finite_loss_error,
)
from megatron_mopd.trainer.rollout import Completed, CompletionSource

PHASES = ("rollout", "teacher_submit", "forward_backward", "teacher_wait", "optimizer")


@dataclass
class PhaseTimer:
    """Wall-clock seconds per named phase of one step."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def time(self, phase: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - began


@dataclass
class StepResult:
    """What one step reports: per-name sums and counts over the global batch (last stage), the learning
    rate, the gradient norm, the phases' seconds and the data counters."""

    step: int
    sums: Optional[dict[str, tuple[float, float]]]
    lr: float
    grad_norm: Optional[float]
    seconds: dict[str, float]
    data: DataStats
    completions: str = "dataset"  # where the step's completions came from: dataset, student or teacher

    @property
    def on_policy(self) -> bool:
        """Whether the student sampled the step's completions."""
        return self.completions == "student"


@dataclass
class Trainee:
    """The student and what updates it."""

    model: list[torch.nn.Module]
    optimizer: Any
    scheduler: Any
    forward_backward: Any
    seq_length: int
    micro_batch_size: int
    vocab_size: int
    pad_id: int
    fused_output_layer: bool = False  # loss.fused_output_layer: the losses never see the logits


@dataclass(frozen=True)
class StepTeacher:
    """A teacher as the step uses it: its configuration, its client (None on ranks that do not fetch)
    and, for a teacher with another tokenizer, its side of the alignment."""

    config: Any
    client: Any
    cross: Optional[CrossTokenizerSide] = None


def run_step(
    step: int,
    trainee: Trainee,
    examples: Sequence[Example],
    teachers: Sequence[StepTeacher],
    routes: dict[str, torch.Tensor],
    *,
    sft_alpha: float,
    source: Optional[CompletionSource] = None,
    validate_inputs: bool = False,
) -> StepResult:
    """Train on this data-parallel rank's ``examples`` (its part of the global batch): on their
    dataset completions, or on the completions ``source`` gives (the student's or a teacher's).

    Args:
        routes: bool ``[len(examples)]`` per teacher name, the samples it scores.
        validate_inputs: ``loss.validate_inputs`` (module docstring).
    Raises:
        NonFiniteLossError: the step's loss, or a teacher's part of it, is NaN or infinite (last stage).
    """
    timer = PhaseTimer()
    with timer.time("rollout"):
        completed = _complete(source, examples, trainee.seq_length)
    reduced, step_teachers = _run_schedule(step, trainee, completed, teachers, routes, sft_alpha, timer,
                                           forward_only=False, validate_inputs=validate_inputs)
    sums = _reduce(reduced)
    check_finite_sums(sums, f"step {step}", validated=validate_inputs)
    lr = trainee.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
    with timer.time("optimizer"):
        updated, grad_norm, _ = trainee.optimizer.step()
        if not updated:
            raise RuntimeError(f"step {step}: the optimizer skipped the update (gradient overflow)")
        trainee.scheduler.step(increment=1)
    return StepResult(step, sums, lr, None if grad_norm is None else float(grad_norm), timer.seconds,
                      DataStats.of(e.tokenized for e in completed.examples), completed.source)


def check_finite_sums(sums: Optional[dict[str, tuple[float, float]]], where: str, *, validated: bool) -> None:
    """The step's one check of its loss: every reduced sum (host floats: no device sync) is finite.

    Raises:
        NonFiniteLossError: naming the teachers whose divergence is not finite (or the other parts).
    """
    bad = [name for name, (total, _) in (sums or {}).items() if not math.isfinite(total)]
    if bad:
        raise non_finite_loss_error(where, bad, validated)


@dataclass
class Evaluation:
    """A held-out evaluation: per-name sums and counts over every rank's prompts (last stage; else
    None), this rank's sampled examples, and the seconds it took."""

    step: int
    sums: Optional[dict[str, tuple[float, float]]]
    examples: list[Example]
    seconds: float


def evaluate(
    step: int,
    trainee: Trainee,
    examples: Sequence[Example],
    teachers: Sequence[StepTeacher],
    routes: dict[str, torch.Tensor],
    source: CompletionSource,
    validate_inputs: bool = False,
) -> Evaluation:
    """Each teacher's divergence on ``source``'s completions of this rank's held-out ``examples``
    (forward-only; nothing is updated). The rank's examples need not fill whole micro-batches: the
    last one is padded with rows that have no completion (no teacher scores them, no loss counts them)."""
    began = time.perf_counter()
    completed = _complete(source, examples, trainee.seq_length)
    missing = -len(examples) % trainee.micro_batch_size
    padding = [_without_completion(completed.examples[0])] * missing
    behaviour = completed.behaviour
    if behaviour is not None:
        behaviour = torch.cat([behaviour, behaviour.new_zeros(missing, behaviour.shape[1])])
    padded = Completed(completed.examples + padding, behaviour, completed.dataset_completion, completed.source,
                       completed.behaviour_temperature)
    routes = {name: torch.cat([route, route.new_zeros(missing)]) for name, route in routes.items()}
    reduced, _ = _run_schedule(step, trainee, padded, teachers, routes, 0.0, PhaseTimer(), forward_only=True,
                               validate_inputs=validate_inputs)
    sums = _reduce(reduced)
    check_finite_sums(sums, f"held-out evaluation at step {step}", validated=validate_inputs)
    return Evaluation(step, sums, completed.examples, time.perf_counter() - began)


def _complete(source: Optional[CompletionSource], examples: Sequence[Example], seq_length: int) -> Completed:
    if source is None:
        return Completed(list(examples), None, True, "dataset")
    return source.complete(examples, seq_length)


def _without_completion(example: Example) -> Example:
    tokens = example.tokenized
    return Example(example.sample, example.rendered, TokenizedSample(
        tokens.input_ids, [False] * len(tokens.input_ids), tokens.offsets, tokens.truncated, 0))


def _run_schedule(step: int, trainee: Trainee, completed: Completed, teachers: Sequence[StepTeacher],
                  routes: dict[str, torch.Tensor], sft_alpha: float, timer: PhaseTimer, *, forward_only: bool,
                  validate_inputs: bool):
    """Submit the teachers' requests and run Megatron's schedule over the micro-batches; returns the
    schedule's per-micro-batch logs and the step's teachers."""
    examples = completed.examples
    with timer.time("teacher_submit"):
        step_teachers = [_submit(teacher, examples, routes[teacher.config.name], trainee.seq_length,
                                 trainee.vocab_size) for teacher in teachers]
    context = StepContext(step, step_teachers, routes, sft_alpha, trainee.vocab_size, dist.get_rank(),
                          validate_inputs=validate_inputs, check_loss_per_micro_batch=validate_inputs,
                          fused_output_layer=trainee.fused_output_layer)
    micro_batches = _micro_batches(completed, context, trainee)
    with timer.time("forward_backward"):
        if not forward_only:
            for chunk in trainee.model:
                chunk.zero_grad_buffer()
            trainee.optimizer.zero_grad()
        reduced = trainee.forward_backward(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=trainee.model,
            num_microbatches=len(micro_batches),
            seq_length=trainee.seq_length,
            micro_batch_size=trainee.micro_batch_size,
            forward_only=forward_only,
        )
    timer.seconds["teacher_wait"] = sum(t.waited_s for t in step_teachers)
    timer.seconds["forward_backward"] -= timer.seconds["teacher_wait"]
    return reduced, step_teachers


def _submit(teacher: StepTeacher, examples: Sequence[Example], route: torch.Tensor, seq_length: int,
            vocab_size: int) -> StepTeacherScores:
    """Start the teacher's requests for the routed samples (this rank's batch order kept)."""
    from megatron.core import parallel_state

    if getattr(teacher.client, "collective", False):
        return _run_colocated(teacher, examples, seq_length)
    _expect_vocabulary(teacher.client,
                       vocab_size if teacher.cross is None else teacher.cross.projection.teacher_vocab_size)
    chosen = [int(i) for i in torch.nonzero(route).flatten()]
    rows = torch.full((len(examples),), -1, dtype=torch.long)
    rows[chosen] = torch.arange(len(chosen))
    if teacher.cross is None:
        pending = submit_teacher_scores(teacher.client, [examples[i].tokenized.input_ids for i in chosen],
                                        seq_length=seq_length)
        return StepTeacherScores(teacher.config, pending, rows)
    alignments: list = [None] * len(examples)
    sequences = []
    if parallel_state.is_pipeline_last_stage():  # the loss, and so the alignment, lives there
        for i in chosen:
            teacher_ids, alignments[i] = teacher.cross.prepare(examples[i])
            sequences.append(teacher_ids)
    pending = submit_teacher_scores(teacher.client, sequences)
    return StepTeacherScores(teacher.config, pending, rows, teacher.cross.projection, alignments)


def _expect_vocabulary(client: Any, vocab_size: int) -> None:
    """Tell a remote client (on the fetching rank) the vocabulary its ids index for the loss, unless it
    was given one: it rejects other ids as it parses each response, on the host, so the losses need not
    check them on the device."""
    if client is not None and hasattr(client, "vocab_size") and client.vocab_size is None:
        client.vocab_size = vocab_size


class _Ready:
    """Scores computed already (a colocated teacher), delivered like a remote teacher's."""

    def __init__(self, scores: Any, seq_length: int) -> None:
        self._scores, self._seq_length = scores, seq_length

    def wait(self) -> Any:
        return None if self._scores is None else local_rows(self._scores, self._seq_length)


def _run_colocated(teacher: StepTeacher, examples: Sequence[Example], seq_length: int) -> StepTeacherScores:
    """A colocated teacher runs now, on every rank, over the whole batch (in the student's micro-batches):
    its top-K (``topk_jsd``, ``mopd``) or its sharded logits per micro-batch (``jsd``)."""
    sequences = [e.tokenized.input_ids for e in examples]
    rows = torch.arange(len(examples))
    if teacher.config.loss != "jsd":
        return StepTeacherScores(teacher.config, _Ready(teacher.client.score(sequences), seq_length), rows)
    logits = [None if part is None else torch.nn.functional.pad(part, (0, 0, 0, seq_length - part.shape[1]))
              for part in teacher.client.iter_logits(sequences)]
    return StepTeacherScores(teacher.config, None, rows, logits=logits)


def _micro_batches(completed: Completed, context: StepContext, trainee: Trainee) -> list[MicroBatch]:
    """The rank's batch in micro-batches; with context parallelism, this CP rank's part of each
    sequence, split as Megatron splits it (``get_batch_on_this_cp_rank``; remote teacher rows are split
    the same way by ``placement``)."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    size, samples, behaviour = trainee.micro_batch_size, [e.tokenized for e in completed.examples], completed.behaviour
    dataset_completion = torch.full((len(samples),), completed.dataset_completion, dtype=torch.bool)
    batches = []
    for first in range(0, len(samples), size):
        rows = slice(first, first + size)
        tensors = collate(samples[rows], trainee.seq_length, trainee.pad_id)
        tensors["behaviour_logprobs"] = None if behaviour is None else behaviour[rows]
        tensors = get_batch_on_this_cp_rank(tensors)
        batches.append(MicroBatch(tensors["tokens"], tensors["position_ids"], tensors["labels"],
                                  dataset_completion[rows], first, context, tensors["behaviour_logprobs"],
                                  completed.behaviour_temperature))
    return batches


def _reduce(reduced: list[dict[str, torch.Tensor]]) -> Optional[dict[str, tuple[float, float]]]:
    """Sum the micro-batches' ``[sum, count]`` logs, then over the data- and context-parallel ranks
    (last stage), as Megatron reduces the token count."""
    from megatron.core import parallel_state

    if not parallel_state.is_pipeline_last_stage():
        return None
    names = sorted(reduced[0])
    totals = torch.stack([torch.stack([r[name] for r in reduced]).sum(0) for name in names]).float()
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return {name: (float(total), float(count)) for name, (total, count) in zip(names, totals.tolist())}
