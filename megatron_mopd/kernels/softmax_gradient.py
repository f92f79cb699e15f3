"""The softmax-shaped logit gradient, written once in the output dtype.

``out[n, v] = exp(logits[n, v] / τ − lse[n]) · dense_coef[n] + Σ_k ids_grad[n, k] · 1{v = local_ids[n, k]}``
for ``v < num_valid``, 0 for the padded columns (``parallel.chunking.softmax_gradient``). Two launches:

1. the dense kernel, one program per (row, block of columns), writes ``p_v · dense_coef`` (and the
   zeros of the padded columns) straight in the output dtype: no float32 copy of the shard;
2. the ids kernel, one program per (row, block of ids), rewrites the K columns ``local_ids`` with
   ``p_v · dense_coef + ids_grad`` recomputed in float32 and rounded once. Repeated ids in a row are
   summed (``scatter_add`` semantics): only the first occurrence writes, with the sum of all of them.
   Ids are clamped to ``num_valid − 1`` as in the PyTorch path (entries not owned carry 0 there).

In place (``out`` is the float32 logits themselves, as in the fused output layer's chunks): the dense
kernel reads and writes each element in the same program, and the ids kernel then reads the dense
kernel's float32 ``p_v · dense_coef`` back from ``out`` instead of recomputing it from the logits.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

DEFAULT_BLOCK = 1024
IDS_BLOCK = 64  # entries per program of the ids kernel; each compares against the whole row's K


@triton.jit
def _dense_softmax_gradient_kernel(
    logits_ptr,
    stride_row,
    stride_col,
    lse_ptr,
    coef_ptr,
    out_ptr,
    stride_out_row,
    stride_out_col,
    num_valid,
    num_cols,
    inv_temperature,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < num_valid
    x = tl.load(logits_ptr + row * stride_row + cols * stride_col, mask=valid, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    coef = tl.load(coef_ptr + row)
    grad = tl.where(valid, tl.exp(x * inv_temperature - lse) * coef, 0.0)
    out = out_ptr + row * stride_out_row + cols * stride_out_col
    tl.store(out, grad.to(out_ptr.dtype.element_ty), mask=cols < num_cols)


@triton.jit
def _ids_softmax_gradient_kernel(
    logits_ptr,
    stride_row,
    stride_col,
    lse_ptr,
    coef_ptr,
    ids_ptr,
    stride_ids,
    ids_grad_ptr,
    stride_ids_grad,
    out_ptr,
    stride_out_row,
    stride_out_col,
    num_valid,
    num_ids,
    inv_temperature,
    DENSE_FROM_OUT: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_row = k < num_ids
    ids = tl.load(ids_ptr + row * stride_ids + k, mask=in_row, other=0)
    ids = tl.where(in_row, tl.minimum(ids, num_valid - 1), -1)
    # Against every block of the row's entries j: same[i, j] when entries i and j name the same
    # column; the first of them writes the sum of all their ids_grad.
    total = tl.zeros((BLOCK_K,), tl.float32)
    earlier = tl.zeros((BLOCK_K,), tl.int32)
    for start in range(0, num_ids, BLOCK_K):
        j = start + tl.arange(0, BLOCK_K)
        in_row_j = j < num_ids
        ids_j = tl.load(ids_ptr + row * stride_ids + j, mask=in_row_j, other=0)
        ids_j = tl.where(in_row_j, tl.minimum(ids_j, num_valid - 1), -1)
        grad_j = tl.load(ids_grad_ptr + row * stride_ids_grad + j, mask=in_row_j, other=0.0).to(tl.float32)
        same = (ids[:, None] == ids_j[None, :]) & in_row[:, None] & in_row_j[None, :]
        total += tl.sum(tl.where(same, grad_j[None, :], 0.0), axis=1)
        earlier += tl.sum((same & (j[None, :] < k[:, None])).to(tl.int32), axis=1)
    writes = in_row & (earlier == 0)
    out = out_ptr + row * stride_out_row + ids * stride_out_col
    if DENSE_FROM_OUT:  # in place: the logits there are already p_v · dense_coef (float32)
        dense = tl.load(out, mask=writes, other=0.0)
    else:
        x = tl.load(logits_ptr + row * stride_row + ids * stride_col, mask=writes, other=0.0).to(tl.float32)
        dense = tl.exp(x * inv_temperature - tl.load(lse_ptr + row)) * tl.load(coef_ptr + row)
    tl.store(out, (dense + total).to(out_ptr.dtype.element_ty), mask=writes)


def triton_softmax_gradient(
    logits_2d: torch.Tensor,
    logsumexp: torch.Tensor,
    dense_coef: torch.Tensor,
    local_ids: torch.Tensor,
    ids_grad: torch.Tensor,
    num_valid: int,
    temperature: float,
    dtype: torch.dtype,
    *,
    out: Optional[torch.Tensor] = None,
    block_size: Optional[int] = None,
    ids_block_size: Optional[int] = None,
) -> torch.Tensor:
    """``[N, V_local]`` in ``dtype``: ``softmax(logits / τ)_v · dense_coef`` plus ``ids_grad`` at ``local_ids``.

    Args:
        logits_2d: ``[N, V_local]`` float32, bfloat16 or float16 logits.
        logsumexp: float32 ``[N]``, the (global) logsumexp of ``logits / τ`` per row.
        dense_coef: float32 ``[N, 1]`` or ``[N]``.
        local_ids: integer ``[N, K]`` local columns in ``[0, V_local)``; entries this rank does not own
            must carry 0 in ``ids_grad``.
        ids_grad: float32 ``[N, K]`` added at ``local_ids`` (repeated ids add up).
        num_valid: columns ``>= num_valid`` (padding) get 0.
        temperature: τ > 0.
        dtype: the output's dtype; every element is computed in float32 and rounded once.
        out: ``[N, V_local]`` of ``dtype`` (any strides) to write into instead of a new tensor; it may be
            ``logits_2d`` itself when both are float32 (the gradient then replaces the logits).
        block_size: columns per program of the dense kernel (a power of two); None: a default.
        ids_block_size: entries per program of the ids kernel (a power of two); None: a default.
    Returns:
        The gradient: ``out``, or a new contiguous ``[N, V_local]`` tensor.
    Raises:
        ValueError: ``out`` is ``logits_2d`` (the same storage) but not float32, or has another shape or dtype.
    """
    num_rows, num_cols = logits_2d.shape
    in_place = out is not None and out.data_ptr() == logits_2d.data_ptr()
    if out is not None and (out.shape != logits_2d.shape or out.dtype != dtype or
                            (in_place and (dtype != torch.float32 or out.stride() != logits_2d.stride()))):
        raise ValueError(f"out must be a {tuple(logits_2d.shape)} {dtype} tensor, or the float32 logits themselves "
                         f"(same strides) to write in place; got {tuple(out.shape)} {out.dtype}")
    grad = torch.empty((num_rows, num_cols), dtype=dtype, device=logits_2d.device) if out is None else out
    if num_rows == 0 or num_cols == 0:
        return grad
    coef = dense_coef.reshape(num_rows).float().contiguous()
    lse = logsumexp.reshape(num_rows).float().contiguous()
    inv_temperature = 1.0 / temperature
    block = block_size or min(DEFAULT_BLOCK, triton.next_power_of_2(num_cols))
    _dense_softmax_gradient_kernel[(num_rows, triton.cdiv(num_cols, block))](
        logits_2d, logits_2d.stride(0), logits_2d.stride(1), lse, coef,
        grad, grad.stride(0), grad.stride(1), num_valid, num_cols, inv_temperature,
        BLOCK=block, num_warps=4,
    )
    num_ids = local_ids.shape[-1]
    if num_valid == 0 or num_ids == 0:
        return grad
    ids = local_ids.reshape(num_rows, num_ids).contiguous()
    ids_grad = ids_grad.reshape(num_rows, num_ids).contiguous()
    block_k = ids_block_size or min(IDS_BLOCK, triton.next_power_of_2(num_ids))
    _ids_softmax_gradient_kernel[(num_rows, triton.cdiv(num_ids, block_k))](
        logits_2d, logits_2d.stride(0), logits_2d.stride(1), lse, coef,
        ids, ids.stride(0), ids_grad, ids_grad.stride(0),
        grad, grad.stride(0), grad.stride(1), num_valid, num_ids, inv_temperature,
        DENSE_FROM_OUT=in_place, BLOCK_K=block_k, num_warps=4,
    )
    return grad
