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
gradient flows into ``teacher_logits``. On CUDA with Triton, steps 2 and 3 are two kernels
(``kernels.jsd``: the partial sums in one pass over both rows, the gradient written straight into the
buffer in the logits' dtype) after the logsumexp kernel of step 1; CPU and NPU run the PyTorch passes.

A -inf logit is a token of probability 0 on that side (divergence.py says which β make the loss
+inf). A NaN or +inf teacher logit, or a teacher row of only -inf, is not a distribution: it makes
that position's loss NaN (or +inf), so with ``validate`` one check of the per-token loss after the
forward (the call's only host sync) finds such rows and raises ValueError; without it the loss stays
non-finite there. A NaN or +inf student logit gives a NaN (or +inf) loss at its position, never a
finite one.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch

from megatron_mopd.kernels import use_triton
from megatron_mopd.losses.divergence import (
    fused_generalized_jsd_terms,
    generalized_jsd_terms,
    log_ratios_to_mixture_,
    rowdot,
    validate_beta,
    validate_temperature,
)
from megatron_mopd.parallel.chunking import chunk_rows, local_logsumexp, row_slices, tempered_fp32
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
        z_s = student_logits.reshape(-1, shard.local_size)
        z_t = teacher_logits.reshape(-1, shard.local_size)
        num_tokens, valid = z_s.shape[0], shard.num_valid

        loss = torch.empty(num_tokens, dtype=torch.float32, device=z_s.device)
        # The gradient is written chunk by chunk in the logits' dtype: no float32 copy of a bf16 shard.
        grad = shard.empty_with_zero_padding(z_s, student_logits.dtype)
        coef = loss_scale / temperature
        kernels = use_triton(z_s)
        chunk = _mixture_chunk if 0.0 < beta < 1.0 else _divergence_chunk
        for rows in row_slices(num_tokens, rows_per_chunk):
            if kernels:  # the gradient written straight into the buffer, padded columns included
                loss[rows] = _kernel_chunk(z_s[rows], z_t[rows], shard, beta, temperature, coef, grad[rows])
                continue
            out = grad[rows, :valid]
            work = out if out.dtype == torch.float32 else torch.empty(out.shape, device=out.device)
            loss[rows] = chunk(z_s[rows, :valid], z_t[rows, :valid], shard, beta, temperature, coef, work, fused)
            if work is not out:
                out.copy_(work)

        ctx.save_for_backward(grad)
        ctx.logits_shape, ctx.rows_per_chunk = student_logits.shape, rows_per_chunk
        ctx.backward_done = False
        return loss.mul_(loss_scale).view(student_logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        if ctx.backward_done:
            raise RuntimeError("generalized_jsd reuses its gradient buffer: backward runs only once")
        ctx.backward_done = True
        (grad,) = ctx.saved_tensors
        grad_loss = grad_loss.reshape(-1, 1).float()
        # Row chunks: a bf16 buffer times float32 factors in one op would make float32 copies of it.
        for rows in row_slices(grad.shape[0], ctx.rows_per_chunk):
            part = grad[rows]
            if part.dtype == torch.float32:
                part.mul_(grad_loss[rows])
            else:
                part.copy_(part.float().mul_(grad_loss[rows]))
        return grad.view(ctx.logits_shape), None, None, None, None, None, None, None


def _tempered_log_softmax(
    shard: VocabShard, student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (s, t) = global log_softmax of ``student / τ`` and ``teacher / τ`` over the vocabulary.

    One all-gather of 2 scalars per token (each rank's logsumexp of both sides).
    """
    return tuple(shard.log_softmax(tempered_fp32(student, temperature), tempered_fp32(teacher, temperature)))


def _divergence_chunk(
    student: torch.Tensor,
    teacher: torch.Tensor,
    shard: VocabShard,
    beta: float,
    temperature: float,
    coef: float,
    grad_out: torch.Tensor,
    fused: bool,
) -> torch.Tensor:
    """One chunk through ``generalized_jsd_terms`` (any β): the loss [n]; ∂loss/∂z · coef·τ into ``grad_out``.

    ∂loss/∂z_s = (g − p_s · Σ_v g_v) / τ, with one all-reduce of 2 scalars per token (partial loss
    and Σ_v g_v).
    """
    divergence_terms = fused_generalized_jsd_terms() if fused else generalized_jsd_terms
    s, t = _tempered_log_softmax(shard, student, teacher, temperature)
    partial_loss, g = divergence_terms(s, t, beta)
    del t
    loss_and_g_sum = shard.all_reduce_(torch.stack([partial_loss, g.sum(-1)]))
    torch.mul(g, coef, out=grad_out).addcmul_(s.exp_(), loss_and_g_sum[1, :, None], value=-coef)
    return loss_and_g_sum[0]


def _kernel_chunk(
    student: torch.Tensor,
    teacher: torch.Tensor,
    shard: VocabShard,
    beta: float,
    temperature: float,
    coef: float,
    grad_out: torch.Tensor,
) -> torch.Tensor:
    """``_divergence_chunk`` by the Triton kernels (CUDA), on the chunk's whole ``[n, V_local]`` rows:
    the logits are read three times and nothing of the chunk's size is allocated."""
    loss, lse, g_sum = kernel_jsd_sums(student, teacher, shard, beta, temperature)
    kernel_jsd_gradient(student, teacher, shard, lse, g_sum, beta, temperature, coef, grad_out)
    return loss


def kernel_jsd_sums(
    student: torch.Tensor, teacher: torch.Tensor, shard: VocabShard, beta: float, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [n], lse [2, n], Σg [n]) of ``[n, V_local]`` rows (any strides) by the Triton kernels.

    Each side's logsumexp kernel and one all-gather (lse: the student's and the teacher's global
    logsumexp of z/τ), then the partial sums kernel and one all-reduce.
    """
    from megatron_mopd.kernels.jsd import triton_jsd_loss_terms

    valid = shard.num_valid
    local_lse = torch.stack([local_logsumexp(side, valid, temperature, side.shape[0]) for side in (student, teacher)])
    lse = shard.logsumexp(local_lse) if shard.parallel else local_lse
    loss, g_sum = shard.all_reduce_(torch.stack(triton_jsd_loss_terms(student, teacher, lse[0], lse[1], valid, beta,
                                                                      temperature)))
    return loss, lse, g_sum


def kernel_jsd_gradient(
    student: torch.Tensor,
    teacher: torch.Tensor,
    shard: VocabShard,
    lse: torch.Tensor,
    g_sum: torch.Tensor,
    beta: float,
    temperature: float,
    coef: float,
    out: torch.Tensor,
) -> None:
    """Write ``coef · (g − p_s · Σg)`` (0 in the padded columns) into ``out`` ``[n, V_local]`` in its
    dtype, from ``kernel_jsd_sums``' lse and Σg; no collective. ``out`` may be ``student`` itself."""
    from megatron_mopd.kernels.jsd import triton_jsd_gradient

    triton_jsd_gradient(student, teacher, lse[0], lse[1], g_sum, shard.num_valid, beta, temperature, coef, out)


def _mixture_chunk(
    student: torch.Tensor,
    teacher: torch.Tensor,
    shard: VocabShard,
    beta: float,
    temperature: float,
    coef: float,
    grad_out: torch.Tensor,
    fused: bool,
) -> torch.Tensor:
    """``_divergence_chunk`` for 0 < β < 1, in fewer passes over the chunk.

    With r = m − s (divergence.py's mixture log-ratios) the mixture's terms simplify:

        g = (β − 1) · p_s · r,  Σ_v g_v = (β − 1) · R  where R = Σ_v p_s · r
        loss = β · Σ_v p_t · (t − m) − (1 − β) · R
        ∂loss/∂z = (g − p_s · Σ_v g_v) / τ = (β − 1) / τ · p_s · (r − R)

    so p_s and p_t are each exponentiated once and R serves both the loss and the gradient. One
    all-reduce of 2 scalars per token (Σ_v p_t · (t − m) and R). ``fused``: the two local halves run
    as ``torch.compile``-fused kernels.
    """
    sums, gradient = fused_mixture_parts() if fused else (_mixture_sums, _mixture_gradient_)
    s, t = _tempered_log_softmax(shard, student, teacher, temperature)
    partial_sums, m_minus_s, p_s = sums(s, t, beta)
    teacher_term, r_sum = shard.all_reduce_(partial_sums)
    gradient(grad_out, p_s, m_minus_s, r_sum, coef * (beta - 1.0))
    return teacher_term.mul_(beta).sub_(r_sum, alpha=1.0 - beta)


def _mixture_sums(
    s: torch.Tensor, t: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local half of ``_mixture_chunk`` before its all-reduce; consumes ``s`` and ``t``.

    Returns ``(sums [2, n], r [n, V], p_s [n, V])`` with sums = (Σ_v p_t · (t − m), Σ_v p_s · r)
    over this rank's columns.
    """
    m_minus_s, t_minus_m = log_ratios_to_mixture_(torch.sub(t, s).nan_to_num_(), beta, torch.empty_like(s))
    p_s = s.exp_()
    return torch.stack([rowdot(t.exp_(), t_minus_m), rowdot(p_s, m_minus_s)]), m_minus_s, p_s


def _mixture_gradient_(
    out: torch.Tensor, p_s: torch.Tensor, m_minus_s: torch.Tensor, r_sum: torch.Tensor, scale: float
) -> torch.Tensor:
    """Write ``scale · p_s · (r − R)`` into ``out`` (float32 [n, V]); R = ``r_sum`` [n]."""
    return torch.sub(m_minus_s, r_sum[:, None], out=out).mul_(p_s).mul_(scale)


@functools.cache
def fused_mixture_parts() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``_mixture_sums`` and ``_mixture_gradient_`` compiled by ``torch.compile`` (built on first use)."""
    return torch.compile(_mixture_sums, dynamic=True), torch.compile(_mixture_gradient_, dynamic=True)


def raise_on_invalid_teacher_rows(
    loss: torch.Tensor,
    teacher_logits_at: Callable[[torch.Tensor], torch.Tensor],
    shard: VocabShard,
    temperature: float,
    rows_per_chunk: int,
    positions: torch.Size,
    *,
    subject: str,
    remedy: str,
) -> None:
    """Raise ValueError naming the first position whose teacher logits are not a distribution.

    Args:
        loss: float32 ``[N]`` the loss of each flattened position. Only the positions of a non-finite
            loss are looked at, which every invalid teacher row causes; a student NaN or a genuinely
            infinite divergence also gets here and passes.
        teacher_logits_at: flat position indices ``[n]`` -> this rank's teacher logits there,
            ``[n, shard.num_valid]`` in any float dtype.
        positions: the leading shape the flat positions index (named in the error).
        subject, remedy: the error's wording: ``subject`` holds ``{position}``.

    The loss is the same on every rank, so all ranks take this path and its collective together.
    """
    suspects = torch.nonzero(~torch.isfinite(loss)).squeeze(1)
    local_lse = torch.full((suspects.numel(),), -torch.inf, dtype=torch.float32, device=loss.device)
    if shard.num_valid:
        for part in row_slices(suspects.numel(), rows_per_chunk):
            local_lse[part] = torch.logsumexp(tempered_fp32(teacher_logits_at(suspects[part]), temperature), dim=-1)
    lse = shard.logsumexp(local_lse)  # NaN: a NaN logit; +inf: a +inf logit; -inf: only -inf
    invalid = torch.nonzero(~torch.isfinite(lse)).squeeze(1)
    if invalid.numel() == 0:
        return
    first = int(invalid[0])
    value = float(lse[first])
    position = ", ".join(str(int(i)) for i in torch.unravel_index(suspects[first], positions))
    problem = (
        "has a NaN logit" if value != value
        else "has a +inf logit (or one that overflows float32 at this temperature)" if value > 0
        else "is -inf at every vocabulary id"
    )
    raise ValueError(f"{subject.format(position=position)} {problem}: each teacher position must be a "
                     f"distribution{remedy}")


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
    validate: bool = True,
) -> torch.Tensor:
    """Per-token generalized JSD between vocab-sharded student and teacher logits.

    Args:
        student_logits: ``[..., V_local]`` this rank's shard (any float dtype; math in float32).
            -inf marks a token of probability 0; a NaN or +inf logit gives a non-finite loss there.
        teacher_logits: same shape and sharding as ``student_logits``; treated as a constant. -inf
            marks a token of probability 0; a NaN or +inf logit, or a position whose logits are all
            -inf, raises ValueError (with ``validate``; else that position's loss is not finite).
        beta: 0 → forward KL(T‖S), 1 → reverse KL(S‖T), else β·KL(T‖M) + (1−β)·KL(S‖M) with
            M = (1−β)·S + β·T (TRL's convention).
        temperature: τ > 0; both sides are softened as ``log_softmax(z / τ)``.
        vocab_size: true vocabulary size; ids at or above it are padding (probability 0).
            None: no padding.
        tp_group: tensor-parallel group; None → Megatron's when initialized, else no TP.
        chunk_size: tokens per chunk for the float32 temporaries (None: automatic).
        scale_by_temperature_squared: multiply the loss (and gradient) by τ².
        fused: compute each chunk's divergence with ``torch.compile``-fused kernels (README's
            benchmark gives the measured gain; compiles on first use, needs a C++ compiler on CPU or
            Triton on CUDA).
        validate: check the loss for non-finite values after the forward (one host sync) and raise
            ValueError naming the first invalid teacher position. False: no host sync.
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
    loss = _VocabParallelGeneralizedJSD.apply(
        student_logits, teacher_logits.detach(), shard, beta, temperature, rows, scale, fused
    )
    if validate and not bool(torch.isfinite(loss).all()):
        z_t = teacher_logits.detach().reshape(-1, shard.local_size)
        raise_on_invalid_teacher_rows(
            loss.detach().reshape(-1), lambda at: z_t[at, : shard.num_valid], shard, temperature, rows,
            teacher_logits.shape[:-1], subject="teacher_logits[{position}]",
            remedy=", with finite logits and -inf only for tokens of probability 0; check the teacher's forward "
                   "pass (e.g. a float16 overflow) and mask banned tokens with -inf, not NaN or +inf")
    return loss
