"""On-policy sampling from the live Megatron student, inside the training processes.

``MegatronRolloutEngine`` samples completions from the student's ``GPTModel`` as it is at the call
(the weights after the last optimizer step: nothing is copied or cached between calls), at any
tensor/pipeline-parallel layout, with Megatron-Core's static KV cache:

- the key/value cache is Megatron's ``StaticInferenceContext``: the model is called with
  ``inference_context=`` and fills the cache of each of its layers; each forward covers only the
  positions not yet cached (the prompts' common prefix first, then one position per step);
- tensor parallelism is the model's own (the output layer gathers the vocabulary shards,
  ``runtime_gather_output=True``); pipeline parallelism sends the hidden states stage to stage with
  Megatron's inference helpers (``recv_from_prev_pipeline_rank_`` / ``send_to_next_pipeline_rank``),
  the last stage samples, and ``broadcast_from_last_pipeline_stage`` gives every stage the sampled
  ids and their log-probabilities.

The generation loop is this module's, not Megatron's ``SimpleTextGenerationController`` (0.16): the
controller clamps a sampled padded-vocabulary id to ``vocab_size - 1`` instead of masking it, and its
one generator (created on ``torch.cuda.current_device()``) is not seeded per call or per data-parallel
rank.

Prompts of different lengths share one right-padded batch: position ``t`` of a sequence is its prompt
token while ``t`` is inside its prompt (the model's prediction there is discarded) and a sampled token
after it, so every forward step is causal over real tokens only and no padding is ever attended to.

Sampling at each step, from the last position's logits ``z`` (float32, padded vocabulary):

1. ids ``>= vocab_size`` (Megatron's vocabulary padding) get ``-inf``: they are never sampled;
2. ``log π = log_softmax(z / temperature)`` — the behaviour policy; ``Rollout.logprobs`` holds
   ``log π`` of each sampled id (before top-k/top-p truncation, so it equals a teacher-forced
   re-score of the completion at the same temperature);
3. top-k keeps the ``top_k`` most probable ids, top-p the smallest most-probable set whose
   probability reaches ``top_p`` (the most probable id always stays); the kept probabilities are
   renormalized;
4. one uniform number per sequence from the call's generator picks the id by inverse CDF over the
   kept ids in descending probability order.

The generator is seeded from ``(sampling.seed, data-parallel rank)``: tensor- and pipeline-parallel
ranks of one replica draw the same numbers (and agree on every id), data-parallel replicas draw
different ones. A sequence finishes after a stop token (``"stop"``) or after ``max_new_tokens``
tokens or at ``max_sequence_length`` total tokens (``"length"``).

During ``generate`` the model is in eval mode and sequence parallelism is switched off (the last
token's logits are taken from the full sequence); both are restored afterwards. Autograd is off
(``torch.no_grad``, not ``inference_mode``: Megatron caches RoPE tables across calls, and a table
made in inference mode could not be used by the next training step).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from megatron_mopd.rollout.types import Rollout, SamplingParams, checked_prompts, mixed_seed

__all__ = ["MegatronRolloutEngine"]


def _unwrap(model: Any) -> torch.nn.Module:
    """The ``GPTModel`` inside DDP / Float16Module wrappers; refuses virtual-pipeline model lists."""
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError(
                f"model is a list of {len(model)} virtual-pipeline chunks; generation runs without "
                "virtual pipeline stages: pass one model chunk per rank (virtual_pipeline_model_parallel_size=None)"
            )
        model = model[0]
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


class MegatronRolloutEngine:
    """Samples completions from a Megatron ``GPTModel`` (see the module docstring).

    Args:
        model: this rank's model chunk: a ``GPTModel``, possibly wrapped (``.module``: DDP,
            Float16Module), or a one-element list of it. It is used live, at every call.
        vocab_size: the tokenizer's vocabulary size; ids at or above it (the padded vocabulary) are
            never sampled.
        pad_token_id: the id filling finished sequences' positions (never attended to by a real token).
        max_sequence_length: at most this many tokens per prompt + completion (the KV cache size).

    Raises:
        ValueError: a size is below 1, the model is a virtual-pipeline list, or the parallel state has
            virtual pipeline stages.
    """

    def __init__(self, model: Any, *, vocab_size: int, pad_token_id: int, max_sequence_length: int) -> None:
        from megatron.core import parallel_state

        if vocab_size < 1 or max_sequence_length < 2:
            raise ValueError(
                f"need vocab_size >= 1 and max_sequence_length >= 2, got {vocab_size}, {max_sequence_length}"
            )
        if not 0 <= pad_token_id < vocab_size:
            raise ValueError(f"pad_token_id={pad_token_id} is not an id of the {vocab_size}-token vocabulary")
        virtual = parallel_state.get_virtual_pipeline_model_parallel_world_size()
        if virtual is not None and virtual > 1:
            raise ValueError(
                f"virtual_pipeline_model_parallel_size={virtual}: generation runs without virtual pipeline "
                "stages; build the rollout student with virtual_pipeline_model_parallel_size=None"
            )
        self.model = _unwrap(model)
        self.vocab_size = vocab_size
        self.pad_token_id = pad_token_id
        self.max_sequence_length = max_sequence_length

    # --- the collective call -------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Rollout]:
        """One completion per prompt, in order, on every rank of this model replica.

        Collective over the replica's tensor/pipeline-parallel ranks, which must pass the same
        prompts and sampling; each data-parallel replica passes its own.

        Raises:
            ValueError: a prompt is empty, holds an id outside the vocabulary, or leaves no room for a
                completion within ``max_sequence_length``.
        """
        prompts = checked_prompts(prompts, self.vocab_size, self.max_sequence_length)
        if not prompts:
            return []
        with self._generation_mode(), torch.no_grad():
            tokens, logprobs, lengths, stopped = self._sample(prompts, sampling)
        rollouts = []
        for index, prompt in enumerate(prompts):
            start, end = len(prompt), len(prompt) + int(lengths[index])
            rollouts.append(Rollout(
                prompt_ids=prompt,
                completion_ids=tuple(int(token) for token in tokens[index, start:end]),
                logprobs=logprobs[index, start:end].astype(np.float32),
                finish_reason="stop" if stopped[index] else "length",
            ))
        return rollouts

    # --- the loop ------------------------------------------------------------------------------

    def _sample(
        self, prompts: list[tuple[int, ...]], sampling: SamplingParams
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Runs the KV-cached loop; returns per position the tokens and log-probs ``[B, L]``, and per
        sequence the completion length and whether it stopped on a stop token."""
        from megatron.core import parallel_state
        from megatron.core.inference.communication_utils import broadcast_from_last_pipeline_stage
        from megatron.core.inference.contexts import StaticInferenceContext

        device = self._device()
        batch = len(prompts)
        prompt_lengths = torch.tensor([len(prompt) for prompt in prompts], dtype=torch.long)
        budgets = torch.clamp(self.max_sequence_length - prompt_lengths, max=sampling.max_new_tokens)
        total_length = int((prompt_lengths + budgets).max())
        tokens = torch.full((batch, total_length), self.pad_token_id, dtype=torch.long)
        for index, prompt in enumerate(prompts):
            tokens[index, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        logprobs = torch.zeros((batch, total_length), dtype=torch.float32)
        generated = torch.zeros(batch, dtype=torch.long)
        finished = torch.zeros(batch, dtype=torch.bool)
        stopped = torch.zeros(batch, dtype=torch.bool)
        stop_ids = torch.tensor(sorted(set(sampling.stop_token_ids)), dtype=torch.long)

        generator = torch.Generator(device=device)
        generator.manual_seed(mixed_seed(sampling.seed, parallel_state.get_data_parallel_rank()))
        last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
        position_ids = torch.arange(total_length, device=device).unsqueeze(0).expand(batch, -1)
        context = StaticInferenceContext(batch, total_length)
        context.materialize_only_last_token_logits = True

        start, end = 0, int(prompt_lengths.min())
        while end < total_length and not bool(finished.all()):
            logits = self._forward(
                tokens[:, start:end].to(device), position_ids[:, start:end], context, batch, end - start
            )
            sampled = torch.empty(batch, dtype=torch.long, device=device)
            sampled_logprobs = torch.empty(batch, dtype=torch.float32, device=device)
            if last_stage:
                sampled, sampled_logprobs = self._choose(logits[:, -1, :], sampling, generator)
            if pipelined:
                sampled = broadcast_from_last_pipeline_stage([batch], torch.long, sampled.contiguous())
                sampled_logprobs = broadcast_from_last_pipeline_stage(
                    [batch], torch.float32, sampled_logprobs.contiguous()
                )
            sampled, sampled_logprobs = sampled.cpu(), sampled_logprobs.cpu()
            # Position `end`: a prompt token (forced) while inside the prompt, else the sample.
            generating = (end >= prompt_lengths) & ~finished
            tokens[generating, end] = sampled[generating]
            logprobs[generating, end] = sampled_logprobs[generating]
            generated += generating.long()
            hit_stop = generating & torch.isin(sampled, stop_ids)
            stopped |= hit_stop
            finished |= hit_stop | (generated >= budgets)
            start, end = end, end + 1
        return tokens.numpy(), logprobs.numpy(), generated.numpy(), stopped.numpy()

    def _forward(
        self, tokens: torch.Tensor, position_ids: torch.Tensor, context: Any, batch: int, length: int
    ) -> Optional[torch.Tensor]:
        """One forward over ``length`` new positions through this rank's stage; the last stage's
        last-position logits ``[B, 1, padded vocabulary]`` (float32), None on other stages."""
        from megatron.core import parallel_state
        from megatron.core.inference.communication_utils import (
            recv_from_prev_pipeline_rank_,
            send_to_next_pipeline_rank,
        )

        config = self.model.config
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        dtype = torch.float32 if config.fp32_residual_connection else config.params_dtype
        received = None
        if not first:
            received = torch.empty((length, batch, config.hidden_size), dtype=dtype, device=tokens.device)
            recv_from_prev_pipeline_rank_(received)
        self.model.set_input_tensor(received)
        output = self.model(tokens, position_ids, None, inference_context=context, runtime_gather_output=True)
        if not last:
            send_to_next_pipeline_rank(output.to(dtype).contiguous())
        context.increment_sequence_len_offset(length)
        return output.float() if last else None

    def _choose(
        self, logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples one id per row of ``logits [B, padded vocabulary]``; returns the ids and their
        log-probabilities under the temperature-scaled, untruncated distribution."""
        logits = logits.float()
        logits[:, self.vocab_size:] = float("-inf")
        logprobs = F.log_softmax(logits / sampling.temperature, dim=-1)
        sorted_logprobs, order = torch.sort(logprobs, dim=-1, descending=True)
        probs = sorted_logprobs.exp()
        keep = torch.ones_like(probs, dtype=torch.bool)
        keep[:, self.vocab_size:] = False  # -inf sorts last: the padded ids
        if sampling.top_k > 0:
            keep[:, sampling.top_k:] = False
        if sampling.top_p < 1.0:
            mass_before = torch.cumsum(probs, dim=-1) - probs
            keep &= mass_before < sampling.top_p
        keep[:, 0] = True
        kept = torch.where(keep, probs, torch.zeros_like(probs))
        cumulative = torch.cumsum(kept, dim=-1)
        draws = torch.rand(logits.shape[0], 1, generator=generator, device=logits.device, dtype=torch.float32)
        targets = draws * cumulative[:, -1:]
        rank = torch.searchsorted(cumulative, targets, right=True).clamp(max=self.vocab_size - 1)
        # Never land on a dropped id (equal cumulative sums behind a kept one, or rounding).
        rank = torch.minimum(rank, keep.long().sum(-1, keepdim=True) - 1)
        chosen = torch.gather(order, 1, rank).squeeze(1)
        return chosen, torch.gather(logprobs, 1, chosen.unsqueeze(1)).squeeze(1)

    # --- model state ---------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @contextmanager
    def _generation_mode(self) -> Iterator[None]:
        """Eval mode and sequence parallelism off (on the config and every module that copied the
        flag) for the duration; both restored after, as is the pipeline input tensor."""
        was_training = self.model.training
        switched = [module for module in self.model.modules() if getattr(module, "sequence_parallel", False) is True]
        config_switched = bool(getattr(self.model.config, "sequence_parallel", False))
        self.model.eval()
        for module in switched:
            module.sequence_parallel = False
        if config_switched:
            self.model.config.sequence_parallel = False
        try:
            yield
        finally:
            for module in switched:
                module.sequence_parallel = True
            if config_switched:
                self.model.config.sequence_parallel = True
            self.model.set_input_tensor(None)
            self.model.train(was_training)
