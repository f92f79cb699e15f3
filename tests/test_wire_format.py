"""Specification: each wire protocol owns both directions of its scoring and generation formats.

What a protocol renders for scored positions (``WireProtocol.render_scores``, as the servers write
them) its own parser (``WireProtocol.parse``) reads back as the same ``ScoredRows``: the actual tokens'
log-probabilities, the top K ids in the server's order and their log-probabilities, with −inf kept
(vLLM writes it −9999.0, SGLang null), ties kept in the server's order, and positions whose support is
smaller than K padded with −inf entries as the server sent them.

What a protocol renders for a completion (``WireProtocol.render_generation``, answering its own
``generation_request``) its own ``parse_generation`` reads back as the same ids, log-probabilities
(−inf kept), finish reason and text.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import orjson
import pytest

from megatron_mopd.rollout.types import SamplingParams
from megatron_mopd.teachers.protocols import PROTOCOLS, Completion, ScoredPositions, ScoredRows, WireProtocol

VOCAB = 12
K = 5


def random_distributions(rng: np.random.Generator, rows: int) -> np.ndarray:
    """float32 ``[rows, VOCAB]`` log-probabilities with ties (values on a coarse grid) and −inf entries
    (some rows with fewer than K possible ids), each row with at least one finite entry."""
    logits = rng.integers(0, 4, (rows, VOCAB)).astype(np.float64)  # 4 levels: many ties
    support = rng.integers(1, VOCAB + 1, rows)
    support[::3] = rng.integers(1, K, len(support[::3]))  # every third row: fewer possible ids than K
    for row, size in enumerate(support):
        logits[row, rng.permutation(VOCAB)[size:]] = -np.inf
    logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    return logprobs.astype(np.float32)


def scores_of(prompt: Sequence[int], logprobs: np.ndarray) -> ScoredPositions:
    """What a server computes for ``prompt[1:]`` from ``logprobs`` (row j: the distribution of token
    j + 1): vLLM's ranks (ties last) and the K most probable ids, ties in id order."""
    actual = np.asarray(prompt[1:], dtype=np.int64)
    token_logprobs = logprobs[np.arange(actual.size), actual]
    top_ids = np.argsort(-logprobs, axis=1, kind="stable")[:, :K]
    return ScoredPositions(actual.tolist(), token_logprobs.tolist(),
                           (logprobs >= token_logprobs[:, None]).sum(axis=1).tolist(), top_ids.tolist(),
                           np.take_along_axis(logprobs, top_ids, axis=1).tolist())


def response(protocol: WireProtocol, prompts: list[list[int]], scores: list[ScoredPositions]) -> bytes:
    """The scoring response body: the protocol's fields in the envelope its servers put them in."""
    fields = [protocol.render_scores(prompt, scored) for prompt, scored in zip(prompts, scores)]
    body: Any = ({"choices": [{"index": i, **f} for i, f in enumerate(fields)]} if protocol.name == "vllm"
                 else [{"meta_info": f} for f in fields])
    return orjson.dumps(body)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_rendered_scores_parse_back_to_the_same_rows(name: str, seed: int) -> None:
    protocol, rng = PROTOCOLS[name], np.random.default_rng(seed)
    prompts, distributions = [], []
    for length in (1, 2, 9, 20):
        logprobs = random_distributions(rng, length - 1)
        # the actual tokens: possible ones, and at some positions an impossible one (probability 0)
        prompt = [int(rng.integers(VOCAB))] + [int(rng.choice(np.flatnonzero(np.isfinite(row))))
                                                if rng.random() < 0.8 else int(rng.integers(VOCAB))
                                                for row in logprobs]
        prompts.append(prompt)
        distributions.append(logprobs)
    scores = [scores_of(prompt, logprobs) for prompt, logprobs in zip(prompts, distributions)]

    parsed = protocol.parse(response(protocol, prompts, scores), prompts, K, vocab_size=VOCAB)

    expected = ScoredRows(np.array([v for s in scores for v in s.top_logprobs], np.float32).reshape(-1, K),
                          np.array([i for s in scores for i in s.top_ids], np.int64).reshape(-1, K),
                          np.array([v for s in scores for v in s.logprobs], np.float32))
    assert np.isneginf(expected.token_logprobs).any() and np.isneginf(expected.topk_logprobs).any()
    np.testing.assert_array_equal(parsed.topk_logprobs, expected.topk_logprobs)
    np.testing.assert_array_equal(parsed.topk_ids, expected.topk_ids)
    np.testing.assert_array_equal(parsed.token_logprobs, expected.token_logprobs)


