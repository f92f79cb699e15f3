"""Specification: Megatron-Core trains on CPU with gloo in CPU mode, identically across parallel layouts.

A tiny GPTModel (local layer spec: RMSNorm, RoPE, SwiGLU, grouped-query attention, tied embeddings,
a 100-token vocabulary padded to 128 by Megatron's rule) is trained for a few steps with the real
Megatron stack: ``get_forward_backward_func`` (several micro-batches per step), Megatron's
DistributedDataParallel with ``finalize_model_grads``, and ``get_megatron_optimizer`` (Adam, fp32,
``clip_grad=0``). The data is a learnable pattern (each next token is a fixed permutation of the
current one), so:

- at TP=1, PP=1 the loss decreases clearly;
- at TP=2, PP=2, DP=2 and TP=2 x PP=2 the per-step losses equal the TP=1 ones up to fp32 round-off:
  the weights are the same slices of the same full matrices (drawn per parameter name, independent of
  the layout) and every step sees the same global batch.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Iterator, Optional

import pytest
import torch

from megatron_mopd.platform import destroy_parallel, initialize_parallel
from megatron_mopd.testing import run_on_ranks
from megatron_mopd.testing.gpt import TinyGPT

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU mode runs only on hosts without an accelerator"
)

SEED = 1234
TINY_GPT = TinyGPT()
VOCAB_SIZE, NUM_LAYERS, SEQ_LEN = TINY_GPT.vocab_size, TINY_GPT.num_layers, TINY_GPT.max_sequence_length
MICRO_BATCH, NUM_MICROBATCHES, STEPS, LR = 2, 4, 8, 1e-2


def global_batch(step: int) -> list[dict[str, torch.Tensor]]:
    """The NUM_MICROBATCHES micro-batches of ``step``: sequences following a fixed permutation."""
    permutation = torch.randperm(VOCAB_SIZE, generator=torch.Generator().manual_seed(SEED))
    gen = torch.Generator().manual_seed(SEED + 1 + step)
    tokens = [torch.randint(VOCAB_SIZE, (NUM_MICROBATCHES * MICRO_BATCH,), generator=gen)]
    for _ in range(SEQ_LEN):
        tokens.append(permutation[tokens[-1]])
    sequences = torch.stack(tokens, dim=1)
    position_ids = torch.arange(SEQ_LEN).expand(MICRO_BATCH, SEQ_LEN)
    return [
        {
            "tokens": chunk[:, :-1],
            "labels": chunk[:, 1:],
            "position_ids": position_ids,
            "loss_mask": torch.ones(MICRO_BATCH, SEQ_LEN),
        }
        for chunk in sequences.split(MICRO_BATCH)
    ]


def loss_func(
    loss_mask: torch.Tensor, output_tensor: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked mean of GPTModel's per-token losses; the schedule divides it by the micro-batch count."""
    loss = (output_tensor.float() * loss_mask).sum() / loss_mask.sum()
    # A copy: the schedule scales the returned loss in place.
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(
    data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module
) -> tuple[torch.Tensor, Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]]:
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def train(tp: int, pp: int) -> Optional[list[float]]:
    """Train on this rank; return the per-step losses of this DP rank's micro-batches on the last
    pipeline stage of TP rank 0, None elsewhere."""
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    torch.set_num_threads(1)
    initialize_parallel(tp, pp, device="cpu", seed=SEED)
    try:
        model = TINY_GPT.build(tp, pp)
        TINY_GPT.load_layout_independent_weights(model, tp, pp)
        config = model.config
        ddp_model = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=LR, weight_decay=0.0, clip_grad=0.0),
            [ddp_model],
        )
        config.grad_scale_func = optimizer.scale_loss
        config.finalize_model_grads_func = finalize_model_grads
        forward_backward = get_forward_backward_func()

        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        losses = []
        for step in range(STEPS):
            microbatches = global_batch(step)[dp_rank::dp_size]
            ddp_model.zero_grad_buffer()
            optimizer.zero_grad()
            reduced = forward_backward(
                forward_step_func=forward_step,
                data_iterator=iter(microbatches),
                model=[ddp_model],
                num_microbatches=len(microbatches),
                seq_length=SEQ_LEN,
                micro_batch_size=MICRO_BATCH,
            )
            update_successful, _, _ = optimizer.step()
            assert update_successful
            if reduced:
                losses.append(torch.stack([r["lm loss"] for r in reduced]).mean().item())
        last_stage = parallel_state.is_pipeline_last_stage()
        return losses if last_stage and parallel_state.get_tensor_model_parallel_rank() == 0 else None
    finally:
        destroy_parallel()


def per_step_losses(tp: int = 1, pp: int = 1, dp: int = 1) -> list[float]:
    """Run ``train`` on tp * pp * dp ranks; the global batch's per-step losses (mean over DP ranks)."""
    per_rank = run_on_ranks(train, tp * pp * dp, args=(tp, pp), timeout_s=300)
    reporting = [losses for losses in per_rank if losses is not None]
    assert len(reporting) == dp
    return torch.tensor(reporting).mean(dim=0).tolist()


@pytest.fixture(scope="module")
def reference_losses() -> list[float]:
    return per_step_losses()


def test_padded_vocabulary_is_the_same_at_tp1_and_tp2() -> None:
    assert TINY_GPT.padded_vocab_size(1) == TINY_GPT.padded_vocab_size(2) == 128


def test_loss_decreases_at_tp1(reference_losses: list[float]) -> None:
    assert len(reference_losses) == STEPS
    # Untrained (small weights): about uniform over the padded vocabulary, padding included.
    assert reference_losses[0] == pytest.approx(math.log(TINY_GPT.padded_vocab_size(1)), rel=0.05)
    assert reference_losses[-1] < reference_losses[0] - 1.0, str(reference_losses)  # nats


@pytest.mark.parametrize(
    ("tp", "pp", "dp"),
    [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1)],
    ids=["tp2", "pp2", "dp2", "tp2-pp2"],
)
def test_parallel_layout_matches_tp1(reference_losses: list[float], tp: int, pp: int, dp: int) -> None:
    losses = per_step_losses(tp, pp, dp)
    assert losses == pytest.approx(reference_losses, rel=1e-4), (losses, reference_losses)
