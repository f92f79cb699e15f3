"""Specification: ``RemoteTeacher`` reads top-K prompt log-probabilities from vLLM and SGLang servers
(DESIGN.md §5) exactly, in batched requests, through retries and load balancing, and fails loudly
(naming server, request, sequence and position) whenever a response does not match its request.

Servers are ``megatron_mopd.testing.canned_server.CannedServer`` (real HTTP on 127.0.0.1, bodies in
the real formats from a deterministic bigram model, scripted faults), the recorded-format bodies of
``tests/fixtures/``, and, at the end, the reference server subprocess serving a tiny HF model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

from megatron_mopd.crosstok import align_offsets
from megatron_mopd.teachers import (
    RemoteTeacher,
    TeacherConfigError,
    TeacherLogprobs,
    TeacherRequestError,
    TeacherResponseError,
)
from megatron_mopd.teachers.protocols import get_protocol
from megatron_mopd.testing.canned_server import CannedServer, simulated_training_loop

FIXTURES = Path(__file__).parent / "fixtures"
PROTOCOLS = ["vllm", "sglang"]
NEG_INF = -np.inf
FAST = dict(backoff_s=0.01, timeout_s=10.0)

# What both recorded bodies say (tests/fixtures/README.md): rows of prompt 0 (3) then prompt 1 (2).
RECORDED_IDS = [[11, 0, 1879], [358, 1052, 3838], [0, 13, 151643], [1079, 2776, 614], [537, 1588, 2087]]
RECORDED_LOGPROBS = [
    [np.log(0.5), np.log(0.25), np.log(0.125)],
    [-0.5, -1.75, -2.25],
    [np.log(0.75), np.log(0.25), NEG_INF],  # vLLM -9999.0 / SGLang null
    [np.log(0.9), -2.75, -4.0],
    [-0.5, -1.5, -2.0],
]
RECORDED_TOKEN_LOGPROBS = [np.log(0.5), -3.5, np.log(0.25), np.log(0.9), NEG_INF]


def recorded(protocol: str) -> tuple[bytes, list[list[int]], int]:
    name = {"vllm": "vllm_completions_prompt_logprobs.json", "sglang": "sglang_generate_logprobs.json"}[protocol]
    request = json.loads((FIXTURES / "teacher_request.json").read_text())
    return (FIXTURES / name).read_bytes(), request["prompts"], request["topk"]


def expected_scores(server: CannedServer, sequences: list[list[int]], k: int) -> TeacherLogprobs:
    """What a correct client returns for ``sequences``, from the canned server's model directly."""
    rows = max(len(s) for s in sequences) - 1
    topk_logprobs = torch.full((len(sequences), rows, k), NEG_INF)
    topk_ids = torch.zeros((len(sequences), rows, k), dtype=torch.int64)
    token_logprobs = torch.full((len(sequences), rows), NEG_INF)
    valid = torch.zeros((len(sequences), rows), dtype=torch.bool)
    for b, tokens in enumerate(sequences):
        if len(tokens) < 2:
            continue
        values, ids = server.model.topk(tokens, k)
        n = len(tokens) - 1
        topk_logprobs[b, :n], topk_ids[b, :n] = torch.from_numpy(values), torch.from_numpy(ids)
        token_logprobs[b, :n] = torch.from_numpy(server.model.logprobs(tokens)[np.arange(n), tokens[1:]])
        valid[b, :n] = True
    return TeacherLogprobs(topk_logprobs, topk_ids, token_logprobs, valid, tuple(map(tuple, sequences)))


def assert_same(actual: TeacherLogprobs, expected: TeacherLogprobs) -> None:
    assert actual.sequences == expected.sequences
    for name in ("topk_logprobs", "topk_ids", "token_logprobs", "valid"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), rtol=0, atol=0, msg=name)


def random_sequences(count: int, vocab: int, seed: int, lengths=(1, 40)) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(*lengths, endpoint=True)).tolist() for _ in range(count)]


def greedy(server: CannedServer, start: int, length: int) -> list[int]:
    """A sequence whose every actual token is the most probable one (vLLM sends K entries, not K+1)."""
    tokens = [start]
    while len(tokens) < length:
        tokens.append(int(np.argmax(server.model.table[tokens[-1]])))
    return tokens


