"""Specification of the trainer's rollout phase (``trainer.rollout``): the per-step ``lmbda`` draw, and the
student's samples turned into what the step trains on (prompt + sampled tokens, the loss on the sampled
tokens only, the behaviour log-probabilities aligned with the labels)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pytest
import torch

from megatron_mopd.demo.tokenizers import byte_level_bpe
from megatron_mopd.rollout import Rollout, SamplingParams
from megatron_mopd.trainer.data import Example, Sample, collate, render, tokenize
from megatron_mopd.trainer.rollout import is_on_policy, on_policy_examples


def test_the_lmbda_draw_is_one_decision_per_step_the_same_in_every_run() -> None:
    draws = [is_on_policy(7, step, 0.3) for step in range(2000)]
    assert draws == [is_on_policy(7, step, 0.3) for step in range(2000)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.05
    assert draws != [is_on_policy(8, step, 0.3) for step in range(2000)]
    assert not any(is_on_policy(7, step, 0.0) for step in range(100))
    assert all(is_on_policy(7, step, 1.0) for step in range(100))


class ScriptedEngine:
    """A rollout engine that answers each prompt with fixed ids and log-probabilities (the conversion
    under test does not depend on how they were sampled)."""

    def __init__(self, completion: Sequence[int]) -> None:
        self.completion = tuple(completion)
        self.asked: list = []

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Rollout]:
        self.asked.append((prompts, sampling))
        ids = self.completion[: sampling.max_new_tokens]
        logprobs = -np.arange(1, len(ids) + 1, dtype=np.float32) / 10
        return [Rollout(tuple(p), ids, logprobs, "length") for p in prompts]


def example(prompt: str, completion: str | None, tokenizer, seq_length: int) -> Example:
    sample = Sample(prompt, completion, None, 0)
    rendered = render(sample, tokenizer)
    return Example(sample, rendered, tokenize(rendered, tokenizer, seq_length))


def test_a_sampled_completion_follows_its_prompt_and_only_it_is_trained_on() -> None:
    tokenizer, seq_length = byte_level_bpe(), 32
    examples = [example("The quick brown fox", " jumps", tokenizer, seq_length),
                example("Distillation", None, tokenizer, seq_length)]  # prompt-only data works too
    engine = ScriptedEngine([11, 12, 13])
    sampled, behaviour = on_policy_examples(engine, examples, tokenizer, SamplingParams(max_new_tokens=3), seq_length)
    for source, result in zip(examples, sampled):
        prompt = tokenize(render(source.sample, tokenizer, with_completion=False), tokenizer, seq_length - 1).input_ids
        assert result.tokenized.input_ids == prompt + [11, 12, 13]
        assert result.tokenized.loss_mask == [False] * len(prompt) + [True] * 3
    batch = collate([e.tokenized for e in sampled], seq_length, 0)
    trained = batch["labels"] != -100
    assert torch.equal(behaviour != 0, trained)  # one behaviour log-probability per trained label
    first = len(sampled[0].tokenized.input_ids) - 3
    assert batch["labels"][0, first - 1 : first + 2].tolist() == [11, 12, 13]
    torch.testing.assert_close(behaviour[0, first - 1 : first + 2], torch.tensor([-0.1, -0.2, -0.3]))


def test_completions_stop_where_the_sequence_is_full() -> None:
    tokenizer, seq_length = byte_level_bpe(), 8
    engine = ScriptedEngine(list(range(100, 120)))
    sampled, behaviour = on_policy_examples(engine, [example("The quick brown fox jumps", " over", tokenizer, 64)],
                                            tokenizer, SamplingParams(max_new_tokens=64), seq_length)
    prompts, sampling = engine.asked[0]
    assert sampling.max_new_tokens == seq_length - len(prompts[0])
    assert len(sampled[0].tokenized.input_ids) == seq_length


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_sampling_params_stop_at_eos(lmbda) -> None:
    from megatron_mopd.trainer.config import RolloutConfig
    from megatron_mopd.trainer.rollout import sampling_params

    tokenizer = byte_level_bpe()
    params = sampling_params(RolloutConfig(lmbda=lmbda, temperature=0.7), tokenizer, seed=3, step=5)
    assert params.stop_token_ids == (tokenizer.eos_token_id,) and params.temperature == 0.7
    assert params.seed != sampling_params(RolloutConfig(), tokenizer, seed=3, step=6).seed
