"""The two input mappings of a column-parallel output layer, as autograd functions on an explicit group.

Megatron's ``ColumnParallelLinear`` (the output layer: weight ``[V_local, H]``, one vocabulary shard per
tensor-parallel rank) receives its input in one of two layouts, and its gradient must go back the
same way (megatron.core.tensor_parallel.mappings):

``copy_to_tensor_parallel_region``        hidden replicated on every TP rank.
    forward: identity.     backward: all-reduce (sum) of the input gradient over the group — each
    rank's gradient covers only its own vocabulary shard's logits.
``gather_from_sequence_parallel_region``  hidden sharded along the sequence (dim 0), sequence parallel.
    forward: all-gather along dim 0.     backward: reduce-scatter along dim 0 — the sum over the
    ranks' vocabulary shards, and each rank keeps the gradient of its own sequence slice.

Megatron's own functions allocate their buffers with ``torch.cuda.current_device()``; these allocate on
the input's device, so they also run on CPU with gloo (whose ``all_gather_into_tensor`` and
``reduce_scatter_tensor`` PyTorch 2.13 implements). Without a group, or with a group of one rank, both
are the identity.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup


def _world_size(group: Optional[ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_gather_first_dim(tensor: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """``[w·d0, ...]``: every rank's ``tensor`` ``[d0, ...]`` concatenated along dim 0 in rank order.

    No autograd: for tensors that need no gradient (a colocated teacher's hidden states).
    """
    world_size = _world_size(group)
    if world_size == 1:
        return tensor
    tensor = tensor.contiguous()
    out = torch.empty((world_size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    dist.all_gather_into_tensor(out, tensor, group=group)
    return out


def reduce_scatter_first_dim(tensor: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """``[d0 / w, ...]``: the sum over the ranks of ``tensor`` ``[d0, ...]``, this rank's slice of dim 0."""
    world_size = _world_size(group)
    if world_size == 1:
        return tensor
    if tensor.shape[0] % world_size:
        raise ValueError(f"dim 0 ({tensor.shape[0]}) must divide by the group size {world_size}")
    tensor = tensor.contiguous()
    out = torch.empty(
        (tensor.shape[0] // world_size, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device
    )
    dist.reduce_scatter_tensor(out, tensor, group=group)
    return out


class _CopyToTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return all_gather_first_dim(tensor, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return reduce_scatter_first_dim(grad, ctx.group), None


def copy_to_tensor_parallel_region(tensor: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient over ``group`` backward (a replicated input)."""
    if _world_size(group) == 1:
        return tensor
    return _CopyToTensorParallelRegion.apply(tensor, group)


def gather_from_sequence_parallel_region(tensor: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """All-gather along dim 0 forward, reduce-scatter along dim 0 backward (a sequence-parallel input).

    ``tensor`` ``[s / w, ...]`` → ``[s, ...]``: rank r's slice becomes rows ``[r·s/w, (r+1)·s/w)``.
    """
    if _world_size(group) == 1:
        return tensor
    return _GatherFromSequenceParallelRegion.apply(tensor, group)
