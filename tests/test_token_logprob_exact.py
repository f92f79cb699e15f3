"""Specification: ``vocab_parallel_token_logprobs`` (cross-entropy and the MOPD loss's log π_S(y)) equals
a dense float64 log_softmax at the labels, loss and logit gradients, at TP = 1, 2 and 4.

The vocabulary is 190 real ids padded to 256 (at TP = 4 the last rank holds no real id); some labels
are -100 (skipped: log-probability 0, gradient 0); one label's logit is -inf (log-probability -inf),
and a few other logits are -inf (probability 0, gradient exactly 0). The logits are not modified.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dense_reference import rel_err
from megatron_mopd.losses import vocab_parallel_token_logprobs
from megatron_mopd.testing import run_on_ranks

VOCAB_SIZE, PADDED_VOCAB = 190, 256
TEMPERATURES = (1.0, 2.0)
TOLERANCE = 1e-5


def make_inputs(seq: int = 5, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(batch, seq, PADDED_VOCAB, generator=gen) * 3.0
    logits[0, 1, [5, 60, 150]] = -torch.inf  # banned tokens: probability 0
    labels = torch.randint(0, VOCAB_SIZE, (batch, seq), generator=gen)
    labels[1, 0] = labels[2, 4] = -100
    weights = torch.randn(batch, seq, generator=gen)  # d(loss)/d(logp): a random upstream gradient
    return logits, labels, weights


def dense(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, tau: float):
    logits = logits.double().requires_grad_(True)
    logp = torch.log_softmax(logits[..., :VOCAB_SIZE] / tau, dim=-1)
    kept = labels >= 0
    at_labels = torch.where(kept, logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1), 0.0)
    (at_labels * weights.double()).sum().backward()
    return at_labels.detach(), logits.grad


def on_rank(tp: int) -> list[tuple[float, float, bool]]:
    rank = dist.get_rank()
    group = dist.new_group(list(range(tp)))
    logits, labels, weights = make_inputs()
    local = PADDED_VOCAB // tp
    out = []
    for tau in TEMPERATURES:
        expected, expected_grad = dense(logits, labels, weights, tau)
        shard = logits[..., rank * local : (rank + 1) * local].clone().requires_grad_(True)
        before = shard.detach().clone()
        logp = vocab_parallel_token_logprobs(
            shard, labels, temperature=tau, vocab_size=VOCAB_SIZE, tp_group=group, chunk_size=4
        )
        (logp * weights).sum().backward()
        grad = expected_grad[..., rank * local : (rank + 1) * local]
        unchanged = torch.equal(shard.detach(), before) and bool(torch.isfinite(shard.grad).all())
        out.append((rel_err(logp, expected), rel_err(shard.grad, grad), unchanged))
    return out


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_log_probabilities_and_gradients_equal_the_dense_reference(tp: int) -> None:
    for rank_result in run_on_ranks(on_rank, tp, args=(tp,)):
        for loss_err, grad_err, unchanged in rank_result:
            assert loss_err <= TOLERANCE and grad_err <= TOLERANCE
            assert unchanged, "the logits must not be modified and the gradient must be finite"


def test_skipped_labels_give_zero_and_a_minus_inf_logit_gives_minus_inf() -> None:
    logits, labels, _ = make_inputs()
    labels[0, 1] = 60  # its logit is -inf
    logp = vocab_parallel_token_logprobs(logits, labels, vocab_size=VOCAB_SIZE)
    assert logp[1, 0] == 0 and logp[2, 4] == 0
    assert logp[0, 1] == -torch.inf


def test_bf16_logits_match_their_float32_values() -> None:
    logits, labels, _ = make_inputs()
    low = logits.bfloat16()
    assert torch.allclose(
        vocab_parallel_token_logprobs(low, labels, vocab_size=VOCAB_SIZE),
        vocab_parallel_token_logprobs(low.float(), labels, vocab_size=VOCAB_SIZE),
    )


def test_labels_outside_the_vocabulary_are_refused() -> None:
    logits, labels, _ = make_inputs()
    labels[0, 0] = VOCAB_SIZE
    with pytest.raises(ValueError, match="another tokenizer"):
        vocab_parallel_token_logprobs(logits, labels, vocab_size=VOCAB_SIZE)
