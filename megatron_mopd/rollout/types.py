"""What a rollout engine returns, and the interface every engine offers.

The trainer's rollout phase asks an engine for completions of the step's prompts (on-policy: the
student samples). A ``Rollout`` carries what the rest of the step needs: the token ids the teachers
score, the behaviour policy's log-probabilities for the truncated importance weights of the MOPD
loss, and the text with character offsets for teachers with another tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """How completions are sampled.

    Attributes:
        temperature: > 0; logits are divided by it before sampling.
        top_p: nucleus sampling in (0, 1] (1: off).
        top_k: keep the k most probable tokens (0: off).
        max_new_tokens: at most this many completion tokens.
        stop_token_ids: generation of a sequence ends after any of these (the tokenizer's EOS).
        seed: the sampling seed of this call; engines derive per-rank streams from it (equal across
            tensor/pipeline-parallel ranks, distinct across data-parallel ranks).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.max_new_tokens < 1:
            raise ValueError(f"need top_k >= 0 and max_new_tokens >= 1, got {self.top_k}, {self.max_new_tokens}")


@dataclass(frozen=True)
class Rollout:
    """One sampled completion of one prompt.

    Attributes:
        prompt_ids: the prompt's token ids (student vocabulary).
        completion_ids: the sampled ids, ending with a stop token when ``finish_reason == "stop"``.
        logprobs: float32 ``[len(completion_ids)]``, log π_rollout of each sampled id (the behaviour
            policy: the distribution it was sampled from, after temperature, before top-p/top-k
            truncation).
        finish_reason: ``"stop"`` (a stop token was sampled) or ``"length"`` (max_new_tokens reached).
        text: the decoded completion (for teachers with another tokenizer), or None.
        offsets: ``[len(completion_ids), 2]`` character spans of the completion ids in ``text``, or None.
    """

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    logprobs: np.ndarray
    finish_reason: str
    text: Optional[str] = None
    offsets: Optional[np.ndarray] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.finish_reason not in ("stop", "length"):
            raise ValueError(f"finish_reason must be 'stop' or 'length', got {self.finish_reason!r}")
        if len(self.logprobs) != len(self.completion_ids):
            raise ValueError(f"{len(self.logprobs)} log-probabilities for {len(self.completion_ids)} completion ids")


class RolloutEngine(Protocol):
    """Samples completions from the current student.

    ``generate`` is collective over the engine's ranks (every tensor/pipeline-parallel rank of the
    student calls it with the same prompts); each data-parallel rank passes its own prompts. It returns
    one ``Rollout`` per prompt, in order, on every rank.
    """

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Rollout]: ...


def checked_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_sequence_length: int
                    ) -> list[tuple[int, ...]]:
    """``prompts`` as tuples of ints, each checked to be non-empty, inside ``[0, vocab_size)`` and
    shorter than ``max_sequence_length`` (room for one completion token).

    Raises:
        ValueError: naming the first prompt that is not.
    """
    checked = [tuple(int(token) for token in prompt) for prompt in prompts]
    for index, prompt in enumerate(checked):
        if not prompt:
            raise ValueError(f"prompt {index} is empty")
        if min(prompt) < 0 or max(prompt) >= vocab_size:
            raise ValueError(f"prompt {index} holds an id outside [0, {vocab_size})")
        if len(prompt) >= max_sequence_length:
            raise ValueError(f"prompt {index} has {len(prompt)} tokens; max_sequence_length={max_sequence_length} "
                             "leaves no room for a completion: raise it or shorten the prompt")
    return checked


def mixed_seed(seed: int, stream: int) -> int:
    """A 63-bit seed of ``seed`` and a stream number (a prompt's index in its batch, a data-parallel rank):
    distinct streams get distinct seeds, the same ones the same seed."""
    state = np.random.SeedSequence([int(seed) & (2**63 - 1), int(stream)]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))
