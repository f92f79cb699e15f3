"""The output layer fused with the loss: vocab-parallel losses whose logits never exist in full.

Each loss here equals "output layer, then the logits loss" — ``logits = hidden @ output_weight.T`` on
this tensor-parallel rank's vocabulary shard, then ``topk_generalized_jsd`` / ``generalized_jsd`` /
``-vocab_parallel_token_logprobs`` — in loss and in the gradients of ``hidden`` and ``output_weight``,
at any TP size and with sequence parallel, while only a chunk of rows of the logits is ever held.

Shapes (Megatron's ``ColumnParallelLinear`` output layer, no bias: Megatron's has none):

    hidden         [..., H]        e.g. [s, b, H]; replicated on the TP ranks, or with
                                   ``sequence_parallel`` this rank's slice [s/tp, b, H] of dim 0
    output_weight  [V_local, H]    this rank's rows of the (padded) output layer or tied embedding
    logits         [..., V_local]  = hidden @ output_weight.T, never materialized

The driver walks the N flattened positions in chunks of rows. Per chunk (forward):

    zt = W[:num_valid] @ hidden[rows].T          the transposed logits [num_valid, n]: matmul in the
                                                 input dtype, then float32
    loss[rows], dzt = ChunkLoss(zt)              per-token collectives only (linear_chunk_losses.py)
    grad_hidden[rows]  = dzt.T @ W[:num_valid]   (dzt rounded to the input dtype)
    grad_W[:num_valid] += dzt @ hidden[rows]     (accumulated in float32)

The vocabulary-major layout is the one whose three matmuls per chunk run fastest (on CPU about 8%
faster than row-major chunks of 256 positions: no transposed copy of W is packed per call), and a
block of its vocabulary rows is contiguous for the loss math. A chunk's matmuls still pay for reading
W once more per chunk; the automatic chunk is therefore as large as the memory budget allows.

Most callers differentiate a masked sum or mean of the loss, so by default the gradients are
computed in the forward pass for an upstream gradient of 1 per position in ``loss_mask``, and stored:
3 matmuls in all, as for an output layer and its backward, instead of 4 for a recompute in backward.
Backward multiplies them by the upstream gradient's common value c, read on the device (no host
sync); ``validate`` checks that the upstream gradient is c · loss_mask (one host sync) and otherwise
recomputes, and without it a different upstream gradient makes the gradients NaN. With
``gradient_in_forward=False`` (per-position weights, such as MOPD's advantages) forward computes only
the loss and backward recomputes each chunk's logits and gradient from the saved per-position
statistics, exactly and without collectives.
Padded vocabulary rows of W (global ids >= vocab_size) are never read and get a gradient of 0.

Tensor parallelism (megatron.core.tensor_parallel.mappings, ``parallel/sequence.py``): the hidden
states enter as the input of a ColumnParallelLinear — replicated: identity forward, all-reduce of the
hidden gradient backward; sequence parallel: all-gather along dim 0 forward, reduce-scatter backward.
The loss (of the full, gathered sequence) is identical on every TP rank, as for the logits losses.

Memory beyond the inputs and their gradients: one float32 logits chunk (44 MiB on CPU by default) per
logits tensor replaced — one; two with the colocated teacher (its logits are replaced too) — plus
cache-sized temporaries and a few floats per position; with bfloat16 weights also the float32
accumulator of the weight gradient (V_local · H · 4 bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_mopd.kernels import use_triton
from megatron_mopd.losses.divergence import validate_beta, validate_temperature
from megatron_mopd.losses.jsd import raise_on_invalid_teacher_rows
from megatron_mopd.losses.linear_chunk_losses import (
    ChunkLoss,
    CrossEntropyChunks,
    GeneralizedJSDChunks,
    TopKJSDChunks,
)
from megatron_mopd.losses.topk import TAIL_MODES, TailMode, validate_teacher_topk
from megatron_mopd.parallel.chunking import chunk_rows, row_slices
from megatron_mopd.parallel.sequence import (
    all_gather_first_dim,
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron_mopd.parallel.vocab import ProcessGroup, VocabShard

# Bytes of float32 logits per chunk when chunk_size is None, for each logits tensor a loss replaces
# (the student's; for the colocated teacher also the teacher's): 44 MiB on CPU (0.086x the logits of
# 4096 tokens x 32768 ids, and enough positions that a chunk's matmuls run within ~10% of whole ones),
# 256 MiB on an accelerator.
LINEAR_CHUNK_BYTES = {"cpu": 44 << 20, "accelerator": 256 << 20}
# Rows of the weight per float32 accumulation of a low-precision weight gradient (bounds the temporary).
_WEIGHT_GRAD_BLOCK_ELEMENTS = 1 << 22
_ROW_MULTIPLE = 16  # automatic chunks are a multiple of this many positions (a 64-byte float32 line)


def linear_chunk_rows(chunk_size: Optional[int], local_vocab_size: int, device: torch.device) -> int:
    """Positions per chunk: ``chunk_size`` if given (>= 1), else as many as fit ``LINEAR_CHUNK_BYTES`` of
    float32 logits for the device (a multiple of 16 when that is at least 16). Raises ValueError if
    ``chunk_size`` < 1."""
    if chunk_size is not None:
        return chunk_rows(chunk_size, local_vocab_size, device)
    budget = LINEAR_CHUNK_BYTES["cpu" if device.type == "cpu" else "accelerator"]
    rows = budget // (4 * max(local_vocab_size, 1))
    return max(1, rows - rows % _ROW_MULTIPLE if rows >= _ROW_MULTIPLE else rows)


@dataclass(frozen=True)
class _Plan:
    """How the driver runs: rows per chunk, which gradients, and the rows differentiated in forward."""

    rows_per_chunk: int
    grad_hidden: bool
    grad_weight: bool
    active: Optional[torch.Tensor]  # bool [N] (loss_mask) or None: every row
    gradient_in_forward: bool  # the gradients are computed in forward, for an upstream c · active
    check_upstream: bool  # backward checks that upstream (a host sync) and recomputes if it is not

    @property
    def want_grad(self) -> bool:
        """Whether forward computes the gradients."""
        return (self.grad_hidden or self.grad_weight) and self.gradient_in_forward


def _logits_into(buffer: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float32 zt [V, n] = weight [V, H] @ hidden[n, H].T (the transposed logits), in ``buffer``'s storage.

    The matmul runs in the inputs' dtype. Its layout is vocabulary-major (fastest on CPU) or, when the
    Triton epilogues run (CUDA), position-major — zt is then the transposed view of [n, V] logits,
    whose rows the kernels read contiguously; the chunk losses take either.
    """
    num_vocab, num_positions = weight.shape[0], hidden.shape[0]
    position_major = use_triton(hidden)
    storage = buffer[: num_vocab * num_positions]
    zt = storage.view(num_positions, num_vocab).t() if position_major else storage.view(num_vocab, num_positions)
    if zt.numel() == 0:
        return zt
    if hidden.dtype == torch.float32:
        if position_major:
            torch.mm(hidden, weight.t(), out=zt.t())
        else:
            torch.mm(weight, hidden.t(), out=zt)
        return zt
    return zt.copy_(torch.mm(hidden, weight.t()).t() if position_major else torch.mm(weight, hidden.t()))


