"""The reference teacher server: a Hugging Face causal LM behind the vLLM and SGLang wire protocols.

``mopd serve-teacher --model DIR`` (or ``python -m megatron_mopd.teachers.server --model DIR``) serves
any local ``AutoModelForCausalLM`` directory (its tokenizer too when the directory has one) with the
subset of the two protocols that docs/design.md §5 reads, with the same numbers as running the model
in-process:

- vLLM: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` with ``prompt`` (token ids, a
  batch of them, or text), ``prompt_logprobs``, ``max_tokens``, ``temperature``, ``seed``, ``ignore_eos``.
- SGLang: ``POST /generate`` with ``input_ids`` (or ``text``), ``sampling_params`` (``max_new_tokens``,
  ``temperature``, ``sampling_seed``, ``ignore_eos``), ``return_logprob``, ``logprob_start_len``,
  ``top_logprobs_num``, ``return_text_in_logprobs``; ``GET /get_model_info``.

The prompts of one request go through one forward (right-padded: a real position never sees a pad,
so each prompt's logits are those of running it alone); log-probabilities are float32 log_softmax of
the logits, −inf sent as −9999.0 (as vLLM does; SGLang would send null). ``max_tokens`` > 0 continues
from the same forward with a KV cache, greedily when the temperature is 0 (< 1e-5, like vLLM), else
sampling the full distribution at that temperature with one generator per prompt seeded by ``seed``
(so a prompt's sample does not depend on its batch). Generation stops at an end-of-sequence id of the
generation config or the tokenizer unless ``ignore_eos``. Generated-token log-probabilities (SGLang's
``output_*_logprobs``) are those of the raw (τ = 1) distribution. Request options that would change
the result but are not implemented (``n``, ``top_p``, ``stop``, penalties, ``stream``, ...) are refused
with 400 rather than ignored.

One lock serializes the model; parsing, the response bodies and ``--delay-ms`` (latency added to each
scoring/generation request, before it takes the lock) run concurrently on a ``ThreadingHTTPServer``.
Requests asking for more than ``--max-logprobs`` top log-probabilities (both protocols) get 400.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional, Sequence
from urllib.parse import urlsplit

import orjson
import torch

log = logging.getLogger(__name__)

_NEG_INF_WIRE = -9999.0
_GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS: smaller temperatures are greedy
_ROWS_PER_CHUNK = 1024  # rows of float32 log_softmax held at once
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowedError",
                500: "InternalServerError"}
# Options whose other values would change the result; refused unless absent, null or one of these.
_NEUTRAL = {
    "n": (1,), "best_of": (1,), "stream": (False,), "echo": (False,), "logprobs": (), "suffix": (),
    "top_p": (1,), "top_k": (-1, 0), "min_p": (0,), "stop": ([], ""), "stop_token_ids": ([],),
    "presence_penalty": (0,), "frequency_penalty": (0,), "repetition_penalty": (1,), "min_tokens": (0,),
    "min_new_tokens": (0,), "logit_bias": ({},), "regex": (), "json_schema": (), "ebnf": (),
}


class RequestError(Exception):
    """A request the server refuses with HTTP ``status`` and ``message``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Rows:
    """Scores of m rows: the log-probability and 1-based vocabulary rank (ties ranked last, as vLLM) of
    each row's target token, and the row's K most probable ids with their log-probabilities."""

    logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]

    @staticmethod
    def empty() -> "_Rows":
        return _Rows([], [], [], [])

    def extend(self, other: "_Rows") -> None:
        self.logprobs += other.logprobs
        self.ranks += other.ranks
        self.top_ids += other.top_ids
        self.top_logprobs += other.top_logprobs


@dataclass
class _Result:
    """One prompt's result: ``prompt_rows`` row j scores prompt token j + 1 (None unless asked for),
    ``output`` the generated ids, ``output_rows`` row i scores ``output[i]`` (None unless asked for),
    ``stopped`` whether generation ended at an end-of-sequence id (else at the token limit)."""

    prompt_rows: Optional[_Rows]
    output: list[int]
    output_rows: Optional[_Rows]
    stopped: bool


