"""The rollout phase of a step: where the completions the step trains on come from.

Three sources, one per step:

* the dataset (off-policy): the samples' own completions;
* the student (on-policy, with probability ``lmbda``): ``StudentSamples`` asks the rollout engine for a
  completion of each prompt; the sequence is the prompt's tokens followed by the sampled ids, the loss
  covers the sampled ids, and the behaviour policy's log-probability of each travels with it (the MOPD
  loss's truncated importance weights);
* a teacher (``seq_kd``, sequence-level KD, on the steps that are not on-policy): ``TeacherSamples``
  asks a remote teacher to generate each completion; the student learns on the teacher's text. With
  ``loss.routing=domain`` each sample's own teacher generates it, with ``weights`` the first remote one.

``lmbda`` is one decision per step, drawn from a generator seeded by (seed, step): every rank draws
the same, and a resumed run draws what the uninterrupted one did (TRL's GKD draws per step as well;
``seq_kd`` applies where the draw says off-policy, as there).

Sampled ids become text with each token's character span (``crosstok.decode_with_offsets``), so a
teacher with another tokenizer scores exactly what the student sampled: the sample's completion is
that text, rendered by the teacher with its own template, and aligned by characters. Special tokens
(the stop token) spell no text. SFT (``loss.sft_alpha``) applies to dataset and teacher completions,
never to the student's own samples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

import torch
import torch.distributed as dist

from megatron_mopd.crosstok import CanonicalVocabulary
from megatron_mopd.crosstok.detokenize import decode_with_offsets
from megatron_mopd.rollout import Rollout, RolloutEngine, SamplingParams
from megatron_mopd.trainer.config import RolloutConfig
from megatron_mopd.trainer.data import Example, RenderedSample, TokenizedSample, render, tokenize


def is_on_policy(seed: int, step: int, lmbda: float) -> bool:
    """The step's draw: True with probability ``lmbda``, the same on every rank and every run."""
    if lmbda <= 0.0:
        return False
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return bool(torch.rand((), generator=generator) < lmbda)


def sampling_params(config: RolloutConfig, tokenizer: Any, *, seed: int, step: int,
                    max_new_tokens: Optional[int] = None) -> SamplingParams:
    """The step's sampling: the configuration's, stopping at the tokenizer's EOS, seeded per step."""
    return SamplingParams(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                          max_new_tokens=max_new_tokens or config.max_new_tokens, stop_token_ids=_stop_ids(tokenizer),
                          seed=seed * 1_000_003 + step)


@dataclass(frozen=True)
class Completed:
    """The step's sequences: ``examples`` (prompt + completion), the behaviour log-probabilities
    ``[b, seq_length]`` aligned with the labels for student samples (else None) and the temperature
    they were sampled at, whether the completions count as dataset completions (SFT applies), and where
    they came from."""

    examples: list[Example]
    behaviour: Optional[torch.Tensor]
    dataset_completion: bool
    source: str  # "dataset", "student" or "teacher"
    behaviour_temperature: float = 1.0


class CompletionSource(Protocol):
    """Turns a step's examples into the sequences it trains on (collective over the replica's ranks)."""

    def complete(self, examples: Sequence[Example], seq_length: int) -> Completed: ...


def prompt_tokens(example: Example, tokenizer: Any, seq_length: int) -> tuple[RenderedSample, TokenizedSample]:
    """The example's prompt as the student's text and tokens, at most ``seq_length - 1`` of them (room
    for one completion token)."""
    rendered = render(example.sample, tokenizer, with_completion=False)
    return rendered, tokenize(rendered, tokenizer, seq_length - 1)


def sampled_example(example: Example, prompt: tuple[RenderedSample, TokenizedSample], completion: Sequence[int],
                    vocabulary: CanonicalVocabulary, seq_length: int) -> Example:
    """The example whose completion is ``completion`` (student-vocabulary ids sampled after the prompt),
    cut where the sequence reaches ``seq_length``; its text and offsets are what the ids spell."""
    rendered_prompt, tokens = prompt
    kept = list(completion)[: seq_length - len(tokens.input_ids)]
    text, offsets = decode_with_offsets(vocabulary, kept)
    start = len(rendered_prompt.text)
    sample = dataclasses.replace(example.sample, completion=text)
    rendered = RenderedSample(rendered_prompt.text + text, (start, start + len(text)),
                              rendered_prompt.add_special_tokens)
    tokenized = TokenizedSample(list(tokens.input_ids) + kept, [False] * len(tokens.input_ids) + [True] * len(kept),
                                list(tokens.offsets) + [(start + int(s), start + int(e)) for s, e in offsets],
                                tokens.truncated, len(kept))
    return Example(sample, rendered, tokenized)