def _accumulate_grads(
    dzt: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    grad_hidden: Optional[torch.Tensor],
    grad_weight: Optional[torch.Tensor],
) -> None:
    """grad_hidden ← dzt.T @ weight; grad_weight (float32) += dzt @ hidden.

    dzt: float32 [V, n] the transposed gradient of the logits; weight [V, H]; hidden [n, H]. The
    matmuls run in the inputs' dtype (dzt rounded to it once, as the logits' gradient would be); a
    low-precision weight gradient is accumulated in float32, block of weight rows by block.
    """
    if dzt.shape[0] == 0:
        if grad_hidden is not None:
            grad_hidden.zero_()
        return
    low = dzt if hidden.dtype == torch.float32 else dzt.to(hidden.dtype)
    if grad_hidden is not None:
        torch.mm(low.t(), weight, out=grad_hidden)
    if grad_weight is None:
        return
    if low is dzt:
        grad_weight.addmm_(dzt, hidden)
        return
    block = max(1, _WEIGHT_GRAD_BLOCK_ELEMENTS // hidden.shape[1])
    for vocab_rows in row_slices(low.shape[0], block):
        grad_weight[vocab_rows] += torch.mm(low[vocab_rows], hidden)


def _upstream_scale(
    upstream: torch.Tensor, active: Optional[torch.Tensor], zero_grad_rows: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, uniform) as 0-dim device tensors, no host sync: c is the upstream gradient of the first
    differentiated row (0 when there is none), ``uniform`` whether the upstream gradient is c on every
    differentiated row (``active``; every row without it) and 0 on the others.

    Rows in ``zero_grad_rows`` have a zero gradient whatever their upstream gradient: not looked at.
    A NaN upstream value is never uniform.
    """
    constant = torch.ones_like(upstream, dtype=torch.bool) if active is None else active.clone()
    zero = torch.zeros_like(constant) if active is None else ~active
    if zero_grad_rows is not None:
        constant &= ~zero_grad_rows
        zero &= ~zero_grad_rows
    first = torch.argmax(constant.to(torch.uint8)).view(1)  # a tensor index: indexing with it would sync
    c = torch.where(constant.any(), upstream.index_select(0, first).squeeze(0), 0.0)
    uniform = (torch.where(constant, upstream == c, True) & torch.where(zero, upstream == 0, True)).all()
    return c, uniform


class _FusedOutputLayerLoss(torch.autograd.Function):
    """loss [N] = ChunkLoss(hidden [N, H] @ weight[V_local, H].T), chunk by chunk; gradients in forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, hidden: torch.Tensor, weight: torch.Tensor, chunks: ChunkLoss, plan: _Plan
    ) -> torch.Tensor:
        num_rows, num_valid = hidden.shape[0], chunks.shard.num_valid
        w = weight[:num_valid]
        loss = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
        buffer = torch.empty(min(plan.rows_per_chunk, num_rows) * num_valid, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if plan.grad_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if plan.grad_weight else None
        for rows in row_slices(num_rows, plan.rows_per_chunk):
            zt = _logits_into(buffer, hidden[rows], w)
            loss[rows] = chunks.forward_chunk(rows, zt, plan.want_grad)
            if plan.want_grad:
                if plan.active is not None:
                    zt.masked_fill_(~plan.active[rows], 0.0)
                _accumulate_grads(zt, hidden[rows], w, grad_hidden[rows] if grad_hidden is not None else None,
                                  grad_weight[:num_valid] if grad_weight is not None else None)
        ctx.save_for_backward(hidden, weight)
        ctx.chunks, ctx.plan = chunks, plan
        ctx.stored = (grad_hidden, grad_weight) if plan.want_grad else None
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        hidden, weight = ctx.saved_tensors
        chunks: ChunkLoss = ctx.chunks
        plan: _Plan = ctx.plan
        upstream = grad_loss.reshape(-1).float()
        stored, ctx.stored = ctx.stored, None  # used once: a second backward recomputes
        if stored is not None:
            scale, uniform = _upstream_scale(upstream, plan.active, chunks.zero_grad_rows)
            if not plan.check_upstream:  # trusted, unchecked: gradients of NaN if it was not uniform
                scale = torch.where(uniform, scale, torch.nan)
            if not plan.check_upstream or bool(uniform):
                grad_hidden, grad_weight = stored
                del stored
                for grad in (grad_hidden, grad_weight):
                    if grad is not None:
                        grad.mul_(scale)
                if grad_weight is not None and grad_weight.dtype != weight.dtype:
                    grad_weight = grad_weight.to(weight.dtype)
                return grad_hidden, grad_weight, None, None
            del stored
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden, grad_weight = _recompute_grads(hidden, weight, chunks, plan, upstream, need_hidden, need_weight)
        return grad_hidden, grad_weight, None, None


def _recompute_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    chunks: ChunkLoss,
    plan: _Plan,
    upstream: torch.Tensor,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The gradients for any upstream gradient [N]: each chunk's logits and gradient recomputed.

    ∂L/∂z_i = upstream_i · ∂loss_i/∂z_i from the statistics the forward saved (no collective, no host
    sync).
    """
    num_rows, num_valid = hidden.shape[0], chunks.shard.num_valid
    w = weight[:num_valid]
    grad_hidden = torch.zeros_like(hidden) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    buffer = torch.empty(min(plan.rows_per_chunk, num_rows) * num_valid, dtype=torch.float32, device=hidden.device)
    for rows in row_slices(num_rows, plan.rows_per_chunk):
        zt = _logits_into(buffer, hidden[rows], w)
        chunks.grad_chunk(rows, zt)
        zt.mul_(upstream[rows])
        _accumulate_grads(zt, hidden[rows], w, grad_hidden[rows] if grad_hidden is not None else None,
                          grad_weight[:num_valid] if grad_weight is not None else None)
    if grad_weight is not None and grad_weight.dtype != weight.dtype:
        grad_weight = grad_weight.to(weight.dtype)
    return grad_hidden, grad_weight


@dataclass(frozen=True)
class _OutputLayer:
    """The validated output-layer inputs: the (gathered) hidden states as [N, H], the positions' shape."""

    hidden: torch.Tensor  # [N, H], after the TP input mapping
    weight: torch.Tensor  # [V_local, H]
    shard: VocabShard
    positions: torch.Size  # the leading shape of the (gathered) hidden states: the loss's shape


def _check_output_layer(hidden: torch.Tensor, weight: torch.Tensor, names: tuple[str, str]) -> None:
    hidden_name, weight_name = names
    if hidden.dim() < 2:
        raise ValueError(
            f"{hidden_name} must be [..., H] with at least one position dimension, got {tuple(hidden.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{weight_name} must be [V_local, H] with the hidden size H={hidden.shape[-1]} of {hidden_name} "
            f"(the ColumnParallelLinear weight layout), got {tuple(weight.shape)}"
        )
    if not hidden.dtype.is_floating_point or hidden.dtype != weight.dtype:
        raise ValueError(
            f"{hidden_name} ({hidden.dtype}) and {weight_name} ({weight.dtype}) must have the same floating dtype"
        )
    if hidden.device != weight.device:
        raise ValueError(f"{hidden_name} is on {hidden.device}, {weight_name} on {weight.device}")


def _output_layer(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    vocab_size: Optional[int],
    tp_group: Optional[ProcessGroup],
    sequence_parallel: bool,
    names: tuple[str, str] = ("hidden", "output_weight"),
) -> _OutputLayer:
    """Validate, describe the vocabulary shard and apply the TP input mapping of the hidden states."""
    _check_output_layer(hidden, weight, names)
    shard = VocabShard.of(weight.shape[0], vocab_size, tp_group)
    if sequence_parallel:
        mapped = gather_from_sequence_parallel_region(hidden, shard.group if shard.parallel else None)
    else:
        mapped = copy_to_tensor_parallel_region(hidden, shard.group if shard.parallel else None)
    return _OutputLayer(mapped.reshape(-1, hidden.shape[-1]).contiguous(), weight, shard, mapped.shape[:-1])


def _plan(layer: _OutputLayer, chunk_size: Optional[int], loss_mask: Optional[torch.Tensor],
          gradient_in_forward: bool, validate: bool) -> _Plan:
    active = None
    if loss_mask is not None:
        if loss_mask.shape != layer.positions:
            raise ValueError(
                f"loss_mask {tuple(loss_mask.shape)} must have the shape {tuple(layer.positions)} of the "
                f"positions (the loss's shape; with sequence_parallel, the gathered sequence)"
            )
        active = loss_mask.reshape(-1).to(device=layer.hidden.device, dtype=torch.bool)
    grad_enabled = torch.is_grad_enabled()
    return _Plan(
        rows_per_chunk=linear_chunk_rows(chunk_size, layer.shard.local_size, layer.hidden.device),
        grad_hidden=grad_enabled and layer.hidden.requires_grad,
        grad_weight=grad_enabled and layer.weight.requires_grad,
        active=active,
        gradient_in_forward=gradient_in_forward,
        check_upstream=validate,
    )


def _run(layer: _OutputLayer, chunks: ChunkLoss, plan: _Plan) -> torch.Tensor:
    return _FusedOutputLayerLoss.apply(layer.hidden, layer.weight, chunks, plan).view(layer.positions)


def linear_topk_generalized_jsd(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
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
    sequence_parallel: bool = False,
    loss_mask: Optional[torch.Tensor] = None,
    gradient_in_forward: bool = True,
    validate: bool = True,
) -> torch.Tensor:
    """``topk_generalized_jsd(hidden @ output_weight.T, ...)`` without the logits.

    Args:
        hidden: ``[..., H]`` the output layer's input (float32 or bfloat16/float16): replicated on the
            TP ranks, or with ``sequence_parallel`` this rank's slice of dim 0 (``[s/tp, b, H]``).
        output_weight: ``[V_local, H]`` this rank's shard of the output layer (or the tied embedding),
            same dtype as ``hidden``. No bias (Megatron's output layer has none).
        teacher_topk_logprobs, teacher_topk_ids: ``[..., K]`` over the positions of the (gathered)
            hidden states, as in ``topk_generalized_jsd``.
        beta, temperature, tail, vocab_size, tp_group, scale_by_temperature_squared: as in
            ``topk_generalized_jsd``.
        validate: as in ``topk_generalized_jsd`` (no host sync when False); also whether backward checks
            its upstream gradient (``gradient_in_forward``).
        chunk_size: positions per chunk of logits (None: 44 MiB of float32 logits on CPU, 256 MiB on an
            accelerator).
        sequence_parallel: ``hidden`` is sequence-sharded (all-gather forward, reduce-scatter backward).
        loss_mask: ``[...]`` bool or 0/1 over the positions: which positions the caller differentiates
            (e.g. ``labels != -100``; None: every one). It never changes a value: the loss is returned
            at every position.
        gradient_in_forward: compute the gradients in the forward pass (3 matmuls in all, as an output
            layer and its backward), for an upstream gradient c · loss_mask: a masked sum or mean, c
            any scalar (a loss scale). With ``validate`` backward checks that (one host sync) and
            recomputes for any other upstream gradient; without, any other upstream gradient makes the
            gradients NaN (loud, never silently wrong). False: forward computes only the loss and
            backward recomputes each chunk's logits, exact for any upstream gradient (per-position
            weights), with one matmul more.
    Returns:
        float32 ``[...]`` (the gathered positions): the loss of each position, identical on every TP
        rank. Gradients flow to ``hidden`` and ``output_weight`` in their dtypes.
    """
    validate_beta(beta)
    validate_temperature(temperature)
    if tail not in TAIL_MODES:
        raise ValueError(f"tail must be one of {TAIL_MODES}, got {tail!r}")
    layer = _output_layer(hidden, output_weight, vocab_size, tp_group, sequence_parallel)
    present = validate_teacher_topk(
        teacher_topk_logprobs,
        teacher_topk_ids,
        layer.shard.vocab_size,
        check_mass=tail == "tail",
        leading_shape=layer.positions,
        validate=validate,
    )
    k = teacher_topk_ids.shape[-1]
    chunks = TopKJSDChunks(
        layer.shard,
        teacher_topk_logprobs.detach().reshape(-1, k),
        teacher_topk_ids.reshape(-1, k),
        present.reshape(-1, k),
        beta=beta,
        temperature=temperature,
        tail=tail == "tail",
        loss_scale=temperature**2 if scale_by_temperature_squared else 1.0,
    )
    return _run(layer, chunks, _plan(layer, chunk_size, loss_mask, gradient_in_forward, validate))


def linear_generalized_jsd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    tp_group: Optional[ProcessGroup] = None,
    chunk_size: Optional[int] = None,
    scale_by_temperature_squared: bool = False,
    fused: bool = False,
    sequence_parallel: bool = False,
    loss_mask: Optional[torch.Tensor] = None,
    gradient_in_forward: bool = True,
    validate: bool = True,
) -> torch.Tensor:
    """``generalized_jsd(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, ...)``
    without either side's logits (a colocated teacher with the same vocabulary and TP sharding).

    Args:
        student_hidden, student_weight: the student's output layer input ``[..., H]`` and shard
            ``[V_local, H]``, as ``hidden`` / ``output_weight`` of ``linear_topk_generalized_jsd``.
        teacher_hidden, teacher_weight: the teacher's ``[..., H_t]`` (the student's positions, laid out
            like ``student_hidden``: sequence-sharded with ``sequence_parallel``) and ``[V_local, H_t]``
            (the same vocabulary rows); any floating dtype, the same for both. Constants: no gradient.
        beta, temperature, vocab_size, tp_group, scale_by_temperature_squared, fused: as in
            ``generalized_jsd``.
        chunk_size, sequence_parallel, loss_mask, gradient_in_forward: as in
            ``linear_topk_generalized_jsd``; the student's and the teacher's logits are each held one
            chunk at a time (two chunk buffers).
        validate: after the forward, if a loss is not finite (one host sync), raise ValueError naming
            the first position whose teacher logits are not a distribution (NaN or +inf, or all -inf);
            also whether backward checks its upstream gradient (``gradient_in_forward``).
    Returns:
        float32 ``[...]``: the loss of each (gathered) position, identical on every TP rank.
    """
    validate_beta(beta)
    validate_temperature(temperature)
    layer = _output_layer(student_hidden, student_weight, vocab_size, tp_group, sequence_parallel,
                          names=("student_hidden", "student_weight"))
    _check_output_layer(teacher_hidden, teacher_weight, ("teacher_hidden", "teacher_weight"))
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1] or teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"teacher_hidden {tuple(teacher_hidden.shape)} and teacher_weight {tuple(teacher_weight.shape)} must "
            f"cover the student's positions {tuple(student_hidden.shape[:-1])} and vocabulary rows "
            f"{student_weight.shape[0]} (same vocabulary, same tensor-parallel sharding); a teacher with "
            f"another vocabulary needs the cross-tokenizer losses"
        )
    shard = layer.shard
    group = shard.group if shard.parallel else None
    teacher_2d = (all_gather_first_dim(teacher_hidden.detach(), group) if sequence_parallel
                  else teacher_hidden.detach()).reshape(-1, teacher_hidden.shape[-1])
    plan = _plan(layer, chunk_size, loss_mask, gradient_in_forward, validate)
    teacher_w = teacher_weight.detach()[: shard.num_valid]
    teacher_buffer = torch.empty(min(plan.rows_per_chunk, teacher_2d.shape[0]) * shard.num_valid,
                                 dtype=torch.float32, device=teacher_2d.device)

    def teacher_logits(rows: slice) -> torch.Tensor:
        return _logits_into(teacher_buffer, teacher_2d[rows], teacher_w)

    chunks = GeneralizedJSDChunks(
        shard, teacher_logits, teacher_2d.shape[0], teacher_2d.device,
        beta=beta, temperature=temperature,
        loss_scale=temperature**2 if scale_by_temperature_squared else 1.0, fused=fused,
    )
    loss = _run(layer, chunks, plan)
    if validate and not bool(torch.isfinite(loss).all()):
        raise_on_invalid_teacher_rows(
            loss.detach().reshape(-1), lambda at: torch.mm(teacher_2d[at], teacher_w.t()), shard, temperature,
            plan.rows_per_chunk, layer.positions,
            subject="the teacher's logits (teacher_hidden @ teacher_weight.T) at position [{position}]",
            remedy="; check teacher_hidden and teacher_weight (e.g. a float16 overflow)")
    return loss


