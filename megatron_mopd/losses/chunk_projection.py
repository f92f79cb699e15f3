"""Chunk-averaged student probabilities seen through a sparse vocabulary projection, vocab-parallel.

The two building blocks of the cross-tokenizer losses. Each student position i carries the aligned
chunk c(i) of the token it predicts (−1: not scored); p_i = softmax(z_i/τ) over the student
vocabulary, sharded across TP ranks, and n_c is the number of positions of chunk c.

``chunk_projected_probs``: with W the student→teacher projection (≤ R entries per student row),

    q_i[k] = Σ_v p_i[v] · W[v, J_c(i),k]          (Wᵀ p_i restricted to chunk c's teacher columns J_c)
    q̄_c[k] = (1/n_c) Σ_{i ∈ c} q_i[k]

    ∂L/∂z_i[v] = p_i[v] · (Σ_k g_i[k] W[v, J_k] − Σ_k g_i[k] q_i[k]) / τ,   g_i = (∂L/∂q̄_c(i)) / n_c

Each rank projects its own rows of W (a CSR matrix restricted to the batch's teacher columns) and the
per-position partial q_i are summed across ranks: one all-reduce of K values per position (identity
backward: every rank back-propagates the same g into its own rows). Σ_k g_i[k] q_i[k] is the softmax
normalizer's term, computed from the summed q_i, so backward needs no collective.

``chunk_topk_probs``: the L largest entries of p̄_c = (1/n_c) Σ_{i∈c} p_i over the student ids not
excluded, sorted descending, with their ids: local top-L per rank of each chunk's average, then a
global top-L over the all-gathered candidates (L values per chunk and rank). Backward:

    ∂L/∂z_i[v] = p_i[v] · (h_i[v] − Σ_l h_i[id_l] p_i[id_l]) / τ,   h_i[id_l] = (∂L/∂value_c(i),l) / n_c

one all-reduce of a scalar per position (the p_i at ids owned by other ranks).

Both keep nothing of the logits' size for backward besides the input: p is recomputed chunk of rows
by chunk of rows from the saved global logsumexp.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from megatron_mopd.parallel.chunking import softmax_into
from megatron_mopd.parallel.vocab import VocabShard


@dataclass(frozen=True)
class ScoredPositions:
    """The positions that carry a chunk, in the flattened ``[N, V_local]`` logits.

    ``rows`` int64 [P] indices into the N positions, grouped by chunk (ascending chunk, then
    position); ``chunk`` int64 [P] their chunk ids; ``count`` int64 [C] positions per chunk.
    """

    rows: torch.Tensor
    chunk: torch.Tensor
    count: torch.Tensor

    @classmethod
    def of(cls, position_chunks: torch.Tensor, num_chunks: int) -> "ScoredPositions":
        if position_chunks.dtype.is_floating_point or position_chunks.dtype == torch.bool:
            raise ValueError(f"student chunk ids must be an integer tensor, got {position_chunks.dtype}")
        flat = position_chunks.reshape(-1).long()
        if flat.numel() and int(flat.max()) >= num_chunks:
            raise ValueError(f"student chunk id {int(flat.max())} >= num_chunks={num_chunks}")
        rows = torch.nonzero(flat >= 0).squeeze(1)
        order = torch.argsort(flat[rows], stable=True)
        rows = rows[order]
        chunk = flat[rows]
        count = torch.bincount(chunk, minlength=num_chunks)
        if num_chunks and int(count.min()) == 0:
            missing = int(torch.nonzero(count == 0)[0])
            raise ValueError(
                f"chunk {missing} has no student position: chunk ids must come from align_batch "
                f"(a chunk whose first token starts the sequence has no predicting position)"
            )
        return cls(rows, chunk, count)


def scored_logsumexp(
    logits_2d: torch.Tensor, positions: ScoredPositions, shard: VocabShard, temperature: float, rows: int
) -> torch.Tensor:
    """float32 [P]: the global logsumexp of z/τ over the real vocabulary at each scored position."""
    local = torch.full((positions.rows.numel(),), -torch.inf, device=logits_2d.device)
    if shard.num_valid:
        for sl in _slices(positions.rows.numel(), rows):
            z = logits_2d[positions.rows[sl], : shard.num_valid].float().div_(temperature)
            local[sl] = torch.logsumexp(z, dim=-1)
    return shard.logsumexp(local)


def _slices(n: int, step: int):
    return (slice(s, min(s + step, n)) for s in range(0, n, step))


def _softmax_rows(
    logits_2d: torch.Tensor, rows: torch.Tensor, lse: torch.Tensor, shard: VocabShard, temperature: float
) -> torch.Tensor:
    """float32 [len(rows), num_valid]: p over this rank's real columns at the given positions."""
    z = logits_2d[rows, : shard.num_valid]
    return softmax_into(torch.empty(z.shape, device=z.device), z.float(), lse, temperature)


