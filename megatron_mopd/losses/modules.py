"""Thin ``nn.Module`` wrappers: a loss configuration plus the masked reduction.

    criterion = TopKGeneralizedJSDLoss(beta=0.5, tail="tail", vocab_size=vocab_size)
    total, count = criterion(student_logits, teacher_logprobs, teacher_ids, labels=labels)

They return ``(sum, count)`` over the kept positions (labels != -100 and loss_mask != 0) — or, for the
cross-tokenizer losses, over the aligned chunks — the form Megatron's schedules reduce over
micro-batches and data-parallel ranks (``calculate_per_token_loss``). ``validate=False`` (every
module) skips the losses' checks of input values, and so their host syncs (see each loss).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron_mopd.losses.cross_tokenizer import gold_loss, projected_kl
from megatron_mopd.losses.jsd import generalized_jsd
from megatron_mopd.losses.reduction import masked_sum_and_count
from megatron_mopd.losses.topk import TailMode, topk_generalized_jsd
from megatron_mopd.parallel.vocab import ProcessGroup


class _DivergenceLoss(nn.Module):
    def __init__(
        self,
        *,
        beta: float = 0.5,
        temperature: float = 1.0,
        vocab_size: Optional[int] = None,
        tp_group: Optional[ProcessGroup] = None,
        chunk_size: Optional[int] = None,
        scale_by_temperature_squared: bool = False,
        validate: bool = True,
    ) -> None:
        super().__init__()
        self.options = dict(
            beta=beta,
            temperature=temperature,
            vocab_size=vocab_size,
            tp_group=tp_group,
            chunk_size=chunk_size,
            scale_by_temperature_squared=scale_by_temperature_squared,
            validate=validate,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.items() if k != "tp_group")


class GeneralizedJSDLoss(_DivergenceLoss):
    """``generalized_jsd`` (colocated teacher, same vocabulary) reduced to ``(sum, count)``."""

    def __init__(self, *, fused: bool = False, **options) -> None:
        super().__init__(**options)
        self.options["fused"] = fused

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        loss_mask: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        loss = generalized_jsd(student_logits, teacher_logits, **self.options)
        return masked_sum_and_count(loss, labels, loss_mask=loss_mask)


class TopKGeneralizedJSDLoss(_DivergenceLoss):
    """``topk_generalized_jsd`` (teacher top-K log-probs) reduced to ``(sum, count)``."""

    def __init__(self, *, tail: TailMode = "tail", **options) -> None:
        super().__init__(**options)
        self.options["tail"] = tail

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_topk_logprobs: torch.Tensor,
        teacher_topk_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        loss_mask: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        loss = topk_generalized_jsd(student_logits, teacher_topk_logprobs, teacher_topk_ids, **self.options)
        return masked_sum_and_count(loss, labels, loss_mask=loss_mask)


class _CrossTokenizerLoss(_DivergenceLoss):
    def __init__(self, projection, *, tail: TailMode = "tail", **options) -> None:
        super().__init__(**options)
        self.projection = projection
        self.options["tail"] = tail

    def forward(
        self,
        student_logits: torch.Tensor,
        student_chunk_ids: torch.Tensor,
        teacher_topk_logprobs: torch.Tensor,
        teacher_topk_ids: torch.Tensor,
        teacher_chunk_ids: torch.Tensor,
        num_chunks: Optional[int] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        loss = self.loss_fn(
            student_logits, student_chunk_ids, teacher_topk_logprobs, teacher_topk_ids, teacher_chunk_ids,
            self.projection, num_chunks=num_chunks, **self.options,
        )
        return loss.sum(), torch.tensor(float(loss.numel()), device=loss.device)


class ProjectedKLLoss(_CrossTokenizerLoss):
    """``projected_kl`` (P-KL / CTKD, cross-tokenizer teacher) reduced to ``(sum, number of chunks)``."""

    loss_fn = staticmethod(projected_kl)

    def __init__(self, projection, *, beta: float = 0.0, **options) -> None:
        super().__init__(projection, beta=beta, **options)


class GOLDLoss(_CrossTokenizerLoss):
    """``gold_loss`` (GOLD hybrid, cross-tokenizer teacher) reduced to ``(sum, number of chunks)``."""

    loss_fn = staticmethod(gold_loss)

    def __init__(
        self,
        projection,
        *,
        common_threshold: float = 0.6,
        matched_weight: Optional[float] = None,
        unmatched_weight: Optional[float] = None,
        **options,
    ) -> None:
        super().__init__(projection, **options)
        self.options.update(
            common_threshold=common_threshold, matched_weight=matched_weight, unmatched_weight=unmatched_weight
        )