# ---- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_recorded_bodies_parse_exactly(protocol):
    """Null first entries, −9999 / null → −inf, K+1 entries with the actual token, decoded_token null."""
    body, prompts, k = recorded(protocol)
    rows = get_protocol(protocol).parse(body, prompts, k)
    np.testing.assert_array_equal(rows.topk_ids, RECORDED_IDS)
    np.testing.assert_array_equal(rows.topk_logprobs, np.float32(RECORDED_LOGPROBS))
    np.testing.assert_array_equal(rows.token_logprobs, np.float32(RECORDED_TOKEN_LOGPROBS))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_recorded_bodies_through_http(protocol):
    """A replayed body becomes a [B, T-1, K] TeacherLogprobs; rows past a sequence's end are invalid."""
    body, prompts, k = recorded(protocol)
    with CannedServer() as server, RemoteTeacher(server.url, protocol, topk=k, **FAST) as teacher:
        server.replay(body)
        out = teacher.score(prompts)
    assert out.topk_logprobs.shape == (2, 3, 3) and out.sequences == tuple(map(tuple, prompts))
    assert out.valid.tolist() == [[True, True, True], [True, True, False]]
    assert out.topk_ids[0].tolist() == RECORDED_IDS[:3] and out.topk_ids[1, :2].tolist() == RECORDED_IDS[3:]
    assert torch.equal(out.topk_logprobs[1, :2], torch.tensor(RECORDED_LOGPROBS[3:], dtype=torch.float32))
    assert out.token_logprobs[1].tolist() == [np.float32(np.log(0.9)), NEG_INF, NEG_INF]
    assert torch.all(out.topk_logprobs[1, 2] == NEG_INF) and torch.all(out.topk_ids[1, 2] == 0)


def test_vllm_choices_are_matched_by_index():
    body, prompts, k = recorded("vllm")
    doc = orjson.loads(body)
    doc["choices"].reverse()
    rows = get_protocol("vllm").parse(orjson.dumps(doc), prompts, k)
    np.testing.assert_array_equal(rows.topk_ids, RECORDED_IDS)


# ---- batching and balancing --------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_many_ragged_sequences_split_into_requests(protocol):
    """Exact scores for ragged sequences (length 1 included, impossible tokens → −inf, greedy runs
    with the actual token inside the top K), split by sequence and token limits."""
    with CannedServer() as server:
        sequences = random_sequences(23, server.model.vocab_size, seed=1) + [greedy(server, 7, 12), [3]]
        sequences[0][1:3] = [server.model.vocab_size - 1, 5]  # probability 0 under the model
        with RemoteTeacher(server.url, protocol, topk=6, max_sequences_per_request=4,
                           max_tokens_per_request=60, **FAST) as teacher:
            probes = server.scoring_requests
            out = teacher.score(sequences)
        log = server.scoring_log[probes:]
    assert_same(out, expected_scores(server, sequences, 6))
    assert out.token_logprobs[0, 0] == NEG_INF
    scored = [s for s in sequences if len(s) >= 2]
    assert sum(n for n, _ in log) == len(scored) and sum(t for _, t in log) == sum(map(len, scored))
    assert all(n <= 4 and (t <= 60 or n == 1) for n, t in log) and len(log) >= len(scored) // 4 + 1


def test_empty_and_trivial_batches():
    with CannedServer() as server, RemoteTeacher(server.url, "vllm", topk=3, **FAST) as teacher:
        empty, single = teacher.score([]), teacher.score([[5]])
        assert server.scoring_requests == 1  # the start-up probe only
        as_tensor, as_list = teacher.score([torch.tensor([4, 2, 9])]), teacher.score([[4, 2, 9]])
    assert empty.topk_logprobs.shape == (0, 0, 3) and single.topk_logprobs.shape == (1, 0, 3)
    assert_same(as_tensor, as_list)
    with pytest.raises(ValueError, match="negative token id"):
        teacher.submit([[1, -100, 2]])
    with pytest.raises(ValueError, match="http://host:port"):
        RemoteTeacher("localhost:8000")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_load_balancing_over_two_servers(protocol):
    with CannedServer() as a, CannedServer() as b:
        sequences = random_sequences(12, 256, seed=2, lengths=(2, 20))
        with RemoteTeacher([a.url, b.url], protocol, topk=4, max_sequences_per_request=1,
                           max_in_flight_per_server=2, **FAST) as teacher:
            out = teacher.score(sequences)
        assert_same(out, expected_scores(a, sequences, 4))
        served = [len(a.scoring_log) - 1, len(b.scoring_log) - 1]  # minus each one's start-up probe
    assert sum(served) == 12 and min(served) >= 3, served


