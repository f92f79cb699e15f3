"""Masked reduction of per-position losses into ``(sum, count)``.

Megatron reduces a token-mean over all micro-batches and data-parallel (and context-parallel) ranks:
callers sum the ``(sum, count)`` pairs across them before dividing, so every token weighs the same.
"""

from __future__ import annotations

from typing import Optional

import torch

IGNORE_INDEX = -100


def masked_sum_and_count(
    per_token_loss: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    loss_mask: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of the loss over kept positions.

    Args:
        per_token_loss: ``[...]`` loss of each position.
        labels: same shape; positions equal to ``ignore_index`` (-100) are dropped.
        loss_mask: same shape, bool or 0/1; positions where it is 0 are dropped.
    Returns:
        ``(sum, count)`` float32 scalars. Dropped positions contribute nothing, not even a NaN (their
        gradient is exactly 0).
    """
    keep = torch.ones_like(per_token_loss, dtype=torch.bool)
    for name, mask in (("labels", labels), ("loss_mask", loss_mask)):
        if mask is not None and mask.shape != per_token_loss.shape:
            raise ValueError(
                f"{name} has shape {tuple(mask.shape)}, the loss has {tuple(per_token_loss.shape)}"
            )
    if labels is not None:
        keep &= labels != ignore_index
    if loss_mask is not None:
        keep &= loss_mask.bool()
    total = torch.where(keep, per_token_loss.float(), 0.0).sum()
    return total, keep.sum().to(torch.float32)
