"""Distributed top-k over vocab-sharded logits (what a colocated teacher sends to the loss).

Each rank takes the top-k of its valid columns, the K·tp candidates (values and global ids) are
all-gathered, and the global top-k is taken among them: per token 2·K·tp numbers cross the wire, never
the vocabulary. Ties among equal values may pick any of the tied ids, exactly like ``torch.topk``.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_mopd.parallel.chunking import chunk_rows, local_logsumexp
from megatron_mopd.parallel.vocab import ProcessGroup, VocabShard


@torch.no_grad()
def vocab_parallel_topk(
    logits: torch.Tensor,
    k: int,
    *,
    vocab_size: Optional[int] = None,
    tp_group: Optional[ProcessGroup] = None,
    log_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the full (unpadded) vocabulary from this rank's shard ``[..., V_local]``.

    Args:
        k: number of entries, 1 <= k <= vocab_size.
        log_probs: return ``log_softmax(logits)`` values at the top ids instead of the logits (the
            teacher top-k log-probabilities of the loss API; one more scalar per token on the wire).
    Returns:
        ``(values [..., k] float32, ids [..., k] int64)``, sorted by decreasing value, identical on
        every rank of ``tp_group``. No gradient flows through it.
    """
    shard = VocabShard.of(logits.shape[-1], vocab_size, tp_group)
    if not 1 <= k <= shard.vocab_size:
        raise ValueError(f"k must be in [1, vocab_size={shard.vocab_size}], got {k}")
    flat = logits.reshape(-1, shard.local_size)
    k_local = min(k, shard.num_valid)
    # topk in the logits' own dtype (float32 conversion is exact and keeps the order): no float32
    # copy of a bf16 shard.
    values, local_ids = flat[:, : shard.num_valid].topk(k_local, dim=-1)
    values = values.float()
    if k_local < k:  # this shard has fewer valid ids than k: pad with entries that never win
        pad = (0, k - k_local)
        values = torch.nn.functional.pad(values, pad, value=-torch.inf)
        local_ids = torch.nn.functional.pad(local_ids, pad, value=0)
    candidate_values = shard.all_gather(values).permute(1, 0, 2).reshape(flat.shape[0], -1)
    candidate_ids = shard.all_gather(local_ids + shard.start).permute(1, 0, 2).reshape(flat.shape[0], -1)
    top_values, position = candidate_values.topk(k, dim=-1)
    top_ids = candidate_ids.gather(-1, position)
    if log_probs:
        rows = chunk_rows(None, shard.local_size, logits.device)
        top_values -= shard.logsumexp(local_logsumexp(flat, shard.num_valid, 1.0, rows))[:, None]
    lead = logits.shape[:-1]
    return top_values.view(*lead, k), top_ids.view(*lead, k)