def test_server_failing_health_is_left_out():
    with CannedServer() as good, CannedServer() as bad:
        bad.healthy = False
        with RemoteTeacher([bad.url, good.url], "vllm", topk=4, max_sequences_per_request=1, **FAST) as teacher:
            assert teacher.healthy_urls == [good.url]
            sequences = random_sequences(6, 256, seed=3, lengths=(2, 10))
            assert_same(teacher.score(sequences), expected_scores(good, sequences, 4))
        assert bad.scoring_requests == 0 and bad.requests["/health"] == 1 and good.scoring_requests == 7
        good.healthy = False
        with pytest.raises(TeacherRequestError, match=r"no teacher server is healthy: .*/health: HTTP 503"):
            RemoteTeacher([bad.url, good.url], "vllm", topk=4, **FAST)


def test_model_name_is_discovered():
    with CannedServer(model_name="Qwen/Qwen2.5-7B") as server:
        with RemoteTeacher(server.url, "vllm", topk=2, **FAST) as teacher:
            assert teacher.model == "Qwen/Qwen2.5-7B"
        with RemoteTeacher(server.url, "vllm", topk=2, model="given", **FAST) as teacher:
            assert teacher.model == "given" and server.requests["/v1/models"] == 1


# ---- faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("fault", ["http_503", "http_429", "drop_connection"])
def test_transient_failures_are_retried(protocol, fault):
    with CannedServer() as server, RemoteTeacher(server.url, protocol, topk=4, retries=3, **FAST) as teacher:
        sequences = random_sequences(5, 256, seed=4, lengths=(2, 15))
        server.inject(fault, times=2)
        assert_same(teacher.score(sequences), expected_scores(server, sequences, 4))
        assert server.scoring_requests == 1 + 3  # the probe, two failures, the success


def test_closed_keep_alive_connection_is_replaced_without_using_a_retry():
    with CannedServer() as server, RemoteTeacher(server.url, "vllm", topk=4, retries=0, **FAST) as teacher:
        sequences = [[1, 2, 3, 4]]
        first = teacher.score(sequences)  # opens the worker's keep-alive connection
        server.inject("drop_connection")  # the server closes it (as after an idle timeout)
        assert_same(teacher.score(sequences), first)
        assert server.scoring_requests == 1 + 3


def test_retries_exhausted_error_names_server_request_attempts_and_cause():
    with CannedServer() as server, RemoteTeacher(server.url, "vllm", topk=4, retries=2, **FAST) as teacher:
        server.inject("http_503", times=3)
        with pytest.raises(TeacherRequestError, match=rf"a request of 2 sequences / 7 tokens to /v1/completions "
                                                      rf"failed after 3 attempts: attempt 1 at {server.url}: "
                                                      rf"HTTP 503: .*scripted HTTP 503.*attempt 3"):
            teacher.score([[1, 2, 3], [4, 5, 6, 7]])


def test_retry_moves_to_the_other_server():
    with CannedServer() as flaky, CannedServer() as steady:
        with RemoteTeacher([flaky.url, steady.url], "sglang", topk=4, retries=1, max_sequences_per_request=1,
                           **FAST) as teacher:
            flaky.inject("http_503", times=100)
            sequences = random_sequences(4, 256, seed=5, lengths=(2, 12))
            assert_same(teacher.score(sequences), expected_scores(steady, sequences, 4))
        assert len(steady.scoring_log) - 1 == 4


