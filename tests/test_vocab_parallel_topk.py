"""Specification: the distributed top-k of sharded logits equals torch.topk on the gathered logits.

At TP = 1, 2, 4 (with a padded vocabulary whose padding must never be selected): the values equal
torch.topk's exactly and are sorted; where values are distinct the ids are torch.topk's ids; where
logits tie, the ids are distinct real ids whose logits are exactly the returned values (any tied id
is a correct answer, as with torch.topk itself). ``log_probs=True`` returns log_softmax values.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_mopd.losses import vocab_parallel_topk
from megatron_mopd.testing import run_on_ranks

VOCAB_SIZE, PADDED_VOCAB, K = 90, 96, 16


def logits_with_ties() -> torch.Tensor:
    """[5, 3, 96]: row 0 of each sequence has small integer logits (many ties), the rest are distinct."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, PADDED_VOCAB, generator=gen)
    logits[:, 0] = torch.randint(-3, 4, (5, PADDED_VOCAB), generator=gen).float()
    logits[..., VOCAB_SIZE:] = 100.0  # padding: the largest logits, never a valid answer
    return logits


def _topk_on_rank(logits: torch.Tensor, log_probs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = PADDED_VOCAB // dist.get_world_size()
    shard = logits[..., dist.get_rank() * width : (dist.get_rank() + 1) * width]
    return vocab_parallel_topk(shard, K, vocab_size=VOCAB_SIZE, tp_group=dist.group.WORLD, log_probs=log_probs)


def distributed_topk(tp: int, log_probs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits_with_ties()
    if tp == 1:
        return vocab_parallel_topk(logits, K, vocab_size=VOCAB_SIZE, log_probs=log_probs)
    per_rank = run_on_ranks(_topk_on_rank, tp, args=(logits, log_probs))
    for values, ids in per_rank[1:]:
        assert torch.equal(values, per_rank[0][0]) and torch.equal(ids, per_rank[0][1])
    return per_rank[0]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_topk_equals_torch_topk_on_gathered_logits(tp: int) -> None:
    logits = logits_with_ties()[..., :VOCAB_SIZE]
    expected_values, expected_ids = logits.topk(K, dim=-1)
    values, ids = distributed_topk(tp)

    assert values.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(values, expected_values)
    assert torch.equal(logits.gather(-1, ids), values)
    assert torch.all(ids < VOCAB_SIZE)
    assert torch.all(ids.sort(-1).values.diff(dim=-1) > 0), "ids must be distinct"
    distinct = slice(1, None)  # rows without ties
    assert torch.equal(ids[:, distinct], expected_ids[:, distinct])


@pytest.mark.parametrize("tp", [1, 2])
def test_log_probs_are_log_softmax_at_the_top_ids(tp: int) -> None:
    logits = logits_with_ties()[..., :VOCAB_SIZE]
    values, ids = distributed_topk(tp, log_probs=True)
    torch.testing.assert_close(values, torch.log_softmax(logits, -1).gather(-1, ids))


def test_k_must_fit_the_vocabulary() -> None:
    with pytest.raises(ValueError, match="k must be in"):
        vocab_parallel_topk(torch.zeros(2, 10), 11)
    with pytest.raises(ValueError, match="k must be in"):
        vocab_parallel_topk(torch.zeros(2, 10), 0)
