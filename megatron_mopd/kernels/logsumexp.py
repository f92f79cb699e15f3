"""Online logsumexp of each row's valid columns, optionally fused with a gather at local ids.

One program per row walks the columns ``[0, num_valid)`` in blocks, keeping the running maximum m
and the running sum of ``exp(x − m)`` (rescaled by ``exp(m_old − m_new)`` when the maximum grows),
with x = logits / τ in float32. A row with no finite column keeps m = -inf; the shift used is then 0,
so its sum is 0 and its logsumexp -inf (never NaN), as in ``parallel.chunking.local_logsumexp``. A
NaN or +inf logit gives NaN, as there. The gather reads the K raw logits (not divided by τ) at the
local ids this rank owns and writes 0 elsewhere, as ``VocabShard.gather_columns`` does before its
all-reduce.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

DEFAULT_BLOCK = 2048  # columns per step of the online logsumexp


@triton.jit
def _logsumexp_gather_kernel(
    logits_ptr,
    stride_row,
    stride_col,
    lse_ptr,
    ids_ptr,
    stride_ids,
    gathered_ptr,
    stride_gathered,
    num_valid,
    num_ids,
    inv_temperature,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GATHER: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    offsets = tl.arange(0, BLOCK)
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.full((), 0.0, tl.float32)
    for start in range(0, num_valid, BLOCK):
        cols = start + offsets
        x = tl.load(row_ptr + cols * stride_col, mask=cols < num_valid, other=float("-inf"))
        x = x.to(tl.float32) * inv_temperature
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # all -inf so far: exp gives 0
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), axis=0)
        running_max = new_max
    shift = tl.where(running_max == float("-inf"), 0.0, running_max)
    tl.store(lse_ptr + row, tl.log(running_sum) + shift)
    if GATHER:
        k = tl.arange(0, BLOCK_K)
        in_row = k < num_ids
        ids = tl.load(ids_ptr + row * stride_ids + k, mask=in_row, other=-1)
        owned = in_row & (ids >= 0)
        values = tl.load(row_ptr + ids * stride_col, mask=owned, other=0.0)
        tl.store(gathered_ptr + row * stride_gathered + k, values.to(tl.float32), mask=in_row)


def _launch(
    logits_2d: torch.Tensor,
    num_valid: int,
    temperature: float,
    ids: Optional[torch.Tensor],
    block_size: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel: ``(lse [N], gathered [N, K])``. ``ids``: contiguous int64 ``[N, K]`` local
    columns, -1 where nothing is read; None: no gather (``gathered`` is then empty)."""
    num_rows = logits_2d.shape[0]
    device = logits_2d.device
    lse = torch.empty(num_rows, dtype=torch.float32, device=device)
    if ids is None:
        gathered = torch.empty(0, dtype=torch.float32, device=device)
        ids_arg, num_ids = lse, 0  # never read: GATHER is off
    else:
        gathered = torch.empty(ids.shape, dtype=torch.float32, device=device)
        ids_arg, num_ids = ids, ids.shape[1]
    if num_rows == 0:
        return lse, gathered
    block = block_size or max(16, min(DEFAULT_BLOCK, triton.next_power_of_2(max(num_valid, 1))))
    _logsumexp_gather_kernel[(num_rows,)](
        logits_2d,
        logits_2d.stride(0),
        logits_2d.stride(1),
        lse,
        ids_arg,
        num_ids,  # the row stride of the contiguous ids and gathered values
        gathered,
        num_ids,
        num_valid,
        num_ids,
        1.0 / temperature,
        BLOCK=block,
        BLOCK_K=triton.next_power_of_2(max(num_ids, 1)),
        GATHER=ids is not None,
        num_warps=8 if block >= 2048 else 4,
    )
    return lse, gathered


def triton_local_logsumexp(
    logits_2d: torch.Tensor, num_valid: int, temperature: float, *, block_size: Optional[int] = None
) -> torch.Tensor:
    """float32 ``[N]``: logsumexp of ``logits_2d[:, :num_valid] / temperature`` per row.

    ``parallel.chunking.local_logsumexp`` in one kernel, without a float32 workspace.

    Args:
        logits_2d: ``[N, V_local]`` float32, bfloat16 or float16 (any strides; math in float32).
        num_valid: columns ``>= num_valid`` are ignored.
        temperature: τ > 0.
        block_size: columns per step (a power of two); None picks one for the shape.
    Returns:
        float32 ``[N]``; -inf for a row without a valid column or with only -inf; NaN for a row with a
        NaN or +inf logit.
    """
    return _launch(logits_2d, num_valid, temperature, None, block_size)[0]


def triton_logsumexp_and_gather(
    logits_2d: torch.Tensor,
    num_valid: int,
    temperature: float,
    local_ids: torch.Tensor,
    owned: torch.Tensor,
    *,
    block_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``triton_local_logsumexp`` and the logits at ``local_ids``, in the same pass over each row.

    Args:
        logits_2d, num_valid, temperature, block_size: as in ``triton_local_logsumexp``.
        local_ids: integer ``[N, K]`` local columns in ``[0, V_local)``.
        owned: bool ``[N, K]``: the entries to read; the others give 0.
    Returns:
        ``(lse, gathered)``: float32 ``[N]`` as ``triton_local_logsumexp``; float32 ``[N, K]``, the
        raw logits (not divided by τ) at the owned ids, 0 elsewhere.
    """
    ids = torch.where(owned, local_ids, -1).to(torch.int64).contiguous()
    return _launch(logits_2d, num_valid, temperature, ids, block_size)