def _score(logits: torch.Tensor, targets: torch.Tensor, k: int) -> _Rows:
    """``_Rows`` of ``logits`` [m, V] (any dtype; scored in float32) for the target ids [m]."""
    rows = _Rows.empty()
    for start in range(0, logits.shape[0], _ROWS_PER_CHUNK):
        logprobs = logits[start:start + _ROWS_PER_CHUNK].float().log_softmax(-1)
        target = logprobs.gather(-1, targets[start:start + _ROWS_PER_CHUNK, None])
        ranks = (logprobs >= target).sum(-1)
        top = logprobs.topk(k, -1)
        wire = [t.masked_fill(t == float("-inf"), _NEG_INF_WIRE) for t in (target[:, 0], top.values)]
        rows.extend(_Rows(wire[0].tolist(), ranks.tolist(), top.indices.tolist(), wire[1].tolist()))
    return rows


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (_is_int, "an integer"),
    "number": (lambda v: _is_int(v) or isinstance(v, float), "a number"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
}


def _option(body: dict, key: str, default: Any, kind: str) -> Any:
    """``body[key]`` (``default`` when absent or null), which must be a ``kind``: int, number or bool."""
    value = body.get(key)
    if value is None:
        return default
    check, article = _KINDS[kind]
    if not check(value):
        raise RequestError(f"'{key}' must be {article}, got {value!r}")
    return float(value) if kind == "number" else value


def _refuse_unsupported(body: dict) -> None:
    for key, neutral in _NEUTRAL.items():
        value = body.get(key)
        if value is not None and value not in neutral:
            raise RequestError(f"'{key}'={value!r} is not supported by this reference server")


