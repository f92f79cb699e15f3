"""The per-chunk math of the vocab-parallel losses: a chunk of logits in, its loss and its gradient out.

A ``ChunkLoss`` holds one loss's per-call inputs (the teacher's top-K, a colocated teacher's logits,
labels) for N flattened positions, and works on a float32 chunk of this rank's logits in
vocabulary-major layout, ``zt`` [num_valid, n] = the transposed logits of n positions ``rows`` (the
real columns of this rank's vocabulary shard only): the layout of ``W @ hidden.T``, which the output
layer's matmuls produce and consume fastest, and in which a block of vocabulary rows is contiguous.

    forward_chunk:  the loss of each position [n] (identical on every TP rank); when asked, overwrites
                    ``zt`` with ∂loss_i/∂z_i (the gradient for an upstream gradient of 1 per
                    position), transposed like ``zt``. Runs the per-token collectives (a few scalars,
                    or K values, per position).
    grad_chunk:     overwrites ``zt`` with the same gradient from the per-position statistics saved by
                    ``forward_chunk`` (maxima, logsumexps, coefficients): no collective, so each rank
                    may call it for any rows in any order.

The padded columns (global ids >= vocab_size) are not part of the chunk: they have probability 0 and
a gradient of exactly 0, which the caller writes. The math is the one of the logits losses:

    topk.py          → ``TopKJSDChunks`` (tail / renorm), with ``topk_support_terms`` the support math
    jsd.py           → ``GeneralizedJSDChunks`` (the teacher's logits chunk comes from a callback)
    token_logprob.py → ``CrossEntropyChunks`` (−log p of the labels, negative labels skipped)

and each calls the divergence core of divergence.py. ``losses/linear.py`` drives them with the
output layer's matmuls; a logits loss could drive them over float32 transposed copies of its chunks
(``z[rows, :num_valid].t()``; any strides work, vocabulary-major ones are the fast ones on CPU).

On CUDA with Triton (``kernels``) the chunk epilogues are the logits losses' kernels, run on the
chunk's position-major view ``zt.t()`` (the driver then makes the chunks position-major): the
logsumexp with the gather at the ids in one pass and the gradient written over the logits in place
(top-K JSD, cross-entropy), the JSD's partial sums and gradient (full vocabulary). ``zt`` then keeps
the logits until the gradient replaces them, and the saved statistics are the global logsumexps.
"""

from __future__ import annotations

import abc
from typing import Callable, Optional

import torch

from megatron_mopd.kernels import use_triton
from megatron_mopd.losses.divergence import (
    fused_generalized_jsd_terms,
    generalized_jsd_terms,
    log_ratios_to_mixture_,
)
from megatron_mopd.losses.jsd import kernel_jsd_gradient, kernel_jsd_sums
from megatron_mopd.losses.topk import topk_support_terms
from megatron_mopd.parallel.chunking import row_slices
from megatron_mopd.parallel.vocab import VocabShard

# float32 elements per vocabulary block of the full-vocabulary JSD's passes: its ~5 block-sized
# temporaries stay in a core's cache.
_JSD_BLOCK_ELEMENTS = 1 << 18

TeacherLogits = Callable[[slice], torch.Tensor]
"""rows → float32 [num_valid, n]: the colocated teacher's transposed logits of those positions (real
columns only), in a buffer the loss may overwrite."""


class ChunkLoss(abc.ABC):
    """One loss family's math on float32 transposed logits chunks ``[num_valid, n]`` of N positions.

    Attributes:
        shard: the vocabulary shard the chunks' rows belong to.
        zero_grad_rows: bool [N] or None: positions whose gradient is 0 whatever the upstream gradient
            (e.g. a skipped label), so a caller need not look at their upstream gradient.
    """

    shard: VocabShard
    zero_grad_rows: Optional[torch.Tensor] = None

    @abc.abstractmethod
    def forward_chunk(self, rows: slice, zt: torch.Tensor, want_grad: bool) -> torch.Tensor:
        """float32 [n]: the loss of positions ``rows``; with ``want_grad``, ``zt`` becomes ∂loss_i/∂z_i."""

    @abc.abstractmethod
    def grad_chunk(self, rows: slice, zt: torch.Tensor) -> None:
        """Overwrite ``zt`` (positions ``rows``) with ∂loss_i/∂z_i from the saved statistics; no collective."""


