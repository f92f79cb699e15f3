"""The training objective of one micro-batch: every teacher's loss and the optional SFT term, per token.

One normalization unit for every teacher: the student's completion tokens. Per completion token i
(``labels[i] != -100``) of sample b:

    loss_i = Σ_t w_t · route_t(b) · ℓ_t(i)  +  sft_alpha · dataset(b) · (−log π_S(y_i))

where ``route_t(b)`` is 1 when teacher t scores sample b (always, with ``loss.routing=weights``; only
for the samples of its domains with ``loss.routing=domain``), ``w_t`` is the teacher's weight and
``dataset(b)`` is 1 for dataset completions (never for student-generated ones). The step's loss is
Σ_i loss_i over the global batch divided by its number of completion tokens (Megatron's
``calculate_per_token_loss``), so a domain's weight never shifts with how a teacher tokenizes.

Per-token teacher losses ℓ_t:

- ``jsd`` (a colocated teacher): the vocab-parallel generalized JSD against its full sharded logits;
- ``topk_jsd``: the vocab-parallel generalized JSD against the teacher's top-K (tail or renorm);
- ``ctkd`` / ``gold`` (a teacher with another tokenizer): the P-KL or GOLD loss ℓ_c of each aligned
  chunk c, counted once per student position in the chunk (Σ_c n_c · ℓ_c), so the unit stays the
  student's tokens; positions outside every chunk add nothing;
- ``mopd``: the sampled-token advantage loss −w_i · A_i · log π_S(y_i) with
  A_i = stopgrad(log π_T(y_i) − log π_S(y_i)) and the truncated importance weight
  w_i = clip(π_S(y_i) / π_rollout(y_i), r_min, r_max) when the rollout's behaviour log-probabilities are
  known (1 for dataset and teacher completions); π_S there is the student at the temperature the
  rollout sampled at, as π_rollout is, while the advantage compares raw (temperature 1)
  log-probabilities. A teacher log-probability of −inf (the teacher rules the token out) is floored at
  ``MOPD_TEACHER_LOGPROB_FLOOR``. Its logged divergence is the sampled estimate of
  KL(S‖T), the mean of log π_S(y) − log π_T(y).

The student's output is its logits shard, or with ``loss.fused_output_layer`` its output layer's
input and weight (``trainer.student_output``): the same losses, without the logits.

Validation (``loss.validate_inputs``): on, every loss checks its inputs on the device each micro-batch
and raises naming the first bad position (host syncs, to locate a problem); off (the default), the
objective makes no host sync, and what it would have raised becomes a NaN loss that the step's single
check (``trainer.step``) reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_mopd.losses import generalized_jsd, gold_loss, projected_kl
from megatron_mopd.teachers import TeacherLogprobs
from megatron_mopd.trainer.config import TeacherConfig
from megatron_mopd.trainer.cross_tokenizer import ChunkIds
from megatron_mopd.trainer.student_output import StudentLogits, StudentOutput

MOPD_TEACHER_LOGPROB_FLOOR = -20.0

SumCount = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TeacherTerm:
    """One teacher's scores for one micro-batch.

    Attributes:
        config: the teacher's configuration (loss, β, τ, tail, weight, importance bounds).
        scores: rows ``[b, s, K]`` / ``[b, s]`` aligned with the student's positions (row j scores the
            token at j + 1, as ``labels[:, j]``); for a teacher with another tokenizer, its own rows
            ``[b, t-1, K]`` over its vocabulary. None for a ``jsd`` teacher, which gives ``logits`` instead.
        route: bool ``[b]``, the samples this teacher scores.
        chunks, projection: for a teacher with another tokenizer, the aligned chunks of the micro-batch
            and the ``crosstok.VocabProjection`` into its vocabulary.
        logits: for a ``jsd`` teacher, its logits ``[b, s, V_local]``, sharded as the student's.
    """

    config: TeacherConfig
    scores: Optional[TeacherLogprobs]
    route: torch.Tensor
    chunks: Optional[ChunkIds] = None
    projection: Any = None
    logits: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class Targets:
    """What the student learns on in one micro-batch.

    Attributes:
        labels: int64 ``[b, s]`` next-token ids, −100 outside the completions.
        dataset_completion: bool ``[b]``, completions that come from the dataset (SFT applies).
        behaviour_logprobs: float32 ``[b, s]`` log π_rollout of ``labels`` for sampled completions, or None.
        behaviour_temperature: the temperature the completions were sampled at (π_rollout's).
    """

    labels: torch.Tensor
    dataset_completion: torch.Tensor
    behaviour_logprobs: Optional[torch.Tensor] = None
    behaviour_temperature: float = 1.0


@dataclass(frozen=True)
class ObjectiveParts:
    """The micro-batch's loss sum over completion tokens, their count, and each part's (sum, count)."""

    loss_sum: torch.Tensor
    num_tokens: torch.Tensor
    divergences: dict[str, SumCount]
    sft: Optional[SumCount]


def micro_batch_objective(
    student: StudentOutput | torch.Tensor,
    targets: Targets,
    teachers: list[TeacherTerm],
    *,
    sft_alpha: float,
    vocab_size: int,
    validate: bool = True,
) -> ObjectiveParts:
    """The loss of one micro-batch (module docstring) on the student's output: its logits shard
    ``[b, s, V_local]`` (a tensor or ``StudentLogits``) or ``OutputLayerInput``.

    ``validate``: every loss checks its inputs on the device (host syncs) and a completion token that
    a routed teacher has no score for raises. False: no host sync at all; such a token's loss is NaN
    instead, so a missing score never passes unnoticed (the step checks the loss once, ``trainer.step``).
    With a tensor, ``vocab_size`` and ``validate`` configure the logits losses; a ``StudentOutput``
    carries its own.

    Raises:
        ValueError: with ``validate``, a completion token that a teacher routed to it has no score for
            (the teacher scored fewer positions than the student trains on), or a loss input that is
            not valid; a teacher whose loss needs the logits of a student that has none.
    """
    if isinstance(student, torch.Tensor):
        student = StudentLogits(student, vocab_size=vocab_size, validate=validate)
    labels = targets.labels
    completion = labels != -100
    num_tokens = completion.sum()
    dataset_tokens = completion & targets.dataset_completion[:, None]
    mopd = any(t.config.loss == "mopd" for t in teachers)
    student_logp = None
    if sft_alpha > 0 or mopd:  # SFT alone: one common weight on the dataset tokens; MOPD: per-token weights
        student_logp = student.token_logprobs(labels, common_weight_on=None if mopd else dataset_tokens)

    loss_sum = torch.zeros((), dtype=torch.float32, device=student.device)
    divergences: dict[str, SumCount] = {}
    for term in teachers:
        scored = completion & term.route[:, None]
        missing = None
        if term.chunks is not None:
            scored &= term.chunks.student.to(student.device, non_blocking=True) >= 0
        elif term.scores is not None:
            missing = scored & ~term.scores.valid
            if validate:
                _check_rows(term, missing)
        differentiated = scored if missing is None else scored & ~missing
        per_token, divergence = _teacher_loss(student, student_logp, targets, term, differentiated, vocab_size,
                                              validate)
        if missing is not None:  # all False when validated
            per_token = torch.where(missing, torch.nan, per_token)
            divergence = torch.where(missing, torch.nan, divergence)
        loss_sum = loss_sum + term.config.weight * torch.where(scored, per_token, 0.0).sum()
        divergences[term.config.name] = (torch.where(scored, divergence, 0.0).sum().detach(),
                                         scored.sum().float())
    sft = None
    if sft_alpha > 0:
        nll = torch.where(dataset_tokens, -student_logp, 0.0).sum()
        loss_sum = loss_sum + sft_alpha * nll
        sft = (nll.detach(), dataset_tokens.sum().float())
    return ObjectiveParts(loss_sum, num_tokens, divergences, sft)


def _teacher_loss(
    student: StudentOutput,
    student_logp: Optional[torch.Tensor],
    targets: Targets,
    term: TeacherTerm,
    differentiated: torch.Tensor,
    vocab_size: int,
    validate: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss ``[b, s]`` with gradient, per-token divergence ``[b, s]`` for the logs).

    ``differentiated``: bool ``[b, s]``, the positions whose loss enters the sum with the teacher's weight.
    """
    cfg, scores = term.config, term.scores
    if cfg.loss == "jsd":
        loss = generalized_jsd(student.logits(f"teacher {cfg.name!r} (loss jsd)"), term.logits, beta=cfg.beta,
                               temperature=cfg.temperature, vocab_size=vocab_size, validate=validate)
        return loss, loss.detach()
    if cfg.loss == "topk_jsd":
        loss = student.topk_jsd(scores, differentiated, beta=cfg.beta, temperature=cfg.temperature, tail=cfg.tail)
        return loss, loss.detach()
    if cfg.loss == "mopd":
        teacher_logp = scores.token_logprobs.clamp_min(MOPD_TEACHER_LOGPROB_FLOOR)
        log_ratio = (student_logp - teacher_logp).detach()  # log π_S − log π_T = −A
        weight = torch.ones_like(log_ratio)
        if targets.behaviour_logprobs is not None:
            current = student_logp.detach()  # π_S at the temperature the rollout sampled at
            if targets.behaviour_temperature != 1.0:
                current = student.token_logprobs(targets.labels, temperature=targets.behaviour_temperature,
                                                 differentiable=False)
            ratio = (current - targets.behaviour_logprobs).exp()
            weight = torch.where(targets.dataset_completion[:, None], weight,
                                 ratio.clamp(cfg.importance_ratio_min, cfg.importance_ratio_max))
        return weight * log_ratio * student_logp, log_ratio
    if cfg.loss in ("ctkd", "gold"):
        per_chunk = _chunk_losses(student.logits(f"teacher {cfg.name!r} (loss {cfg.loss})"), term, vocab_size,
                                  validate)
        chunk_of = term.chunks.student.to(student.device, non_blocking=True)
        per_token = torch.where(chunk_of >= 0, per_chunk[chunk_of.clamp_min(0)], 0.0)
        return per_token, per_token.detach()
    raise ValueError(f"teacher {cfg.name!r}: loss {cfg.loss!r} is not available in the trainer yet "
                     f"(available: jsd, topk_jsd, ctkd, gold, mopd)")


def _chunk_losses(logits: torch.Tensor, term: TeacherTerm, vocab_size: int, validate: bool) -> torch.Tensor:
    """float32 ``[C]`` (at least one entry, so an empty micro-batch still indexes): each chunk's loss.

    The chunk ids stay where the alignment made them (the host): the losses read their grouping there,
    without a device sync."""
    cfg, chunks, scores = term.config, term.chunks, term.scores
    if chunks.num_chunks == 0:
        return logits.new_zeros(1, dtype=torch.float32)
    loss_fn = projected_kl if cfg.loss == "ctkd" else gold_loss
    return loss_fn(
        logits, chunks.student, scores.topk_logprobs, scores.topk_ids, chunks.teacher,
        term.projection, num_chunks=chunks.num_chunks, beta=cfg.beta, temperature=cfg.temperature, tail=cfg.tail,
        vocab_size=vocab_size, validate=validate,
    )


def _check_rows(term: TeacherTerm, missing: torch.Tensor) -> None:
    if bool(missing.any()):
        sample, position = (int(i) for i in torch.nonzero(missing)[0])
        raise ValueError(
            f"teacher {term.config.name!r} returned no score for position {position} of micro-batch sample "
            f"{sample}, a completion token the student trains on: the teacher scored a shorter sequence "
            f"than was sent (check that the server's max model length covers data.seq_length)"
        )
