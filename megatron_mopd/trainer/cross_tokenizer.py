"""A teacher with another tokenizer, in the trainer: its own rendering of each sample, the alignment of
the two tokenizations, and the vocabulary projection its loss (``ctkd`` or ``gold``) goes through.

Per sample: the teacher renders the sample with *its* chat template (``data.render``) and tokenizes it;
the completion — the same text on both sides — is aligned by characters (``crosstok.align_offsets``),
never by position. When the student's sequence was truncated, both regions end where the student's
last kept token ends, so a chunk never covers text the student does not see. The teacher's sequence is
cut after its last token that starts inside the region: that is all it needs to score.

The loss of a chunk counts once per student position in it (``objective``), so a teacher's weight does
not shift with how its tokenizer cuts the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from megatron_mopd.crosstok import AlignmentError, SequenceAlignment, VocabProjection, align_batch, align_offsets
from megatron_mopd.crosstok.local_tokenizer import load_local_tokenizer
from megatron_mopd.trainer.config import ConfigError, TeacherConfig
from megatron_mopd.trainer.data import Example, render, tokenize


@dataclass(frozen=True)
class ChunkIds:
    """Chunk ids of one micro-batch: ``student`` ``[b, s]`` (the chunk of the token each position
    predicts), ``teacher`` ``[b, t-1]`` (per teacher row), −1 = none; ``num_chunks`` in all."""

    student: torch.Tensor
    teacher: torch.Tensor
    num_chunks: int


class CrossTokenizerSide:
    """The teacher's tokenizer, the projection into its vocabulary, and the per-sample alignment."""

    def __init__(self, config: TeacherConfig, student_tokenizer: Any, max_teacher_tokens: int) -> None:
        where = f"teacher {config.name!r}"
        try:
            self.tokenizer = load_local_tokenizer(config.tokenizer, "teachers.N.tokenizer")
        except (OSError, ValueError) as error:
            raise ConfigError(f"{where}: tokenizer {config.tokenizer}: {error}") from None
        if not getattr(self.tokenizer, "is_fast", False):
            raise ConfigError(f"{where}: tokenizer {config.tokenizer} is not a fast tokenizer (character offsets)")
        try:
            self.projection = VocabProjection.load(config.projection, student_tokenizer, self.tokenizer)
        except (OSError, ValueError) as error:
            raise ConfigError(f"{where}: projection {config.projection}: {error}") from None
        self.name, self.max_teacher_tokens = config.name, max_teacher_tokens

    def prepare(self, example: Example) -> tuple[list[int], SequenceAlignment]:
        """The teacher's token ids of ``example`` and their alignment with the student's tokens."""
        student = example.tokenized
        start, end = example.rendered.completion_span
        end = min(end, max((e for _, e in student.offsets), default=start))  # the student's truncation
        rendered = render(example.sample, self.tokenizer)
        teacher = tokenize(rendered, self.tokenizer, self.max_teacher_tokens)
        t_start = rendered.completion_span[0]
        t_end = t_start + (end - start)
        keep = 1 + max((i for i, (s, _) in enumerate(teacher.offsets) if s < t_end), default=0)
        if teacher.truncated and keep >= len(teacher.input_ids) and teacher.offsets[-1][1] < t_end:
            raise ValueError(
                f"teacher {self.name!r}: sample {example.sample.index} needs more than {self.max_teacher_tokens} "
                f"teacher tokens to cover the student's completion; raise data.seq_length or shorten the sample"
            )
        offsets = np.asarray(teacher.offsets[:keep], dtype=np.int64).reshape(-1, 2)
        try:
            alignment = align_offsets(np.asarray(student.offsets, dtype=np.int64).reshape(-1, 2), offsets,
                                      example.rendered.text, rendered.text, [(start, end)], [(t_start, t_end)])
        except AlignmentError as error:
            raise AlignmentError(f"teacher {self.name!r}, sample {example.sample.index}: {error}") from None
        return teacher.input_ids[:keep], alignment


_NO_CHUNKS = SequenceAlignment(np.full(1, -1, dtype=np.int64), np.full(1, -1, dtype=np.int64),
                               np.zeros((0, 3), dtype=np.int64))  # a sample this teacher does not score


def chunk_ids(alignments: Sequence[Optional[SequenceAlignment]], student_length: int, teacher_rows: int) -> ChunkIds:
    """The micro-batch's chunk ids from its samples' alignments (None: not scored by this teacher)."""
    filled = [a if a is not None else _NO_CHUNKS for a in alignments]
    batch = align_batch(filled, student_length, teacher_rows + 1)
    return ChunkIds(batch.student_chunk_ids, batch.teacher_chunk_ids, batch.num_chunks)