@dataclass(frozen=True)
class StudentSamples:
    """On-policy: the student samples each prompt's completion through ``engine``."""

    engine: RolloutEngine
    tokenizer: Any
    vocabulary: CanonicalVocabulary
    sampling: SamplingParams

    def complete(self, examples: Sequence[Example], seq_length: int) -> Completed:
        """The student's samples as examples, and their behaviour log-probabilities ``[b, seq_length]``
        (position j holds the log-probability of token j + 1; 0 elsewhere)."""
        prompts = [prompt_tokens(e, self.tokenizer, seq_length) for e in examples]
        rollouts = self.engine.generate([p.input_ids for _, p in prompts], _within(self.sampling, prompts, seq_length))
        behaviour = torch.zeros(len(examples), seq_length)
        sampled = []
        for row, (example, prompt, rollout) in enumerate(zip(examples, prompts, rollouts)):
            result = sampled_example(example, prompt, rollout.completion_ids, self.vocabulary, seq_length)
            first, count = len(prompt[1].input_ids), result.tokenized.num_completion_tokens
            behaviour[row, first - 1 : first - 1 + count] = torch.as_tensor(rollout.logprobs[:count])
            sampled.append(result)
        return Completed(sampled, behaviour, False, "student", self.sampling.temperature)


@dataclass(frozen=True)
class SequenceTeacher:
    """A remote teacher that generates completions: its client (None on ranks that do not fetch), and
    its tokenizer and vocabulary when they are not the student's."""

    name: str
    client: Any
    tokenizer: Any = None
    vocabulary: Optional[CanonicalVocabulary] = None


@dataclass(frozen=True)
class TeacherSamples:
    """``seq_kd``: teachers generate the completions; ``owners`` names each example's teacher."""

    teachers: dict[str, SequenceTeacher]
    owners: Sequence[str]
    tokenizer: Any
    vocabulary: CanonicalVocabulary
    sampling: SamplingParams
    fetching: bool

    def complete(self, examples: Sequence[Example], seq_length: int) -> Completed:
        """Generated on the replica's fetching rank, then the same examples on each of its ranks."""
        completed: list[Optional[Example]] = [None] * len(examples)
        if self.fetching:
            for name, teacher in self.teachers.items():
                rows = [i for i, owner in enumerate(self.owners) if owner == name]
                if rows:
                    for row, example in zip(rows, self._generate(teacher, [examples[i] for i in rows], seq_length)):
                        completed[row] = example
        return Completed(replicate_from_fetching_rank(completed), None, True, "teacher")

    def _generate(self, teacher: SequenceTeacher, examples: list[Example], seq_length: int) -> list[Example]:
        prompts = [prompt_tokens(e, self.tokenizer, seq_length) for e in examples]
        if teacher.tokenizer is None:  # the student's vocabulary: train on the very ids the teacher chose
            sampling = _within(self.sampling, prompts, seq_length)
            rollouts = _generate(teacher, [p.input_ids for _, p in prompts], sampling)
            return [sampled_example(e, p, r.completion_ids, self.vocabulary, seq_length)
                    for e, p, r in zip(examples, prompts, rollouts)]
        own = [tokenize(render(e.sample, teacher.tokenizer, with_completion=False), teacher.tokenizer, 4 * seq_length)
               for e in examples]
        rollouts = _generate(teacher, [p.input_ids for p in own], dataclasses.replace(
            self.sampling, stop_token_ids=_stop_ids(teacher.tokenizer)))
        return [_text_example(e, p[0], decode_with_offsets(teacher.vocabulary, r.completion_ids)[0],
                              r.finish_reason == "stop", self.tokenizer, seq_length)
                for e, p, r in zip(examples, prompts, rollouts)]


