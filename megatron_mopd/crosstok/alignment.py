"""Chunk alignment of two tokenizations of the same text (docs/design.md §4, "Sequence alignment").

A chunk is a maximal character span between two positions that are token boundaries on both sides:
one or more student tokens aligned with one or more teacher tokens holding the same characters.
Everything works on the character offsets fast tokenizers report (``return_offsets_mapping=True``),
in linear time over numpy arrays indexed by character position.

* Regions. Chat templates differ per model, so nothing is aligned by position: each side names the
  character ranges of the scored text (the completion, and the prompt when it is scored) within its
  own text, and the i-th ranges of the two sides must hold identical text. Alignment runs region by
  region in region-relative coordinates. Tokens outside every region are unscored, and so is every
  chunk that holds a token crossing a region edge.
* Boundaries. Position p is a boundary of one side when a token of that side ends at p and no token of
  that side starts before p and ends after it (byte-level BPE reports the span (k, k + 1) for every
  byte token of the CJK character k: no boundary inside it). Region edges are boundaries.
* Gaps. Characters between consecutive tokens of one side (in sequence order) belong to the
  following token: the leading space that trimmed byte-level offsets leave out of "Ġword", and the
  whole span of a trimmed whitespace-only token, reported empty at its end. Characters after a side's
  last token belong to its last token. A non-whitespace character that one side's tokens cover and the
  other's do not (a normalizer dropped it) is an AlignmentError.
* Tokens whose span is empty even so (special tokens added by the tokenizer, padding: (0, 0)) are
  unscored and take no part in the alignment.
* Next-token shift. Student position i predicts student token i + 1 and teacher row j predicts teacher
  token j + 1; a chunk holding token 0 of either side has no prediction of its first token on that side
  and is dropped on both. Kept chunks are numbered 0..C-1 in text order, and each has at least one
  predicting student position and one teacher row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

Region = tuple[int, int]


class AlignmentError(ValueError):
    """The two sides (or their regions) do not hold the same text."""


@dataclass(frozen=True, eq=False)
class SequenceAlignment:
    """The chunks of one student/teacher sequence pair: ids 0..C-1 in text order, -1 = unscored.

    student_token_chunks: ``[n_s]`` int64, the chunk of each student token.
    teacher_token_chunks: ``[n_t]`` int64, the chunk of each teacher token.
    chunk_spans: ``[C, 3]`` int64, (region index, start, end) of each chunk, region-relative characters.
    """

    student_token_chunks: np.ndarray
    teacher_token_chunks: np.ndarray
    chunk_spans: np.ndarray

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_spans)

    def student_position_chunks(self) -> np.ndarray:
        """``[n_s]``: the chunk of the token each student position predicts (the last: -1)."""
        out = np.full_like(self.student_token_chunks, -1)
        out[:-1] = self.student_token_chunks[1:]
        return out

    def teacher_position_chunks(self) -> np.ndarray:
        """``[n_t - 1]``: the chunk of the token each teacher row predicts."""
        return self.teacher_token_chunks[1:].copy()


@dataclass(frozen=True, eq=False)
class BatchAlignment:
    """Chunk ids of a batch, global over it (0..num_chunks-1); -1 = unscored or padding.

    student_chunk_ids: ``[B, T_s]`` int64, the chunk of the token each student position predicts.
    teacher_chunk_ids: ``[B, T_t - 1]`` int64, the chunk of the token each teacher row predicts.
    chunk_sample: ``[C]`` int64, the sample each chunk belongs to.
    chunk_spans: ``[C, 3]`` int64, (region index, start, end) of each chunk within its sample's regions.
    """

    student_chunk_ids: torch.Tensor
    teacher_chunk_ids: torch.Tensor
    chunk_sample: torch.Tensor
    chunk_spans: torch.Tensor

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_sample)


def align_offsets(
    student_offsets: Sequence[Sequence[int]] | np.ndarray | torch.Tensor,
    teacher_offsets: Sequence[Sequence[int]] | np.ndarray | torch.Tensor,
    student_text: str,
    teacher_text: str,
    student_regions: Optional[Sequence[Region]] = None,
    teacher_regions: Optional[Sequence[Region]] = None,
) -> SequenceAlignment:
    """Align two tokenizations given as ``[n, 2]`` character offsets into their own texts.

    Offsets are the fast tokenizers' ``offset_mapping`` (special tokens and padding: empty spans).
    Regions are ``(start, end)`` character ranges, ascending and disjoint, one list per side with
    identical text pairwise; ``None`` means the whole text. The texts are needed to check the regions
    and to tell whitespace. Raises AlignmentError when the region texts differ or a non-whitespace
    character is covered by one side only.
    """
    student_offsets = _offsets(student_offsets, student_text, "student")
    teacher_offsets = _offsets(teacher_offsets, teacher_text, "teacher")
    student_regions = _regions(student_regions, student_text, "student")
    teacher_regions = _regions(teacher_regions, teacher_text, "teacher")
    if len(student_regions) != len(teacher_regions):
        raise AlignmentError(
            f"{len(student_regions)} student regions but {len(teacher_regions)} teacher regions; "
            "they must pair up"
        )
    student_spans, teacher_spans = _close_gaps(student_offsets), _close_gaps(teacher_offsets)
    student_chunks = np.full(len(student_offsets), -1, dtype=np.int64)
    teacher_chunks = np.full(len(teacher_offsets), -1, dtype=np.int64)
    spans, crossed, num_chunks = [], [], 0
    for region, ((s_lo, s_hi), (t_lo, t_hi)) in enumerate(zip(student_regions, teacher_regions)):
        text = student_text[s_lo:s_hi]
        if text != teacher_text[t_lo:t_hi]:
            raise AlignmentError(
                f"region {region} differs: student text [{s_lo}:{s_hi}] {_excerpt(text)} vs teacher "
                f"text [{t_lo}:{t_hi}] {_excerpt(teacher_text[t_lo:t_hi])}"
            )
        if not text:
            continue
        student = _tokens_in(student_offsets, student_spans, s_lo, len(text))
        teacher = _tokens_in(teacher_offsets, teacher_spans, t_lo, len(text))
        _check_coverage(text, student.covered, teacher.covered, region, s_lo, t_lo)
        common = student.boundaries & teacher.boundaries
        char_chunk = np.cumsum(common[:-1]) - 1 + num_chunks  # [L]: the chunk of each character
        starts = np.flatnonzero(common[:-1])
        spans.append(np.stack([np.full_like(starts, region), starts, np.flatnonzero(common[1:]) + 1], 1))
        num_chunks += len(starts)
        for side, chunks in ((student, student_chunks), (teacher, teacher_chunks)):
            token_chunk = char_chunk[side.starts]
            chunks[side.indices] = token_chunk
            crossed.append(token_chunk[side.crosses])
    spans = np.concatenate(spans) if spans else np.zeros((0, 3), dtype=np.int64)
    # Drop chunks holding a region-crossing token or token 0 of either side, and chunks a side has no
    # token in (a region only one side's tokens reach).
    first_tokens = np.concatenate([student_chunks[:1], teacher_chunks[:1]])
    dropped = np.concatenate([*crossed, first_tokens[first_tokens >= 0]])
    keep = np.bincount(dropped, minlength=num_chunks) == 0
    for chunks in (student_chunks, teacher_chunks):
        keep &= np.bincount(chunks[chunks >= 0], minlength=num_chunks) > 0
    # Renumber the kept chunks; the appended -1 is what index -1 (unscored) looks up.
    lookup = np.append(np.where(keep, np.cumsum(keep) - 1, -1), -1)
    return SequenceAlignment(lookup[student_chunks], lookup[teacher_chunks], spans[keep])


def align_texts(
    student_text: str,
    teacher_text: str,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_regions: Optional[Sequence[Region]] = None,
    teacher_regions: Optional[Sequence[Region]] = None,
    *,
    add_special_tokens: bool = True,
) -> tuple[SequenceAlignment, list[int], list[int]]:
    """Tokenize each text with its (fast) tokenizer and align: (alignment, student ids, teacher ids)."""
    options = dict(return_offsets_mapping=True, add_special_tokens=add_special_tokens)
    student, teacher = student_tokenizer(student_text, **options), teacher_tokenizer(teacher_text, **options)
    alignment = align_offsets(
        student["offset_mapping"],
        teacher["offset_mapping"],
        student_text,
        teacher_text,
        student_regions,
        teacher_regions,
    )
    return alignment, list(student["input_ids"]), list(teacher["input_ids"])


def align_batch(
    alignments: Sequence[SequenceAlignment], student_length: int, teacher_length: int
) -> BatchAlignment:
    """Stack per-sample alignments into position-level chunk ids padded with -1, ids global over the batch.

    ``student_length`` is the padded student sequence length T_s, ``teacher_length`` the padded teacher
    sequence length T_t (the teacher has T_t - 1 rows).
    """
    if teacher_length < 1:
        raise ValueError(f"teacher_length must be >= 1, got {teacher_length}")
    student = np.full((len(alignments), student_length), -1, dtype=np.int64)
    teacher = np.full((len(alignments), teacher_length - 1), -1, dtype=np.int64)
    first = 0
    for sample, alignment in enumerate(alignments):
        student_ids, teacher_ids = alignment.student_position_chunks(), alignment.teacher_position_chunks()
        if len(student_ids) > student_length or len(teacher_ids) > teacher_length - 1:
            raise ValueError(
                f"sample {sample} has {len(student_ids)} student and {len(alignment.teacher_token_chunks)} "
                f"teacher tokens: more than student_length={student_length} or "
                f"teacher_length={teacher_length}"
            )
        student[sample, : len(student_ids)] = np.where(student_ids >= 0, student_ids + first, -1)
        teacher[sample, : len(teacher_ids)] = np.where(teacher_ids >= 0, teacher_ids + first, -1)
        first += alignment.num_chunks
    counts = [alignment.num_chunks for alignment in alignments]
    spans = [alignment.chunk_spans for alignment in alignments] or [np.zeros((0, 3), dtype=np.int64)]
    return BatchAlignment(
        torch.from_numpy(student),
        torch.from_numpy(teacher),
        torch.from_numpy(np.repeat(np.arange(len(alignments), dtype=np.int64), counts)),
        torch.from_numpy(np.concatenate(spans)),
    )


@dataclass(frozen=True)
class _Side:
    """One side's tokens overlapping a region of L characters (region-relative, clipped)."""

    indices: np.ndarray  # [m] the tokens' indices in the sequence
    starts: np.ndarray  # [m] starts after the gap rule, in [0, L)
    crosses: np.ndarray  # [m] bool: the token crosses a region edge
    covered: np.ndarray  # [L] bool: characters inside a token's span as reported
    boundaries: np.ndarray  # [L + 1] bool: the side's token boundaries, region edges included