def _csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix from COO entries (any order)."""
    order = torch.argsort(rows * shape[1] + cols)
    crow = torch.zeros(shape[0] + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols[order], values[order], shape, check_invariants=False)


class _ChunkProjectedProbs(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student_logits: torch.Tensor,
        lse: torch.Tensor,
        positions: ScoredPositions,
        columns: torch.Tensor,
        projection_indices: torch.Tensor,
        projection_weights: torch.Tensor,
        shard: VocabShard,
        temperature: float,
        rows_per_chunk: int,
    ) -> torch.Tensor:
        z = student_logits.reshape(-1, shard.local_size)
        present = columns >= 0
        # The batch's teacher columns U, and each chunk's columns as indices into U.
        used, column_in_used = torch.unique(columns.clamp_min(0), return_inverse=True)
        projection_t, projection = _restricted_projection(
            projection_indices, projection_weights, used, shard.num_valid
        )
        q = torch.zeros((positions.rows.numel(), columns.shape[1]), device=z.device)
        if projection is not None:
            for sl in _slices(positions.rows.numel(), rows_per_chunk):
                p = _softmax_rows(z, positions.rows[sl], lse[sl], shard, temperature)
                projected = (projection_t @ p.t()).t()  # [n, |U|]
                q[sl] = projected.gather(1, column_in_used[positions.chunk[sl]])
        q = shard.all_reduce_(q.mul_(present[positions.chunk]))
        mean = torch.zeros(columns.shape, device=z.device).index_add_(0, positions.chunk, q)
        mean.div_(positions.count[:, None])

        ctx.save_for_backward(z, lse, q, column_in_used, present)
        ctx.projection, ctx.positions, ctx.shard = projection, positions, shard
        ctx.temperature, ctx.rows_per_chunk, ctx.logits_shape = temperature, rows_per_chunk, student_logits.shape
        ctx.num_used = used.numel()
        return mean

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor):  # type: ignore[override]
        z, lse, q, column_in_used, present = ctx.saved_tensors
        positions: ScoredPositions = ctx.positions
        shard: VocabShard = ctx.shard
        g = (grad_mean.float() * present)[positions.chunk] / positions.count[positions.chunk, None]
        normalizer = (g * q).sum(-1, keepdim=True)  # Σ_k g_i[k] q_i[k] = Σ_v p_i[v] (∂L/∂p_i[v])
        grad = torch.zeros(z.shape, dtype=z.dtype, device=z.device)
        for sl in _slices(positions.rows.numel() if shard.num_valid else 0, ctx.rows_per_chunk):
            p = _softmax_rows(z, positions.rows[sl], lse[sl], shard, ctx.temperature)
            if ctx.projection is None:  # no local row projects to the columns: only the normalizer term
                g_p = normalizer[sl].neg().expand_as(p)
            else:
                g_used = torch.zeros((p.shape[0], ctx.num_used), device=z.device)
                g_used.scatter_add_(1, column_in_used[positions.chunk[sl]], g[sl])
                g_p = (ctx.projection @ g_used.t()).t().sub_(normalizer[sl])  # [n, num_valid]
            grad[positions.rows[sl], : shard.num_valid] = p.mul_(g_p).div_(ctx.temperature).to(z.dtype)
        return grad.view(ctx.logits_shape), None, None, None, None, None, None, None, None


def _restricted_projection(
    indices: torch.Tensor, weights: torch.Tensor, used: torch.Tensor, num_valid: int
) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """W's local rows restricted to the teacher columns ``used``: (Wᵀ [|U|, V_valid], W [V_valid, |U|]) CSR."""
    indices, weights = indices[:num_valid], weights[:num_valid].float()
    slot = torch.searchsorted(used, indices.clamp_min(0))
    slot_clamped = slot.clamp_max(used.numel() - 1)
    hit = (indices >= 0) & (weights != 0) & (used[slot_clamped] == indices)
    if not bool(hit.any()):
        return None, None
    rows = torch.arange(num_valid, device=indices.device)[:, None].expand_as(indices)[hit]
    cols, values = slot_clamped[hit], weights[hit]
    return (
        _csr(cols, rows, values, (used.numel(), num_valid)),
        _csr(rows, cols, values, (num_valid, used.numel())),
    )


def chunk_projected_probs(
    student_logits: torch.Tensor,
    lse: torch.Tensor,
    positions: ScoredPositions,
    columns: torch.Tensor,
    projection_indices: torch.Tensor,
    projection_weights: torch.Tensor,
    shard: VocabShard,
    temperature: float,
    rows_per_chunk: int,
) -> torch.Tensor:
    """q̄ float32 [C, K] (module docstring), replicated on every TP rank; 0 where ``columns`` < 0.

    Args:
        student_logits: ``[..., V_local]`` this rank's shard; positions index its flattened rows.
        lse: float32 [P] ``scored_logsumexp`` of the positions (not differentiated).
        columns: int64 [C, K] teacher ids per chunk, −1 = absent.
        projection_indices, projection_weights: [V_local, R] this rank's rows of W (teacher ids,
            −1 = empty slot; weights).
    """
    return _ChunkProjectedProbs.apply(
        student_logits, lse.detach(), positions, columns, projection_indices, projection_weights,
        shard, temperature, rows_per_chunk,
    )