def _owned_columns(shard: VocabShard, ids: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(local column of each global id, clamped into [0, num_valid), mask of the ids this rank owns)."""
    local_ids, owned = shard.owned_local_ids(ids, present)
    return local_ids.clamp(max=max(shard.num_valid - 1, 0)), owned


def _gather_owned(shard: VocabShard, zt: torch.Tensor, local_ids: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    """float32 [n, K] values of the chunk at the ids, replicated on every rank (docs/design.md §3).

    Masked local gather + all-reduce: each rank contributes the ids it owns, 0 elsewhere.
    """
    if zt.shape[0] == 0:
        values = torch.zeros(local_ids.shape, dtype=torch.float32, device=zt.device)
    else:
        values = torch.where(owned, zt.t().gather(-1, local_ids), 0.0)
    return shard.all_reduce_(values)


def _scatter_add_owned(zt: torch.Tensor, local_ids: torch.Tensor, owned: torch.Tensor, values: torch.Tensor) -> None:
    """zt[local_ids[i, k], i] += values[i, k] where owned (the ids other ranks own add nothing)."""
    if zt.shape[0]:
        zt.t().scatter_add_(-1, local_ids, torch.where(owned, values, 0.0))


def _exp_shifted_(zt: torch.Tensor, shift: torch.Tensor, temperature: float) -> torch.Tensor:
    """In place: zt ← exp((zt − shift) / τ) (shift [n] per position); returns zt."""
    zt.sub_(shift)
    if temperature != 1.0:
        zt.mul_(1.0 / temperature)
    return zt.exp_()


def _softmax_numerator_(shard: VocabShard, zt: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """In place zt ← e = exp((z − m) / τ), m each position's maximum over the local columns (0 if
    they are all -inf); returns (m [n], the global logsumexp of z/τ [n]).

    Then softmax(z/τ) = e · exp(m/τ − lse). Passes over the chunk: max, subtract, (scale,) exp, sum —
    no temporary of the chunk's size. One all-gather of one scalar per position.
    """
    if zt.shape[0] == 0:
        shift = torch.zeros(zt.shape[1], dtype=torch.float32, device=zt.device)
        local_lse = torch.full_like(shift, -torch.inf)
    else:
        shift = zt.amax(dim=0)
        shift.masked_fill_(shift == -torch.inf, 0.0)  # only -inf: exp gives 0, not NaN
        local_lse = _exp_shifted_(zt, shift, temperature).sum(dim=0).log_().add_(shift, alpha=1.0 / temperature)
    return shift, shard.logsumexp(local_lse)


class _SoftmaxShapedGradient(ChunkLoss):
    """A loss whose gradient is p_v · dense_coef plus coefficients at a few ids (p = softmax(z/τ)).

    Saved per position for ``grad_chunk``: the local maximum m and the global logsumexp (p is
    e · exp(m/τ − lse) with e = exp((z − m)/τ), in forward and in ``grad_chunk`` alike), dense_coef
    and the ids' coefficients. With the kernels (``kernels``) zt keeps the logits and p is computed
    from them and the logsumexp alone.
    """

    temperature: float
    kernels: bool  # CUDA with Triton: the Triton epilogues on zt.t()
    local_ids: torch.Tensor  # [N, K] local columns, clamped
    owned: torch.Tensor  # [N, K]
    shift: torch.Tensor  # [N] the local maximum m
    lse: torch.Tensor  # [N]
    dense_coef: torch.Tensor  # [N]
    ids_coef: torch.Tensor  # [N, K]

    def _gather_and_softmax(self, rows: slice, zt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the raw logits at the ids [n, K], replicated; the global logsumexp of z/τ [n]), saved for
        ``grad_chunk``; without the kernels zt ← e in place (m saved too)."""
        local_ids, owned = self.local_ids[rows], self.owned[rows]
        if self.kernels:
            at_ids, lse = self.shard.gather_owned_columns_and_logsumexp(zt.t(), local_ids, owned, self.temperature,
                                                                        zt.shape[1])
            self.lse[rows] = lse
            return at_ids, lse
        at_ids = _gather_owned(self.shard, zt, local_ids, owned)
        shift, lse = _softmax_numerator_(self.shard, zt, self.temperature)
        self.shift[rows], self.lse[rows] = shift, lse
        return at_ids, lse

    def _write_gradient_(self, rows: slice, zt: torch.Tensor) -> None:
        """zt ← p · dense_coef, plus the ids' coefficients at the owned ids; zt holds e (the logits
        with the kernels)."""
        if self.kernels:
            from megatron_mopd.kernels.softmax_gradient import triton_softmax_gradient

            ids_coef = torch.where(self.owned[rows], self.ids_coef[rows], 0.0)
            triton_softmax_gradient(zt.t(), self.lse[rows], self.dense_coef[rows], self.local_ids[rows], ids_coef,
                                    self.shard.num_valid, self.temperature, torch.float32, out=zt.t())
            return
        scale = (self.shift[rows] / self.temperature - self.lse[rows]).exp_().mul_(self.dense_coef[rows])
        zt.mul_(scale)
        _scatter_add_owned(zt, self.local_ids[rows], self.owned[rows], self.ids_coef[rows])

    def grad_chunk(self, rows: slice, zt: torch.Tensor) -> None:
        if not self.kernels:
            _exp_shifted_(zt, self.shift[rows], self.temperature)
        self._write_gradient_(rows, zt)


