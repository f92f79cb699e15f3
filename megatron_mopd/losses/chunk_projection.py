"""Chunk-averaged student probabilities seen through a sparse vocabulary projection, vocab-parallel.

The student side of the cross-tokenizer losses. Each student position i carries the aligned chunk
c(i) of the token it predicts (−1: not scored); p_i = softmax(z_i/τ) over the student vocabulary,
sharded across TP ranks, and n_c is the number of positions of chunk c. ``chunk_statistics`` computes
either or both of two statistics in one pass over p (and its backward in one more), so a loss using
both produces one logits-sized gradient, not one per statistic.

Projected probabilities: with W the student→teacher projection (≤ R entries per student row),

    q_i[k] = Σ_v p_i[v] · W[v, J_c(i),k]          (Wᵀ p_i restricted to chunk c's teacher columns J_c)
    q̄_c[k] = (1/n_c) Σ_{i ∈ c} q_i[k]

    ∂L/∂z_i[v] = p_i[v] · (Σ_k g_i[k] W[v, J_k] − Σ_k g_i[k] q_i[k]) / τ,   g_i = (∂L/∂q̄_c(i)) / n_c

Each rank projects its own rows of W — per group of rows, the entries of the group's teacher columns,
gathered from W's local rows sorted by teacher id — and the per-position partial q_i are summed across
ranks: one all-reduce of K values per position (identity backward: every rank back-propagates the same
g into its own rows). Σ_k g_i[k] q_i[k] is the softmax
normalizer's term, computed from the summed q_i, so backward needs no collective.

Top list: the L largest entries of p̄_c = (1/n_c) Σ_{i∈c} p_i over the student ids not
excluded, sorted descending, with their ids: local top-L per rank of each chunk's average, then a
global top-L over the all-gathered candidates (L values per chunk and rank). Backward:

    ∂L/∂z_i[v] = p_i[v] · (h_i[v] − Σ_l h_i[id_l] p_i[id_l]) / τ,   h_i[id_l] = (∂L/∂value_c(i),l) / n_c

one all-reduce of a scalar per position (the p_i at ids owned by other ranks).

Nothing of the logits' size is kept for backward besides the input: p is recomputed group of rows
by group of rows from the saved global logsumexp. Rows are processed in groups of whole chunks (the
positions are sorted by chunk) of about ``rows_per_chunk`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from megatron_mopd.parallel.vocab import VocabShard


@dataclass(frozen=True)
class RowGroup:
    """Consecutive whole chunks: ``scored`` slices the scored positions, ``chunks`` their chunk ids,
    ``logits_rows`` the rows of the flattened logits (a slice when they are contiguous)."""

    scored: slice
    chunks: slice
    logits_rows: Union[slice, torch.Tensor]

    @property
    def size(self) -> int:
        return self.scored.stop - self.scored.start


@dataclass(frozen=True)
class ScoredPositions:
    """The positions that carry a chunk, in the flattened ``[N, V_local]`` logits.

    ``rows`` int64 [P] indices into the N positions, grouped by chunk (ascending chunk, then
    position); ``chunk`` int64 [P] their chunk ids; ``count`` int64 [C] positions per chunk;
    ``groups``: consecutive whole chunks of about ``rows_per_group`` positions each (a chunk longer
    than that is a group of its own).
    """

    rows: torch.Tensor
    chunk: torch.Tensor
    count: torch.Tensor
    groups: tuple[RowGroup, ...]

    @classmethod
    def of(
        cls,
        position_chunks: torch.Tensor,
        num_chunks: int,
        rows_per_group: int,
        *,
        device: Optional[torch.device] = None,
        validate: bool = True,
    ) -> "ScoredPositions":
        """The positions of ``position_chunks`` (int ``[...]``, −1 = none), computed where those ids
        are, then moved to ``device`` (default: the same). The grouping reads the chunk sizes on the
        host: chunk ids given on the host (the trainer's come from the host alignment) cost no device
        sync; ids on an accelerator cost one. ``validate``: check that every id is below
        ``num_chunks`` and every chunk has a position (host syncs; raise ValueError); False checks
        neither (a chunk without a position then gets a NaN loss).
        """
        if position_chunks.dtype.is_floating_point or position_chunks.dtype == torch.bool:
            raise ValueError(f"student chunk ids must be an integer tensor, got {position_chunks.dtype}")
        flat = position_chunks.reshape(-1).long()
        if validate and flat.numel() and int(flat.max()) >= num_chunks:
            raise ValueError(f"student chunk id {int(flat.max())} >= num_chunks={num_chunks}")
        rows = torch.nonzero(flat >= 0).squeeze(1)
        rows = rows[torch.argsort(flat[rows], stable=True)]
        chunk = flat[rows]
        count = torch.bincount(chunk, minlength=num_chunks)[:num_chunks]
        if validate and num_chunks and int(count.min()) == 0:
            missing = int(torch.nonzero(count == 0)[0])
            raise ValueError(
                f"chunk {missing} has no student position: chunk ids must come from align_batch "
                f"(a chunk whose first token starts the sequence has no predicting position)"
            )
        groups = _row_groups(rows, count, rows_per_group)
        if device is not None and torch.device(device) != rows.device:
            rows, chunk, count = (t.to(device, non_blocking=True) for t in (rows, chunk, count))
            groups = tuple(
                g if isinstance(g.logits_rows, slice) else RowGroup(g.scored, g.chunks, rows[g.scored])
                for g in groups
            )
        return cls(rows, chunk, count, groups)


def _row_groups(rows: torch.Tensor, count: torch.Tensor, rows_per_group: int) -> tuple[RowGroup, ...]:
    """Consecutive whole chunks of about ``rows_per_group`` rows; one host read of four values per chunk."""
    if count.numel() == 0 or rows.numel() == 0:
        return ()
    ends = torch.cumsum(count, 0)
    # breaks[i]: how many non-consecutive steps rows[0..i] contain; a group is contiguous if none inside.
    breaks = torch.cat([rows.new_zeros(1), torch.cumsum((rows[1:] - rows[:-1] != 1).long(), 0)])
    last_row = rows.numel() - 1
    first = (ends - count).clamp_max(last_row)  # (an empty chunk, possible only unvalidated, reads a neighbour)
    end = (ends - 1).clamp(0, last_row)
    ends, first_breaks, end_breaks, first_rows = torch.stack([ends, breaks[first], breaks[end], rows[first]]).tolist()
    groups, chunk = [], 0
    while chunk < len(ends):
        start = ends[chunk - 1] if chunk else 0
        last = chunk
        while last + 1 < len(ends) and ends[last + 1] - start <= rows_per_group:
            last += 1
        stop = ends[last]
        contiguous = stop == start or end_breaks[last] == first_breaks[chunk]
        first_row = first_rows[chunk]
        logits_rows = slice(first_row, first_row + stop - start) if contiguous else rows[start:stop]
        groups.append(RowGroup(slice(start, stop), slice(chunk, last + 1), logits_rows))
        chunk = last + 1
    return tuple(groups)


def _load_rows(
    work: torch.Tensor, logits_2d: torch.Tensor, group: RowGroup, num_valid: int, temperature: float
) -> torch.Tensor:
    """Write float32 ``z/τ`` of the group's rows (real columns) into ``work`` [rows, num_valid]; return it."""
    source = logits_2d[:, :num_valid]
    if isinstance(group.logits_rows, slice):
        work.copy_(source[group.logits_rows])
    else:
        torch.index_select(source, 0, group.logits_rows, out=work) if source.dtype == work.dtype else work.copy_(
            source.index_select(0, group.logits_rows)
        )
    return work if temperature == 1.0 else work.div_(temperature)


def scored_logsumexp(
    logits_2d: torch.Tensor, positions: ScoredPositions, shard: VocabShard, temperature: float
) -> torch.Tensor:
    """float32 [P]: the global logsumexp of z/τ over the real vocabulary at each scored position."""
    local = torch.full((positions.rows.numel(),), -torch.inf, device=logits_2d.device)
    if shard.num_valid and positions.groups:
        workspace = _workspace(positions, shard.num_valid, logits_2d.device)
        for group in positions.groups:
            z = _load_rows(workspace[: group.size], logits_2d, group, shard.num_valid, temperature)
            row_max = z.amax(dim=-1, keepdim=True)
            row_max.masked_fill_(row_max == -torch.inf, 0.0)  # a row of only -inf: exp gives 0, not NaN
            local[group.scored] = z.sub_(row_max).exp_().sum(-1).log_().add_(row_max.squeeze(-1))
    return shard.logsumexp(local)


def _workspace(positions: ScoredPositions, num_valid: int, device: torch.device) -> torch.Tensor:
    return torch.empty((max(g.size for g in positions.groups), num_valid), device=device)


@dataclass(frozen=True)
class ProjectionRequest:
    """Project onto teacher columns: ``columns`` int64 [C, K] (−1 = absent) and this rank's rows of W,
    ``indices`` (teacher ids, −1 = empty slot) and ``weights``, both [V_local, R]."""

    columns: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor


@dataclass(frozen=True)
class TopListRequest:
    """The ``k`` largest chunk-averaged probabilities over the ids not ``excluded`` (bool [V_local])."""

    excluded: torch.Tensor
    k: int


@dataclass(frozen=True)
class ChunkStatistics:
    """``projected`` float32 [C, K] (0 where the column is absent); ``top_values`` float32 [C, k] sorted
    descending and ``top_ids`` int64 [C, k] global student ids ((0, −1) past the selectable ids).
    Unrequested statistics are None. Replicated on every TP rank; differentiable in the values."""

    projected: torch.Tensor | None
    top_values: torch.Tensor | None
    top_ids: torch.Tensor | None


def chunk_statistics(
    student_logits: torch.Tensor,
    lse: torch.Tensor,
    positions: ScoredPositions,
    shard: VocabShard,
    temperature: float,
    *,
    projection: ProjectionRequest | None = None,
    top_list: TopListRequest | None = None,
) -> ChunkStatistics:
    """The requested statistics of the chunk-averaged student distributions (module docstring).

    Args:
        student_logits: ``[..., V_local]`` this rank's shard; ``positions`` index its flattened rows.
        lse: float32 [P] ``scored_logsumexp`` of the positions (not differentiated).
    """
    projected, top_values, top_ids = _ChunkStatistics.apply(
        student_logits, lse.detach(), positions, shard, temperature, projection, top_list
    )
    return ChunkStatistics(
        projected if projection is not None else None,
        top_values if top_list is not None else None,
        top_ids if top_list is not None else None,
    )


@dataclass(frozen=True)
class _GroupEntries:
    """W's entries in one group's teacher columns: student column ``v`` (local), column slot ``u``
    among the group's ``num_columns`` columns, weight ``w``; ``slot`` [rows, K]: each row's K
    columns as slots (absent columns: slot 0, masked by the caller)."""

    v: torch.Tensor
    u: torch.Tensor
    w: torch.Tensor
    num_columns: int
    slot: torch.Tensor


class _ColumnIndex:
    """This rank's rows of W sorted by teacher id, to fetch the entries of any set of teacher columns."""

    def __init__(self, indices: torch.Tensor, weights: torch.Tensor, num_valid: int):
        indices, weights = indices[:num_valid], weights[:num_valid].float()
        hit = (indices >= 0) & (weights != 0)
        student = torch.arange(num_valid, device=indices.device)[:, None].expand_as(indices)[hit]
        teacher, weight = indices[hit], weights[hit]
        order = torch.argsort(teacher, stable=True)
        self.student, self.teacher, self.weight = student[order], teacher[order], weight[order]

    def entries(self, columns: torch.Tensor, row_chunks: torch.Tensor) -> _GroupEntries:
        """The entries of the present ``columns`` [c, K] of a group whose rows have chunks ``row_chunks``."""
        used, slot = torch.unique(columns.clamp_min(0), return_inverse=True)
        lo = torch.searchsorted(self.teacher, used)
        length = torch.searchsorted(self.teacher, used, right=True) - lo
        u = torch.repeat_interleave(torch.arange(used.numel(), device=used.device), length)
        # position of each entry: its column's first entry + its rank within the column
        starts = torch.repeat_interleave(torch.cumsum(length, 0) - length, length)
        within = torch.arange(u.numel(), device=u.device) - starts
        at = lo[u] + within
        return _GroupEntries(self.student[at], u, self.weight[at], used.numel(), slot[row_chunks])


class _ChunkStatistics(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student_logits: torch.Tensor,
        lse: torch.Tensor,
        positions: ScoredPositions,
        shard: VocabShard,
        temperature: float,
        projection: ProjectionRequest | None,
        top_list: TopListRequest | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = student_logits.reshape(-1, shard.local_size)
        device, num_chunks, num_rows = z.device, positions.count.numel(), positions.rows.numel()
        valid = shard.num_valid
        groups = positions.groups if valid else ()
        entries: list[_GroupEntries] = []
        if projection is not None:
            index = _ColumnIndex(projection.indices, projection.weights, valid)
            q = torch.zeros((num_rows, projection.columns.shape[1]), device=device)
        if top_list is not None:
            local_values = torch.full((num_chunks, top_list.k), -1.0, device=device)
            local_ids = torch.full((num_chunks, top_list.k), -1, dtype=torch.long, device=device)
            local_k = min(top_list.k, valid)
        workspace = _workspace(positions, valid, device) if groups else None
        for group in groups:
            p = _load_rows(workspace[: group.size], z, group, valid, temperature)
            p.sub_(lse[group.scored, None]).exp_()
            row_chunks = positions.chunk[group.scored]
            if projection is not None:
                e = index.entries(projection.columns[group.chunks], row_chunks - group.chunks.start)
                projected = torch.zeros((group.size, e.num_columns), device=device)
                projected.index_add_(1, e.u, p[:, e.v] * e.w)
                q[group.scored] = projected.gather(1, e.slot)
                entries.append(e)
            if top_list is not None and local_k:
                mean = torch.zeros((group.chunks.stop - group.chunks.start, valid), device=device)
                mean.index_add_(0, row_chunks - group.chunks.start, p).div_(positions.count[group.chunks, None])
                mean[:, top_list.excluded[:valid]] = -1.0
                values, ids = mean.topk(local_k, dim=-1)
                local_values[group.chunks, :local_k] = values
                local_ids[group.chunks, :local_k] = torch.where(values >= 0, ids + shard.start, -1)

        projected_mean = top_values = top_ids = torch.empty(0, device=device)
        if projection is not None:
            present = projection.columns >= 0
            q = shard.all_reduce_(q.mul_(present[positions.chunk]))
            projected_mean = torch.zeros(projection.columns.shape, device=device).index_add_(0, positions.chunk, q)
            projected_mean.div_(positions.count[:, None])
            ctx.projection_state = (q, present, entries)
        if top_list is not None:
            candidates = shard.all_gather(local_values).permute(1, 0, 2).reshape(num_chunks, -1)
            candidate_ids = shard.all_gather(local_ids).permute(1, 0, 2).reshape(num_chunks, -1)
            top_values, best = candidates.topk(top_list.k, dim=-1)
            top_ids = torch.where(top_values >= 0, candidate_ids.gather(1, best), -1)
            top_values = top_values.clamp_min_(0.0)
            ctx.top_ids = top_ids
        ctx.save_for_backward(z, lse)
        ctx.positions, ctx.shard, ctx.temperature = positions, shard, temperature
        ctx.requested = (projection is not None, top_list is not None)
        ctx.logits_shape = student_logits.shape
        ctx.mark_non_differentiable(top_ids)
        return projected_mean, top_values, top_ids

    @staticmethod
    def backward(ctx, grad_projected: torch.Tensor, grad_top: torch.Tensor, _grad_ids: torch.Tensor):  # type: ignore[override]
        z, lse = ctx.saved_tensors
        positions: ScoredPositions = ctx.positions
        shard: VocabShard = ctx.shard
        valid, temperature = shard.num_valid, ctx.temperature
        per_position = positions.count[positions.chunk, None].float()
        # normalizer_i = Σ_v p_i[v] ∂L/∂p_i[v], summed over both statistics and all ranks.
        normalizer = torch.zeros((positions.rows.numel(), 1), device=z.device)
        if ctx.requested[0]:
            q, present, entries = ctx.projection_state
            g = (grad_projected.float() * present)[positions.chunk] / per_position
            normalizer += (g * q).sum(-1, keepdim=True)  # Σ_k g_i[k] q_i[k], q already summed over ranks
        if ctx.requested[1]:
            row_ids = ctx.top_ids[positions.chunk]
            local_ids, owned = shard.owned_local_ids(row_ids, row_ids >= 0)
            h = torch.where(owned, grad_top.float()[positions.chunk], 0.0) / per_position
            z_at = z[positions.rows[:, None], local_ids].float().div_(temperature)
            p_at = torch.where(owned, (z_at - lse[:, None]).exp(), 0.0)
            normalizer += shard.all_reduce_((h * p_at).sum(-1, keepdim=True))
            local_ids = local_ids.clamp_max(max(valid - 1, 0))
        # ∂L/∂z = p ⊙ (g_p − normalizer) / τ with g_p sparse: p is written where the gradient goes,
        # the sparse part is read off it, then p is scaled by −normalizer/τ and the sparse part added.
        grad = _empty_gradient(z, positions.rows, valid)
        groups = positions.groups if valid else ()
        in_place = z.dtype == torch.float32
        needs_workspace = groups and not (in_place and _all_contiguous(groups))
        workspace = _workspace(positions, valid, z.device) if needs_workspace else None
        for i, group in enumerate(groups):
            direct = in_place and isinstance(group.logits_rows, slice)
            out = grad[group.logits_rows, :valid] if direct else workspace[: group.size]
            p = _load_rows(out, z, group, valid, temperature).sub_(lse[group.scored, None]).exp_()
            corrections = []
            if ctx.requested[0] and entries[i].v.numel():
                e = entries[i]
                g_used = torch.zeros((group.size, e.num_columns), device=z.device)
                g_used.scatter_add_(1, e.slot, g[group.scored])
                corrections.append((e.v, p[:, e.v] * g_used[:, e.u] * e.w))
            if ctx.requested[1]:
                ids = local_ids[group.scored]
                corrections.append((ids, p.gather(1, ids) * h[group.scored]))
            p.mul_(normalizer[group.scored].neg())
            for columns, values in corrections:
                if columns.dim() == 1:
                    p.index_add_(1, columns, values)
                else:
                    p.scatter_add_(1, columns, values)
            p.div_(temperature)
            if not direct:
                if isinstance(group.logits_rows, slice):
                    grad[group.logits_rows, :valid] = p.to(z.dtype)
                else:
                    grad[:, :valid].index_copy_(0, group.logits_rows, p.to(z.dtype))
        return grad.view(ctx.logits_shape), None, None, None, None, None, None


def _empty_gradient(z: torch.Tensor, scored_rows: torch.Tensor, num_valid: int) -> torch.Tensor:
    """An uninitialized gradient whose padded columns and unscored rows are 0 (the rest is written)."""
    grad = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    grad[:, num_valid:] = 0
    unscored = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    unscored[scored_rows] = False
    grad[unscored] = 0
    return grad


def _all_contiguous(groups: tuple[RowGroup, ...]) -> bool:
    return all(isinstance(g.logits_rows, slice) for g in groups)
