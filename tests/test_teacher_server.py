"""Specification: the reference teacher server (``mopd serve-teacher``) speaks the vLLM and SGLang
subsets of docs/design.md §5 and gives the numbers of running the model in-process.

The server runs as a real subprocess (``python -m megatron_mopd.teachers.server``) on the tiny random
Llama model; the client side is ``urllib`` + orjson, the reference is ``log_softmax(model(ids).logits)``
and ``model.generate`` of the same directory loaded here.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import orjson
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_mopd.demo.models import tiny_causal_lm_dir
from megatron_mopd.teachers.server import TeacherServer
from megatron_mopd.teachers.server_engine import score_rows
from megatron_mopd.teachers.server_process import teacher_server_process

MAX_LOGPROBS = 8
NAME = "tiny-teacher"
ATOL = 1e-5


@pytest.fixture(scope="module")
def model_dir():
    return tiny_causal_lm_dir()


@pytest.fixture(scope="module")
def reference(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def prompts(reference) -> list[list[int]]:
    """Prompts of different lengths; the last continues greedily, so its actual tokens are in the top K."""
    model, _ = reference
    g = torch.Generator().manual_seed(0)
    random = [torch.randint(1, 2000, (n,), generator=g).tolist() for n in (5, 17, 1, 2)]
    return random + [_greedy(model, random[0], 6)]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    flags = ("--max-logprobs", str(MAX_LOGPROBS), "--served-model-name", NAME)
    with teacher_server_process(model_dir, *flags, log_path=log_path) as running:
        yield running.url
    assert running.process.returncode == 0, running.log()  # SIGTERM ends it cleanly
    assert "POST /v1/completions 200" in running.log()  # one INFO line per request


def _request(url: str, path: str, data: Optional[bytes] = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _get(url: str, path: str) -> tuple[int, Any]:
    status, body = _request(url, path)
    return status, orjson.loads(body) if body else None


def _post(url: str, path: str, body: Any) -> tuple[int, Any]:
    status, answer = _request(url, path, body if isinstance(body, bytes) else orjson.dumps(body))
    return status, orjson.loads(answer)


def _logprobs(model, prompt: list[int]) -> torch.Tensor:
    """Row j - 1: the in-process distribution of token j of ``prompt``."""
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1)


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        return model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n)[0].tolist()


def _check_vllm(entries: list, prompt: list[int], reference, k: int) -> int:
    """``entries`` are vLLM prompt_logprobs of ``prompt``; returns how many actual tokens were in the top K."""
    model, tokenizer = reference
    logprobs = _logprobs(model, prompt)
    assert len(entries) == len(prompt) and entries[0] is None
    in_top = 0
    for j in range(1, len(prompt)):
        entry, row, actual = entries[j], logprobs[j - 1], prompt[j]
        top = row.topk(k)
        assert next(iter(entry)) == str(actual)  # vLLM writes the actual token first
        assert set(entry) == {str(i) for i in top.indices.tolist()} | {str(actual)}  # K or K + 1 entries
        for rank, (i, value) in enumerate(zip(top.indices.tolist(), top.values.tolist()), 1):
            assert entry[str(i)]["rank"] == rank
            assert entry[str(i)]["logprob"] == pytest.approx(value, abs=ATOL)
            assert entry[str(i)]["decoded_token"] == tokenizer.decode([i])
        assert entry[str(actual)]["logprob"] == pytest.approx(row[actual].item(), abs=ATOL)
        assert entry[str(actual)]["rank"] == int((row >= row[actual]).sum())  # vLLM's: ties rank last
        in_top += actual in top.indices.tolist()
    return in_top


def test_a_token_tied_with_others_takes_the_last_of_their_ranks_as_in_vllm() -> None:
    """vLLM's rank (``batched_count_greater_than`` in vllm/v1/sample/ops/logprobs.py, ``(x >= token).sum()``):
    the number of ids at least as probable as the token, itself included."""
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0],  # id 2 tied with ids 1 and 3, below id 0
                           [0.5, 0.5, 0.5, 0.5, 0.5],  # all tied
                           [3.0, 1.0, 1.0, 0.0, float("-inf")]])  # an impossible id ties with nothing
    rows = score_rows(logits, torch.tensor([2, 0, 4]), k=2)
    assert rows.ranks == [4, 5, 5]
    assert rows.logprobs[2] == float("-inf")  # kept: the wire protocol encodes it


def test_health_and_models(server) -> None:
    assert _request(server, "/health") == (200, b"")
    status, models = _get(server, "/v1/models")
    assert status == 200 and models["object"] == "list"
    assert [card["id"] for card in models["data"]] == [NAME]


def test_completions_prompt_logprobs_equal_in_process(server, reference, prompts) -> None:
    k = 5
    status, body = _post(server, "/v1/completions",
                         {"model": NAME, "prompt": prompts, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": k})
    assert status == 200
    assert body["object"] == "text_completion" and body["model"] == NAME and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == list(range(len(prompts)))
    assert all(c["logprobs"] is None and c["stop_reason"] is None for c in body["choices"])
    assert body["usage"]["prompt_tokens"] == sum(map(len, prompts))
    assert body["usage"]["completion_tokens"] == len(prompts)
    in_top = [_check_vllm(c["prompt_logprobs"], p, reference, k) for c, p in zip(body["choices"], prompts)]
    assert in_top[-1] >= 6 and in_top[0] < len(prompts[0]) - 1  # both the K and the K + 1 case occur


def test_a_text_prompt_is_tokenized(server, reference) -> None:
    _, tokenizer = reference
    text = "def f(x):\n    return x + 1"
    by_text = _post(server, "/v1/completions", {"prompt": text, "max_tokens": 0, "prompt_logprobs": 2})[1]
    ids = tokenizer(text)["input_ids"]
    by_ids = _post(server, "/v1/completions", {"prompt": ids, "max_tokens": 0, "prompt_logprobs": 2})[1]
    assert by_text["choices"][0]["prompt_logprobs"] == by_ids["choices"][0]["prompt_logprobs"]
    _check_vllm(by_text["choices"][0]["prompt_logprobs"], ids, reference, 2)


def test_too_many_logprobs_is_refused_like_vllm(server) -> None:
    status, body = _post(server, "/v1/completions", {"prompt": [[1, 2, 3]], "prompt_logprobs": MAX_LOGPROBS + 1})
    assert status == 400
    assert body == {"object": "error", "type": "BadRequestError", "param": None, "code": 400,
                    "message": f"Requested prompt logprobs of {MAX_LOGPROBS + 1}, which is greater than max "
                               f"allowed: {MAX_LOGPROBS}"}
    status, body = _post(server, "/generate", {"input_ids": [1, 2, 3], "return_logprob": True,
                                               "top_logprobs_num": MAX_LOGPROBS + 1})
    assert status == 400 and str(MAX_LOGPROBS) in body["error"]["message"]


@pytest.mark.parametrize("body, says", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    ({"prompt_logprobs": 2}, "'prompt' is required"),
    ({"prompt": [[]]}, "'prompt' 0 is empty"),
    ({"prompt": [[1, 2], [3, 2000]]}, "'prompt' 1 holds 2000, not a token id in [0, 2000)"),
    ({"prompt": [1, None]}, "holds None"),
    ({"prompt": {"ids": [1]}}, "'prompt' must be text"),
    ({"prompt": [1, 2], "max_tokens": -1}, "must be ≥ 0"),
    ({"prompt": [1, 2], "prompt_logprobs": "5"}, "'prompt_logprobs' must be an integer"),
    ({"prompt": [1, 2], "temperature": -0.5}, "'temperature' must be ≥ 0"),
    ({"prompt": [1, 2], "n": 2}, "'n'=2 is not supported"),
    ({"prompt": [1, 2], "max_tokens": 600}, "maximum context length is 512 tokens"),
])
def test_malformed_completion_requests_are_400(server, body, says) -> None:
    status, answer = _post(server, "/v1/completions", body)
    assert status == 400 and answer["object"] == "error" and answer["code"] == 400
    assert says in answer["message"]


def test_other_refusals(server) -> None:
    status, answer = _post(server, "/v1/completions", {"model": "other", "prompt": [1, 2]})
    assert status == 404 and answer["message"] == "The model `other` does not exist."
    assert _post(server, "/v1/chat/completions", {})[0] == 404
    status, answer = _post(server, "/generate", {"sampling_params": {"max_new_tokens": 0}})
    assert status == 400 and "'input_ids'" in answer["error"]["message"]
    status, answer = _post(server, "/generate", {"input_ids": [1, 2], "sampling_params": {"top_p": 0.9}})
    assert status == 400 and "'top_p'=0.9 is not supported" in answer["error"]["message"]


def test_greedy_generation_equals_in_process_generate(server, reference, prompts) -> None:
    model, tokenizer = reference
    expected = [_greedy(model, p, 6)[len(p):] for p in prompts]
    status, body = _post(server, "/v1/completions", {"prompt": prompts, "max_tokens": 6, "temperature": 0})
    assert status == 200
    eos = model.generation_config.eos_token_id
    for choice, tokens in zip(body["choices"], expected):
        assert choice["text"] == tokenizer.decode(tokens, skip_special_tokens=True)
        assert choice["finish_reason"] == ("stop" if tokens[-1] == eos else "length")
        assert choice["prompt_logprobs"] is None
    assert body["usage"]["completion_tokens"] == sum(map(len, expected))
    status, results = _post(server, "/generate", {"input_ids": prompts, "sampling_params": {
        "max_new_tokens": 6, "temperature": 0}})
    assert [r["output_ids"] for r in results] == expected


def test_sampling_is_seeded_per_prompt_and_follows_the_temperature(server, reference, prompts) -> None:
    model, _ = reference
    request = {"max_tokens": 5, "temperature": 0.8, "seed": 7}
    alone = _post(server, "/v1/completions", {"prompt": [prompts[1]], **request})[1]["choices"][0]["text"]
    batched = _post(server, "/v1/completions", {"prompt": [prompts[0], prompts[1]], **request})[1]
    assert batched["choices"][1]["text"] == alone
    cold = _post(server, "/generate", {"input_ids": prompts, "sampling_params": {
        "max_new_tokens": 5, "temperature": 1e-3, "sampling_seed": 1}})[1]  # sampled, but nearly one-hot
    assert [r["output_ids"] for r in cold] == [_greedy(model, p, 5)[len(p):] for p in prompts]


def test_sglang_generate_input_logprobs_equal_in_process(server, reference, prompts) -> None:
    model, tokenizer = reference
    k = 4
    request = {"input_ids": prompts, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
               "logprob_start_len": 0, "top_logprobs_num": k}
    status, results = _post(server, "/generate", request)
    assert status == 200 and len(results) == len(prompts)
    for result, prompt in zip(results, prompts):
        meta, logprobs = result["meta_info"], _logprobs(model, prompt)
        assert meta["prompt_tokens"] == len(prompt) and meta["completion_tokens"] == 0
        assert meta["finish_reason"] == {"type": "length", "length": 0}
        tokens, tops = meta["input_token_logprobs"], meta["input_top_logprobs"]
        assert [t[1] for t in tokens] == prompt and tokens[0] == [None, prompt[0], None] and tops[0] is None
        for j in range(1, len(prompt)):
            assert tokens[j][0] == pytest.approx(logprobs[j - 1, prompt[j]].item(), abs=ATOL)
            top = logprobs[j - 1].topk(k)
            assert [entry[1] for entry in tops[j]] == top.indices.tolist()
            assert [entry[0] for entry in tops[j]] == pytest.approx(top.values.tolist(), abs=ATOL)
        assert meta["output_token_logprobs"] == [] and meta["output_top_logprobs"] == []
    single = _post(server, "/generate", {**request, "input_ids": prompts[1], "return_text_in_logprobs": True})[1]
    assert isinstance(single, dict)
    assert [t[2] for t in single["meta_info"]["input_token_logprobs"]] == [tokenizer.decode([t]) for t in prompts[1]]
    assert single["meta_info"]["input_token_logprobs"][1:] == [
        [t[0], t[1], tokenizer.decode([t[1]])] for t in results[1]["meta_info"]["input_token_logprobs"][1:]]
    late = _post(server, "/generate", {**request, "input_ids": prompts[1], "logprob_start_len": 3})[1]["meta_info"]
    assert late["input_token_logprobs"] == results[1]["meta_info"]["input_token_logprobs"][3:]
    assert late["input_top_logprobs"] == results[1]["meta_info"]["input_top_logprobs"][3:]


def test_sglang_generated_token_logprobs_equal_in_process(server, reference, prompts) -> None:
    model, _ = reference
    k = 3
    status, results = _post(server, "/generate", {
        "input_ids": prompts, "sampling_params": {"max_new_tokens": 4, "temperature": 0}, "return_logprob": True,
        "top_logprobs_num": k})
    assert status == 200
    for result, prompt in zip(results, prompts):
        meta, sequence = result["meta_info"], _greedy(model, prompt, 4)
        logprobs = _logprobs(model, sequence)[len(prompt) - 1:]  # row i: generated token i
        assert [t[1] for t in meta["input_token_logprobs"]] == prompt[-1:]  # logprob_start_len -1: the last
        assert [t[1] for t in meta["output_token_logprobs"]] == result["output_ids"] == sequence[len(prompt):]
        for i, (token, top) in enumerate(zip(meta["output_token_logprobs"], meta["output_top_logprobs"])):
            assert token[0] == pytest.approx(logprobs[i, token[1]].item(), abs=ATOL)
            assert [entry[1] for entry in top] == logprobs[i].topk(k).indices.tolist()


def test_concurrent_requests_are_all_correct(server, reference, prompts) -> None:
    model, _ = reference
    jobs = [(prompts[i % len(prompts):] + prompts[:i % len(prompts)], 1 + i % MAX_LOGPROBS) for i in range(12)]

    def ask(job):
        batch, k = job
        return _post(server, "/v1/completions", {"prompt": batch, "max_tokens": 2, "temperature": 0,
                                                 "prompt_logprobs": k})

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, jobs))
    for (batch, k), (status, body) in zip(jobs, answers):
        assert status == 200
        for choice, prompt in zip(body["choices"], batch):
            _check_vllm(choice["prompt_logprobs"], prompt, reference, k)
            assert choice["text"] == reference[1].decode(_greedy(model, prompt, 2)[len(prompt):],
                                                         skip_special_tokens=True)


def test_in_process_server_is_a_context_manager(model_dir, reference, prompts) -> None:
    with TeacherServer(model_dir, port=0, max_logprobs=3, delay_ms=1) as teacher:
        assert teacher.url == f"http://127.0.0.1:{teacher.port}"
        assert _get(teacher.url, "/v1/models")[1]["data"][0]["id"] == str(model_dir)  # vLLM's default name
        status, body = _post(teacher.url, "/v1/completions", {"prompt": prompts[1], "max_tokens": 0,
                                                              "prompt_logprobs": 3})
        assert status == 200
        _check_vllm(body["choices"][0]["prompt_logprobs"], prompts[1], reference, 3)
    with pytest.raises(urllib.error.URLError):
        _request(teacher.url, "/health")
