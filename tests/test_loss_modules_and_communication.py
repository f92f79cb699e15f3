"""Specification: the module wrappers, and what the losses send over the tensor-parallel group.

- The modules equal the functional losses followed by the masked ``(sum, count)`` reduction.
- At TP = 2, every collective a loss issues carries per-token scalars or at most K values per token
  (the distributed top-k: K per rank): never a tensor that grows with the vocabulary.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from megatron_mopd.losses import (
    GeneralizedJSDLoss,
    TopKGeneralizedJSDLoss,
    generalized_jsd,
    masked_sum_and_count,
    topk_generalized_jsd,
    vocab_parallel_topk,
)
from megatron_mopd.testing import run_on_ranks

TOKENS, LOCAL_VOCAB, K = 12, 500, 8


def inputs(world_size: int = 1) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(TOKENS, LOCAL_VOCAB * world_size, generator=gen)
    teacher = torch.randn(TOKENS, LOCAL_VOCAB * world_size, generator=gen)
    logprobs, ids = torch.log_softmax(teacher, -1).topk(K, dim=-1)
    labels = torch.arange(TOKENS).masked_fill(torch.arange(TOKENS) % 3 == 0, -100)
    return student, teacher, logprobs, ids, labels


def test_modules_reduce_the_functional_losses() -> None:
    student, teacher, logprobs, ids, labels = inputs()
    total, count = GeneralizedJSDLoss(beta=0.3, temperature=2.0)(student, teacher, labels)
    expected = masked_sum_and_count(generalized_jsd(student, teacher, beta=0.3, temperature=2.0), labels)
    assert torch.equal(total, expected[0]) and torch.equal(count, expected[1])

    total, count = TopKGeneralizedJSDLoss(beta=0.3, tail="renorm")(student, logprobs, ids, labels)
    expected = masked_sum_and_count(topk_generalized_jsd(student, logprobs, ids, beta=0.3, tail="renorm"), labels)
    assert torch.equal(total, expected[0]) and torch.equal(count, expected[1])


def _collective_sizes_on_rank() -> dict[str, int]:
    """Largest number of elements per token any collective carried, for each loss."""
    rank, world = dist.get_rank(), dist.get_world_size()
    student, teacher, logprobs, ids, _ = inputs(world)
    columns = slice(rank * LOCAL_VOCAB, (rank + 1) * LOCAL_VOCAB)
    student, teacher = student[:, columns].requires_grad_(True), teacher[:, columns]
    largest = {"n": 0}

    def recording(collective):
        @functools.wraps(collective)
        def wrapper(*args, **kwargs):
            sent = args[1] if isinstance(args[0], list) else args[0]  # all_gather(outs, t) / all_reduce(t)
            largest["n"] = max(largest["n"], sent.numel())
            return collective(*args, **kwargs)

        return wrapper

    original = dist.all_reduce, dist.all_gather
    dist.all_reduce, dist.all_gather = recording(dist.all_reduce), recording(dist.all_gather)
    try:
        sizes = {}
        for name, run in {
            "full": lambda: generalized_jsd(student, teacher, tp_group=dist.group.WORLD, chunk_size=5),
            "tail": lambda: topk_generalized_jsd(student, logprobs, ids, tp_group=dist.group.WORLD),
            "renorm": lambda: topk_generalized_jsd(student, logprobs, ids, tail="renorm", tp_group=dist.group.WORLD),
        }.items():
            largest["n"] = 0
            run().sum().backward()
            sizes[name] = largest["n"]
        largest["n"] = 0
        vocab_parallel_topk(teacher, K, tp_group=dist.group.WORLD, log_probs=True)
        sizes["topk_select"] = largest["n"]
        return sizes
    finally:
        dist.all_reduce, dist.all_gather = original


def test_collectives_never_carry_the_vocabulary() -> None:
    sizes = run_on_ranks(_collective_sizes_on_rank, 2)[0]
    assert sizes["full"] <= 2 * 5, sizes  # two scalars per token of a 5-token chunk
    assert sizes["tail"] <= TOKENS * K, sizes  # K gathered student logits per token
    assert sizes["renorm"] <= TOKENS * K, sizes
    assert sizes["topk_select"] <= TOKENS * K, sizes  # each rank's K candidates per token
    assert max(sizes.values()) < TOKENS * LOCAL_VOCAB
