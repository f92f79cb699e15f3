"""Token chunking and float32 views of logit shards, shared by the vocab-parallel losses.

The losses walk the tokens in chunks of rows so that float32 temporaries are bounded by the chunk,
not by the whole ``[tokens, V_local]`` shard. ``chunk_size=None`` picks a chunk of about
``AUTO_CHUNK_ELEMENTS`` logits for the device (small on CPU, where a chunk that stays in cache is
fastest; large on accelerators, where kernel launches dominate small chunks); an explicit
``chunk_size`` (tokens per chunk) bounds it further.

On CUDA with Triton installed, ``local_logsumexp``, ``local_logsumexp_and_gather`` and
``softmax_gradient`` run the Triton kernels of ``megatron_mopd.kernels`` instead (one pass over the
logits, no float32 workspace, so no chunking); ``MOPD_DISABLE_TRITON=1`` keeps the PyTorch code.
CPU and NPU always run the PyTorch code below.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from megatron_mopd.kernels import use_triton

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
        tempered_into(out, logits, temperature).sub_(logsumexp[:, None])
    return out.exp_()


def tempered_into(out: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Write float32 ``logits / τ`` into ``out`` and return it; the division is float32 for any dtype.

    (``torch.mul(bf16, 1 / τ, out=float32)`` would round the quotient to bf16 before widening it.)
    """
    if logits.dtype == torch.float32:
        return torch.mul(logits, 1.0 / temperature, out=out)
    out.copy_(logits)
    return out if temperature == 1.0 else out.mul_(1.0 / temperature)


def local_logsumexp(
    logits_2d: torch.Tensor, num_valid: int, temperature: float, rows_per_chunk: int
) -> torch.Tensor:
    """float32 [N]: logsumexp of ``logits_2d[:, :num_valid] / temperature`` per row, chunk by chunk.

    One float32 workspace of one chunk is reused for every chunk (no allocation per chunk); a row
    with no valid column gives -inf. On CUDA with Triton: one kernel (``kernels.logsumexp``).
    """
    if use_triton(logits_2d):
        from megatron_mopd.kernels.logsumexp import triton_local_logsumexp

        return triton_local_logsumexp(logits_2d, num_valid, temperature)
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
        tempered_into(work, chunk, temperature)
        row_max = work.amax(dim=-1, keepdim=True)
        row_max.masked_fill_(row_max == -torch.inf, 0.0)  # a row of only -inf: exp gives 0, not NaN
        out[rows] = work.sub_(row_max).exp_().sum(dim=-1).log_().add_(row_max.squeeze(-1))
    return out


def local_logsumexp_and_gather(
    logits_2d: torch.Tensor,
    num_valid: int,
    temperature: float,
    rows_per_chunk: int,
    local_ids: torch.Tensor,
    owned: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``local_logsumexp`` and the logits at given local columns, in one pass over the logits on CUDA.

    Args:
        logits_2d: ``[N, V_local]`` (any float dtype).
        num_valid, temperature, rows_per_chunk: as in ``local_logsumexp``.
        local_ids: integer ``[N, K]`` local columns in ``[0, V_local)``.
        owned: bool ``[N, K]``: the entries to read; the others give 0.
    Returns:
        ``(lse, values)``: float32 ``[N]`` as ``local_logsumexp``; float32 ``[N, K]``, the raw logits
        (not divided by τ) at ``local_ids`` where ``owned``, else 0.
    """
    if use_triton(logits_2d):
        from megatron_mopd.kernels.logsumexp import triton_logsumexp_and_gather

        return triton_logsumexp_and_gather(logits_2d, num_valid, temperature, local_ids, owned)
    values = torch.where(owned, logits_2d.gather(-1, local_ids).float(), 0.0)
    return local_logsumexp(logits_2d, num_valid, temperature, rows_per_chunk), values


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
    get 0. Written in place when ``dtype`` is float32, else through one chunk-sized float32 buffer;
    on CUDA with Triton, by two kernels straight in ``dtype`` (``kernels.softmax_gradient``).
    """
    if use_triton(logits_2d):
        from megatron_mopd.kernels.softmax_gradient import triton_softmax_gradient

        return triton_softmax_gradient(
            logits_2d, logsumexp, dense_coef, local_ids, ids_grad, num_valid, temperature, dtype
        )
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
