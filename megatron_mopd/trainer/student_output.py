"""The student's output on the last pipeline stage, in the two forms the objective's losses read.

- ``StudentLogits``: the output layer's logits ``[b, s, V_local]`` (this TP rank's vocabulary shard), as
  Megatron's GPT model returns them; the logits losses run on them.
- ``OutputLayerInput`` (``loss.fused_output_layer``): the output layer's input — the hidden states —
  and this rank's shard of its weight. The fused output-layer losses (``losses.linear``) compute the
  same losses chunk by chunk, so the logits never exist: for a 152k vocabulary and 16k tokens per
  micro-batch that is 9.7 GB of float32 logits per TP rank (and their gradient) never allocated. The
  model's output layer is bypassed for the training step's forward only
  (``hidden_states_instead_of_logits``): GPTModel then returns the hidden states ``[b, s, H]`` where it
  would return the logits, and the schedule carries them to the loss as it would carry the logits.

Both forms give the same losses and gradients (``tests/test_fused_output_layer_trainer.py``). The
fused form supports the losses that read the student's logits one position at a time against
per-position teacher data — ``topk_jsd``, ``mopd`` and the SFT term; ``jsd`` (a colocated teacher's
full logits), ``ctkd`` and ``gold`` read the logits through other structures and need
``StudentLogits`` (the configuration refuses them with the fused output layer).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Protocol

import torch

from megatron_mopd.losses import (
    linear_cross_entropy,
    linear_topk_generalized_jsd,
    topk_generalized_jsd,
    vocab_parallel_token_logprobs,
)
from megatron_mopd.teachers import TeacherLogprobs
from megatron_mopd.trainer.config import FUSED_OUTPUT_LAYER_LOSSES


class StudentOutput(Protocol):
    """What the objective asks of the student's output (``[b, s]`` positions of one micro-batch)."""

    device: torch.device

    def token_logprobs(self, labels: torch.Tensor, *, temperature: float = 1.0,
                       common_weight_on: Optional[torch.Tensor] = None,
                       differentiable: bool = True) -> torch.Tensor:
        """float32 ``[b, s]`` log π_S(labels) at ``temperature`` (0 where labels is −100).

        ``common_weight_on``: bool ``[b, s]`` when the caller differentiates these log-probabilities
        with one common weight on these positions and 0 elsewhere (SFT's masked sum), None when it
        weights positions unequally (MOPD's advantages). ``differentiable=False``: no gradient.
        """

    def topk_jsd(self, scores: TeacherLogprobs, differentiated: torch.Tensor, *, beta: float,
                 temperature: float, tail: str) -> torch.Tensor:
        """float32 ``[b, s]``: the top-K generalized JSD against the teacher's ``scores`` ``[b, s, K]``,
        differentiated as a masked sum over ``differentiated`` (bool ``[b, s]``)."""

    def logits(self, what: str) -> torch.Tensor:
        """The logits ``[b, s, V_local]``, for ``what`` (a teacher's loss named in the error) that needs them."""


class StudentLogits:
    """The student's logits ``[b, s, V_local]``, the logits losses on them."""

    def __init__(self, logits: torch.Tensor, *, vocab_size: int, validate: bool) -> None:
        self._logits, self.vocab_size, self.validate = logits, vocab_size, validate
        self.device = logits.device

    def token_logprobs(self, labels: torch.Tensor, *, temperature: float = 1.0,
                       common_weight_on: Optional[torch.Tensor] = None,
                       differentiable: bool = True) -> torch.Tensor:
        logits = self._logits if differentiable else self._logits.detach()
        return vocab_parallel_token_logprobs(logits, labels, vocab_size=self.vocab_size, temperature=temperature,
                                             validate=self.validate)

    def topk_jsd(self, scores: TeacherLogprobs, differentiated: torch.Tensor, *, beta: float,
                 temperature: float, tail: str) -> torch.Tensor:
        return topk_generalized_jsd(self._logits, scores.topk_logprobs, scores.topk_ids, beta=beta,
                                    temperature=temperature, tail=tail, vocab_size=self.vocab_size,
                                    validate=self.validate)

    def logits(self, what: str) -> torch.Tensor:
        return self._logits