def linear_cross_entropy(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    tp_group: Optional[ProcessGroup] = None,
    chunk_size: Optional[int] = None,
    sequence_parallel: bool = False,
    loss_mask: Optional[torch.Tensor] = None,
    gradient_in_forward: bool = True,
    validate: bool = True,
) -> torch.Tensor:
    """``-vocab_parallel_token_logprobs(hidden @ output_weight.T, labels)`` without the logits (``sft_alpha``).

    Args:
        hidden, output_weight, chunk_size, sequence_parallel, loss_mask, gradient_in_forward: as in
            ``linear_topk_generalized_jsd``.
        labels: ``[...]`` integer global vocabulary ids over the (gathered) positions; negative
            entries (−100) are skipped: loss 0, no gradient.
        temperature, vocab_size, tp_group: as in ``vocab_parallel_token_logprobs``.
        validate: as in ``vocab_parallel_token_logprobs``; also whether backward checks its upstream
            gradient (``gradient_in_forward``).
    Returns:
        float32 ``[...]``: −log softmax(logits / τ)[label] per position (0 where skipped), identical on
        every TP rank; +inf where the label's logit is −inf.
    """
    validate_temperature(temperature)
    layer = _output_layer(hidden, output_weight, vocab_size, tp_group, sequence_parallel)
    if labels.shape != layer.positions:
        raise ValueError(
            f"labels {tuple(labels.shape)} must have the shape {tuple(layer.positions)} of the positions "
            f"(with sequence_parallel, the gathered sequence)"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if validate and bool((labels >= layer.shard.vocab_size).any()):
        raise ValueError(
            f"labels hold id {int(labels.max())} outside the vocabulary [0, {layer.shard.vocab_size}): "
            f"the data was tokenized with another tokenizer than the model's"
        )
    chunks = CrossEntropyChunks(layer.shard, labels.reshape(-1), temperature=temperature)
    return _run(layer, chunks, _plan(layer, chunk_size, loss_mask, gradient_in_forward, validate))
