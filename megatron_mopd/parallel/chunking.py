"""Token chunking and float32 views of logit shards, shared by the vocab-parallel losses.

The losses walk the tokens in chunks of rows so that float32 temporaries are bounded by the chunk,
not by the whole ``[tokens, V_local]`` shard. ``chunk_size=None`` picks a chunk of about
``AUTO_CHUNK_ELEMENTS`` logits for the device (small on CPU, where a chunk that stays in cache is
fastest; large on accelerators, where kernel launches dominate small chunks); an explicit
``chunk_size`` (tokens per chunk) bounds it further.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

AUTO_CHUNK_ELEMENTS = {"cpu": 1 << 19, "accelerator": 1 << 25}  # 2 MiB (L2-sized) / 128 MiB per float32 temporary


def chunk_rows(chunk_size: Optional[int], local_vocab_size: int, device: torch.device) -> int:
    """Tokens per chunk for ``chunk_size`` (None: automatic). Raises ValueError if ``chunk_size`` < 1."""
    if chunk_size is None:
        budget = AUTO_CHUNK_ELEMENTS["cpu" if device.type == "cpu" else "accelerator"]
        return max(1, budget // max(local_vocab_size, 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens or None, got {chunk_size}")
    return chunk_size


def row_slices(num_rows: int, rows_per_chunk: int) -> Iterator[slice]:
    for start in range(0, num_rows, rows_per_chunk):
        yield slice(start, min(start + rows_per_chunk, num_rows))


def tempered_fp32(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """float32 ``logits / temperature``; read-only: it is ``logits`` itself when nothing changes."""
    if temperature == 1.0:
        return logits.float()
    return torch.div(logits.float(), temperature) if logits.dtype == torch.float32 else logits.float().div_(temperature)


def softmax_into(
    out: torch.Tensor, logits: torch.Tensor, logsumexp: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Write float32 ``exp(logits / τ − logsumexp[:, None])`` into ``out`` (float32, logits' shape)."""
    if temperature == 1.0:
        torch.sub(logits, logsumexp[:, None], out=out)
    else:
        torch.mul(logits, 1.0 / temperature, out=out).sub_(logsumexp[:, None])
    return out.exp_()


def local_logsumexp(
    logits_2d: torch.Tensor, num_valid: int, temperature: float, rows_per_chunk: int
) -> torch.Tensor:
    """float32 [N]: logsumexp of ``logits_2d[:, :num_valid] / temperature`` per row, chunk by chunk.

    One float32 workspace of one chunk is reused for every chunk (no allocation per chunk); a row
    with no valid column gives -inf.
    """
    num_rows = logits_2d.shape[0]
    out = torch.full((num_rows,), -torch.inf, dtype=torch.float32, device=logits_2d.device)
    if num_valid == 0 or num_rows == 0:
        return out
    workspace = torch.empty(
        (min(rows_per_chunk, num_rows), num_valid), dtype=torch.float32, device=logits_2d.device
    )
    for rows in row_slices(num_rows, rows_per_chunk):
        work = workspace[: rows.stop - rows.start]
        chunk = logits_2d[rows, :num_valid]
        if temperature == 1.0:
            work.copy_(chunk)
        else:
            torch.mul(chunk, 1.0 / temperature, out=work)
        row_max = work.amax(dim=-1, keepdim=True)
        row_max.masked_fill_(row_max == -torch.inf, 0.0)  # a row of only -inf: exp gives 0, not NaN
        out[rows] = work.sub_(row_max).exp_().sum(dim=-1).log_().add_(row_max.squeeze(-1))
    return out


def softmax_gradient(
    logits_2d: torch.Tensor,
    logsumexp: torch.Tensor,
    dense_coef: torch.Tensor,
    local_ids: torch.Tensor,
    ids_grad: torch.Tensor,
    num_valid: int,
    temperature: float,
    rows_per_chunk: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``[N, V_local]`` in ``dtype``: ``p_v · dense_coef`` plus ``ids_grad`` at ``local_ids``.

    The gradient shape of every loss that depends on a softmax p = softmax(logits / τ) over the whole
    vocabulary and on a few gathered columns. p is recomputed chunk by chunk from the logits and their
    ``logsumexp`` [N]; ``dense_coef`` is [N, 1]; ``ids_grad`` [N, K] is added at the local columns
    ``local_ids`` [N, K] (entries this rank does not own must carry 0). Padded columns (>= num_valid)
    get 0. Written in place when ``dtype`` is float32, else through one chunk-sized float32 buffer.
    """
    grad = torch.empty(logits_2d.shape, dtype=dtype, device=logits_2d.device)
    grad[:, num_valid:] = 0
    if num_valid == 0:
        return grad
    local_ids = local_ids.clamp(max=num_valid - 1)
    in_place = dtype == torch.float32
    for rows in row_slices(grad.shape[0], rows_per_chunk):
        out = grad[rows, :num_valid] if in_place else torch.empty(
            (rows.stop - rows.start, num_valid), dtype=torch.float32, device=logits_2d.device
        )
        softmax_into(out, logits_2d[rows, :num_valid], logsumexp[rows], temperature)
        out.mul_(dense_coef[rows]).scatter_add_(-1, local_ids[rows], ids_grad[rows])
        if not in_place:
            grad[rows, :num_valid] = out
    return grad