class TeacherServer:
    """A Hugging Face causal LM served over HTTP with the vLLM and SGLang protocol subsets (module doc).

    The model loads and the socket binds on construction (``port=0`` picks a free port; ``url`` has
    the bound one). ``start()`` serves on a background thread, ``stop()`` ends it; the context manager
    does both. ``serve_forever()`` serves on the calling thread until SIGTERM or Ctrl-C (the CLI).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        max_logprobs: int = 20,
        served_model_name: Optional[str] = None,
        delay_ms: float = 0.0,
        dtype: str = "float32",
        device: str = "cpu",
    ) -> None:
        if max_logprobs < 0 or delay_ms < 0:
            raise ValueError(f"max_logprobs ({max_logprobs}) and delay_ms ({delay_ms}) must be ≥ 0")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise ValueError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
        self.model_name = served_model_name or str(model_dir)
        self.max_logprobs = max_logprobs
        self.delay_s = delay_ms / 1000
        self._model_dir = str(model_dir)
        self._device = torch.device(device)
        self._model, self._tokenizer = _load(self._model_dir, _DTYPES[dtype], self._device)
        config = self._model.config
        self.vocab_size: int = self._model.get_output_embeddings().weight.shape[0]
        self.max_model_len: Optional[int] = getattr(config, "max_position_embeddings", None)
        self._eos_ids = _eos_ids(self._model, self._tokenizer)
        self._texts: list[Optional[str]] = [None] * self.vocab_size
        if self._tokenizer is not None:  # vLLM's decoded_token: each id decoded alone
            known = min(len(self._tokenizer), self.vocab_size)
            self._texts[:known] = self._tokenizer.batch_decode([[i] for i in range(known)])
        self._routes: dict[tuple[str, str], Callable[[Any], tuple[Any, str]]] = {
            ("GET", "/health"): lambda _: (None, ""),
            ("GET", "/v1/models"): self._models,
            ("GET", "/get_model_info"): self._model_info,
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/generate"): self._generate,
        }
        self._lock = threading.Lock()  # the model
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer may fail when used by two threads at once
        self._http = ThreadingHTTPServer((host, port), _Handler)
        self._http.daemon_threads = True
        self._http.teacher = self  # type: ignore[attr-defined]
        self._thread: Optional[threading.Thread] = None
        self.host, self.port = host, self._http.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "TeacherServer":
        """Serve on a background thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._http.serve_forever, name="teacher-server", daemon=True)
            self._thread.start()
            log.info("serving %s as %r on %s", self._model_dir, self.model_name, self.url)
        return self

    def stop(self) -> None:
        """Stop serving (waits for the serving loop, not for requests in progress) and close the socket."""
        if self._thread is not None:
            self._http.shutdown()
            self._thread.join()
            self._thread = None
        self._http.server_close()

    def serve_forever(self) -> None:
        """Serve on the calling (main) thread until SIGTERM or KeyboardInterrupt, then close the socket."""

        def terminate(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, terminate)
        log.info("serving %s as %r on %s (max logprobs %d)", self._model_dir, self.model_name, self.url,
                 self.max_logprobs)
        try:
            self._http.serve_forever()
        except KeyboardInterrupt:
            log.info("shutting down")
        finally:
            signal.signal(signal.SIGTERM, previous)
            self._http.server_close()

    def __enter__(self) -> "TeacherServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- requests -------------------------------------------------------------------------------------

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, bytes, str]:
        """Answer one request: (HTTP status, response body, a summary for the log)."""
        sglang = path == "/generate"
        try:
            route = self._routes.get((method, path))
            if route is None:
                allowed = any(p == path for _, p in self._routes)
                raise RequestError(f"{method} {path} is not served", 405 if allowed else 404)
            request = None
            if method == "POST":
                try:
                    request = orjson.loads(body)
                except orjson.JSONDecodeError as error:
                    raise RequestError(f"the request body is not valid JSON: {error}") from None
                if not isinstance(request, dict):
                    raise RequestError(f"the request body must be a JSON object, got {type(request).__name__}")
                time.sleep(self.delay_s)
            payload, summary = route(request)
            return 200, b"" if payload is None else orjson.dumps(payload), summary
        except RequestError as error:
            status, message = error.status, str(error)
        except Exception as error:  # the model failed: report it, keep serving
            log.exception("%s %s failed", method, path)
            status, message = 500, f"{type(error).__name__}: {error}"
        if sglang:
            return status, orjson.dumps({"error": {"message": message}}), message
        error_body = {"object": "error", "message": message, "type": _ERROR_TYPES.get(status, "Error"),
                      "param": None, "code": status}
        return status, orjson.dumps(error_body), message

    def _models(self, _: Any) -> tuple[dict, str]:
        card = {"id": self.model_name, "object": "model", "created": int(time.time()), "owned_by": "vllm",
                "root": self._model_dir, "parent": None, "max_model_len": self.max_model_len}
        return {"object": "list", "data": [card]}, ""

    def _model_info(self, _: Any) -> tuple[dict, str]:
        return {"model_path": self._model_dir, "tokenizer_path": self._model_dir, "is_generation": True}, ""

    def _completions(self, body: dict) -> tuple[dict, str]:
        """vLLM ``/v1/completions``: ``choices[i].prompt_logprobs`` as vLLM writes them (module doc)."""
        _refuse_unsupported(body)
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(f"The model `{model}` does not exist.", 404)
        if "prompt" not in body:
            raise RequestError("'prompt' is required")
        prompts, _ = self._prompts(body["prompt"], "prompt")
        k = _option(body, "prompt_logprobs", None, "int")
        if k is not None and not 0 <= k <= self.max_logprobs:
            if k < 0:
                raise RequestError(f"'prompt_logprobs' must be ≥ 0, got {k}")
            raise RequestError(f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                               f"{self.max_logprobs}")
        max_new = _option(body, "max_tokens", 16, "int")
        results = self._run(prompts, k, max_new, _option(body, "temperature", 1.0, "number"),
                            _option(body, "seed", None, "int"), _option(body, "ignore_eos", False, "bool"), None)
        choices = [{
            "index": i, "text": self._decode(r.output), "logprobs": None,
            "finish_reason": "stop" if r.stopped else "length", "stop_reason": None,
            "prompt_logprobs": None if r.prompt_rows is None else self._vllm_prompt_logprobs(p, r.prompt_rows),
        } for i, (p, r) in enumerate(zip(prompts, results))]
        prompt_tokens, generated = sum(map(len, prompts)), sum(len(r.output) for r in results)
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + generated,
                 "completion_tokens": generated, "prompt_tokens_details": None}
        response = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                    "model": self.model_name, "choices": choices, "usage": usage}
        return response, f"{len(prompts)} prompts, {prompt_tokens} tokens, K={k}, {generated} generated"

    def _vllm_prompt_logprobs(self, prompt: list[int], rows: _Rows) -> list[Optional[dict]]:
        """One dict per prompt token after the first: the actual token (its true rank) then the top K."""
        texts, entries = self._texts, [None]
        for token, logprob, rank, top_ids, top_logprobs in zip(
                prompt[1:], rows.logprobs, rows.ranks, rows.top_ids, rows.top_logprobs):
            entry = {str(token): {"logprob": logprob, "rank": rank, "decoded_token": texts[token]}}
            for r, (i, v) in enumerate(zip(top_ids, top_logprobs), 1):
                entry[str(i)] = {"logprob": v, "rank": r, "decoded_token": texts[i]}
            entries.append(entry)
        return entries

    def _generate(self, body: dict) -> tuple[Any, str]:
        """SGLang ``/generate``: a list of results, or one result for one non-nested input."""
        _refuse_unsupported(body)
        if ("input_ids" in body) == ("text" in body):
            raise RequestError("exactly one of 'input_ids' and 'text' is required")
        key = "input_ids" if "input_ids" in body else "text"
        prompts, batched = self._prompts(body[key], key)
        sampling = body.get("sampling_params") or {}
        if not isinstance(sampling, dict):
            raise RequestError(f"'sampling_params' must be an object, got {sampling!r}")
        _refuse_unsupported(sampling)
        return_logprob = _option(body, "return_logprob", False, "bool")
        start = _option(body, "logprob_start_len", -1, "int")
        k = _option(body, "top_logprobs_num", 0, "int")
        if not 0 <= k <= self.max_logprobs:
            raise RequestError(f"'top_logprobs_num' must be between 0 and the server's max logprobs "
                               f"{self.max_logprobs}, got {k}")
        if start < -1:
            raise RequestError(f"'logprob_start_len' must be ≥ -1, got {start}")
        with_text = _option(body, "return_text_in_logprobs", False, "bool")
        max_new = _option(sampling, "max_new_tokens", 128, "int")
        results = self._run(prompts, k if return_logprob else None, max_new,
                            _option(sampling, "temperature", 1.0, "number"),
                            _option(sampling, "sampling_seed", None, "int"),
                            _option(sampling, "ignore_eos", False, "bool"), k if return_logprob else None)
        texts = self._texts if with_text else [None] * self.vocab_size
        out = []
        for prompt, r in zip(prompts, results):
            finish = {"type": "stop", "matched": r.output[-1]} if r.stopped else {"type": "length", "length": max_new}
            meta: dict[str, Any] = {"id": uuid.uuid4().hex, "finish_reason": finish, "prompt_tokens": len(prompt),
                                    "completion_tokens": len(r.output), "cached_tokens": 0}
            if return_logprob:
                assert r.prompt_rows is not None and r.output_rows is not None
                first = len(prompt) - 1 if start == -1 else min(start, len(prompt))
                meta["input_token_logprobs"], meta["input_top_logprobs"] = _sglang_logprobs(
                    prompt[first:], r.prompt_rows, first, texts)
                meta["output_token_logprobs"], meta["output_top_logprobs"] = _sglang_logprobs(
                    r.output, r.output_rows, None, texts)
            out.append({"text": self._decode(r.output), "output_ids": r.output, "meta_info": meta})
        prompt_tokens, generated = sum(map(len, prompts)), sum(len(r.output) for r in results)
        summary = f"{len(prompts)} prompts, {prompt_tokens} tokens, K={k if return_logprob else None}, " \
                  f"{generated} generated"
        return (out if batched else out[0]), summary

    def _prompts(self, value: Any, key: str) -> tuple[list[list[int]], bool]:
        """The token-id lists of a prompt field (text, texts, token ids or lists of them), checked, and
        whether the field was a batch."""
        if isinstance(value, str) or isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            if self._tokenizer is None:
                raise RequestError(f"the model directory has no tokenizer: send '{key}' as token ids")
            texts = [value] if isinstance(value, str) else value
            with self._tokenizer_lock:
                prompts, batched = [self._tokenizer(t)["input_ids"] for t in texts], isinstance(value, list)
        elif isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            prompts, batched = value, True
        elif isinstance(value, list):
            prompts, batched = [value], False
        else:
            raise RequestError(f"'{key}' must be text, a list of texts, a list of token ids or a list of such "
                               f"lists, got {type(value).__name__}")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise RequestError(f"'{key}' {i} is empty")
            bad = [t for t in prompt if not _is_int(t) or not 0 <= t < self.vocab_size]
            if bad:
                raise RequestError(f"'{key}' {i} holds {bad[0]!r}, not a token id in [0, {self.vocab_size})")
        return prompts, batched

    def _decode(self, ids: list[int]) -> str:
        if self._tokenizer is None or not ids:
            return ""
        with self._tokenizer_lock:
            return self._tokenizer.decode(ids, skip_special_tokens=True)

    # -- the model ------------------------------------------------------------------------------------

    def _run(self, prompts: list[list[int]], k: Optional[int], max_new: int, temperature: float,
             seed: Optional[int], ignore_eos: bool, output_k: Optional[int]) -> list[_Result]:
        """Score the prompts (top ``k`` per position; not when None) and generate ``max_new`` tokens each
        (scored with top ``output_k``; not when None), all in one batch."""
        if max_new < 0:
            raise RequestError(f"the number of tokens to generate must be ≥ 0, got {max_new}")
        if temperature < 0:
            raise RequestError(f"'temperature' must be ≥ 0, got {temperature}")
        if seed is not None and not -2**63 <= seed < 2**64:
            raise RequestError(f"the seed must be in [-2**63, 2**64), got {seed}")
        longest = max(map(len, prompts))
        if self.max_model_len is not None and longest + max_new > self.max_model_len:
            raise RequestError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                               f"requested {longest + max_new} tokens ({longest} in the messages, {max_new} in "
                               f"the completion). Please reduce the length of the messages or completion.")
        with self._lock:
            return self._forward(prompts, k, max_new, temperature, seed, ignore_eos, output_k)

    @torch.inference_mode()
    def _forward(self, prompts: list[list[int]], k: Optional[int], max_new: int, temperature: float,
                 seed: Optional[int], ignore_eos: bool, output_k: Optional[int]) -> list[_Result]:
        device, batch = self._device, len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        ids = torch.zeros(batch, int(lengths.max()), dtype=torch.long)
        for b, prompt in enumerate(prompts):
            ids[b, :len(prompt)] = torch.tensor(prompt)
        ids = ids.to(device)
        mask = (torch.arange(ids.shape[1], device=device) < lengths[:, None]).long()
        out = self._model(input_ids=ids, attention_mask=mask, use_cache=max_new > 1)
        results = [_Result(None if k is None else _score(out.logits[b, :len(p) - 1], ids[b, 1:len(p)], k), [],
                           None if output_k is None else _Rows.empty(), False) for b, p in enumerate(prompts)]
        if max_new == 0:
            return results
        logits = out.logits[torch.arange(batch, device=device), lengths - 1]
        generators = None
        if temperature >= _GREEDY_BELOW:
            generators = [torch.Generator(device) for _ in prompts]
            for generator in generators:
                if seed is None:
                    generator.seed()
                else:
                    generator.manual_seed(seed)
        cache, positions, live = out.past_key_values, lengths.clone(), list(range(batch))
        for step in range(max_new):
            if generators is None:
                tokens = logits.argmax(-1)
            else:
                probs = (logits.float() / temperature).softmax(-1)
                tokens = torch.cat([torch.multinomial(probs[b], 1, generator=generators[b]) for b in range(batch)])
            scored = None if output_k is None else _score(logits, tokens, output_k)
            chosen = tokens.tolist()
            for b in list(live):
                result, token = results[b], chosen[b]
                result.output.append(token)
                if scored is not None:
                    result.output_rows.extend(_Rows(scored.logprobs[b:b + 1], scored.ranks[b:b + 1],
                                                    scored.top_ids[b:b + 1], scored.top_logprobs[b:b + 1]))
                if token in self._eos_ids and not ignore_eos:
                    result.stopped = True
                    live.remove(b)
            if not live or step == max_new - 1:
                break
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=device)], 1)
            out = self._model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                              past_key_values=cache, use_cache=True)
            cache, positions, logits = out.past_key_values, positions + 1, out.logits[:, -1]
        return results


