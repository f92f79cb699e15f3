"""Vocab-parallel primitives: which global ids a rank's logits hold, and the per-token collectives.

Megatron shards the (padded) vocabulary of the output layer over the tensor-parallel group: rank r
holds the logits of global ids ``[r * V_local, (r + 1) * V_local)``. Ids at or above the true vocabulary
size are padding and must get probability 0, so every computation here works on the first
``num_valid`` local columns only.

Communication is per token and never over the vocabulary: a logsumexp combines one scalar per token
and rank, sums all-reduce a few scalars (or at most K gathered values) per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_mopd.parallel.chunking import local_logsumexp_and_gather

ProcessGroup = dist.ProcessGroup


def resolve_tp_group(tp_group: Optional[ProcessGroup]) -> Optional[ProcessGroup]:
    """``tp_group`` if given; else Megatron's tensor-parallel group once model parallelism is
    initialized; else ``None`` (no tensor parallelism)."""
    if tp_group is not None:
        return tp_group
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


@dataclass(frozen=True)
class VocabShard:
    """The slice of the vocabulary that this rank's logits cover.

    Attributes:
        group: the tensor-parallel group, or None without tensor parallelism.
        rank, world_size: this rank's position in ``group`` (0 and 1 without one).
        local_size: V_local, the last dimension of the local logits (padded vocabulary / world_size).
        vocab_size: the true vocabulary size; global ids >= vocab_size are padding.
        start: the global id of local column 0.
        num_valid: local columns that are real tokens: ``clamp(vocab_size - start, 0, local_size)``.
    """

    group: Optional[ProcessGroup]
    rank: int
    world_size: int
    local_size: int
    vocab_size: int
    start: int
    num_valid: int

    @classmethod
    def of(
        cls,
        local_size: int,
        vocab_size: Optional[int] = None,
        tp_group: Optional[ProcessGroup] = None,
    ) -> "VocabShard":
        """Describe the shard of logits with last dimension ``local_size`` on this rank.

        Raises ValueError when ``vocab_size`` does not fit the padded vocabulary
        ``local_size * world_size`` (e.g. logits from another model or a wrong TP size).
        """
        group = resolve_tp_group(tp_group)
        rank = dist.get_rank(group) if group is not None else 0
        world_size = dist.get_world_size(group) if group is not None else 1
        padded = local_size * world_size
        if vocab_size is None:
            vocab_size = padded
        if not 0 < vocab_size <= padded:
            raise ValueError(
                f"vocab_size={vocab_size} does not fit logits whose padded vocabulary is "
                f"{local_size} local ids x {world_size} tensor-parallel ranks = {padded}; pass the "
                f"model's true (unpadded) vocabulary size"
            )
        start = rank * local_size
        num_valid = min(max(vocab_size - start, 0), local_size)
        return cls(group, rank, world_size, local_size, vocab_size, start, num_valid)

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def empty_with_zero_padding(self, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized tensor of ``like``'s shape whose padded columns (>= num_valid) are 0."""
        out = torch.empty(like.shape, dtype=dtype, device=like.device)
        out[..., self.num_valid :] = 0
        return out

    def all_reduce_(self, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """In-place all-reduce over the group (a no-op without tensor parallelism)."""
        if self.parallel:
            dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Stack every rank's ``tensor`` along a new leading dimension: ``[world_size, *shape]``."""
        if not self.parallel:
            return tensor.unsqueeze(0)
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.stack(parts)

    def logsumexp(self, local_lse: torch.Tensor) -> torch.Tensor:
        """Global logsumexp from each rank's logsumexp over its valid columns (any shape).

        One all-gather of the per-token scalars; a rank with no valid column contributes -inf.
        """
        return torch.logsumexp(self.all_gather(local_lse), dim=0)

    def log_softmax(self, *logits: torch.Tensor) -> list[torch.Tensor]:
        """Global log_softmax over the vocabulary of each float32 ``[N, num_valid]`` local slice.

        One all-gather of per-token scalars serves all the tensors given (e.g. student and teacher).
        """
        if not self.parallel:
            return [torch.log_softmax(x, dim=-1) for x in logits]
        global_lse = self.logsumexp(torch.stack([torch.logsumexp(x, dim=-1) for x in logits]))
        return [x - lse[:, None] for x, lse in zip(logits, global_lse)]

    def gather_columns(self, local: torch.Tensor, ids: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Values at global ids ``ids`` [N, K] of a sharded ``local`` [N, V_local], replicated on all ranks.

        Masked local gather + all-reduce (docs/design.md §3 "replicated values"): each rank fills the ids it
        owns and zeros elsewhere, the sum gives every rank all K values. Entries where ``present`` is
        False are 0. Returns float32 [N, K].
        """
        local_ids, owned = self.owned_local_ids(ids, present)
        values = local.gather(-1, local_ids).float()
        return self.all_reduce_(torch.where(owned, values, 0.0))

    def gather_columns_and_logsumexp(
        self,
        local: torch.Tensor,
        ids: torch.Tensor,
        present: torch.Tensor,
        temperature: float,
        rows_per_chunk: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``gather_columns`` and the global logsumexp of ``local / temperature``, reading ``local`` once.

        Args:
            local: ``[N, V_local]`` this rank's logits (any float dtype).
            ids, present: ``[N, K]`` as in ``gather_columns``.
            temperature: τ of the logsumexp (the gathered values are the raw logits).
            rows_per_chunk: rows per chunk of the PyTorch path (``parallel.chunking``).
        Returns:
            ``(values, lse)``: float32 ``[N, K]`` as ``gather_columns``, replicated on all ranks;
            float32 ``[N]`` = ``logsumexp(local_logsumexp(local, num_valid, τ, rows_per_chunk))``.
            On CUDA with Triton both come from one kernel pass; the collectives are those of the two
            calls, in the same order (the all-reduce of the values, then the all-gather of the lse).
        """
        local_ids, owned = self.owned_local_ids(ids, present)
        return self.gather_owned_columns_and_logsumexp(local, local_ids, owned, temperature, rows_per_chunk)

    def gather_owned_columns_and_logsumexp(
        self,
        local: torch.Tensor,
        local_ids: torch.Tensor,
        owned: torch.Tensor,
        temperature: float,
        rows_per_chunk: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``gather_columns_and_logsumexp`` from the local columns ``local_ids`` [N, K] (in range) and
        the mask ``owned`` of the ids this rank holds, as ``owned_local_ids`` gives them."""
        local_lse, values = local_logsumexp_and_gather(
            local, self.num_valid, temperature, rows_per_chunk, local_ids, owned
        )
        return self.all_reduce_(values), self.logsumexp(local_lse)

    def owned_local_ids(self, ids: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(local column of each id clamped into range, mask of the ids this rank owns)."""
        local_ids = ids - self.start
        owned = present & (local_ids >= 0) & (local_ids < self.num_valid)
        return local_ids.clamp(0, self.local_size - 1), owned
