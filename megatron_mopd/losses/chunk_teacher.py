"""The teacher's distribution per aligned chunk, from its per-position top-K.

An aligned chunk (``alignment.py``) covers one or more teacher rows: row j is the teacher's
distribution of teacher token j+1, so the rows of chunk c are those predicting c's tokens. The
chunk's teacher distribution is the average of those rows' (tempered) distributions — a sparse vector
on the union of their top-K ids — of which the ``keep`` most probable ids are kept:

    P_c(j) = (1/|rows(c)|) Σ_{r ∈ rows(c)} P_r(j),   P_r = softmax over row r's support / τ

``tail`` mode: row r's support is its K ids plus a tail bucket holding 1 − Σ_K p (as in the top-K
loss), and whatever the kept ids do not hold is the chunk's tail mass ``1 − Σ kept``. ``renorm`` mode:
row r's support is its K ids, and the kept ids are renormalized to sum to 1.

Ids outside ``allowed`` (e.g. teacher tokens no student token projects to) are dropped before the
top-``keep`` selection: in ``tail`` mode their mass joins the tail. Non-differentiable bookkeeping on
[rows, K] tensors of fixed shapes (no host sync unless validating): no student-vocabulary tensor is
involved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_mopd.losses.topk import TAIL_MODES, TailMode, validate_teacher_topk


@dataclass(frozen=True)
class ChunkTeacher:
    """The teacher per chunk: ``ids`` int64 [C, keep] (−1 = absent; most probable first) and
    ``probs`` float32 [C, keep] (0 where absent). ``tail_mass`` float32 [C]: 1 − Σ probs in
    ``tail`` mode, 0 in ``renorm`` mode. ``rows`` int64 [C]: the teacher rows averaged per chunk
    (0: the chunk has no teacher row, possible only without validation)."""

    ids: torch.Tensor
    probs: torch.Tensor
    tail_mass: torch.Tensor
    rows: Optional[torch.Tensor] = None

    @property
    def present(self) -> torch.Tensor:
        return self.ids >= 0


def chunk_teacher_distributions(
    topk_logprobs: torch.Tensor,
    topk_ids: torch.Tensor,
    chunk_ids: torch.Tensor,
    num_chunks: int,
    *,
    teacher_vocab_size: int,
    temperature: float = 1.0,
    tail: TailMode = "tail",
    keep: Optional[int] = None,
    allowed: Optional[torch.Tensor] = None,
    validate: bool = True,
) -> ChunkTeacher:
    """Average the teacher's per-row top-K distributions over each chunk's rows.

    Args:
        topk_logprobs, topk_ids: ``[..., K]`` the teacher's raw log-probabilities (−inf = absent)
            and teacher-vocabulary ids, one row per teacher position.
        chunk_ids: int ``[...]`` the chunk each row belongs to, −1 for rows outside every chunk (any
            device; moved to the teacher's).
        num_chunks: C; every chunk in ``[0, C)`` must have at least one row.
        teacher_vocab_size: ids must lie in ``[0, teacher_vocab_size)``.
        temperature: τ, applied per row over its support before averaging.
        tail: ``"tail"`` or ``"renorm"`` (module docstring).
        keep: ids kept per chunk (default K).
        allowed: optional bool ``[teacher_vocab_size]``; ids where it is False are dropped.
        validate: check the teacher's values (``validate_teacher_topk``) and the chunk ids (below C,
            every chunk with a row) on the device, raising ValueError; host syncs. False: no host
            sync at all (every tensor keeps its shape: no masking, no ``unique``).
    """
    if tail not in TAIL_MODES:
        raise ValueError(f"tail must be one of {TAIL_MODES}, got {tail!r}")
    k = topk_ids.shape[-1] if topk_ids.dim() else 0
    keep = k if keep is None else keep
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if chunk_ids.dtype.is_floating_point or chunk_ids.dtype == torch.bool:
        raise ValueError(f"teacher chunk ids must be an integer tensor, got {chunk_ids.dtype}")
    present = validate_teacher_topk(
        topk_logprobs,
        topk_ids,
        teacher_vocab_size,
        check_mass=tail == "tail",
        leading_shape=chunk_ids.shape,
        vocabulary="teacher",
        validate=validate,
    )
    device = topk_ids.device
    chunks = chunk_ids.reshape(-1).to(device, torch.long, non_blocking=True)
    if validate and chunks.numel() and int(chunks.max()) >= num_chunks:
        raise ValueError(f"teacher chunk id {int(chunks.max())} >= num_chunks={num_chunks}")
    # Rows outside every chunk (and, unvalidated, ids >= C) go to a spare chunk C, dropped at the end.
    row_chunk = torch.where(chunks >= 0, chunks, num_chunks).clamp_max_(num_chunks)
    rows_per_chunk = torch.zeros(num_chunks + 1, dtype=torch.long, device=device).index_add_(
        0, row_chunk, torch.ones_like(row_chunk)
    )
    if validate and num_chunks and int(rows_per_chunk[:num_chunks].min()) == 0:
        missing = int(torch.nonzero(rows_per_chunk[:num_chunks] == 0)[0])
        raise ValueError(
            f"chunk {missing} has no teacher row: the teacher's scores do not cover a position the "
            f"alignment needs (missing position, or chunk ids not from align_batch)"
        )

    present = present.reshape(-1, k)
    row_probs = _tempered_row_probs(topk_logprobs.reshape(-1, k).float(), present, temperature, tail)
    ids = topk_ids.reshape(-1, k).long()
    keep_entry = present & (row_chunk < num_chunks)[:, None]
    if allowed is not None:
        keep_entry &= allowed.to(device, non_blocking=True)[ids.clamp(0, teacher_vocab_size - 1)]
    entry_chunk = row_chunk[:, None].expand(-1, k)
    entry_prob = torch.where(keep_entry, row_probs / rows_per_chunk.clamp_min(1)[entry_chunk], 0.0).reshape(-1)

    # Merge equal (chunk, id) entries: sort the keys, sum each run of equal keys into its segment.
    # Dropped entries share the largest key, chunk C's. Then keep the `keep` most probable ids per chunk.
    dropped = num_chunks * teacher_vocab_size
    key = torch.where(keep_entry, entry_chunk * teacher_vocab_size + ids, dropped).reshape(-1)
    sorted_key, by_key = torch.sort(key, stable=True)
    starts = torch.ones_like(sorted_key, dtype=torch.bool)
    starts[1:] = sorted_key[1:] != sorted_key[:-1]
    segment = torch.cumsum(starts, 0) - 1
    merged = torch.zeros(key.numel(), dtype=torch.float32, device=device).index_add_(0, segment, entry_prob[by_key])
    segment_key = torch.full_like(key, dropped).scatter_(0, segment, sorted_key)  # unused segments: dropped
    by_prob = torch.argsort(merged, descending=True, stable=True)
    order = by_prob[torch.argsort(segment_key[by_prob] // teacher_vocab_size, stable=True)]
    chunk_of = segment_key[order] // teacher_vocab_size
    first = torch.searchsorted(chunk_of, chunk_of, right=False)
    rank = torch.arange(order.numel(), device=device) - first
    kept = (rank < keep) & (chunk_of < num_chunks)
    target = (torch.where(kept, chunk_of, num_chunks), torch.where(kept, rank, 0))
    out_ids = torch.full((num_chunks + 1, keep), -1, dtype=torch.long, device=device)
    out_probs = torch.zeros((num_chunks + 1, keep), dtype=torch.float32, device=device)
    out_ids.index_put_(target, torch.where(kept, segment_key[order] % teacher_vocab_size, -1))
    out_probs.index_put_(target, torch.where(kept, merged[order], 0.0))
    out_ids, out_probs, rows_per_chunk = out_ids[:num_chunks], out_probs[:num_chunks], rows_per_chunk[:num_chunks]
    if tail == "renorm":
        mass = out_probs.sum(-1, keepdim=True)
        out_probs = torch.where(mass > 0, out_probs / mass.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        return ChunkTeacher(out_ids, out_probs, torch.zeros(num_chunks, device=device), rows_per_chunk)
    return ChunkTeacher(out_ids, out_probs, (1.0 - out_probs.sum(-1)).clamp_min_(0.0), rows_per_chunk)


def _tempered_row_probs(
    logprobs: torch.Tensor, present: torch.Tensor, temperature: float, tail: TailMode
) -> torch.Tensor:
    """[R, K] probabilities of each row's entries after tempering over its support (0 where absent)."""
    t = torch.where(present, logprobs, -torch.inf)
    if tail == "tail":
        tail_mass = (1.0 - torch.where(present, logprobs.exp(), 0.0).sum(-1)).clamp_min_(
            torch.finfo(torch.float32).tiny
        )
        t = torch.cat([t, tail_mass.log()[:, None]], dim=-1)
    probs = torch.softmax(t / temperature, dim=-1)[:, : logprobs.shape[-1]]
    return torch.where(present, probs, 0.0)  # a renorm row with no entry softmaxes to NaN
