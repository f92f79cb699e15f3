"""Specification: the colocated Megatron teacher scores like a plain single-process computation.

A tiny GPTModel teacher (testing.gpt, random weights scaled up so that top-k values are far apart) is
built at TP=1, written as a Megatron distributed checkpoint, and loaded at TP=2, PP=2 and TP=2 x PP=2.
At every layout, scoring through Megatron's forward-only schedule (several micro-batches, the last one
partly filler) gives the TP=1 reference — logits -> log_softmax over the true vocabulary -> topk,
and the log-probability of each next token — on every TP rank of the last stage, ``None`` on the
other stages; padding rows are invalid; nothing requires or receives a gradient; the full-logits
iterator yields each micro-batch's logits as this rank's shard of the TP=1 logits.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_mopd.platform import destroy_parallel, initialize_parallel
from megatron_mopd.teachers.colocated import ColocatedTeacher
from megatron_mopd.testing import run_on_ranks
from megatron_mopd.testing.gpt import TinyGPT

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU mode runs only on hosts without an accelerator"
)

SEED, K, MICRO_BATCH = 1234, 8, 2
TINY_GPT = TinyGPT(init_method_std=0.5)
LENGTHS = (17, 5, 12, 1, 9)  # 3 micro-batches of 2, the last with one filler row; one sequence has no row
ROWS = max(LENGTHS) - 1


def sequences() -> list[list[int]]:
    gen = torch.Generator().manual_seed(SEED)
    return [torch.randint(TINY_GPT.vocab_size, (n,), generator=gen).tolist() for n in LENGTHS]


def expected_valid() -> torch.Tensor:
    return torch.arange(ROWS)[None, :] + 1 < torch.tensor(LENGTHS)[:, None]


def plain_reference(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """TP=1 logits of the whole batch in one call -> log_softmax over the true vocabulary -> topk."""
    tokens = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.int64)
    for row, sequence in enumerate(sequences()):
        tokens[row, : len(sequence)] = torch.tensor(sequence)
    with torch.no_grad():
        logits = model(tokens, torch.arange(max(LENGTHS)).expand_as(tokens), None)[:, :ROWS]
    logprobs = torch.log_softmax(logits[..., : TINY_GPT.vocab_size], dim=-1)
    topk_logprobs, topk_ids = logprobs.topk(K + 1, dim=-1)
    return {
        "logits": logits,
        "topk_logprobs": topk_logprobs,  # K + 1: the gap to the (K+1)-th tells whether ids are unique
        "topk_ids": topk_ids[..., :K],
        "token_logprobs": logprobs.gather(-1, tokens[:, 1:, None]).squeeze(-1),
    }


def score_on_rank(tp: int, pp: int, checkpoint_dir: str) -> dict[str, Any]:
    """Build the teacher at (tp, pp) — at TP=1 from Megatron's seeded init, saved to ``checkpoint_dir``;
    else loaded from it — and return what it computes on this rank."""
    from megatron.core import parallel_state

    torch.set_num_threads(1)
    initialize_parallel(tp, pp, device="cpu", seed=SEED)
    try:
        first_layout = tp == pp == 1
        teacher = ColocatedTeacher.from_config(
            TINY_GPT.config(tp, pp),
            TINY_GPT.layer_spec(),
            vocab_size=TINY_GPT.vocab_size,
            padded_vocab_size=TINY_GPT.padded_vocab_size(tp),
            max_sequence_length=TINY_GPT.max_sequence_length,
            topk=K,
            micro_batch_size=MICRO_BATCH,
            checkpoint_dir=None if first_layout else checkpoint_dir,
            **TINY_GPT.gpt_model_kwargs(),
        )
        if first_layout:
            teacher.save(checkpoint_dir)
        future = teacher.submit(sequences())
        return {
            "reference": plain_reference(teacher.model) if first_layout else None,
            "future_done": future.done(),
            "scores": future.result(),
            "logits": list(teacher.iter_logits(sequences())),
            "last_stage": parallel_state.is_pipeline_last_stage(),
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "requires_grad": [p.requires_grad for p in teacher.model.parameters()],
            "grads": [p.grad for p in teacher.model.parameters()],
            "training": teacher.model.training,
        }
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("teacher") / "checkpoint"


@pytest.fixture(scope="module")
def tp1(checkpoint_dir: Path) -> dict[str, Any]:
    # Megatron's checkpoint writer starts worker processes, which run_on_ranks' daemonic ranks may
    # not do; a single rank needs no process group peers, so a process-pool worker (not daemonic) runs it.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(score_on_rank, 1, 1, str(checkpoint_dir)).result(timeout=120)


@pytest.fixture(scope="module")
def reference(tp1: dict[str, Any]) -> dict[str, torch.Tensor]:
    return tp1["reference"]


LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "tp2-pp2": (2, 2)}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout_run(request: pytest.FixtureRequest, tp1: dict[str, Any], checkpoint_dir: Path) -> tuple[int, int, list]:
    tp, pp = LAYOUTS[request.param]
    return tp, pp, run_on_ranks(score_on_rank, tp * pp, args=(tp, pp, str(checkpoint_dir)), timeout_s=120)


def assert_scores_match(scores: Any, reference: dict[str, torch.Tensor]) -> None:
    valid = expected_valid()
    assert scores.topk_logprobs.shape == (len(LENGTHS), ROWS, K) and scores.k == K
    assert torch.equal(scores.valid, valid)
    assert scores.sequences == tuple(tuple(s) for s in sequences())
    assert scores.offsets is None
    torch.testing.assert_close(scores.topk_logprobs[valid], reference["topk_logprobs"][..., :K][valid],
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(scores.topk_ids[valid], reference["topk_ids"][valid])
    torch.testing.assert_close(scores.token_logprobs[valid], reference["token_logprobs"][valid],
                               rtol=1e-5, atol=1e-5)
    assert torch.all(scores.topk_logprobs[~valid] == -torch.inf)
    assert torch.all(scores.topk_ids[~valid] == 0) and torch.all(scores.token_logprobs[~valid] == 0)


def test_reference_top_k_are_far_apart(reference: dict[str, torch.Tensor]) -> None:
    """The premise of comparing ids exactly across layouts: no near-ties among the top K + 1."""
    gaps = -reference["topk_logprobs"].diff(dim=-1)[expected_valid()]
    assert gaps.min() > 1e-3, gaps.min()


def test_tp1_scores_equal_the_plain_computation(tp1: dict[str, Any], reference: dict[str, torch.Tensor]) -> None:
    assert tp1["future_done"], "colocated scoring is synchronous: submit returns a completed future"
    assert_scores_match(tp1["scores"], reference)
    assert torch.all(tp1["scores"].topk_ids < TINY_GPT.vocab_size), "padding ids are never selected"


def test_layouts_score_like_tp1_on_every_last_stage_rank(
    layout_run: tuple[int, int, list], reference: dict[str, torch.Tensor]
) -> None:
    tp, pp, per_rank = layout_run
    last = [r for r in per_rank if r["last_stage"]]
    assert len(last) == tp and sorted(r["tp_rank"] for r in last) == list(range(tp))
    for result in last:
        assert_scores_match(result["scores"], reference)
    for result in per_rank:
        if not result["last_stage"]:
            assert result["scores"] is None and result["future_done"]
            assert result["logits"] == [None] * 3


def test_nothing_requires_or_receives_a_gradient(tp1: dict[str, Any], layout_run: tuple[int, int, list]) -> None:
    for result in [tp1, *layout_run[2]]:
        assert result["requires_grad"] and not any(result["requires_grad"])
        assert all(grad is None for grad in result["grads"])
        assert not result["training"]
        if result["scores"] is not None:
            assert not result["scores"].topk_logprobs.requires_grad
            assert not any(logits.requires_grad for logits in result["logits"])


def test_full_logits_are_one_micro_batch_shard_at_a_time(
    tp1: dict[str, Any], layout_run: tuple[int, int, list], reference: dict[str, torch.Tensor]
) -> None:
    tp, _, per_rank = layout_run
    width = TINY_GPT.padded_vocab_size(tp) // tp
    for result in [tp1, *(r for r in per_rank if r["last_stage"])]:
        local = slice(result["tp_rank"] * width, (result["tp_rank"] + 1) * width) if result is not tp1 else slice(None)
        expected = reference["logits"][..., local].split(MICRO_BATCH)
        assert len(result["logits"]) == len(expected) == 3
        for logits, want in zip(result["logits"], expected):
            torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-4)  # logits of magnitude ~10