class StepSources:
    """Where each step's completions come from: the step's ``lmbda`` draw (the student), else a teacher
    with ``seq_kd``, else the dataset; and the student's samples of held-out prompts for evaluation
    (the same sampling stream at every evaluation, so before and after differ only by the weights).

    Args:
        config: the run's configuration.
        tokenizer, vocabulary: the student's tokenizer and its ``CanonicalVocabulary`` (None when the
            student never samples and nothing is generated).
        engine: the student's rollout engine (None when the student never samples).
        clients: the teachers' clients by name (None on ranks that do not fetch).
        cross_tokenizers: the tokenizer of each teacher with another tokenizer, by name.
        fetching: whether this rank talks to the remote teachers.
    """

    def __init__(self, config: Any, tokenizer: Any, vocabulary: Optional[CanonicalVocabulary],
                 engine: Optional[RolloutEngine], clients: dict[str, Any], cross_tokenizers: dict[str, Any],
                 fetching: bool) -> None:
        self.config, self.tokenizer, self.vocabulary, self.engine, self.fetching = (
            config, tokenizer, vocabulary, engine, fetching)
        self.generators: dict[str, SequenceTeacher] = {}
        if config.rollout.seq_kd:
            for teacher in config.teachers:
                own = cross_tokenizers.get(teacher.name)
                if teacher.placement == "remote":
                    self.generators[teacher.name] = SequenceTeacher(
                        teacher.name, clients[teacher.name], own, None if own is None else CanonicalVocabulary.of(own))

    def for_step(self, step: int, routes: dict[str, torch.Tensor]) -> Optional[CompletionSource]:
        """The step's source; None: the dataset's completions. ``routes``: the samples each teacher scores."""
        rollout, seed = self.config.rollout, self.config.seed
        sampling = sampling_params(rollout, self.tokenizer, seed=seed, step=step)
        if is_on_policy(seed, step, rollout.lmbda):
            return StudentSamples(self.engine, self.tokenizer, self.vocabulary, sampling)
        if not rollout.seq_kd:
            return None
        if self.config.loss.routing == "domain":
            size = len(next(iter(routes.values())))
            owners = [next(name for name, route in routes.items() if route[i]) for i in range(size)]
        else:
            owners = [next(iter(self.generators))] * len(next(iter(routes.values())))
        return TeacherSamples(self.generators, owners, self.tokenizer, self.vocabulary, sampling, self.fetching)

    def held_out(self) -> StudentSamples:
        """The student's samples of held-out prompts: the rollout's sampling with a fixed seed."""
        sampling = sampling_params(self.config.rollout, self.tokenizer, seed=self.config.seed, step=-1,
                                   max_new_tokens=self.config.eval.max_new_tokens)
        return StudentSamples(self.engine, self.tokenizer, self.vocabulary, sampling)


def _within(sampling: SamplingParams, prompts: Sequence[tuple[RenderedSample, TokenizedSample]],
            seq_length: int) -> SamplingParams:
    """``sampling`` with no more new tokens than the longest prompt leaves room for in ``seq_length``."""
    room = seq_length - max(len(tokens.input_ids) for _, tokens in prompts)
    return dataclasses.replace(sampling, max_new_tokens=min(sampling.max_new_tokens, room))


def _generate(teacher: SequenceTeacher, prompts: list[list[int]], sampling: SamplingParams) -> list[Rollout]:
    rollouts = teacher.client.generate(prompts, sampling)
    if len(rollouts) != len(prompts):
        raise RuntimeError(f"teacher {teacher.name!r} returned {len(rollouts)} completions for {len(prompts)} prompts")
    return rollouts


def _text_example(example: Example, prompt: RenderedSample, text: str, stopped: bool, tokenizer: Any,
                  seq_length: int) -> Example:
    """The example whose completion is ``text`` (ending with the student's EOS when the teacher stopped)."""
    start = len(prompt.text)
    eos = (tokenizer.eos_token or "") if stopped else ""
    rendered = RenderedSample(prompt.text + text + eos, (start, start + len(text)), prompt.add_special_tokens)
    return Example(dataclasses.replace(example.sample, completion=text), rendered,
                   tokenize(rendered, tokenizer, seq_length))


def replicate_from_fetching_rank(value: Any) -> Any:
    """``value`` of the replica's fetching rank (last pipeline stage, tensor/context-parallel rank 0) on
    every rank of that replica (a pickled object: for small per-step data)."""
    from megatron.core import parallel_state as ps

    holder = [value]
    if ps.get_tensor_and_context_parallel_rank() == 0 and ps.get_pipeline_model_parallel_world_size() > 1:
        group = ps.get_pipeline_model_parallel_group()
        dist.broadcast_object_list(holder, group=group, group_src=dist.get_world_size(group) - 1)
    if ps.get_tensor_and_context_parallel_world_size() > 1:
        dist.broadcast_object_list(holder, group=ps.get_tensor_and_context_parallel_group(), group_src=0)
    return holder[0]


def _stop_ids(tokenizer: Any) -> tuple[int, ...]:
    return () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)