def test_client_errors_are_not_retried():
    with CannedServer() as server, RemoteTeacher(server.url, "vllm", topk=4, retries=3, **FAST) as teacher:
        server.inject("http_400")
        with pytest.raises(TeacherRequestError, match=r"/v1/completions refused a request of 1 sequences / 3 "
                                                      r"tokens: HTTP 400: .*not retried"):
            teacher.score([[1, 2, 3]])
        assert server.scoring_requests == 2


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_hanging_server_times_out_with_a_clear_error(protocol):
    with CannedServer(hang_s=10.0) as server:
        with RemoteTeacher(server.url, protocol, topk=4, retries=1, backoff_s=0.01, timeout_s=0.3) as teacher:
            server.inject("hang", times=2)
            with pytest.raises(TeacherRequestError, match=rf"1 sequences / 4 tokens .* failed after 2 attempts: "
                                                          rf"attempt 1 at {server.url}: timed out.*attempt 2"):
                teacher.score([[1, 2, 3, 4]])


DEFECTS = {
    # fault: (vLLM message, SGLang message); the fault hits the request's last sequence (index 2)
    "malformed_json": (r"malformed JSON \(.*\); \d+ bytes starting '\{\"id\":\"cmpl-",
                       r"malformed JSON \(.*\); \d+ bytes starting '\[\{\"text\""),
    "missing_position": (r"sequence 2 \(item 2 of the request\), token position 5: the entry is missing \(null\)",
                         r"sequence 2 \(item 2 of the request\), token position 5: the input_top_logprobs entry "
                         r"is missing \(null\)"),
    "wrong_length": (r"sequence 2 \(item 2 of the request\): wrong length: 10 prompt_logprobs entries for 11",
                     r"sequence 2 \(item 2 of the request\): wrong length: 10 input_top_logprobs entries for 11"),
    "wrong_ids": (r"sequence 2 \(item 2 of the request\), token position {p}: the actual token {t} is not among "
                  r"the 4 returned entries",
                  r"sequence 2 \(item 2 of the request\), token position {p}: input_token_logprobs has token id "
                  r"\d+ where {t} was sent"),
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("fault", list(DEFECTS))
def test_defective_responses_are_errors_not_padding(protocol, fault):
    with CannedServer() as server, RemoteTeacher(server.url, protocol, topk=4, retries=3, **FAST) as teacher:
        sequences = random_sequences(2, 256, seed=6, lengths=(3, 8)) + [greedy(server, 9, 4)]
        sequences[2] += random_sequences(1, 252, seed=7, lengths=(7, 7))[0]  # then leaves the top K
        top_ids = server.model.topk(sequences[2], 4)[1]
        row = next(r for r in range(10) if sequences[2][r + 1] not in top_ids[r])
        message = DEFECTS[fault][PROTOCOLS.index(protocol)].replace("{p}", str(row + 1))
        message = message.replace("{t}", str(sequences[2][row + 1]))
        server.inject(fault)
        with pytest.raises(TeacherResponseError, match=rf"^{server.url}{teacher.protocol.path}: bad response to a "
                                                       rf"request of 3 sequences / \d+ tokens: {message}"):
            teacher.score(sequences)
        assert server.scoring_requests == 2  # not retried


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_topk_above_the_servers_limit_fails_at_start_with_the_fix(protocol):
    with CannedServer(max_logprobs=4) as server:
        fix = (r"rejects top-8 log-probabilities \(HTTP 400: .*greater than max allowed: 4.*\): start vLLM with "
               r"--max-logprobs >= 8, or lower topk" if protocol == "vllm" else
               r"does not return top-8 log-probabilities \(4 input_top_logprobs entries; expected 8\): lower topk")
        with pytest.raises(TeacherConfigError, match=fix):
            RemoteTeacher(server.url, protocol, topk=8, **FAST)
        with RemoteTeacher(server.url, protocol, topk=4, **FAST):
            pass


# ---- text mode (cross-tokenizer teachers) ------------------------------------------------------


def test_text_mode_returns_teacher_ids_and_offsets():
    from megatron_mopd.testing.tokenizers import byte_level_bpe, sentencepiece_bpe

    teacher_tokenizer, student_tokenizer = sentencepiece_bpe(), byte_level_bpe()
    texts = ["He said 你好吗 and 12345 + 678 = 13023.", "def f(x):\n    return x  # twice", "Hi"]
    with CannedServer(vocab_size=len(teacher_tokenizer)) as server:
        with RemoteTeacher(server.url, "sglang", topk=5, tokenizer=teacher_tokenizer, **FAST) as teacher:
            out = teacher.score_texts(texts)
        with RemoteTeacher(server.url, "sglang", topk=5, **FAST) as teacher:
            with pytest.raises(ValueError, match="submit_texts needs RemoteTeacher"):
                teacher.submit_texts(texts)
    encoded = teacher_tokenizer(texts, return_offsets_mapping=True)
    assert out.sequences == tuple(map(tuple, encoded["input_ids"]))
    assert_same(out, expected_scores(server, [list(s) for s in out.sequences], 5))
    for text, ids, offsets, expected in zip(texts, out.sequences, out.offsets, encoded["offset_mapping"]):
        assert offsets.shape == (len(ids), 2) and offsets.tolist() == [list(o) for o in expected]
        student = student_tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        assert align_offsets(student, offsets, text, text).num_chunks > 0


# ---- overlap -----------------------------------------------------------------------------------


def test_submit_early_overlaps_teacher_latency_with_student_compute():
    """Same results either way; prints the waiting fraction of a step (no timing assertion)."""
    weights = torch.randn(256, 256)

    def work(iterations: int) -> None:  # real CPU work
        x = torch.randn(256, 256)
        for _ in range(iterations):
            x = torch.tanh(x @ weights)

    began = time.perf_counter()
    work(20)
    iterations = max(1, round(20 * 0.1 / (time.perf_counter() - began)))  # sized to ~100 ms a step

    def student_step() -> None:
        work(iterations)

    with CannedServer(latency_s=0.15) as server:
        micro_batches = [random_sequences(4, 256, seed=10 + i, lengths=(16, 64)) for i in range(4)]
        with RemoteTeacher(server.url, "vllm", topk=8, max_in_flight_per_server=4, **FAST) as teacher:
            blocking = simulated_training_loop(teacher, micro_batches, student_step, submit_early=False)
            early = simulated_training_loop(teacher, micro_batches, student_step, submit_early=True)
    for a, b in zip(blocking.results, early.results):
        assert_same(a, b)
    print(f"\nwaiting fraction of a step: blocking {blocking.waiting_fraction:.0%} "
          f"({blocking.waited_s:.2f}/{blocking.total_s:.2f} s), submit-early {early.waiting_fraction:.0%} "
          f"({early.waited_s:.2f}/{early.total_s:.2f} s)")


# ---- against the reference server (a real HF model) --------------------------------------------

@pytest.fixture(scope="module")
def reference_server(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from megatron_mopd.testing.models import tiny_causal_lm_dir
    from megatron_mopd.testing.server_process import teacher_server_process

    model_dir = tiny_causal_lm_dir()
    log_path = tmp_path_factory.mktemp("reference_server") / "server.log"
    with teacher_server_process(model_dir, "--max-logprobs", "8", log_path=log_path) as running:
        yield running, AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_reference_server_matches_the_model_in_process(reference_server, protocol):
    server, model = reference_server
    url = server.url
    teacher = RemoteTeacher(url, protocol, topk=8, max_sequences_per_request=2, **FAST)
    sequences = random_sequences(5, 2000, seed=11, lengths=(2, 24))
    with teacher:
        out = teacher.score(sequences)
    assert out.topk_logprobs.shape == (5, max(map(len, sequences)) - 1, 8)
    with torch.no_grad():
        for b, tokens in enumerate(sequences):
            logprobs = model(torch.tensor([tokens])).logits[0, :-1].float().log_softmax(-1)
            top = logprobs.topk(8, dim=-1)
            n = len(tokens) - 1
            assert out.valid[b].tolist() == [True] * n + [False] * (out.valid.shape[1] - n)
            torch.testing.assert_close(out.topk_logprobs[b, :n], top.values, rtol=0, atol=1e-5)
            assert torch.equal(out.topk_ids[b, :n], top.indices)
            torch.testing.assert_close(out.token_logprobs[b, :n], logprobs[torch.arange(n), tokens[1:]],
                                       rtol=0, atol=1e-5)
    fix = "start vLLM with --max-logprobs >= 9" if protocol == "vllm" else "lower topk"
    with pytest.raises(TeacherConfigError, match=rf"rejects top-9 log-probabilities \(HTTP 400: .*\): {fix}"):
        RemoteTeacher(url, protocol, topk=9, **FAST)
