"""The full-vocabulary generalized JSD's per-chunk epilogue, on one vocabulary shard.

With x_s, x_t the float32 logits / τ of a row's valid columns and lse_s, lse_t their global
logsumexps, s = x_s − lse_s and t = x_t − lse_t are the log-probabilities over the vocabulary, and
``losses.divergence.generalized_jsd_terms(s, t, β)`` gives per column the loss term ℓ_v and
g_v = ∂loss/∂s_v. Two kernels, each one pass over the row (the chunk's float32 log-probabilities,
mixture and g are never stored):

``triton_jsd_loss_terms``   per row Σ_v ℓ_v and Σ_v g_v over this shard's valid columns (partial
                            sums: the caller all-reduces them over the tensor-parallel group);
``triton_jsd_gradient``     ``out_v = scale · (g_v − p_s,v · G)`` with G the all-reduced Σg (that is
                            ∂loss/∂z_s,v with ``scale`` = loss scale / τ), 0 in the padded columns,
                            written in the output's dtype.

The math is that of ``generalized_jsd_terms``, term by term: the zero-probability rules (0·log 0 = 0
by ``p == 0`` masks, the mixture's ``d = nan_to_num(t − s)``) and the cancellation-free mixture
``m − s = max(d, 0) + log1p(w · expm1(−|d|))``. ``expm1`` and ``log1p`` are evaluated with a Taylor
series near 0 (truncation error < 1e-8) and with exp / log elsewhere, within 2.5e-7 relative of the
float64 values (torch's float32 ones: 6e-8), so the kernels need no libdevice, which Triton's
interpreter cannot run.

``losses/jsd.py`` runs them per chunk on CUDA (``_kernel_chunk``). Tested against
``generalized_jsd_terms``, and ``generalized_jsd`` through the dispatch against its PyTorch path, in
tests/triton_kernel_cases.py.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl

DEFAULT_BLOCK = 1024
FORWARD_KL, REVERSE_KL, MIXTURE = 0, 1, 2
FLOAT32_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _expm1_nonpositive(x):
    """expm1(x) for x <= 0 (-inf included): degree-9 Taylor series on (-0.5, 0], exp(x) − 1 below."""
    small = x > -0.5
    y = tl.where(small, x, 0.0)
    series = 1.0 / 362880.0
    series = series * y + 1.0 / 40320.0
    series = series * y + 1.0 / 5040.0
    series = series * y + 1.0 / 720.0
    series = series * y + 1.0 / 120.0
    series = series * y + 1.0 / 24.0
    series = series * y + 1.0 / 6.0
    series = series * y + 0.5
    series = series * y + 1.0
    return tl.where(small, series * y, tl.exp(x) - 1.0)


@triton.jit
def _log1p_nonpositive(x):
    """log1p(x) for -1 <= x <= 0: 2·atanh(x / (2 + x)) as a series on (-0.25, 0], log(1 + x) below."""
    small = x > -0.25
    y = tl.where(small, x, 0.0)
    u = y / (2.0 + y)
    u2 = u * u
    series = 1.0 / 11.0
    series = series * u2 + 1.0 / 9.0
    series = series * u2 + 1.0 / 7.0
    series = series * u2 + 1.0 / 5.0
    series = series * u2 + 1.0 / 3.0
    series = series * u2 + 1.0
    return tl.where(small, 2.0 * u * series, tl.log(1.0 + x))


@triton.jit
def _jsd_columns(x_s, x_t, lse_s, lse_t, valid, beta, MODE: tl.constexpr):
    """(ℓ, g, p_s) of a block of columns; ℓ and g are 0 outside ``valid``."""
    s = x_s - lse_s
    t = x_t - lse_t
    p_s = tl.exp(s)
    if MODE == 0:  # forward KL(T‖S): ℓ = p_t (t − s), g = −p_t
        p_t = tl.exp(t)
        term = p_t * tl.where(p_t == 0.0, 0.0, t - s)
        g = -p_t
    elif MODE == 1:  # reverse KL(S‖T): ℓ = p_s (s − t), g = p_s (s − t + 1)
        log_ratio = tl.where(p_s == 0.0, 0.0, s - t)
        term = p_s * log_ratio
        g = (log_ratio + 1.0) * p_s
    else:  # mixture: ℓ = β p_t (t − m) − (1 − β) p_s (m − s), g = (β − 1) p_s (m − s)
        # d = nan_to_num(t − s): ±inf → ±float32 max, NaN → 0 (NaN is the one d with |d| >= 0 false)
        d = t - s
        d = tl.where(tl.abs(d) >= 0.0, tl.minimum(tl.maximum(d, -FLOAT32_MAX), FLOAT32_MAX), 0.0)
        sign = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))
        half = _expm1_nonpositive(-tl.abs(d)) * 0.5
        log_weight = _log1p_nonpositive(half + half * sign * (1.0 - 2.0 * beta))
        student_term = (tl.maximum(d, 0.0) + log_weight) * p_s
        term = beta * (tl.exp(t) * (tl.minimum(d, 0.0) - log_weight)) - (1.0 - beta) * student_term
        g = student_term * (beta - 1.0)
    return tl.where(valid, term, 0.0), tl.where(valid, g, 0.0), p_s


@triton.jit
def _jsd_loss_terms_kernel(
    student_ptr,
    teacher_ptr,
    stride_s_row,
    stride_s_col,
    stride_t_row,
    stride_t_col,
    lse_s_ptr,
    lse_t_ptr,
    loss_ptr,
    g_sum_ptr,
    num_valid,
    inv_temperature,
    beta,
    MODE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    lse_s = tl.load(lse_s_ptr + row)
    lse_t = tl.load(lse_t_ptr + row)
    offsets = tl.arange(0, BLOCK)
    loss = tl.zeros((BLOCK,), tl.float32)
    g_sum = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, num_valid, BLOCK):
        cols = start + offsets
        valid = cols < num_valid
        x_s = tl.load(student_ptr + row * stride_s_row + cols * stride_s_col, mask=valid, other=float("-inf"))
        x_t = tl.load(teacher_ptr + row * stride_t_row + cols * stride_t_col, mask=valid, other=float("-inf"))
        term, g, _ = _jsd_columns(
            x_s.to(tl.float32) * inv_temperature, x_t.to(tl.float32) * inv_temperature,
            lse_s, lse_t, valid, beta, MODE,
        )
        loss += term
        g_sum += g
    tl.store(loss_ptr + row, tl.sum(loss, axis=0))
    tl.store(g_sum_ptr + row, tl.sum(g_sum, axis=0))


@triton.jit
def _jsd_gradient_kernel(
    student_ptr,
    teacher_ptr,
    stride_s_row,
    stride_s_col,
    stride_t_row,
    stride_t_col,
    lse_s_ptr,
    lse_t_ptr,
    g_sum_ptr,
    scale_ptr,
    out_ptr,
    stride_out_row,
    stride_out_col,
    num_valid,
    num_cols,
    inv_temperature,
    beta,
    MODE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < num_valid
    x_s = tl.load(student_ptr + row * stride_s_row + cols * stride_s_col, mask=valid, other=float("-inf"))
    x_t = tl.load(teacher_ptr + row * stride_t_row + cols * stride_t_col, mask=valid, other=float("-inf"))
    _, g, p_s = _jsd_columns(
        x_s.to(tl.float32) * inv_temperature, x_t.to(tl.float32) * inv_temperature,
        tl.load(lse_s_ptr + row), tl.load(lse_t_ptr + row), valid, beta, MODE,
    )
    scale = tl.load(scale_ptr + row)
    grad = tl.where(valid, g * scale - p_s * tl.load(g_sum_ptr + row) * scale, 0.0)
    out = out_ptr + row * stride_out_row + cols * stride_out_col
    tl.store(out, grad.to(out_ptr.dtype.element_ty), mask=cols < num_cols)


def _mode(beta: float) -> int:
    return FORWARD_KL if beta == 0.0 else REVERSE_KL if beta == 1.0 else MIXTURE


def _row_vector(value: torch.Tensor, num_rows: int) -> torch.Tensor:
    return value.reshape(num_rows).float().contiguous()


def triton_jsd_loss_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_lse: torch.Tensor,
    teacher_lse: torch.Tensor,
    num_valid: int,
    beta: float,
    temperature: float,
    *,
    block_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, this shard's part of the generalized JSD and of Σg (``generalized_jsd_terms``).

    Args:
        student_logits, teacher_logits: ``[N, V_local]`` float32, bfloat16 or float16 (any strides).
        student_lse, teacher_lse: float32 ``[N]``: the global logsumexp of each side's logits / τ
            over the true vocabulary (all shards).
        num_valid: columns ``>= num_valid`` (padding) are ignored.
        beta: in [0, 1]; 0 and 1 are forward and reverse KL, as in ``generalized_jsd_terms``.
        temperature: τ > 0.
        block_size: columns per step (a power of two); None: a default.
    Returns:
        ``(loss, g_sum)``: float32 ``[N]`` each, Σ_v ℓ_v and Σ_v g_v over the valid local columns.
    """
    num_rows = student_logits.shape[0]
    loss = torch.empty(num_rows, dtype=torch.float32, device=student_logits.device)
    g_sum = torch.empty_like(loss)
    if num_rows == 0:
        return loss, g_sum
    block = block_size or min(DEFAULT_BLOCK, triton.next_power_of_2(max(num_valid, 16)))
    _jsd_loss_terms_kernel[(num_rows,)](
        student_logits, teacher_logits,
        student_logits.stride(0), student_logits.stride(1), teacher_logits.stride(0), teacher_logits.stride(1),
        _row_vector(student_lse, num_rows), _row_vector(teacher_lse, num_rows), loss, g_sum,
        num_valid, 1.0 / temperature, float(beta),
        MODE=_mode(beta), BLOCK=block, num_warps=4,
    )
    return loss, g_sum