def _close_gaps(offsets: np.ndarray) -> np.ndarray:
    """``[n, 2]`` spans after the gap rule: each start moves back to the end of the tokens before it."""
    previous_end = np.maximum.accumulate(np.concatenate([[0], offsets[:, 1]]))[:-1]
    return np.stack([np.minimum(offsets[:, 0], previous_end), offsets[:, 1]], 1)


def _tokens_in(offsets: np.ndarray, spans: np.ndarray, lo: int, length: int) -> _Side:
    """The side's tokens overlapping [lo, lo + length); ``spans`` are the offsets after the gap rule."""
    starts, ends = spans[:, 0] - lo, spans[:, 1] - lo
    indices = np.flatnonzero((ends > starts) & (ends > 0) & (starts < length))
    starts, ends = starts[indices], ends[indices]
    crosses = (starts < 0) | (ends > length)
    starts, ends = starts.clip(0, length), ends.clip(0, length)
    ends = np.where(ends == ends.max(initial=0), length, ends)  # a trailing gap: to the last tokens
    size = length + 1
    reported = (offsets[indices] - lo).clip(0, length)
    covered = np.cumsum(_count(reported[:, 0], size) - _count(reported[:, 1], size))[:length] > 0
    inside = np.cumsum(_count(starts + 1, size) - _count(ends, size)) > 0  # start < p < end
    boundaries = (_count(ends, size) > 0) & ~inside
    boundaries[[0, -1]] = True
    return _Side(indices, starts, crosses, covered, boundaries)