class TopKJSDChunks(_SoftmaxShapedGradient):
    """Top-k generalized JSD against a teacher's top-K (id, log-prob) pairs (topk.py's semantics).

    Per chunk: the K logits at the teacher ids (masked gather + all-reduce of K values per position)
    and, in ``tail`` mode, the logsumexp (an all-gather of one scalar per position); the support math
    on [n, K + 1]; the gradient p · dense_coef (tail) plus ids_coef at the owned ids.
    """

    def __init__(
        self,
        shard: VocabShard,
        teacher_logprobs: torch.Tensor,
        teacher_ids: torch.Tensor,
        present: torch.Tensor,
        *,
        beta: float,
        temperature: float,
        tail: bool,
        loss_scale: float,
    ) -> None:
        """``teacher_logprobs`` [N, K] (raw), ``teacher_ids`` [N, K] global ids, ``present`` [N, K] bool."""
        self.shard = shard
        self.teacher_logprobs = teacher_logprobs.float()
        self.present = present
        self.local_ids, self.owned = _owned_columns(shard, teacher_ids.long(), present)
        self.beta, self.temperature, self.tail, self.loss_scale = beta, temperature, tail, loss_scale
        self.kernels = tail and use_triton(teacher_ids)
        num_rows, device = teacher_ids.shape[0], teacher_ids.device
        self.shift, self.lse, self.dense_coef = (
            torch.empty(num_rows, dtype=torch.float32, device=device) for _ in range(3)
        )
        self.ids_coef = torch.empty(teacher_ids.shape, dtype=torch.float32, device=device)

    def forward_chunk(self, rows: slice, zt: torch.Tensor, want_grad: bool) -> torch.Tensor:
        if self.tail:
            at_ids, lse = self._gather_and_softmax(rows, zt)
        else:
            at_ids, lse = _gather_owned(self.shard, zt, self.local_ids[rows], self.owned[rows]), None
        loss, dense_coef, ids_coef = topk_support_terms(
            at_ids.div_(self.temperature), lse, self.teacher_logprobs[rows], self.present[rows],
            beta=self.beta, temperature=self.temperature, tail=self.tail, loss_scale=self.loss_scale,
        )
        self.ids_coef[rows] = ids_coef
        if self.tail:
            self.dense_coef[rows] = dense_coef
        if want_grad:
            if self.tail:
                self._write_gradient_(rows, zt)
            else:
                self.grad_chunk(rows, zt)
        return loss

    def grad_chunk(self, rows: slice, zt: torch.Tensor) -> None:
        if self.tail:
            super().grad_chunk(rows, zt)
            return
        zt.zero_()  # renorm: only the logits at the teacher ids get a gradient
        _scatter_add_owned(zt, self.local_ids[rows], self.owned[rows], self.ids_coef[rows])