class _ChunkTopKProbs(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student_logits: torch.Tensor,
        lse: torch.Tensor,
        positions: ScoredPositions,
        excluded: torch.Tensor,
        k: int,
        shard: VocabShard,
        temperature: float,
        rows_per_chunk: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z = student_logits.reshape(-1, shard.local_size)
        num_chunks = positions.count.numel()
        local_values = torch.full((num_chunks, k), -1.0, device=z.device)
        local_ids = torch.full((num_chunks, k), -1, dtype=torch.long, device=z.device)
        local_k = min(k, shard.num_valid)
        if local_k:
            excluded_valid = excluded[: shard.num_valid]
            ends = torch.cumsum(positions.count, 0).tolist()
            first_chunk = 0
            while first_chunk < num_chunks:  # groups of whole chunks, about rows_per_chunk rows each
                start = ends[first_chunk - 1] if first_chunk else 0
                last = first_chunk
                while last + 1 < num_chunks and ends[last + 1] - start <= rows_per_chunk:
                    last += 1
                sl = slice(start, ends[last])
                p = _softmax_rows(z, positions.rows[sl], lse[sl], shard, temperature)
                group = positions.chunk[sl] - first_chunk
                mean = torch.zeros((last - first_chunk + 1, p.shape[1]), device=z.device)
                mean.index_add_(0, group, p).div_(positions.count[first_chunk : last + 1, None])
                mean[:, excluded_valid] = -1.0
                values, ids = mean.topk(local_k, dim=-1)
                local_values[first_chunk : last + 1, :local_k] = values
                local_ids[first_chunk : last + 1, :local_k] = torch.where(values >= 0, ids + shard.start, -1)
                first_chunk = last + 1
        candidates = shard.all_gather(local_values).permute(1, 0, 2).reshape(num_chunks, -1)
        candidate_ids = shard.all_gather(local_ids).permute(1, 0, 2).reshape(num_chunks, -1)
        values, best = candidates.topk(k, dim=-1)
        ids = candidate_ids.gather(1, best)
        present = values >= 0
        values = torch.where(present, values, 0.0)
        ids = torch.where(present, ids, -1)
        ctx.save_for_backward(z, lse, ids)
        ctx.positions, ctx.shard, ctx.temperature = positions, shard, temperature
        ctx.rows_per_chunk, ctx.logits_shape = rows_per_chunk, student_logits.shape
        ctx.mark_non_differentiable(ids)
        return values, ids

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor, _grad_ids: torch.Tensor):  # type: ignore[override]
        z, lse, ids = ctx.saved_tensors
        positions: ScoredPositions = ctx.positions
        shard: VocabShard = ctx.shard
        row_ids = ids[positions.chunk]  # [P, L]
        local_ids, owned = shard.owned_local_ids(row_ids, row_ids >= 0)
        h = torch.where(owned, grad_values.float()[positions.chunk], 0.0) / positions.count[positions.chunk, None]
        # Σ_l h_i[id_l] p_i[id_l] over all ranks' ids: local gather of z, one scalar per position reduced.
        z_at = z[positions.rows[:, None], local_ids].float().div_(ctx.temperature)
        normalizer = shard.all_reduce_((h * torch.where(owned, (z_at - lse[:, None]).exp(), 0.0)).sum(-1))
        grad = torch.zeros(z.shape, dtype=z.dtype, device=z.device)
        for sl in _slices(positions.rows.numel() if shard.num_valid else 0, ctx.rows_per_chunk):
            p = _softmax_rows(z, positions.rows[sl], lse[sl], shard, ctx.temperature)
            valid_ids = local_ids[sl].clamp_max(shard.num_valid - 1)
            g_p = torch.zeros_like(p).scatter_add_(1, valid_ids, h[sl]).sub_(normalizer[sl, None])
            grad[positions.rows[sl], : shard.num_valid] = p.mul_(g_p).div_(ctx.temperature).to(z.dtype)
        return grad.view(ctx.logits_shape), None, None, None, None, None, None, None


def chunk_topk_probs(
    student_logits: torch.Tensor,
    lse: torch.Tensor,
    positions: ScoredPositions,
    excluded: torch.Tensor,
    k: int,
    shard: VocabShard,
    temperature: float,
    rows_per_chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest chunk-averaged student probabilities over the ids not ``excluded``.

    Args:
        excluded: bool [V_local]: this rank's columns that may not be selected.
    Returns:
        ``(values float32 [C, k] sorted descending, ids int64 [C, k] global student ids)``,
        replicated on every TP rank; entries beyond the selectable ids are (0, −1). Differentiable
        in ``values``.
    """
    return _ChunkTopKProbs.apply(
        student_logits, lse.detach(), positions, excluded, k, shard, temperature, rows_per_chunk
    )