def test_each_protocol_writes_minus_infinity_its_own_way() -> None:
    assert PROTOCOLS["vllm"].wire_logprob(float("-inf")) == -9999.0
    assert PROTOCOLS["sglang"].wire_logprob(float("-inf")) is None
    assert [p.wire_logprob(-0.25) for p in PROTOCOLS.values()] == [-0.25, -0.25]


def test_a_scoring_request_is_read_from_the_fields_the_client_writes() -> None:
    for protocol in PROTOCOLS.values():
        request = orjson.loads(protocol.request([[1, 2, 3], [4, 5]], 7, "teacher"))
        assert protocol.scoring_fields(request) == ([[1, 2, 3], [4, 5]], 7)


def generation_response(protocol: WireProtocol, prompt: list[int], completion: Completion) -> bytes:
    """The body a server answers ``generation_request`` with: vLLM one choice, with the token ids and the
    tokens named by id that the request asks for; SGLang one result."""
    if protocol.name == "vllm":
        fields = protocol.render_generation(prompt, completion, return_tokens_as_token_ids=True,
                                            return_token_ids=True)
        return orjson.dumps({"choices": [{"index": 0, **fields}]})
    return orjson.dumps(protocol.render_generation(prompt, completion))


@pytest.mark.parametrize("finish_reason", ["stop", "length"])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_a_rendered_completion_parses_back_to_the_same_ids_logprobs_and_finish(name: str, seed: int,
                                                                                finish_reason: str) -> None:
    protocol, rng = PROTOCOLS[name], np.random.default_rng(seed)
    stop_id, max_new_tokens = VOCAB - 1, 8
    prompt = rng.integers(VOCAB, size=4).tolist()
    length = int(rng.integers(1, max_new_tokens + 1)) if finish_reason == "stop" else max_new_tokens
    ids = rng.integers(VOCAB - 1, size=length).tolist()  # never the stop id, but where it ends a "stop"
    if finish_reason == "stop":
        ids[-1] = stop_id
    # the distributions the ids were sampled from (an id may be impossible there: −inf)
    distributions = random_distributions(rng, length)
    scores = scores_of([prompt[-1], *ids], distributions)
    completion = Completion(ids, "decoded text", finish_reason, stop_id if finish_reason == "stop" else None,
                            max_new_tokens, scores)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=(stop_id,))

    generated = protocol.parse_generation(generation_response(protocol, prompt, completion), prompt, sampling)

    assert generated.ids == tuple(ids) and generated.finish_reason == finish_reason
    assert generated.text == "decoded text"
    np.testing.assert_array_equal(generated.logprobs, np.array(scores.logprobs, np.float32))


def test_an_impossible_sampled_token_reads_back_as_minus_infinity() -> None:
    scores = ScoredPositions([3, 7], [-0.5, float("-inf")], [1, VOCAB], [[3], [2]], [[-0.5], [-0.1]])
    completion = Completion([3, 7], "", "length", None, 2, scores)
    for protocol in PROTOCOLS.values():
        body = generation_response(protocol, [1, 2], completion)
        generated = protocol.parse_generation(body, [1, 2], SamplingParams(max_new_tokens=2))
        assert generated.logprobs.tolist() == [-0.5, float("-inf")]
