"""What every teacher source returns, and the interface a teacher source offers.

Row j of a ``TeacherLogprobs`` is the teacher's distribution of token j+1 given tokens 0..j of its
sequence, so it lines up with the student's logits at position j (docs/design.md §1, §5).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import ClassVar, Optional, Protocol, Sequence

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class TeacherLogprobs:
    """A teacher's scores of B sequences of length ≤ T.

    Attributes:
        topk_logprobs: float32 ``[B, T-1, K]`` the teacher's K largest log-probabilities per row, most
            probable first (raw: τ = 1); −inf in rows that are not ``valid`` and for entries of zero
            probability (a teacher with fewer than K possible tokens).
        topk_ids: int64 ``[B, T-1, K]`` their token ids in the teacher's vocabulary (0 in invalid rows).
        token_logprobs: float32 ``[B, T-1]`` the log-probability of the actual next token: 0 in invalid
            rows (so masked sums stay finite); −inf in a valid row when the teacher gives that token
            probability 0 (a consumer that takes its log-ratio must clamp or mask it).
        valid: bool ``[B, T-1]`` rows that exist (row j of sequence b needs j + 1 < len(sequence b)).
        sequences: the teacher-vocabulary token ids that were scored, one list per sequence.
        offsets: for text-mode (cross-tokenizer) scoring, the character offsets ``[n_b, 2]`` of each
            scored token in its text, else None.
    """

    topk_logprobs: torch.Tensor
    topk_ids: torch.Tensor
    token_logprobs: torch.Tensor
    valid: torch.Tensor
    sequences: tuple[tuple[int, ...], ...]
    offsets: Optional[tuple[np.ndarray, ...]] = None

    def __post_init__(self) -> None:
        if self.topk_logprobs.dim() != 3 or self.topk_logprobs.dtype != torch.float32:
            raise ValueError(f"topk_logprobs must be float32 [B, T-1, K], got {self.topk_logprobs.dtype} "
                             f"{tuple(self.topk_logprobs.shape)}")
        rows = self.topk_logprobs.shape[:2]
        if self.topk_ids.shape != self.topk_logprobs.shape or self.topk_ids.dtype != torch.int64:
            raise ValueError(f"topk_ids must be int64 {tuple(self.topk_logprobs.shape)}, got "
                             f"{self.topk_ids.dtype} {tuple(self.topk_ids.shape)}")
        if self.token_logprobs.shape != rows or self.token_logprobs.dtype != torch.float32:
            raise ValueError(f"token_logprobs must be float32 {tuple(rows)}, got {self.token_logprobs.dtype} "
                             f"{tuple(self.token_logprobs.shape)}")
        if self.valid.shape != rows or self.valid.dtype != torch.bool:
            raise ValueError(f"valid must be bool {tuple(rows)}, got {self.valid.dtype} {tuple(self.valid.shape)}")
        if len(self.sequences) != rows[0]:
            raise ValueError(f"{len(self.sequences)} sequences for a batch of {rows[0]}")
        if self.offsets is not None and len(self.offsets) != rows[0]:
            raise ValueError(f"{len(self.offsets)} offset arrays for a batch of {rows[0]}")

    @property
    def k(self) -> int:
        return self.topk_logprobs.shape[-1]

    def to(self, device: torch.device | str) -> "TeacherLogprobs":
        return TeacherLogprobs(
            self.topk_logprobs.to(device), self.topk_ids.to(device), self.token_logprobs.to(device),
            self.valid.to(device), self.sequences, self.offsets,
        )


class TeacherSource(Protocol):
    """A teacher that one rank asks on behalf of its group: a remote (vLLM/SGLang) server.

    ``submit`` starts scoring and returns at once; the trainer calls it as soon as the sequences exist
    and waits on the future only when the loss needs the scores, overlapping the teacher's latency
    with the student's compute. ``score`` is ``submit(...).result()``. ``placement`` decides which rank
    asks and broadcasts the answer.
    """

    collective: ClassVar[bool]  # False: one rank calls it (placement refuses a collective teacher)
    topk: int

    def submit(self, sequences: Sequence[Sequence[int]]) -> "Future[TeacherLogprobs]": ...

    def score(self, sequences: Sequence[Sequence[int]]) -> TeacherLogprobs: ...


class CollectiveTeacher(Protocol):
    """A teacher every model-parallel rank runs together, in the same order: a colocated Megatron model.

    ``score`` is collective (tensor-parallel collectives, pipeline sends); it returns the scores on the
    last pipeline stage and ``None`` elsewhere. Never pass one to ``placement.submit_teacher_scores``,
    which asks from one rank only: it refuses a teacher whose ``collective`` is True.
    """

    collective: ClassVar[bool]  # True
    topk: int

    def score(self, sequences: Sequence[Sequence[int]]) -> Optional[TeacherLogprobs]: ...
