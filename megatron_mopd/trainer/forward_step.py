"""Megatron's ``forward_step(data_iterator, model) -> (output, loss_func)`` contract for distillation.

The data iterator yields ``MicroBatch`` objects: the student's tokens plus everything the loss needs
(targets, the step's pending teacher scores, which rows of the rank's batch the micro-batch holds).
``loss_func(logits)`` returns ``(loss_sum, num_tokens, logs)`` for ``calculate_per_token_loss``: the
schedule sums the loss over micro-batches and data-parallel ranks and divides by the total number of
completion tokens. With ``StepContext.check_loss_per_micro_batch`` (the default, as Megatron-LM's
``loss_func`` does) the loss of each micro-batch is checked for NaN/inf here, naming the step, the rank
and the teacher: one host sync per micro-batch. The trainer turns it off unless ``loss.validate_inputs``
is set and checks the reduced loss once per step instead (``trainer.step``): with validation off the
loss's forward and backward make no host sync.

With ``StepContext.fused_output_layer`` (``loss.fused_output_layer``) the last stage's output layer is
bypassed: the model returns its hidden states, and ``loss_func`` computes the same losses with the
fused output-layer losses on them and the output layer's weight (``trainer.student_output``), so the
logits never exist.

The same ``forward_step`` serves the trainer (``trainer.step``) and Megatron-LM's ``pretrain()``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Optional

import torch

from megatron_mopd.crosstok import SequenceAlignment
from megatron_mopd.teachers import PendingTeacherScores, TeacherLogprobs
from megatron_mopd.trainer.config import TeacherConfig
from megatron_mopd.trainer.cross_tokenizer import chunk_ids
from megatron_mopd.trainer.objective import Targets, TeacherTerm, micro_batch_objective
from megatron_mopd.trainer.student_output import (
    OutputLayerInput,
    StudentLogits,
    hidden_states_instead_of_logits,
    output_layer_weight,
)


class NonFiniteLossError(RuntimeError):
    """The loss of a micro-batch is NaN or infinite; training stops before the update."""


class StepTeacherScores:
    """One teacher's scores for a step's batch on this rank, waited for once, when a loss first needs them.

    ``rows`` maps each sample of the rank's batch to its row in the teacher's answer (−1: the sample is
    not routed to this teacher and was not sent). A teacher with another tokenizer also carries the
    ``projection`` and each sample's ``alignments`` (None where not sent). A colocated ``jsd`` teacher
    carries its sharded ``logits`` per micro-batch instead of scores.
    """

    def __init__(self, config: TeacherConfig, pending: Optional[PendingTeacherScores], rows: torch.Tensor,
                 projection: Any = None, alignments: Optional[list[Optional[SequenceAlignment]]] = None,
                 logits: Optional[list[torch.Tensor]] = None) -> None:
        self.config, self.rows = config, rows
        self.projection, self.alignments = projection, alignments
        self.logits = logits  # a jsd teacher: its logits per micro-batch (no pending scores)
        self._pending: Optional[PendingTeacherScores] = pending
        self._scores: Optional[TeacherLogprobs] = None
        self.waited_s = 0.0

    def scores(self) -> TeacherLogprobs:
        """The teacher's rows for every sample of the batch (rows of unsent samples: invalid)."""
        if self._pending is not None:
            began = time.perf_counter()
            answer, self._pending = self._pending.wait(), None
            self.waited_s = time.perf_counter() - began
            self._scores = _expand(answer, self.rows)
        return self._scores


def _expand(answer: TeacherLogprobs, rows: torch.Tensor) -> TeacherLogprobs:
    """Rows of ``answer`` placed at the batch samples that were sent; the others invalid. ``rows`` is
    a host tensor, read as a list (no device sync)."""
    row_list = rows.tolist()
    if row_list == list(range(len(row_list))) and answer.valid.shape[0] == len(row_list):
        return answer
    if answer.valid.shape[0] == 0:  # no sample of this rank's batch went to this teacher
        size, (num_rows, k) = len(rows), answer.topk_ids.shape[1:]
        device = answer.valid.device
        return TeacherLogprobs(torch.full((size, num_rows, k), -torch.inf, device=device),
                               torch.zeros((size, num_rows, k), dtype=torch.int64, device=device),
                               torch.zeros((size, num_rows), device=device),
                               torch.zeros((size, num_rows), dtype=torch.bool, device=device), ((),) * size)
    take = _to(rows.clamp_min(0), answer.valid.device)
    sent = _to(rows >= 0, answer.valid.device)[:, None]
    return TeacherLogprobs(
        torch.where(sent[..., None], answer.topk_logprobs[take], -torch.inf),
        torch.where(sent[..., None], answer.topk_ids[take], 0),
        torch.where(sent, answer.token_logprobs[take], 0.0),
        sent & answer.valid[take],
        tuple(answer.sequences[i] if i >= 0 else () for i in row_list),
        None,
    )


@dataclass
class StepContext:
    """What every micro-batch of one step shares."""

    step: int
    teachers: list[StepTeacherScores]
    routes: dict[str, torch.Tensor]  # teacher name -> bool [B_rank]
    sft_alpha: float
    vocab_size: int
    rank: int
    validate_inputs: bool = False  # every loss checks its inputs on the device (host syncs; locates a bad one)
    check_loss_per_micro_batch: bool = True  # one host sync per micro-batch; the trainer checks per step
    fused_output_layer: bool = False  # the loss runs on the output layer's input and weight, never the logits


@dataclass
class MicroBatch:
    """One micro-batch of this data-parallel rank: tensors ``[b, s]`` and the rows ``[first, first + b)``
    of the rank's batch it holds."""

    tokens: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    dataset_completion: torch.Tensor
    first_row: int
    context: StepContext
    behaviour_logprobs: Optional[torch.Tensor] = None
    behaviour_temperature: float = 1.0


