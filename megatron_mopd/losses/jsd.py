"""Generalized JSD between a student and a colocated teacher whose logits are sharded identically.

Both logit tensors are ``[..., V_local]`` shards of the same (padded) vocabulary on each
tensor-parallel rank. Per token:

    s = log_softmax(z_s / τ),  t = log_softmax(z_t / τ)        over the true vocabulary
    loss = generalized JSD_β(S, T)                              (losses/divergence.py)
    ∂loss/∂z_s = (g − p_s · Σ_v g_v) / τ                        g = ∂loss/∂s

Forward, one pass over token chunks; per chunk:
  1. both sides' log_softmax: one all-gather of 2 scalars per token (each rank's logsumexp);
  2. partial loss and Σ_v g_v on the local shard, one all-reduce of 2 scalars per token;
  3. the gradient of the chunk, written into the single float32 buffer kept for backward.
Backward scales that buffer by the upstream gradient in place. The teacher is a constant: no
gradient flows into ``teacher_logits``.

A -inf logit is a token of probability 0 on that side (divergence.py says which β make the loss
+inf). A NaN or +inf teacher logit, or a teacher row of only -inf, is not a distribution: it makes
that position's loss NaN (or +inf), so after the loop one check of the per-token loss (the call's
only device sync) finds such rows and raises ValueError. A NaN or +inf student logit gives a NaN
(or +inf) loss at its position, never a finite one.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_mopd.parallel.chunking import chunk_rows, row_slices, tempered_fp32
from megatron_mopd.losses.divergence import (
    fused_generalized_jsd_terms,
    generalized_jsd_terms,
    validate_beta,
    validate_temperature,
)
from megatron_mopd.parallel.vocab import ProcessGroup, VocabShard


class _VocabParallelGeneralizedJSD(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        shard: VocabShard,
        beta: float,
        temperature: float,
        rows_per_chunk: int,
        loss_scale: float,
        fused: bool,
    ) -> torch.Tensor:
        divergence_terms = fused_generalized_jsd_terms() if fused else generalized_jsd_terms
        z_s = student_logits.reshape(-1, shard.local_size)
        z_t = teacher_logits.reshape(-1, shard.local_size)
        num_tokens, valid = z_s.shape[0], shard.num_valid

        loss = torch.empty(num_tokens, dtype=torch.float32, device=z_s.device)
        grad = shard.empty_with_zero_padding(z_s, torch.float32)
        coef = loss_scale / temperature
        for rows in row_slices(num_tokens, rows_per_chunk):
            s, t = shard.log_softmax(
                tempered_fp32(z_s[rows, :valid], temperature), tempered_fp32(z_t[rows, :valid], temperature)
            )
            partial_loss, g = divergence_terms(s, t, beta)
            del t
            loss_and_g_sum = shard.all_reduce_(torch.stack([partial_loss, g.sum(-1)]))
            loss[rows] = loss_and_g_sum[0]
            # ∂loss/∂z_s = (g − p_s Σg) / τ, written straight into the gradient buffer.
            torch.mul(g, coef, out=grad[rows, :valid]).addcmul_(
                s.exp_(), loss_and_g_sum[1, :, None], value=-coef
            )

        if not bool(torch.isfinite(loss).all()):
            leading_shape = teacher_logits.shape[:-1]
            _raise_on_invalid_teacher_rows(z_t, loss, shard, temperature, rows_per_chunk, leading_shape)
        ctx.save_for_backward(grad)
        ctx.logits_shape, ctx.logits_dtype = student_logits.shape, student_logits.dtype
        ctx.backward_done = False
        return loss.mul_(loss_scale).view(student_logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        if ctx.backward_done:
            raise RuntimeError("generalized_jsd reuses its gradient buffer: backward runs only once")
        ctx.backward_done = True
        (grad,) = ctx.saved_tensors
        grad.mul_(grad_loss.reshape(-1, 1))
        grad_logits = grad.view(ctx.logits_shape).to(ctx.logits_dtype)
        return grad_logits, None, None, None, None, None, None, None


def _raise_on_invalid_teacher_rows(
    z_t: torch.Tensor,
    loss: torch.Tensor,
    shard: VocabShard,
    temperature: float,
    rows_per_chunk: int,
    leading_shape: torch.Size,
) -> None:
    """Raise ValueError naming the first position whose teacher logits are not a distribution.

    Runs only when some loss is not finite, which every invalid teacher row causes; a student NaN or
    a genuinely infinite divergence also gets here and passes. The loss is the same on every rank,
    so all ranks take this path and its collective together.
    """
    suspects = torch.nonzero(~torch.isfinite(loss)).squeeze(1)
    local_lse = torch.cat([
        torch.logsumexp(tempered_fp32(z_t[suspects[part], : shard.num_valid], temperature), dim=-1)
        for part in row_slices(suspects.numel(), rows_per_chunk)
    ])
    lse = shard.logsumexp(local_lse)  # NaN: a NaN logit; +inf: a +inf logit; -inf: only -inf
    invalid = torch.nonzero(~torch.isfinite(lse)).squeeze(1)
    if invalid.numel() == 0:
        return
    first = int(invalid[0])
    value = float(lse[first])
    position = ", ".join(str(int(i)) for i in torch.unravel_index(suspects[first], leading_shape))
    problem = (
        "has a NaN logit" if value != value
        else "has a +inf logit (or one that overflows float32 at this temperature)" if value > 0
        else "is -inf at every vocabulary id"
    )
    raise ValueError(
        f"teacher_logits[{position}] {problem}: each teacher position must be a distribution, with "
        f"finite logits and -inf only for tokens of probability 0; check the teacher's forward pass "
        f"(e.g. a float16 overflow) and mask banned tokens with -inf, not NaN or +inf"
    )


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    tp_group: Optional[ProcessGroup] = None,
    chunk_size: Optional[int] = None,
    scale_by_temperature_squared: bool = False,
    fused: bool = False,
) -> torch.Tensor:
    """Per-token generalized JSD between vocab-sharded student and teacher logits.

    Args:
        student_logits: ``[..., V_local]`` this rank's shard (any float dtype; math in float32).
            -inf marks a token of probability 0; a NaN or +inf logit gives a non-finite loss there.
        teacher_logits: same shape and sharding as ``student_logits``; treated as a constant. -inf
            marks a token of probability 0; a NaN or +inf logit, or a position whose logits are all
            -inf, raises ValueError.
        beta: 0 → forward KL(T‖S), 1 → reverse KL(S‖T), else β·KL(T‖M) + (1−β)·KL(S‖M) with
            M = (1−β)·S + β·T (TRL's convention).
        temperature: τ > 0; both sides are softened as ``log_softmax(z / τ)``.
        vocab_size: true vocabulary size; ids at or above it are padding (probability 0).
            None: no padding.
        tp_group: tensor-parallel group; None → Megatron's when initialized, else no TP.
        chunk_size: tokens per chunk for the float32 temporaries (None: automatic).
        scale_by_temperature_squared: multiply the loss (and gradient) by τ².
        fused: compute each chunk's divergence with ``torch.compile``-fused kernels (1.3-1.5x faster
            end to end on CPU in tools/bench_losses.py; compiles on first use, needs a C++ compiler
            on CPU or Triton on CUDA).
    Returns:
        float32 ``[...]``: the loss of each position (identical on every TP rank). Reduce it with
        ``masked_sum_and_count``. Backward keeps one float32 buffer of the local logits' size.
        A position's loss is +inf where the divergence is: β = 0 with a student -inf where the
        teacher has mass, β = 1 with a teacher -inf where the student has mass.
    """
    validate_beta(beta)
    validate_temperature(temperature)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits must have the student's shape {tuple(student_logits.shape)} (same "
            f"vocabulary, same tensor-parallel sharding), got {tuple(teacher_logits.shape)}; a "
            f"teacher with another vocabulary needs the cross-tokenizer losses"
        )
    shard = VocabShard.of(student_logits.shape[-1], vocab_size, tp_group)
    rows = chunk_rows(chunk_size, shard.local_size, student_logits.device)
    scale = temperature**2 if scale_by_temperature_squared else 1.0
    return _VocabParallelGeneralizedJSD.apply(
        student_logits, teacher_logits.detach(), shard, beta, temperature, rows, scale, fused
    )