class CrossEntropyChunks(_SoftmaxShapedGradient):
    """Cross-entropy −log softmax(z/τ)[y] of given labels (token_logprob.py's −logp_y).

    Positions with a negative label (−100) are skipped: loss 0 and gradient 0. Per chunk: the logit
    at the label (masked gather + all-reduce of 1 value per position) and the logsumexp (all-gather of
    1 scalar); ∂loss/∂z_v = (p_v − 1{v = y}) / τ.
    """

    def __init__(self, shard: VocabShard, labels: torch.Tensor, *, temperature: float) -> None:
        """``labels`` int [N] global ids, negative = skipped."""
        self.shard = shard
        self.temperature = temperature
        self.kernels = use_triton(labels)
        present = labels[:, None] >= 0
        self.kept = present.squeeze(-1)
        self.zero_grad_rows = ~self.kept
        self.local_ids, self.owned = _owned_columns(shard, labels[:, None].long().clamp_min(0), present)
        num_rows, device = labels.shape[0], labels.device
        self.shift, self.lse = (torch.empty(num_rows, dtype=torch.float32, device=device) for _ in range(2))
        self.dense_coef = torch.where(self.kept, 1.0 / temperature, 0.0)
        self.ids_coef = torch.where(present, -1.0 / temperature, 0.0)

    def forward_chunk(self, rows: slice, zt: torch.Tensor, want_grad: bool) -> torch.Tensor:
        at_label, lse = self._gather_and_softmax(rows, zt)
        loss = torch.where(self.kept[rows], lse - at_label.squeeze(-1).div_(self.temperature), 0.0)
        if want_grad:
            self._write_gradient_(rows, zt)
        return loss


def _max_sumexp_step(zt: torch.Tensor, inv_temperature: float, state: torch.Tensor) -> torch.Tensor:
    """One block of an online logsumexp over the vocabulary rows of ``zt / τ`` [Vb, n].

    ``state`` [3, n] = (maximum m so far, Σ exp(z/τ − shift) so far, shift = m or 0 while m = -inf);
    returns the updated state: the sum so far is rescaled by exp(shift_old − shift_new).
    """
    x = zt * inv_temperature
    row_max = torch.maximum(state[0], x.amax(dim=0))
    shift = torch.where(row_max == -torch.inf, 0.0, row_max)  # only -inf so far: exp gives 0, not NaN
    total = state[1] * torch.exp(state[2] - shift) + x.sub_(shift).exp_().sum(dim=0)
    return torch.stack([row_max, total, shift])


def _log_probs_(zt: torch.Tensor, inv_temperature: float, shift: torch.Tensor) -> torch.Tensor:
    """In place: z ← (z/τ − M) − offset, ``shift`` [2, n] = (M, offset); returns zt."""
    if inv_temperature != 1.0:
        zt.mul_(inv_temperature)
    return zt.sub_(shift[0]).sub_(shift[1])


def _mixture_block_(
    zt_s: torch.Tensor, zt_t: torch.Tensor, shift: torch.Tensor, inv_temperature: float, beta: float
) -> torch.Tensor:
    """One vocabulary block [Vb, n] of the mixture JSD (0 < β < 1); ``shift`` [2, 2, n] per side (M, offset).

    In place: zt_s ← p_s, zt_t ← r = m − s (``log_ratios_to_mixture_``). Returns [2, n]: the block's
    Σ_v p_t (t − m) and R = Σ_v p_s r.
    """
    s = _log_probs_(zt_s, inv_temperature, shift[0])
    t = _log_probs_(zt_t, inv_temperature, shift[1])
    m_minus_s, t_minus_m = log_ratios_to_mixture_(torch.sub(t, s).nan_to_num_(), beta, torch.empty_like(s))
    teacher_term = t.exp_().mul_(t_minus_m).sum(dim=0)  # t is overwritten with r below
    sums = torch.stack([teacher_term, torch.linalg.vecdot(s.exp_(), m_minus_s, dim=0)])
    zt_t.copy_(m_minus_s)
    return sums


def _mixture_gradient_block_(p_s: torch.Tensor, r: torch.Tensor, r_sum: torch.Tensor, coef: float) -> None:
    """In place p_s ← coef · p_s · (r − R) = ∂loss/∂z_s for coef = (β − 1) · scale / τ (r is overwritten)."""
    p_s.mul_(r.sub_(r_sum)).mul_(coef)