def forward_step(data_iterator: Iterator[MicroBatch], model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
    """Run the student on the next micro-batch; the loss is computed by the returned ``loss_func``.

    With ``fused_output_layer`` the last stage returns the hidden states ``[b, s, H]`` instead of the
    logits, and the loss reads the output layer's weight.
    """
    from megatron.core.utils import unwrap_model

    batch = next(data_iterator)
    gpt = unwrap_model(model)
    if not (batch.context.fused_output_layer and gpt.post_process):
        return model(batch.tokens, batch.position_ids, None), partial(loss_func, batch)
    with hidden_states_instead_of_logits(gpt):
        hidden = model(batch.tokens, batch.position_ids, None)
    return hidden, partial(loss_func, batch, output_weight=output_layer_weight(gpt),
                           sequence_parallel=gpt.config.sequence_parallel)


def loss_func(batch: MicroBatch, output: torch.Tensor, *, output_weight: Optional[torch.Tensor] = None,
              sequence_parallel: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss_sum, num_tokens, logs)`` of the micro-batch; ``logs`` maps names to ``[sum, count]``.

    Args:
        output: the model's output: the logits ``[b, s, V_local]``, or with ``output_weight`` the hidden
            states ``[b, s, H]`` (``[b, s / tp, H]`` with ``sequence_parallel``) the output layer would
            multiply by ``output_weight`` ``[V_local, H]``.
    Raises:
        NonFiniteLossError: with ``context.check_loss_per_micro_batch``, the loss, or one teacher's part of
            it, is NaN or infinite.
        ValueError: with ``context.validate_inputs``, a loss input that is not valid.
    """
    context = batch.context
    rows = slice(batch.first_row, batch.first_row + batch.tokens.shape[0])
    if output_weight is None:
        student = StudentLogits(output, vocab_size=context.vocab_size, validate=context.validate_inputs)
    else:
        student = OutputLayerInput(output, output_weight, sequence_parallel=sequence_parallel,
                                   vocab_size=context.vocab_size, validate=context.validate_inputs)
    device = output.device
    terms = [_term(teacher, rows, batch, device, context) for teacher in context.teachers]
    targets = Targets(_to(batch.labels, device), _to(batch.dataset_completion, device),
                      None if batch.behaviour_logprobs is None else _to(batch.behaviour_logprobs, device),
                      batch.behaviour_temperature)
    parts = micro_batch_objective(student, targets, terms, sft_alpha=context.sft_alpha, vocab_size=context.vocab_size,
                                  validate=context.validate_inputs)
    logs = {"loss": torch.stack([parts.loss_sum.detach(), parts.num_tokens.float()])}
    for name, (total, count) in parts.divergences.items():
        logs[f"divergence/{name}"] = torch.stack([total, count])
    if parts.sft is not None:
        logs["sft/nll"] = torch.stack(parts.sft)
    if context.check_loss_per_micro_batch:
        _check_finite(logs, context)
    return parts.loss_sum, parts.num_tokens.int(), logs


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a host tensor is copied without waiting for the device's queued work."""
    return tensor.to(device, non_blocking=True)


def _term(teacher: StepTeacherScores, rows: slice, batch: MicroBatch, device: torch.device,
          context: StepContext) -> TeacherTerm:
    route = _to(context.routes[teacher.config.name][rows], device)
    if teacher.logits is not None:
        return TeacherTerm(teacher.config, None, route, logits=teacher.logits[rows.start // batch.tokens.shape[0]])
    scores = _rows(teacher.scores(), rows, device)
    if teacher.alignments is None:
        return TeacherTerm(teacher.config, scores, route)
    chunks = chunk_ids(teacher.alignments[rows], batch.tokens.shape[1], scores.valid.shape[1])
    return TeacherTerm(teacher.config, scores, route, chunks, teacher.projection)


def _rows(scores: TeacherLogprobs, rows: slice, device: torch.device) -> TeacherLogprobs:
    return TeacherLogprobs(_to(scores.topk_logprobs[rows], device), _to(scores.topk_ids[rows], device),
                           _to(scores.token_logprobs[rows], device), _to(scores.valid[rows], device),
                           scores.sequences[rows], None)


def _check_finite(logs: dict[str, torch.Tensor], context: StepContext) -> None:
    """One device sync per micro-batch: every logged sum must be finite."""
    sums = torch.stack([value[0] for value in logs.values()])
    if bool(torch.isfinite(sums).all()):
        return
    bad = [name for name, value in logs.items() if not torch.isfinite(value[0])]
    raise non_finite_loss_error(f"step {context.step}, rank {context.rank}", bad, context.validate_inputs)


def non_finite_loss_error(where: str, bad: list[str], validated: bool) -> NonFiniteLossError:
    """The error for a loss whose parts ``bad`` (``divergence/<teacher>``, ``sft/nll``, ``loss``) are not
    finite, naming the teachers and the fix."""
    teachers = [name.split("/", 1)[1] for name in bad if name.startswith("divergence/")]
    culprit = f"teacher(s) {teachers}" if teachers else f"{bad}"
    locate = ("" if validated else
              "Set loss.validate_inputs=true to locate the position (every loss then checks its inputs on the "
              "device each micro-batch and names the first bad teacher score, alignment or label), then check ")
    return NonFiniteLossError(
        f"{where}: the loss is not finite ({culprit}); nothing was updated. "
        f"{locate or 'Check '}the teacher's scores and the student's logits (NaN/inf), or lower train.lr"
    )