def triton_jsd_gradient(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_lse: torch.Tensor,
    teacher_lse: torch.Tensor,
    g_sum: torch.Tensor,
    num_valid: int,
    beta: float,
    temperature: float,
    scale: Union[float, torch.Tensor],
    out: torch.Tensor,
    *,
    block_size: Optional[int] = None,
) -> torch.Tensor:
    """Write ``scale · (g − p_s · g_sum)`` into ``out``: the student logits' gradient of the JSD.

    Args:
        student_logits, teacher_logits, student_lse, teacher_lse, num_valid, beta, temperature: as
            in ``triton_jsd_loss_terms``.
        g_sum: float32 ``[N]``: Σg over the whole vocabulary (the all-reduced ``g_sum``).
        scale: a number, or float32 ``[N]`` per row (e.g. loss scale / τ times the upstream gradient).
        out: ``[N, V_local]`` of any float dtype and strides; columns ``>= num_valid`` get 0.
        block_size: columns per program (a power of two); None: a default.
    Returns:
        ``out``.
    """
    num_rows, num_cols = out.shape
    if num_rows == 0 or num_cols == 0:
        return out
    if not isinstance(scale, torch.Tensor):
        scale = torch.full((num_rows,), float(scale), dtype=torch.float32, device=out.device)
    block = block_size or min(DEFAULT_BLOCK, triton.next_power_of_2(num_cols))
    _jsd_gradient_kernel[(num_rows, triton.cdiv(num_cols, block))](
        student_logits, teacher_logits,
        student_logits.stride(0), student_logits.stride(1), teacher_logits.stride(0), teacher_logits.stride(1),
        _row_vector(student_lse, num_rows), _row_vector(teacher_lse, num_rows),
        _row_vector(g_sum, num_rows), _row_vector(scale, num_rows),
        out, out.stride(0), out.stride(1),
        num_valid, num_cols, 1.0 / temperature, float(beta),
        MODE=_mode(beta), BLOCK=block, num_warps=4,
    )
    return out