def _count(positions: np.ndarray, size: int) -> np.ndarray:
    """``[size]``: how many of ``positions`` (in [0, size)) equal each index."""
    return np.bincount(positions, minlength=size)


def _check_coverage(
    text: str, student: np.ndarray, teacher: np.ndarray, region: int, student_lo: int, teacher_lo: int
) -> None:
    """Raise AlignmentError at the first run of non-whitespace characters only one side covers."""
    one_sided = student != teacher
    if not one_sided.any():
        return
    one_sided &= ~np.char.isspace(np.frombuffer(text.encode("utf-32-le"), dtype="<U1"))
    if not one_sided.any():
        return
    start = int(np.argmax(one_sided))
    rest = ~(one_sided & (student == student[start]))[start:]
    end = start + (int(np.argmax(rest)) if rest.any() else len(rest))
    if student[start]:
        side, other, lo = "teacher", "student", teacher_lo
    else:
        side, other, lo = "student", "teacher", student_lo
    raise AlignmentError(
        f"characters [{start + lo}:{end + lo}] of the {side} text {_excerpt(text[start:end])} (region "
        f"{region}) are covered by {other} tokens but by no {side} token; did a normalizer drop them?"
    )


def _offsets(offsets, text: str, side: str) -> np.ndarray:
    array = np.asarray(offsets, dtype=np.int64)
    array = array.reshape(0, 2) if array.size == 0 else array
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{side}_offsets must be [n, 2] (start, end) pairs, got shape {array.shape}")
    bad = (array[:, 0] < 0) | (array[:, 1] < array[:, 0]) | (array[:, 1] > len(text))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{side}_offsets[{i}] = {tuple(array[i].tolist())} is not a span of the {side} text "
            f"(length {len(text)})"
        )
    return array


def _regions(regions: Optional[Sequence[Region]], text: str, side: str) -> list[Region]:
    regions = [(0, len(text))] if regions is None else [(int(a), int(b)) for a, b in regions]
    bounds = [0, *(x for region in regions for x in region), len(text)]
    if any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(
            f"{side}_regions must be ascending, disjoint (start, end) ranges within the {side} text "
            f"(length {len(text)}), got {regions}"
        )
    return regions


def _excerpt(text: str, limit: int = 60) -> str:
    return repr(text) if len(text) <= limit else repr(text[: limit - 1]) + "…"
