"""Log-probability of given tokens under vocab-sharded logits, with its closed-form gradient.

Per position with label y (labels < 0, e.g. -100, are skipped):

    logp_y = z_y / τ − logsumexp(z / τ)          over the true vocabulary
    ∂logp_y/∂z_v = (1{v = y} − p_v) / τ          p = softmax(z / τ)

Cross-entropy (``sft_alpha``) is −logp_y; the sampled-token MOPD loss weighs logp_y by the teacher's
advantage. Communication per token: one scalar for the logsumexp and one for z_y (masked local
gather + all-reduce; each rank writes gradients only into the ids it owns). Unlike Megatron's
``vocab_parallel_cross_entropy``, the logits are neither modified in place nor copied: other losses
may read the same logits, and backward recomputes p chunk by chunk.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_mopd.losses.divergence import validate_temperature
from megatron_mopd.parallel.chunking import chunk_rows, softmax_gradient
from megatron_mopd.parallel.vocab import ProcessGroup, VocabShard


class _VocabParallelTokenLogprob(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        logits: torch.Tensor,
        labels: torch.Tensor,
        shard: VocabShard,
        temperature: float,
        rows_per_chunk: int,
    ) -> torch.Tensor:
        z = logits.reshape(-1, shard.local_size)
        ids = labels.reshape(-1, 1).long()
        present = ids >= 0
        ids = ids.clamp_min(0)
        z_y, lse = shard.gather_columns_and_logsumexp(z, ids, present, temperature, rows_per_chunk)
        z_y = z_y.squeeze(-1).div_(temperature)
        logp = torch.where(present.squeeze(-1), z_y - lse, 0.0)
        ctx.save_for_backward(z, lse, ids, present)
        ctx.shard, ctx.temperature, ctx.rows_per_chunk = shard, temperature, rows_per_chunk
        ctx.logits_shape, ctx.logits_dtype = logits.shape, logits.dtype
        return logp.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor):  # type: ignore[override]
        z, lse, ids, present = ctx.saved_tensors
        shard: VocabShard = ctx.shard
        coef = torch.where(present, grad_logp.reshape(-1, 1).float(), 0.0).div_(ctx.temperature)
        local_ids, owned = shard.owned_local_ids(ids, present)
        grad = softmax_gradient(
            z, lse, coef.neg(), local_ids, torch.where(owned, coef, 0.0), shard.num_valid,
            ctx.temperature, ctx.rows_per_chunk, ctx.logits_dtype,
        )
        return grad.view(ctx.logits_shape), None, None, None, None


def vocab_parallel_token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    tp_group: Optional[ProcessGroup] = None,
    chunk_size: Optional[int] = None,
    validate: bool = True,
) -> torch.Tensor:
    """log_softmax(logits / τ) at ``labels``, computed on this rank's vocabulary shard.

    Args:
        logits: ``[..., V_local]`` this rank's shard (any float dtype; math in float32).
        labels: ``[...]`` integer global vocabulary ids; negative entries (−100) are skipped.
        temperature: τ > 0.
        vocab_size: the true vocabulary size (ids at or above it are padding); None: no padding.
        tp_group, chunk_size: as in ``generalized_jsd``.
        validate: check that no label is at or above the vocabulary size (one host sync). False: no
            host sync; the labels are the caller's contract.
    Returns:
        float32 ``[...]``: the log-probability of each label (0 where skipped), identical on every
        TP rank; −inf where the label's logit is −inf.
    Raises:
        ValueError: shapes that do not line up, or (with ``validate``) a label at or above ``vocab_size``.
    """
    validate_temperature(temperature)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must have the logits' leading shape {tuple(logits.shape[:-1])}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    shard = VocabShard.of(logits.shape[-1], vocab_size, tp_group)
    if validate and bool((labels >= shard.vocab_size).any()):
        raise ValueError(
            f"labels hold id {int(labels.max())} outside the vocabulary [0, {shard.vocab_size}): "
            f"the data was tokenized with another tokenizer than the model's"
        )
    rows = chunk_rows(chunk_size, shard.local_size, logits.device)
    return _VocabParallelTokenLogprob.apply(logits, labels, shard, temperature, rows)
