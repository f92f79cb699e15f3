"""Token chunking and fp32 views of logit shards, shared by the vocab-parallel losses.

The losses walk the tokens in chunks of rows so that fp32 temporaries are bounded by the chunk,
not by the whole ``[tokens, V_local]`` shard. ``chunk_size=None`` picks a chunk of about
``AUTO_CHUNK_ELEMENTS`` logits; an explicit ``chunk_size`` (tokens per chunk) bounds it further.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

AUTO_CHUNK_ELEMENTS = 1 << 23  # 32 MiB per fp32 temporary


def chunk_rows(chunk_size: Optional[int], local_vocab_size: int) -> int:
    """Tokens per chunk for ``chunk_size`` (None: automatic). Raises ValueError if ``chunk_size`` < 1."""
    if chunk_size is None:
        return max(1, AUTO_CHUNK_ELEMENTS // max(local_vocab_size, 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens or None, got {chunk_size}")
    return chunk_size


def row_slices(num_rows: int, rows_per_chunk: int) -> Iterator[slice]:
    for start in range(0, num_rows, rows_per_chunk):
        yield slice(start, min(start + rows_per_chunk, num_rows))


def tempered_fp32(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """A new float32 tensor ``logits / temperature`` (never a view of ``logits``, safe to modify)."""
    out = logits.to(torch.float32, copy=True)
    return out.div_(temperature) if temperature != 1.0 else out


def local_logsumexp(
    logits_2d: torch.Tensor, num_valid: int, temperature: float, rows_per_chunk: int
) -> torch.Tensor:
    """float32 [N]: logsumexp of ``logits_2d[:, :num_valid] / temperature`` per row, chunk by chunk."""
    out = torch.empty(logits_2d.shape[0], dtype=torch.float32, device=logits_2d.device)
    for rows in row_slices(logits_2d.shape[0], rows_per_chunk):
        out[rows] = torch.logsumexp(tempered_fp32(logits_2d[rows, :num_valid], temperature), dim=-1)
    return out