def _global_max_and_offset(
    shard: VocabShard, chunks: tuple[torch.Tensor, ...], temperature: float, block: int
) -> torch.Tensor:
    """float32 [len(chunks), 2, n]: per chunk ``zt`` [V, n] and position, the maximum M of ``z / τ``
    over the whole vocabulary and ``offset = logsumexp(z / τ) − M``, so log_softmax = (z/τ − M) − offset.

    Subtracting M and the small offset one after the other keeps the log-probabilities as exact as
    ``torch.log_softmax`` does (z/τ − logsumexp would round them at the scale of the logsumexp, which
    the mixture's gradient amplifies for sharp distributions). Each rank's (max, offset) over its
    vocabulary comes from one pass of vocabulary blocks (an online logsumexp); one all-gather of them,
    2 scalars per position and chunk, gives offset = log Σ_r exp(m_r − M + offset_r). A position that
    is -inf everywhere gets M = 0 and offset -inf.
    """
    n = chunks[0].shape[1]
    local = torch.empty((len(chunks), 2, n), dtype=torch.float32, device=chunks[0].device)
    for i, zt in enumerate(chunks):
        state = torch.zeros((3, n), dtype=torch.float32, device=zt.device)
        state[0] = -torch.inf
        for rows in row_slices(zt.shape[0], block):
            state = _max_sumexp_step(zt[rows], 1.0 / temperature, state)
        local[i, 0], local[i, 1] = state[0], state[1].log()
    if not shard.parallel:
        local[:, 0].masked_fill_(local[:, 0] == -torch.inf, 0.0)
        return local
    gathered = shard.all_gather(local)  # [w, chunks, 2, n]
    row_max = gathered[:, :, 0].amax(dim=0)
    row_max.masked_fill_(row_max == -torch.inf, 0.0)
    offset = torch.logsumexp(gathered[:, :, 0] - row_max + gathered[:, :, 1], dim=0)
    return torch.stack([row_max, offset], dim=1)