def _sglang_logprobs(tokens: list[int], rows: _Rows, first: Optional[int], texts: Sequence[Optional[str]]
                     ) -> tuple[list, list]:
    """SGLang's ``[logprob, id, text]`` per token and ``[[logprob, id, text] × K]`` per position. Prompt
    tokens from position ``first`` (row j - 1 scores position j; position 0 has null scores); output
    tokens (``first`` None) row i scores token i."""
    token_entries, top_entries = [], []
    for j, token in enumerate(tokens, 0 if first is None else first):
        row = j if first is None else j - 1
        if row < 0:
            token_entries.append([None, token, texts[token]])
            top_entries.append(None)
            continue
        token_entries.append([rows.logprobs[row], token, texts[token]])
        top_entries.append([[v, i, texts[i]] for i, v in zip(rows.top_ids[row], rows.top_logprobs[row])])
    return token_entries, top_entries


def _load(model_dir: str, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    """The model (eval mode, on ``device``) and the tokenizer (None when the directory has none)."""
    import transformers
    from packaging.version import Version
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(model_dir, **{dtype_key: dtype}).to(device).eval()
    has_tokenizer = any(os.path.isfile(os.path.join(model_dir, name)) for name in (
        "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))
    return model, AutoTokenizer.from_pretrained(model_dir) if has_tokenizer else None


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """End-of-sequence ids: the generation config's (an int or a list) and the tokenizer's."""
    config = getattr(model, "generation_config", None)
    found = getattr(config, "eos_token_id", None)
    ids = set([found] if _is_int(found) else found or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 (keep-alive) front of ``TeacherServer.handle``; one INFO log line per request."""

    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")

    def _answer(self, method: str) -> None:
        began = time.perf_counter()
        path = urlsplit(self.path).path
        length = self.headers.get("Content-Length", "0")
        if not length.isdigit() or "Transfer-Encoding" in self.headers:  # unreadable body: close after this
            status, summary, self.close_connection = 411, "a numeric Content-Length is required", True
            body = orjson.dumps({"object": "error", "message": summary, "type": "LengthRequiredError",
                                 "param": None, "code": 411})
        else:
            request = self.rfile.read(int(length))
            status, body, summary = self.server.teacher.handle(method, path, request)  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            log.warning("%s %s: the client went away before the response", method, path)
        log.info("%s %s %d %s(%d B in, %d B out, %.1f ms)", method, path, status, f"{summary} " if summary else "",
                 int(length) if length.isdigit() else 0, len(body), 1000 * (time.perf_counter() - began))

    def log_message(self, format: str, *args: Any) -> None:  # the INFO line above replaces the stderr line
        pass


HELP = "serve a Hugging Face causal LM as a teacher (vLLM /v1/completions and SGLang /generate subsets)"
DESCRIPTION = ("Serve a local Hugging Face causal LM directory over HTTP with the subsets of the vLLM and SGLang "
               "protocols that remote teachers use (prompt log-probabilities, top-K, generation), with the same "
               "numbers as running the model in-process. Stops on SIGTERM or Ctrl-C.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="Hugging Face model directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind, 0 for a free one (default 8000)")
    parser.add_argument(
        "--max-logprobs", type=int, default=20, metavar="K",
        help="largest prompt_logprobs / top_logprobs_num a request may ask for (default 20)",
    )
    parser.add_argument(
        "--served-model-name", metavar="NAME", help="model name in /v1/models and responses (default: --model)"
    )
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, metavar="MS",
        help="latency added to each scoring/generation request, for overlap tests (default 0)",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="(default float32)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="(default cpu)")


def run(args: argparse.Namespace) -> int:
    logging.getLogger("megatron_mopd.teachers.server").setLevel(logging.INFO)
    TeacherServer(
        args.model,
        args.host,
        args.port,
        max_logprobs=args.max_logprobs,
        served_model_name=args.served_model_name,
        delay_ms=args.delay_ms,
        dtype=args.dtype,
        device=args.device,
    ).serve_forever()
    return 0


if __name__ == "__main__":
    from megatron_mopd.cli import run_command

    sys.exit(run_command("serve-teacher", sys.argv[1:]))
