"""Generalized JSD against a teacher known only through its top-K (id, log-probability) pairs.

The teacher ids are global student-vocabulary ids ``[..., K]``; entries whose log-probability is -inf
are absent (a position may carry fewer than K). Two supports (docs/design.md §2):

``tail`` (default) — K + 1 buckets: the K ids and the rest. Student: s_k = log_softmax(z/τ)[id_k]
    from its full-vocabulary softmax, tail s_∞ = log(1 − Σ_k e^{s_k}). Teacher: log_softmax over
    [t_1..t_K, log(1 − Σ_k e^{t_k})] / τ. The exact divergence of the coarsened distributions.
``renorm`` — the K ids only: both sides log_softmax over their K values / τ. Student mass outside
    the K ids is not penalized, and only the logits at the K ids get a gradient.

A -inf student logit is a token of probability 0 (divergence.py: 0·log 0 = 0), also at a teacher id.
In ``renorm`` mode a position where the student is -inf at every present teacher id has no
renormalized student distribution: its loss is NaN. A NaN or +inf student logit gives a non-finite
loss at its position in ``tail`` mode; ``renorm`` reads only the logits at the teacher ids.

Gradients (g = ∂loss/∂s over the support, G = Σ_j g_j, p = softmax(z/τ) over the vocabulary):

    tail:    ∂loss/∂z_v = [ p_v · (g_∞ / P_∞ − G) + 1{v = id_k} · (g_k − p_v · g_∞ / P_∞) ] / τ
    renorm:  ∂loss/∂z_{id_k} = (g_k − q_k · G) / τ,   q = softmax over the K ids

Communication per token: the K student logits at the teacher ids (masked local gather + all-reduce,
identity backward: each rank writes gradients only into ids it owns) and, for ``tail``, one scalar
for the logsumexp. Nothing of the local logits' size is kept for backward besides the input itself:
backward recomputes p chunk by chunk.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

from megatron_mopd.losses.divergence import (
    generalized_jsd_terms,
    validate_beta,
    validate_temperature,
)
from megatron_mopd.parallel.chunking import chunk_rows, row_slices, softmax_gradient
from megatron_mopd.parallel.vocab import ProcessGroup, VocabShard

TailMode = Literal["tail", "renorm"]
TAIL_MODES: tuple[str, ...] = ("tail", "renorm")

# Teacher top-K probabilities may exceed 1 by rounding (servers send float32 log-probs); beyond this
# the input is not a log-probability distribution (e.g. raw logits were passed).
_MASS_TOLERANCE = 1e-3
_TINY = torch.finfo(torch.float32).tiny


class _VocabParallelTopKJSD(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student_logits: torch.Tensor,
        teacher_logprobs: torch.Tensor,
        teacher_ids: torch.Tensor,
        present: torch.Tensor,
        shard: VocabShard,
        beta: float,
        temperature: float,
        tail: bool,
        rows_per_chunk: int,
        loss_scale: float,
    ) -> torch.Tensor:
        z = student_logits.reshape(-1, shard.local_size)
        k = teacher_ids.shape[-1]
        ids = teacher_ids.reshape(-1, k)
        present = present.reshape(-1, k)
        t_raw = teacher_logprobs.reshape(-1, k).float()

        if tail:
            student_at_ids, lse = shard.gather_columns_and_logsumexp(z, ids, present, temperature, rows_per_chunk)
        else:
            student_at_ids, lse = shard.gather_columns(z, ids, present), None
        loss, dense_coef, ids_coef = topk_support_terms(
            student_at_ids.div_(temperature), lse, t_raw, present,
            beta=beta, temperature=temperature, tail=tail, loss_scale=loss_scale,
        )
        if tail:
            ctx.save_for_backward(z, lse, dense_coef, ids_coef, ids, present)
        else:
            ctx.save_for_backward(ids_coef, ids, present)
        ctx.shard, ctx.temperature, ctx.tail, ctx.rows_per_chunk = shard, temperature, tail, rows_per_chunk
        ctx.logits_shape, ctx.logits_dtype = student_logits.shape, student_logits.dtype
        return loss.view(student_logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        shard: VocabShard = ctx.shard
        grad_loss = grad_loss.reshape(-1, 1).float()
        if ctx.tail:
            z, lse, dense_coef, ids_coef, ids, present = ctx.saved_tensors
        else:
            ids_coef, ids, present = ctx.saved_tensors
        local_ids, owned = shard.owned_local_ids(ids, present)
        ids_grad = torch.where(owned, ids_coef * grad_loss, 0.0)
        if ctx.tail:
            grad = softmax_gradient(z, lse, dense_coef[:, None] * grad_loss, local_ids, ids_grad, shard.num_valid,
                                    ctx.temperature, ctx.rows_per_chunk, ctx.logits_dtype)
        else:
            grad = torch.zeros((ids.shape[0], shard.local_size), dtype=ctx.logits_dtype, device=ids.device)
            ids_grad = ids_grad.to(grad.dtype)
            for rows in row_slices(grad.shape[0], ctx.rows_per_chunk):  # bf16 scatter_add_ widens its target
                grad[rows].scatter_add_(-1, local_ids[rows], ids_grad[rows])
        return grad.view(ctx.logits_shape), None, None, None, None, None, None, None, None, None


def _renormalized(values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """log_softmax over the present entries; absent entries (and rows with none) → -inf."""
    logp = torch.log_softmax(torch.where(present, values, -torch.inf), dim=-1)
    return torch.where(present, logp, -torch.inf)


def topk_support_terms(
    student_at_ids: torch.Tensor,
    student_lse: Optional[torch.Tensor],
    teacher_logprobs: torch.Tensor,
    present: torch.Tensor,
    *,
    beta: float,
    temperature: float,
    tail: bool,
    loss_scale: float,
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """The top-k generalized JSD of positions from their student values at the teacher's ids.

    Args:
        student_at_ids: float32 [n, K] z/τ at the teacher ids (any value where absent).
        student_lse: float32 [n] logsumexp of z/τ over the whole vocabulary (``tail``; else None).
        teacher_logprobs: float32 [n, K] the teacher's raw log-probabilities (-inf: absent).
        present: bool [n, K] the present entries.
        loss_scale: multiplies loss and gradient (τ² or 1).
    Returns:
        ``(loss [n], dense_coef [n] or None, ids_coef [n, K])``: the scaled loss, and its gradient

            tail:    ∂loss/∂z_v = p_v · dense_coef + 1{v = id_k} · ids_coef_k,   p = softmax(z/τ)
                     dense_coef = (g_∞ / P_∞ − G) / τ,  ids_coef_k = (g_k − p_{id_k} · g_∞ / P_∞) / τ
            renorm:  ∂loss/∂z_{id_k} = ids_coef_k = (g_k − q_k · G) / τ,  q = softmax over the K ids

        with g = ∂loss/∂s over the support (generalized_jsd_terms), G = Σ_j g_j, P_∞ the student's
        tail mass (both times ``loss_scale``).
    """
    k = teacher_logprobs.shape[-1]
    if tail:
        # Student support: s_k = z_{id_k}/τ − lse, tail s_∞ = log(1 − Σ_k e^{s_k}).
        s_ids = torch.where(present, student_at_ids - student_lse[:, None], -torch.inf)
        p_ids = s_ids.exp()
        student_tail_mass = (1.0 - p_ids.sum(-1)).clamp_min_(_TINY)
        student = torch.cat([s_ids, student_tail_mass.log()[:, None]], dim=-1)
        # Teacher support: log_softmax over [t_1..t_K, log(1 − Σ_k e^{t_k})] / τ.
        teacher_tail = (1.0 - torch.where(present, teacher_logprobs.exp(), 0.0).sum(-1)).clamp_min_(_TINY)
        teacher = torch.cat([torch.where(present, teacher_logprobs, -torch.inf), teacher_tail.log()[:, None]], -1)
        teacher = torch.log_softmax(teacher / temperature, dim=-1)  # absent entries stay -inf
    else:
        student = _renormalized(student_at_ids, present)
        teacher = _renormalized(teacher_logprobs / temperature, present)

    loss, g = generalized_jsd_terms(student, teacher, beta)
    g_sum = g.sum(-1, keepdim=True)
    coef = loss_scale / temperature
    if tail:
        tail_ratio = g[:, k:] / student_tail_mass[:, None]  # g_∞ / P_∞
        ids_coef = (g[:, :k] - p_ids * tail_ratio).mul_(coef)
        dense_coef = (tail_ratio - g_sum).mul_(coef).squeeze(-1)
        return loss.mul_(loss_scale), dense_coef, ids_coef
    ids_coef = (g - student.exp() * g_sum).mul_(coef)
    return loss.mul_(loss_scale), None, ids_coef


def topk_generalized_jsd(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: TailMode = "tail",
    vocab_size: Optional[int] = None,
    tp_group: Optional[ProcessGroup] = None,
    chunk_size: Optional[int] = None,
    scale_by_temperature_squared: bool = False,
    validate: bool = True,
) -> torch.Tensor:
    """Per-token generalized JSD between vocab-sharded student logits and a teacher's top-K.

    Args:
        student_logits: ``[..., V_local]`` this rank's shard (any float dtype; math in float32).
        teacher_topk_logprobs: ``[..., K]`` the teacher's log-probabilities (raw, τ = 1; -inf marks
            an absent entry). In ``tail`` mode they must sum (as probabilities) to at most 1.
        teacher_topk_ids: ``[..., K]`` integer global student-vocabulary ids; ids of present entries
            must be distinct and in ``[0, vocab_size)``; ids of absent entries are ignored.
        beta, temperature, vocab_size, tp_group, chunk_size, scale_by_temperature_squared: as in
            ``generalized_jsd``. The teacher is tempered on the support it has:
            ``log_softmax(logprob / τ)`` over its K entries (plus the tail bucket in ``tail`` mode).
        tail: ``"tail"`` (K+1 buckets, default) or ``"renorm"`` (renormalize over the K ids).
        validate: check the teacher's values on the device (NaN / +inf, ids, repeats, mass) and raise
            ValueError naming the first bad position; each check is a host sync. False: no host sync
            (shapes and dtypes are still checked); the values are the caller's contract (a remote
            teacher's are checked on the host as they arrive, ``teachers.protocols``), and a NaN or
            +inf log-probability gives a non-finite loss at its position, never a finite one.
    Returns:
        float32 ``[...]``: the loss of each position (identical on every TP rank). A position with no
        present teacher entry contributes 0 in ``renorm`` mode; mask such positions out.
    """
    validate_beta(beta)
    validate_temperature(temperature)
    if tail not in TAIL_MODES:
        raise ValueError(f"tail must be one of {TAIL_MODES}, got {tail!r}")
    shard = VocabShard.of(student_logits.shape[-1], vocab_size, tp_group)
    present = validate_teacher_topk(
        teacher_topk_logprobs,
        teacher_topk_ids,
        shard.vocab_size,
        check_mass=tail == "tail",
        leading_shape=student_logits.shape[:-1],
        validate=validate,
    )
    rows = chunk_rows(chunk_size, shard.local_size, student_logits.device)
    scale = temperature**2 if scale_by_temperature_squared else 1.0
    return _VocabParallelTopKJSD.apply(
        student_logits,
        teacher_topk_logprobs.detach(),
        teacher_topk_ids,
        present,
        shard,
        beta,
        temperature,
        tail == "tail",
        rows,
        scale,
    )


def validate_teacher_topk(
    logprobs: torch.Tensor,
    ids: torch.Tensor,
    vocab_size: int,
    *,
    check_mass: bool,
    leading_shape: torch.Size,
    vocabulary: str = "student",
    validate: bool = True,
) -> torch.Tensor:
    """Check a teacher's top-K tensors; return the mask of present entries (log-prob not -inf).

    ``leading_shape`` is the shape the positions must have (the tensor they line up with);
    ``vocabulary`` names the vocabulary the ids index in error messages. Shapes and dtypes are always
    checked (no device work). ``validate``: also check the values — no NaN / +inf, present ids in
    ``[0, vocab_size)`` and distinct, and with ``check_mass`` a mass of at most 1 — one host sync
    each; False checks none of them and syncs nothing. A NaN or +inf entry counts as present, so it
    reaches the loss (a non-finite loss) instead of being dropped silently.
    """
    if logprobs.shape != ids.shape or logprobs.dim() == 0 or logprobs.shape[-1] < 1:
        raise ValueError(
            f"teacher_topk_logprobs {tuple(logprobs.shape)} and teacher_topk_ids {tuple(ids.shape)} "
            f"must have the same shape [..., K] with K >= 1"
        )
    if logprobs.shape[:-1] != leading_shape:
        raise ValueError(
            f"teacher_topk_logprobs {tuple(logprobs.shape)} must have the leading shape "
            f"{tuple(leading_shape)} of the positions it scores, followed by K"
        )
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"teacher_topk_ids must be an integer tensor, got {ids.dtype}")
    present = logprobs != -torch.inf
    if not validate:
        return present
    if torch.isnan(logprobs).any() or torch.isposinf(logprobs).any():
        raise ValueError("teacher_topk_logprobs contains NaN or +inf; absent entries must be -inf")
    outside = present & ((ids < 0) | (ids >= vocab_size))
    if outside.any():
        where = tuple(torch.nonzero(outside)[0].tolist())
        raise ValueError(
            f"teacher_topk_ids[{', '.join(map(str, where))}] = {int(ids[where])} is outside the {vocabulary} "
            f"vocabulary [0, {vocab_size}); "
            + (
                "a teacher with another tokenizer needs the cross-tokenizer losses, and absent entries "
                "need logprob -inf"
                if vocabulary == "student"
                else "the ids must come from the teacher the projection was built for (absent entries "
                "need logprob -inf)"
            )
        )
    if ids.shape[-1] > 1:
        # Absent entries get distinct negative ids, so only present duplicates compare equal.
        k = ids.shape[-1]
        placeholder = -1 - torch.arange(k, device=ids.device)
        keyed = torch.where(present, ids.long(), placeholder).sort(dim=-1).values
        duplicated = (keyed[..., 1:] == keyed[..., :-1]).any(-1)
        if duplicated.any():
            where = tuple(torch.nonzero(duplicated)[0].tolist())
            raise ValueError(f"teacher_topk_ids has a repeated id at position {where}: ids must be distinct")
    if check_mass:
        mass = torch.where(present, logprobs.float().exp(), 0.0).sum(-1)
        over = mass > 1.0 + _MASS_TOLERANCE
        if over.any():
            where = tuple(torch.nonzero(over)[0].tolist())
            raise ValueError(
                f"teacher_topk_logprobs at position {where} sum to probability {float(mass[where]):.4f} "
                f"> 1: pass log-probabilities (log_softmax), not logits, or use tail='renorm'"
            )
    return present