class GeneralizedJSDChunks(ChunkLoss):
    """Full-vocabulary generalized JSD against a colocated teacher sharded identically (jsd.py).

    With s = log_softmax(z_s/τ), t = log_softmax(z_t/τ) over the vocabulary, per chunk, each pass
    walking both chunks block of vocabulary rows by block (the block's temporaries stay in cache):
      1. both sides' max and logsumexp (online): one all-gather of 4 scalars per position;
      2. s and t in place, then the local vocabulary's partial sums; one all-reduce of 2 scalars per
         position;
      3. the gradient, written over the student's chunk (the teacher's chunk holds a per-entry factor
         after pass 2).

    β = 0, β = 1 and ``fused`` (its ``torch.compile``-fused form) go through ``generalized_jsd_terms``
    (g = ∂loss/∂s):

        sums = (Σ_v loss_v, G = Σ_v g_v),   ∂loss/∂z_s = (g − p_s · G) / τ

    0 < β < 1 otherwise in the mixture form of jsd.py, in fewer passes and without the cancellation of
    g − p_s·G: with r = m − s (``log_ratios_to_mixture_``), g = (β − 1) p_s r, so

        sums = (Σ_v p_t (t − m), R = Σ_v p_s r),   loss = β · Σ_v p_t (t − m) − (1 − β) · R
        ∂loss/∂z_s = (β − 1) / τ · p_s · (r − R)

    Saved per position: both sides' max and logsumexp − max, and G (or R). With the kernels: both
    sides' logsumexp (max 0) and G, from jsd.py's ``kernel_jsd_sums``; the gradient by
    ``kernel_jsd_gradient`` over the student's chunk.
    """

    def __init__(
        self,
        shard: VocabShard,
        teacher_logits: TeacherLogits,
        num_rows: int,
        device: torch.device,
        *,
        beta: float,
        temperature: float,
        loss_scale: float,
        fused: bool = False,
    ) -> None:
        self.shard = shard
        self.teacher_logits = teacher_logits
        self.beta, self.temperature, self.loss_scale = beta, temperature, loss_scale
        self.kernels = use_triton(device)
        self.mixture = 0.0 < beta < 1.0 and not fused and not self.kernels
        self.terms = fused_generalized_jsd_terms() if fused else generalized_jsd_terms
        # Per side (student, teacher) and position: the global max M and logsumexp − M of z/τ.
        self.shift = torch.empty((2, 2, num_rows), dtype=torch.float32, device=device)
        self.row_sum = torch.empty(num_rows, dtype=torch.float32, device=device)  # G, or R (mixture)

    def _block(self, zt: torch.Tensor) -> int:
        """Vocabulary rows per block: a cache-sized block of ``_JSD_BLOCK_ELEMENTS``."""
        return max(1, _JSD_BLOCK_ELEMENTS // max(zt.shape[1], 1))

    def _divergence_pass(self, rows: slice, s: torch.Tensor, t: torch.Tensor, sums: torch.Tensor) -> None:
        """Per vocabulary block: s, t ← log-probabilities, then the divergence terms, added to ``sums``
        [2, n]. After it: mixture form s ← p_s, t ← r = m − s; generic form s ← s, t ← g."""
        shift = self.shift[:, :, rows]
        inv_tau = 1.0 / self.temperature
        for block in row_slices(s.shape[0], self._block(s)):
            s_b, t_b = s[block], t[block]
            if self.mixture:
                sums += _mixture_block_(s_b, t_b, shift, inv_tau, self.beta)
            else:
                partial_loss, g = self.terms(_log_probs_(s_b, inv_tau, shift[0]).t(),
                                             _log_probs_(t_b, inv_tau, shift[1]).t(), self.beta)
                sums[0] += partial_loss
                sums[1] += g.sum(-1)
                t_b.copy_(g.t())

    def _gradient_pass(self, rows: slice, s: torch.Tensor, t: torch.Tensor) -> None:
        """Per vocabulary block: s ← ∂loss/∂z_s · scale, from the divergence pass's s and t and the
        saved G (or R) of the positions."""
        coef = self.loss_scale / self.temperature
        row_sum = self.row_sum[rows]
        for block in row_slices(s.shape[0], self._block(s)):
            s_b, t_b = s[block], t[block]
            if self.mixture:  # (β − 1)/τ · p_s · (r − R)
                _mixture_gradient_block_(s_b, t_b, row_sum, coef * (self.beta - 1.0))
            else:  # (g − p_s · G) / τ
                s_b.exp_().mul_(row_sum * -coef).add_(t_b, alpha=coef)

    def forward_chunk(self, rows: slice, zt: torch.Tensor, want_grad: bool) -> torch.Tensor:
        zt_t = self.teacher_logits(rows)
        if self.kernels:
            loss, lse, self.row_sum[rows] = kernel_jsd_sums(zt.t(), zt_t.t(), self.shard, self.beta, self.temperature)
            self.shift[:, 0, rows], self.shift[:, 1, rows] = 0.0, lse
            if want_grad:
                self._kernel_gradient(rows, zt, zt_t)
            return loss.mul_(self.loss_scale)
        self.shift[:, :, rows] = _global_max_and_offset(self.shard, (zt, zt_t), self.temperature, self._block(zt))
        sums = torch.zeros((2, zt.shape[1]), dtype=torch.float32, device=zt.device)
        self._divergence_pass(rows, zt, zt_t, sums)
        self.shard.all_reduce_(sums)
        self.row_sum[rows] = sums[1]
        if want_grad:
            self._gradient_pass(rows, zt, zt_t)
        loss = sums[0].mul_(self.beta).sub_(sums[1], alpha=1.0 - self.beta) if self.mixture else sums[0]
        return loss.mul_(self.loss_scale)

    def _kernel_gradient(self, rows: slice, zt: torch.Tensor, zt_t: torch.Tensor) -> None:
        kernel_jsd_gradient(zt.t(), zt_t.t(), self.shard, self.shift[:, 1, rows], self.row_sum[rows], self.beta,
                            self.temperature, self.loss_scale / self.temperature, zt.t())

    def grad_chunk(self, rows: slice, zt: torch.Tensor) -> None:
        zt_t = self.teacher_logits(rows)
        if self.kernels:
            self._kernel_gradient(rows, zt, zt_t)
            return
        self._divergence_pass(rows, zt, zt_t, torch.zeros((2, zt.shape[1]), dtype=torch.float32, device=zt.device))
        self._gradient_pass(rows, zt, zt_t)
