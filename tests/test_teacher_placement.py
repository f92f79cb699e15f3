"""Specification: remote teacher scores are fetched once per data-parallel rank and placed where needed.

On gloo ranks with Megatron's parallel state at TP=2, PP=2, TP=2 x PP=2, CP=2 and DP=2, with a counting
``TeacherSource`` whose scores are a deterministic function of the sequences:

- only rank 0 of the last stage's TP/CP group calls the source (``submit`` already calls it, before
  ``wait``), once per fetch, with exactly its data-parallel rank's sequences;
- every TP rank of the last stage ends with identical tensors, the scored sequences and offsets;
  other stages get None;
- the rows are padded (invalid) to the student's sequence length and each CP rank holds exactly what
  ``megatron.core.utils.get_batch_on_this_cp_rank`` gives for the same full tensors;
- a failing source raises on every rank of the group instead of leaving the others blocked.
"""

from __future__ import annotations

import functools
from concurrent.futures import Future
from typing import Any, Sequence

import numpy as np
import pytest
import torch

from megatron_mopd.platform import destroy_parallel, initialize_parallel
from megatron_mopd.teachers.placement import cp_slice, fetch_teacher_scores, submit_teacher_scores
from megatron_mopd.teachers.types import TeacherLogprobs
from megatron_mopd.testing import run_on_ranks

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU mode runs only on hosts without an accelerator"
)

K, VOCAB, SEQ_LENGTH = 4, 50, 16
LENGTHS = (9, 16, 4, 12)
FIELDS = ("topk_logprobs", "topk_ids", "token_logprobs", "valid")
LAYOUTS = {  # (tp, pp, cp, world size): the data-parallel size is what remains
    "tp2": (2, 1, 1, 2),
    "pp2": (1, 2, 1, 2),
    "tp2-pp2": (2, 2, 1, 4),
    "cp2": (1, 1, 2, 2),
    "dp2": (1, 1, 1, 2),
}


def global_sequences() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(VOCAB, (n,), generator=gen).tolist() for n in LENGTHS]


def deterministic_scores(sequences: Sequence[Sequence[int]]) -> TeacherLogprobs:
    """Scores that depend only on the sequences: the actual next token first, distinct values."""
    batch, rows = len(sequences), max(len(s) for s in sequences) - 1
    valid = torch.arange(rows)[None, :] + 1 < torch.tensor([len(s) for s in sequences])[:, None]
    next_tokens = torch.zeros(batch, rows, dtype=torch.int64)
    for b, sequence in enumerate(sequences):
        next_tokens[b, : len(sequence) - 1] = torch.tensor(sequence[1:], dtype=torch.int64)
    ids = (next_tokens[..., None] + 7 * torch.arange(K)) % VOCAB
    logprobs = (-0.5 * (torch.arange(K) + 1.0) - 0.01 * torch.arange(rows)[:, None]
                - 0.1 * torch.arange(batch)[:, None, None])
    offsets = tuple(np.stack([np.arange(len(s)), np.arange(len(s)) + 1], axis=-1) for s in sequences)
    return TeacherLogprobs(
        logprobs.masked_fill(~valid[..., None], -torch.inf), ids.masked_fill(~valid[..., None], 0),
        logprobs[..., 0].masked_fill(~valid, 0.0), valid, tuple(tuple(s) for s in sequences), offsets,
    )


class CountingTeacher:
    """A ``TeacherSource`` computing ``deterministic_scores``; records the sequences of every call."""

    topk = K

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, ...], ...]] = []

    def submit(self, sequences: Sequence[Sequence[int]]) -> "Future[TeacherLogprobs]":
        self.calls.append(tuple(tuple(s) for s in sequences))
        future: "Future[TeacherLogprobs]" = Future()
        future.set_result(deterministic_scores(sequences))
        return future

    def score(self, sequences: Sequence[Sequence[int]]) -> TeacherLogprobs:
        return self.submit(sequences).result()


class FailingTeacher(CountingTeacher):
    def submit(self, sequences: Sequence[Sequence[int]]) -> "Future[TeacherLogprobs]":
        future: "Future[TeacherLogprobs]" = Future()
        future.set_exception(ConnectionError("teacher server unreachable"))
        return future


def as_dict(scores: TeacherLogprobs | None) -> dict[str, Any] | None:
    if scores is None:
        return None
    return {**{f: getattr(scores, f) for f in FIELDS}, "sequences": scores.sequences, "offsets": scores.offsets}