class OutputLayerInput:
    """The student's output layer, not applied: its input and weight; the fused output-layer losses.

    Args:
        hidden: ``[b, s, H]`` what GPTModel returns with its output layer bypassed (the hidden states,
            batch first); with sequence parallel ``[b, s / tp, H]``, this rank's slice of the sequence.
        weight: ``[V_local, H]`` this rank's shard of the output layer (or of the tied embedding).
        sequence_parallel: whether ``hidden`` is sequence-sharded (Megatron's ``sequence_parallel``).
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, *, sequence_parallel: bool, vocab_size: int,
                 validate: bool) -> None:
        # Megatron's sequence-first layout, where the sequence-parallel gather runs along dim 0; a
        # wrapper that returns float32 outputs (Float16Module) is undone, exactly, to the weight's dtype.
        self.hidden = hidden.transpose(0, 1).to(weight.dtype)
        self.weight, self.sequence_parallel = weight, sequence_parallel
        self.vocab_size, self.validate = vocab_size, validate
        self.device = hidden.device

    def _options(self) -> dict[str, Any]:
        return dict(vocab_size=self.vocab_size, sequence_parallel=self.sequence_parallel, validate=self.validate)

    def token_logprobs(self, labels: torch.Tensor, *, temperature: float = 1.0,
                       common_weight_on: Optional[torch.Tensor] = None,
                       differentiable: bool = True) -> torch.Tensor:
        with contextlib.nullcontext() if differentiable else torch.no_grad():
            nll = linear_cross_entropy(
                self.hidden, self.weight, labels.t(), temperature=temperature,
                loss_mask=None if common_weight_on is None else common_weight_on.t(),
                gradient_in_forward=common_weight_on is not None, **self._options())
        return -nll.t()

    def topk_jsd(self, scores: TeacherLogprobs, differentiated: torch.Tensor, *, beta: float,
                 temperature: float, tail: str) -> torch.Tensor:
        return linear_topk_generalized_jsd(
            self.hidden, self.weight, scores.topk_logprobs.transpose(0, 1), scores.topk_ids.transpose(0, 1),
            beta=beta, temperature=temperature, tail=tail, loss_mask=differentiated.t(), **self._options(),
        ).t()

    def logits(self, what: str) -> torch.Tensor:
        raise ValueError(f"{what} needs the student's logits, which loss.fused_output_layer never computes: "
                         f"it supports the losses {FUSED_OUTPUT_LAYER_LOSSES} and loss.sft_alpha; set "
                         f"loss.fused_output_layer=false")


def output_layer_weight(gpt: torch.nn.Module) -> torch.Tensor:
    """``[V_local, H]``: the weight the last stage's output layer multiplies by (the tied embedding's when
    the embeddings and the output layer share it)."""
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


@contextlib.contextmanager
def hidden_states_instead_of_logits(gpt: torch.nn.Module) -> Iterator[None]:
    """Within: the last stage's output layer returns its input, so GPTModel returns the hidden states
    ``[b, s, H]`` (batch first, as it would the logits) instead of the logits.

    Raises:
        ValueError: the model has multi-token prediction layers (their loss is computed on logits
            inside the model).
    """
    if getattr(gpt.config, "mtp_num_layers", None):
        raise ValueError("loss.fused_output_layer: the model has multi-token prediction layers, whose loss "
                         "GPTModel computes on logits; set loss.fused_output_layer=false")
    layer = gpt.output_layer

    def identity(input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                 runtime_gather_output: Optional[bool] = None) -> tuple[torch.Tensor, None]:
        return input_, None

    layer.forward = identity
    try:
        yield
    finally:
        del layer.forward
