"""Several teachers for one student: per-sample routing or static weights.

Each teacher is scored with the loss that fits its tokenizer: a teacher sharing the student's
tokenizer uses the plain top-K JSD (``topk_generalized_jsd``, no projection); a teacher with another
tokenizer uses ``projected_kl`` or ``gold_loss`` on aligned chunks.

Routing (MOPD): every sample names exactly one teacher (its ``domain``); a teacher scores only its
samples. Weights: every teacher scores every sample. ``teacher_losses`` returns each teacher's
``(sum, count)`` — positions for a same-tokenizer teacher, chunks for a cross-tokenizer one — so the
caller can reduce them over micro-batches and data-parallel ranks before ``combine_teacher_losses``:

    routing:  Σ_t sum_t / Σ_t count_t           (every scored position/chunk weighs the same)
    weights:  Σ_t w_t · sum_t / count_t         (each teacher's mean, weighted)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import torch

from megatron_mopd.losses.cross_tokenizer import gold_loss, projected_kl
from megatron_mopd.losses.reduction import masked_sum_and_count
from megatron_mopd.losses.topk import topk_generalized_jsd


@dataclass(frozen=True)
class SameTokenizerTeacher:
    """A teacher with the student's tokenizer: top-K ``[B, T, K]`` aligned with the student positions."""

    topk_logprobs: torch.Tensor
    topk_ids: torch.Tensor
    options: Mapping[str, Any] = field(default_factory=dict)  # topk_generalized_jsd keywords (beta, tail…)


@dataclass(frozen=True)
class CrossTokenizerTeacher:
    """A teacher with another tokenizer: its top-K rows and the chunk alignment with the student.

    ``student_chunk_ids`` ``[B, T]`` is −1 on every sample this teacher does not score.
    """

    topk_logprobs: torch.Tensor
    topk_ids: torch.Tensor
    teacher_chunk_ids: torch.Tensor
    student_chunk_ids: torch.Tensor
    num_chunks: int
    projection: Any
    loss: Literal["pkl", "gold"] = "pkl"
    options: Mapping[str, Any] = field(default_factory=dict)  # projected_kl / gold_loss keywords


TeacherInputs = Union[SameTokenizerTeacher, CrossTokenizerTeacher]


def route_by_sample(sample_teachers: Sequence[str], teacher_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """bool ``[B]`` per teacher: the samples that name it. Every name must be a known teacher."""
    unknown = sorted(set(sample_teachers) - set(teacher_names))
    if unknown:
        raise ValueError(
            f"samples are routed to unknown teacher(s) {unknown}; the configured teachers are "
            f"{list(teacher_names)} (check the samples' domain field or the teacher names)"
        )
    return {name: torch.tensor([t == name for t in sample_teachers]) for name in teacher_names}


def teacher_losses(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teachers: Mapping[str, TeacherInputs],
    *,
    routes: Optional[Mapping[str, torch.Tensor]] = None,
    validate: bool = True,
    **common: Any,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each teacher's ``(loss sum, count)`` on the student's logits shard ``[B, T, V_local]``.

    Args:
        labels: ``[B, T]`` next-token labels, −100 where no loss is taken (same-tokenizer teachers).
        routes: from ``route_by_sample``; None scores every sample with every teacher.
        validate: check every loss input on the device (each loss's checks, and that a cross-tokenizer
            teacher has no chunks on another teacher's samples), raising ValueError; host syncs.
            False: no host sync.
        common: keywords every loss takes (temperature, vocab_size, tp_group, chunk_size…).
    """
    out = {}
    for name, teacher in teachers.items():
        route = None if routes is None else routes[name].to(labels.device)
        options = {**common, **teacher.options, "validate": validate}
        if isinstance(teacher, SameTokenizerTeacher):
            loss = topk_generalized_jsd(student_logits, teacher.topk_logprobs, teacher.topk_ids, **options)
            mask = None if route is None else route[:, None].expand_as(labels)
            out[name] = masked_sum_and_count(loss, labels, loss_mask=mask)
            continue
        if validate and route is not None:
            scored = (teacher.student_chunk_ids >= 0).any(-1).to(route.device)
            if bool((scored & ~route).any()):
                sample = int(torch.nonzero(scored & ~route)[0])
                raise ValueError(
                    f"teacher {name!r} has aligned chunks on sample {sample}, which is routed to another "
                    f"teacher: align each teacher only with its own samples"
                )
        loss_fn = projected_kl if teacher.loss == "pkl" else gold_loss
        loss = loss_fn(
            student_logits, teacher.student_chunk_ids, teacher.topk_logprobs, teacher.topk_ids,
            teacher.teacher_chunk_ids, teacher.projection, num_chunks=teacher.num_chunks, **options,
        )
        out[name] = (loss.sum(), torch.tensor(float(teacher.num_chunks), device=loss.device))
    return out


def combine_teacher_losses(
    per_teacher: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    weights: Optional[Mapping[str, float]] = None,
) -> torch.Tensor:
    """The distillation loss from (already reduced) per-teacher ``(sum, count)`` (module docstring)."""
    if weights is None:
        total = torch.stack([s for s, _ in per_teacher.values()]).sum()
        count = torch.stack([c for _, c in per_teacher.values()]).sum()
        return total / count.clamp_min(1)
    missing = sorted(set(per_teacher) - set(weights))
    if missing:
        raise ValueError(f"no weight given for teacher(s) {missing}")
    return sum(weights[name] * s / c.clamp_min(1) for name, (s, c) in per_teacher.items())
