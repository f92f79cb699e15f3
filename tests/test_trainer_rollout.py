"""Specification of the trainer's rollout phase (``trainer.rollout``): the per-step ``lmbda`` draw, and the
student's samples turned into what the step trains on (prompt + sampled tokens, the loss on the sampled
tokens only, the behaviour log-probabilities aligned with the labels, the text and character offsets a
teacher with another tokenizer aligns on)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pytest
import torch

from megatron_mopd.crosstok import CanonicalVocabulary
from megatron_mopd.demo.tokenizers import byte_level_bpe
from megatron_mopd.rollout import Rollout, SamplingParams
from megatron_mopd.trainer.data import Example, Sample, collate, render, tokenize
from megatron_mopd.trainer.rollout import StudentSamples, is_on_policy


def student_samples(engine, tokenizer, sampling: SamplingParams) -> StudentSamples:
    return StudentSamples(engine, tokenizer, CanonicalVocabulary.of(tokenizer), sampling)


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

    def __init__(self, completion: Sequence[int], finish_reason: str = "length") -> None:
        self.completion, self.finish_reason = tuple(completion), finish_reason
        self.asked: list = []

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Rollout]:
        self.asked.append((prompts, sampling))
        ids = self.completion[: sampling.max_new_tokens]
        logprobs = -np.arange(1, len(ids) + 1, dtype=np.float32) / 10
        return [Rollout(tuple(p), ids, logprobs, self.finish_reason) for p in prompts]


def example(prompt: str, completion: str | None, tokenizer, seq_length: int) -> Example:
    sample = Sample(prompt, completion, None, 0)
    rendered = render(sample, tokenizer)
    return Example(sample, rendered, tokenize(rendered, tokenizer, seq_length))


def test_a_sampled_completion_follows_its_prompt_and_only_it_is_trained_on() -> None:
    tokenizer, seq_length = byte_level_bpe(), 32
    examples = [example("The quick brown fox", " jumps", tokenizer, seq_length),
                example("Distillation", None, tokenizer, seq_length)]  # prompt-only data works too
    engine = ScriptedEngine([11, 12, 13])
    completed = student_samples(engine, tokenizer, SamplingParams(max_new_tokens=3)).complete(examples, seq_length)
    sampled, behaviour = completed.examples, completed.behaviour
    assert completed.source == "student" and not completed.dataset_completion  # no SFT on the student's samples
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
    sampled = student_samples(engine, tokenizer, SamplingParams(max_new_tokens=64)).complete(
        [example("The quick brown fox jumps", " over", tokenizer, 64)], seq_length).examples
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


def test_a_sampled_completion_carries_the_text_its_ids_spell_with_each_tokens_span() -> None:
    tokenizer, seq_length = byte_level_bpe(), 48
    completion = tokenizer(" over the lazy dog")["input_ids"] + [tokenizer.eos_token_id]
    engine = ScriptedEngine(completion, finish_reason="stop")
    result = student_samples(engine, tokenizer, SamplingParams(max_new_tokens=16)).complete(
        [example("The quick brown fox jumps", " away", tokenizer, seq_length)], seq_length).examples[0]
    assert result.sample.completion == " over the lazy dog"  # the stop token spells no text
    start, end = result.rendered.completion_span
    assert result.rendered.text[start:end] == " over the lazy dog"
    assert result.rendered.text[:start] == "The quick brown fox jumps"
    sampled_spans = result.tokenized.offsets[-len(completion):]
    for token, (first, last) in zip(completion[:-1], sampled_spans):
        assert result.rendered.text[first:last] == tokenizer.decode([token])
    assert sampled_spans[-1][0] == sampled_spans[-1][1] == end  # EOS: an empty span at the end


def test_a_teacher_with_another_tokenizer_aligns_on_what_the_student_sampled() -> None:
    from megatron_mopd.crosstok import align_offsets
    from megatron_mopd.demo.tokenizers import sentencepiece_bpe

    tokenizer, teacher, seq_length = byte_level_bpe(), sentencepiece_bpe(), 48
    completion = tokenizer(" 你好吗 12345 + 678")["input_ids"]
    result = student_samples(ScriptedEngine(completion), tokenizer, SamplingParams(max_new_tokens=32)).complete(
        [example("Say hello:", " hi", tokenizer, seq_length)], seq_length).examples[0]
    teacher_rendering = render(result.sample, teacher)  # the teacher renders the sampled text itself
    teacher_tokens = tokenize(teacher_rendering, teacher, 4 * seq_length)
    alignment = align_offsets(np.asarray(result.tokenized.offsets).reshape(-1, 2),
                              np.asarray(teacher_tokens.offsets).reshape(-1, 2), result.rendered.text,
                              teacher_rendering.text, [result.rendered.completion_span],
                              [teacher_rendering.completion_span])
    assert (alignment.student_token_chunks[-len(completion):] >= 0).all()  # every sampled token is scored
    spans = alignment.chunk_spans[:, 1:]
    assert spans[0, 0] == 0 and spans[-1, 1] == len(result.sample.completion)  # chunks tile the sampled text
    assert (spans[1:, 0] == spans[:-1, 1]).all()
