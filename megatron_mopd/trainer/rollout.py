"""The rollout phase of a step: whether the step is on-policy, and the student's samples as examples.

``lmbda`` is one decision per step, drawn from a generator seeded by (seed, step): every rank draws
the same, and a resumed run draws what the uninterrupted one did. On an on-policy step the student
samples a completion of each prompt (``rollout.RolloutEngine``); the sequence the step trains on is
the prompt's tokens followed by the sampled ones, the loss covers the sampled tokens, and the
behaviour policy's log-probability of each sampled token travels with it (the MOPD loss's truncated
importance weights). SFT never applies to these completions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from megatron_mopd.rollout import RolloutEngine, SamplingParams
from megatron_mopd.trainer.config import RolloutConfig
from megatron_mopd.trainer.data import Example, TokenizedSample, render, tokenize


def is_on_policy(seed: int, step: int, lmbda: float) -> bool:
    """The step's draw: True with probability ``lmbda``, the same on every rank and every run."""
    if lmbda <= 0.0:
        return False
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return bool(torch.rand((), generator=generator) < lmbda)


def sampling_params(config: RolloutConfig, tokenizer: Any, *, seed: int, step: int) -> SamplingParams:
    """The step's sampling: the configuration's, stopping at the tokenizer's EOS, seeded per step."""
    stop = () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)
    return SamplingParams(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                          max_new_tokens=config.max_new_tokens, stop_token_ids=stop, seed=seed * 1_000_003 + step)


def on_policy_examples(
    engine: RolloutEngine, examples: Sequence[Example], tokenizer: Any, sampling: SamplingParams, seq_length: int
) -> tuple[list[Example], torch.Tensor]:
    """The student's samples as examples, and their behaviour log-probabilities ``[b, seq_length]``
    aligned with the labels (position j holds the log-probability of token j + 1; 0 elsewhere).

    Each prompt keeps at most ``seq_length - 1`` tokens (room for one sampled token); a completion is
    cut where the sequence reaches ``seq_length``.
    """
    prompts = [tokenize(render(e.sample, tokenizer, with_completion=False), tokenizer, seq_length - 1)
               for e in examples]
    room = min(sampling.max_new_tokens, seq_length - max(len(p.input_ids) for p in prompts))
    rollouts = engine.generate([p.input_ids for p in prompts], dataclasses.replace(sampling, max_new_tokens=room))
    behaviour = torch.zeros(len(examples), seq_length)
    sampled = []
    for row, (example, prompt, rollout) in enumerate(zip(examples, prompts, rollouts)):
        completion = list(rollout.completion_ids)[: seq_length - len(prompt.input_ids)]
        ids = list(prompt.input_ids) + completion
        first = len(prompt.input_ids)
        behaviour[row, first - 1 : first - 1 + len(completion)] = torch.as_tensor(rollout.logprobs[: len(completion)])
        tokenized = TokenizedSample(ids, [False] * first + [True] * len(completion),
                                    list(prompt.offsets) + [(0, 0)] * len(completion), prompt.truncated,
                                    len(completion))
        sampled.append(Example(example.sample, example.rendered, tokenized))
    return sampled, behaviour