def fetch_on_rank(tp: int, pp: int, cp: int) -> dict[str, Any]:
    """Fetch this data-parallel rank's scores both ways; return them with what was expected."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    torch.set_num_threads(1)
    initialize_parallel(tp, pp, cp, device="cpu")
    try:
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        mine = global_sequences()[dp_rank::dp_size]
        source = CountingTeacher()
        blocking = fetch_teacher_scores(source, mine, seq_length=SEQ_LENGTH)
        pending = submit_teacher_scores(source, mine, seq_length=SEQ_LENGTH)
        calls_before_wait = len(source.calls)
        overlapped = pending.wait()
        try:
            fetch_teacher_scores(FailingTeacher(), mine, seq_length=SEQ_LENGTH)
            error = None
        except Exception as caught:  # the message is the result
            error = f"{type(caught).__name__}: {caught}"
        missing_seq_length = None
        if cp > 1:
            try:
                submit_teacher_scores(source, mine)
            except ValueError as caught:
                missing_seq_length = str(caught)

        full = deterministic_scores(mine)
        padded = {}  # the full scores with invalid rows up to SEQ_LENGTH
        for name, fill in zip(FIELDS, (-torch.inf, 0, 0.0, False)):
            tensor = getattr(full, name)
            padding = torch.full((len(mine), SEQ_LENGTH - tensor.shape[1], *tensor.shape[2:]), fill)
            padded[name] = torch.cat([tensor, padding], dim=1)
        return {
            "last_stage": parallel_state.is_pipeline_last_stage(),
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "cp_rank": parallel_state.get_context_parallel_rank(),
            "dp_rank": dp_rank,
            "mine": tuple(tuple(s) for s in mine),
            "calls": source.calls,
            "calls_before_wait": calls_before_wait,
            "blocking": as_dict(blocking),
            "overlapped": as_dict(overlapped),
            "expected": get_batch_on_this_cp_rank(padded),
            "full_offsets": full.offsets,
            "error": error,
            "missing_seq_length": missing_seq_length,
        }
    finally:
        destroy_parallel()


@functools.cache
def run_layout(name: str) -> list[dict[str, Any]]:
    tp, pp, cp, world_size = LAYOUTS[name]
    return run_on_ranks(fetch_on_rank, world_size, args=(tp, pp, cp), timeout_s=120)


def test_cp_slice_keeps_chunk_r_and_its_mirror() -> None:
    sequence = torch.arange(8)
    assert cp_slice(sequence, 0, cp_size=2, cp_rank=0).tolist() == [0, 1, 6, 7]
    assert cp_slice(sequence, 0, cp_size=2, cp_rank=1).tolist() == [2, 3, 4, 5]
    assert cp_slice(sequence, 0, cp_size=1, cp_rank=0) is sequence
    with pytest.raises(ValueError, match="not divisible"):
        cp_slice(torch.zeros(2, 6), 1, cp_size=2, cp_rank=0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_only_rank_0_of_the_last_stage_calls_the_source(layout: str) -> None:
    per_rank = run_layout(layout)
    for result in per_rank:
        fetches = result["last_stage"] and result["tp_rank"] == 0 and result["cp_rank"] == 0
        assert result["calls"] == ([result["mine"]] * 2 if fetches else [])
        assert result["calls_before_wait"] == (2 if fetches else 0), "submit must start the fetch"
    tp, pp, cp, world_size = LAYOUTS[layout]
    fetching_dp_ranks = sorted(r["dp_rank"] for r in per_rank if r["calls"])
    assert fetching_dp_ranks == list(range(world_size // (tp * pp * cp))), "one fetch per data-parallel rank"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_last_stage_ranks_hold_their_cp_slice_of_the_padded_scores(layout: str) -> None:
    """Identical on the TP ranks of the last stage; get_batch_on_this_cp_rank's slice of the rows
    padded to SEQ_LENGTH; sequences and offsets as the source returned them; None elsewhere."""
    per_rank = run_layout(layout)
    for result in per_rank:
        if not result["last_stage"]:
            assert result["blocking"] is None and result["overlapped"] is None
            continue
        for scores in (result["blocking"], result["overlapped"]):
            for name in FIELDS:
                assert torch.equal(scores[name], result["expected"][name]), name
            assert scores["sequences"] == result["mine"]
            assert all(np.array_equal(a, b) for a, b in zip(scores["offsets"], result["full_offsets"], strict=True))
        cp = LAYOUTS[layout][2]
        assert result["blocking"]["valid"].shape == (len(result["mine"]), SEQ_LENGTH // cp)


def test_data_parallel_ranks_fetch_their_own_sequences() -> None:
    per_rank = run_layout("dp2")
    everything = tuple(tuple(s) for s in global_sequences())
    assert [r["dp_rank"] for r in per_rank] == [0, 1]
    assert [r["calls"][0] for r in per_rank] == [everything[0::2], everything[1::2]]


@pytest.mark.parametrize("layout", ["tp2", "tp2-pp2", "cp2"])
def test_a_failing_source_raises_on_every_rank_of_the_group(layout: str) -> None:
    for result in run_layout(layout):
        if not result["last_stage"]:
            assert result["error"] is None
        elif result["tp_rank"] == 0 and result["cp_rank"] == 0:
            assert result["error"] == "ConnectionError: teacher server unreachable"
        else:
            assert result["error"].startswith("RuntimeError: the teacher fetch") and "unreachable" in result["error"]


def test_context_parallelism_needs_the_student_sequence_length() -> None:
    """Without S the teacher's rows cannot be split like the student's tokens: every rank refuses."""
    for result in run_layout("cp2"):
        assert "pass seq_length=S" in result["missing_seq_length"]


def test_a_collective_teacher_is_refused_on_every_rank_instead_of_hanging() -> None:
    from megatron_mopd.teachers import ColocatedTeacher

    source = ColocatedTeacher.__new__(ColocatedTeacher)  # the class decides, not the instance's state
    with pytest.raises(TypeError, match="collective teacher .* call its score\\(\\) on every rank"):
        submit_teacher_scores(source, [[1, 2, 3]])
