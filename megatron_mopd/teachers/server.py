"""The reference teacher server: a Hugging Face causal LM behind the vLLM and SGLang wire protocols.

``mopd serve-teacher --model DIR`` (or ``python -m megatron_mopd.teachers.server --model DIR``) serves
any local ``AutoModelForCausalLM`` directory (its tokenizer too when the directory has one) with the
subset of the two protocols that docs/design.md §5 reads, with the same numbers as running the model
in-process:

- vLLM: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` with ``prompt`` (token ids, a
  batch of them, or text), ``prompt_logprobs``, ``logprobs``, ``max_tokens``, ``temperature``, ``top_p``,
  ``top_k``, ``seed``, ``stop_token_ids``, ``ignore_eos``, ``return_token_ids``,
  ``return_tokens_as_token_ids``; the development-mode endpoints a trainer syncs weights with:
  ``POST /collective_rpc {"method": "reload_weights"}`` (reload the served directory, or
  ``kwargs.weights_path``), ``POST /reset_prefix_cache`` and ``GET /server_info`` (the JSON form:
  ``vllm_config.model_config`` with ``model`` and ``logprobs_mode``). They are always served here; vLLM
  serves them only with ``VLLM_SERVER_DEV_MODE=1``.
- SGLang: ``POST /generate`` with ``input_ids`` (or ``text``), ``sampling_params`` (``max_new_tokens``,
  ``temperature``, ``top_k``, ``sampling_seed``, ``stop_token_ids``, ``ignore_eos``), ``return_logprob``,
  ``logprob_start_len``, ``top_logprobs_num``, ``return_text_in_logprobs``; ``GET /get_model_info``;
  ``POST /update_weights_from_disk {"model_path": DIR}`` (answered as SGLang does: ``success``,
  ``message``, ``num_paused_requests``; 400 with ``success: false`` when the directory cannot be loaded).

The model runs in ``teachers.server_engine`` (one forward per request, scoring, sampling, weight
reloads); this module is its HTTP front: routing, the protocols' request options, JSON errors, the
response envelopes (each prompt's scores and completion are rendered by ``teachers.protocols``, so −inf
is −9999.0 for vLLM and null for SGLang, as the real servers write it) and the limits below. Each
prompt token's ``rank`` is vLLM's: the number of vocabulary ids at least as probable, so tied tokens
take the last of their ranks.
Generation stops after an end-of-sequence id of the generation config or the tokenizer, or after a
``stop_token_ids`` id (vLLM: ``finish_reason`` "stop", ``stop_reason`` the id; EOS gives
``stop_reason`` null). ``ignore_eos`` drops the end-of-sequence ids (vLLM; SGLang drops the
``stop_token_ids`` too, as SGLang does).

Generated-token log-probabilities are what the real servers return. vLLM (``choices[i].logprobs``:
``tokens``, ``token_logprobs``, ``top_logprobs`` with the sampled token first, then the top
``logprobs``, keyed by token text, and ``text_offset``, cumulative token-text lengths): per
``--logprobs-mode`` as vLLM's option of that name, ``raw_logprobs`` (vLLM's default: log_softmax of the
logits, before temperature and truncation) or ``processed_logprobs`` (after temperature and top-k/top-p,
truncated ids −9999.0); in greedy requests both are those of the raw logits.
``return_tokens_as_token_ids`` writes each token as ``token_id:<id>``; ``return_token_ids`` adds
``token_ids`` and ``prompt_token_ids`` to every choice (else null). SGLang (``output_*_logprobs``):
log_softmax(logits / temperature), before truncation (SGLang's default; raw logits when greedy).
Request options that would change the result but are not implemented (``n``, ``stop``, penalties,
``stream``, SGLang's ``top_p``, ...) are refused with 400 rather than ignored.

One lock serializes the model; parsing, the response bodies and ``--delay-ms`` (latency added to each
scoring/generation request, before it takes the lock) run concurrently on a ``ThreadingHTTPServer``
with a listen backlog of ``LISTEN_BACKLOG`` (bursts of hundreds of concurrent requests queue, none is
reset). Requests asking for more than ``--max-logprobs`` top log-probabilities, or more than the
vocabulary, get 400 (both protocols), as do requests whose response would exceed ``--max-response-mb``
(refused before the model runs when the log-probabilities alone would, else once rendered).
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

import orjson

from megatron_mopd.teachers.protocols import Completion, SGLangProtocol, VLLMProtocol
from megatron_mopd.teachers.server_engine import DTYPES, RequestError, Result, Sampling, TeacherEngine

log = logging.getLogger(__name__)

_VLLM, _SGLANG = VLLMProtocol(), SGLangProtocol()
_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowedError",
                500: "InternalServerError"}
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")  # vLLM's --logprobs-mode values served here
_RELOAD_METHOD = "reload_weights"
_BODILESS = frozenset({"/reset_prefix_cache"})  # POST endpoints vLLM calls without a body
LISTEN_BACKLOG = 1024  # pending connections the socket queues (the kernel caps it at net.core.somaxconn)
DEFAULT_MAX_RESPONSE_MB = 256.0
# Bytes of JSON per scored entry at the least (vLLM: {"id": {"logprob": x, "rank": r, "decoded_token": t}}):
# a request whose entries alone would pass the response cap is refused before the model runs.
_MIN_ENTRY_BYTES = 40
# Options whose other values would change the result; refused unless absent, null or one of these.
_NEUTRAL = {
    "n": (1,), "best_of": (1,), "stream": (False,), "echo": (False,), "suffix": (), "min_p": (0,),
    "stop": ([], ""), "presence_penalty": (0,), "frequency_penalty": (0,), "repetition_penalty": (1,),
    "min_tokens": (0,), "min_new_tokens": (0,), "logit_bias": ({},), "regex": (), "json_schema": (), "ebnf": (),
}
_SGLANG_NEUTRAL = {**_NEUTRAL, "top_p": (1,), "logprobs": ()}


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


def _refuse_unsupported(body: dict, neutral_values: dict[str, tuple] = _NEUTRAL) -> None:
    for key, neutral in neutral_values.items():
        value = body.get(key)
        if value is not None and value not in neutral:
            raise RequestError(f"'{key}'={value!r} is not supported by this reference server")


def _token_ids(body: dict, key: str) -> frozenset[int]:
    """``body[key]``: a list of token ids (absent or null: none)."""
    value = body.get(key)
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(_is_int(v) and v >= 0 for v in value):
        raise RequestError(f"'{key}' must be a list of token ids, got {value!r}")
    return frozenset(value)


class TeacherServer:
    """A Hugging Face causal LM served over HTTP with the vLLM and SGLang protocol subsets (module doc).

    The model loads (a ``TeacherEngine``) and the socket binds on construction (``port=0`` picks a free
    port; ``url`` has the bound one). ``start()`` serves on a background thread, ``stop()`` ends it; the
    context manager does both. ``serve_forever()`` serves on the calling thread until SIGTERM or Ctrl-C
    (the CLI).
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
        logprobs_mode: str = "raw_logprobs",
        max_response_mb: float = DEFAULT_MAX_RESPONSE_MB,
    ) -> None:
        if max_logprobs < 0 or delay_ms < 0:
            raise ValueError(f"max_logprobs ({max_logprobs}) and delay_ms ({delay_ms}) must be ≥ 0")
        if not max_response_mb > 0:
            raise ValueError(f"max_response_mb must be > 0, got {max_response_mb}")
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
        self.model_name = served_model_name or str(model_dir)
        self.max_logprobs = max_logprobs
        self.delay_s = delay_ms / 1000
        self.logprobs_mode = logprobs_mode
        self.max_response_bytes = int(max_response_mb * 2**20)
        self.engine = TeacherEngine(model_dir, dtype, device)
        self.vocab_size = self.engine.vocab_size
        self.max_model_len = self.engine.max_model_len
        self._routes: dict[tuple[str, str], Callable[[Any], tuple[Any, str]]] = {
            ("GET", "/health"): lambda _: (None, ""),
            ("GET", "/v1/models"): self._models,
            ("GET", "/get_model_info"): self._model_info,
            ("POST", _VLLM.path): self._completions,
            ("POST", _SGLANG.path): self._generate,
            ("POST", "/update_weights_from_disk"): self._update_weights_from_disk,
            ("POST", "/collective_rpc"): self._collective_rpc,
            ("POST", "/reset_prefix_cache"): lambda _: ({"success": True}, ""),  # no prefix cache here
            ("GET", "/server_info"): self._server_info,
        }
        self._http = _HTTPServer((host, port), _Handler)
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
            log.info("serving %s as %r on %s", self.engine.model_dir, self.model_name, self.url)
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
        log.info("serving %s as %r on %s (max logprobs %d)", self.engine.model_dir, self.model_name, self.url,
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
                    request = orjson.loads(body) if body or path not in _BODILESS else {}
                except orjson.JSONDecodeError as error:
                    raise RequestError(f"the request body is not valid JSON: {error}") from None
                if not isinstance(request, dict):
                    raise RequestError(f"the request body must be a JSON object, got {type(request).__name__}")
                time.sleep(self.delay_s)
            payload, summary = route(request)
            response = b"" if payload is None else orjson.dumps(payload)
            if len(response) > self.max_response_bytes:
                raise RequestError(self._too_large(f"is {len(response) / 2**20:.2f} MB"))
            return 200, response, summary
        except RequestError as error:
            if error.body is not None:
                return error.status, orjson.dumps(error.body), str(error)
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
                "root": self.engine.model_dir, "parent": None, "max_model_len": self.max_model_len}
        return {"object": "list", "data": [card]}, ""

    def _model_info(self, _: Any) -> tuple[dict, str]:
        return {"model_path": self.engine.model_dir, "tokenizer_path": self.engine.model_dir, "is_generation": True}, ""

    def _server_info(self, _: Any) -> tuple[dict, str]:
        """vLLM's ``/server_info?config_format=json``, the fields a trainer reads."""
        model_config = {"model": self.engine.model_dir, "logprobs_mode": self.logprobs_mode,
                        "max_logprobs": self.max_logprobs, "max_model_len": self.max_model_len}
        return {"vllm_config": {"model_config": model_config}, "vllm_env": {}, "system_env": {}}, ""

    # -- weight updates -------------------------------------------------------------------------------

    def _update_weights_from_disk(self, body: dict) -> tuple[dict, str]:
        """SGLang ``/update_weights_from_disk``: ``{"success", "message", "num_paused_requests"}``."""
        model_path = body.get("model_path")
        try:
            if not isinstance(model_path, str) or not model_path:
                raise RequestError(f"'model_path' must be a directory, got {model_path!r}")
            summary = self.engine.reload(model_path)
        except RequestError as error:
            message = f"Failed to update weights: {error}.\nRolling back to original weights."
            raise RequestError(message, 400, {"success": False, "message": message,
                                              "num_paused_requests": 0}) from None
        return {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}, summary

    def _collective_rpc(self, body: dict) -> tuple[dict, str]:
        """vLLM's development-mode ``/collective_rpc``: only ``reload_weights`` (one worker's result)."""
        method = body.get("method")
        if method is None:
            raise RequestError("Missing 'method' in request body")
        if method != _RELOAD_METHOD:
            raise RequestError(f"method {method!r} is not supported by this reference server (only "
                               f"{_RELOAD_METHOD!r})")
        kwargs = body.get("kwargs") or {}
        if not isinstance(kwargs, dict) or set(kwargs) - {"weights_path"}:
            raise RequestError(f"reload_weights takes only kwargs.weights_path here, got {kwargs!r}")
        return {"results": [None]}, self.engine.reload(kwargs.get("weights_path"))

    def _completions(self, body: dict) -> tuple[dict, str]:
        """vLLM ``/v1/completions``: ``choices[i].prompt_logprobs`` as vLLM writes them (module doc)."""
        _refuse_unsupported(body)
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(f"The model `{model}` does not exist.", 404)
        if _VLLM.prompts_field not in body:
            raise RequestError(f"'{_VLLM.prompts_field}' is required")
        prompts, _ = self._prompts(body[_VLLM.prompts_field], _VLLM.prompts_field)
        k = self._logprobs_option(body, _VLLM.k_field, "prompt")
        output_k = self._logprobs_option(body, "logprobs", "sample")
        stop_token_ids = _token_ids(body, "stop_token_ids")
        eos_ids = frozenset() if _option(body, "ignore_eos", False, "bool") else self.engine.eos_ids
        top_k = _option(body, "top_k", 0, "int")
        sampling = Sampling(
            max_new=_option(body, "max_tokens", 16, "int"), temperature=_option(body, "temperature", 1.0, "number"),
            top_k=0 if top_k == -1 else top_k, top_p=_option(body, "top_p", 1.0, "number"),
            seed=_option(body, "seed", None, "int"), stop_ids=stop_token_ids | eos_ids, output_k=output_k,
            logprobs="processed" if self.logprobs_mode == "processed_logprobs" else "raw")
        results = self._run(prompts, k, sampling)
        as_ids = _option(body, "return_tokens_as_token_ids", False, "bool")
        with_ids = _option(body, "return_token_ids", False, "bool")
        texts = self.engine.texts.__getitem__
        choices = [{"index": i, **_VLLM.render_generation(
            p, self._completion(r, sampling.max_new, stop_token_ids, eos_ids),
            None if r.prompt_rows is None else _VLLM.render_scores(p, r.prompt_rows.of(p[1:]), texts), texts,
            return_tokens_as_token_ids=as_ids, return_token_ids=with_ids,
        )} for i, (p, r) in enumerate(zip(prompts, results))]
        prompt_tokens, generated = sum(map(len, prompts)), sum(len(r.output) for r in results)
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + generated,
                 "completion_tokens": generated, "prompt_tokens_details": None}
        response = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                    "model": self.model_name, "choices": choices, "usage": usage}
        return response, f"{len(prompts)} prompts, {prompt_tokens} tokens, K={k}, {generated} generated"

    def _completion(self, result: Result, max_new: int, stop_token_ids: frozenset[int],
                    eos_ids: frozenset[int]) -> Completion:
        """``result``'s completion, for a wire protocol: its decoded text, and the ``stop_token_ids`` id
        it ended at unless that is also one of the ``eos_ids`` the request stops at (vLLM's
        ``stop_reason``: null for an end of sequence)."""
        last = result.output[-1] if result.stopped else None
        return Completion(result.output, self.engine.decode(result.output), "stop" if result.stopped else "length",
                          last if last in stop_token_ids - eos_ids else None, max_new,
                          None if result.output_rows is None else result.output_rows.of(result.output))

    def _logprobs_option(self, body: dict, key: str, kind: str) -> Optional[int]:
        """vLLM's ``prompt_logprobs`` / ``logprobs``: None, or a count in [0, --max-logprobs]."""
        k = _option(body, key, None, "int")
        if k is not None and not 0 <= k <= self.max_logprobs:
            if k < 0:
                raise RequestError(f"'{key}' must be ≥ 0, got {k}")
            raise RequestError(f"Requested {kind} logprobs of {k}, which is greater than max allowed: "
                               f"{self.max_logprobs}")
        self._check_k_fits_vocabulary(key, k)
        return k

    def _check_k_fits_vocabulary(self, key: str, k: Optional[int]) -> None:
        """A K above the vocabulary (possible with a large ``--max-logprobs``) is the request's fault: 400."""
        if k is not None and k > self.vocab_size:
            raise RequestError(f"'{key}' of {k} is more than the model's vocabulary of {self.vocab_size} tokens")

    def _too_large(self, size: str) -> str:
        return (f"the response {size}, over this server's --max-response-mb "
                f"{self.max_response_bytes / 2**20:g}: send fewer or shorter sequences per request, or a smaller K")

    def _run(self, prompts: list[list[int]], k: Optional[int], sampling: Sampling) -> list[Result]:
        """The engine's results, after the response cap: a request whose log-probabilities alone would
        pass it is refused before the model runs. Takes ``--delay-ms`` first."""
        entries = 0 if k is None else sum(len(p) - 1 for p in prompts) * (k + 1)
        if sampling.output_k is not None:
            entries += len(prompts) * max(sampling.max_new, 0) * (sampling.output_k + 1)
        if entries * _MIN_ENTRY_BYTES > self.max_response_bytes:
            raise RequestError(self._too_large(f"would hold {entries} log-probabilities (at least "
                                               f"{entries * _MIN_ENTRY_BYTES / 2**20:.2f} MB)"))
        return self.engine.run(prompts, k, sampling)

    def _generate(self, body: dict) -> tuple[Any, str]:
        """SGLang ``/generate``: a list of results, or one result for one non-nested input."""
        _refuse_unsupported(body, _SGLANG_NEUTRAL)
        if (_SGLANG.prompts_field in body) == ("text" in body):
            raise RequestError(f"exactly one of '{_SGLANG.prompts_field}' and 'text' is required")
        key = _SGLANG.prompts_field if _SGLANG.prompts_field in body else "text"
        prompts, batched = self._prompts(body[key], key)
        sampling = body.get("sampling_params") or {}
        if not isinstance(sampling, dict):
            raise RequestError(f"'sampling_params' must be an object, got {sampling!r}")
        _refuse_unsupported(sampling, _SGLANG_NEUTRAL)
        return_logprob = _option(body, "return_logprob", False, "bool")
        start = _option(body, "logprob_start_len", -1, "int")
        k = _option(body, _SGLANG.k_field, 0, "int")
        if not 0 <= k <= self.max_logprobs:
            raise RequestError(f"'{_SGLANG.k_field}' must be between 0 and the server's max logprobs "
                               f"{self.max_logprobs}, got {k}")
        self._check_k_fits_vocabulary(_SGLANG.k_field, k)
        if start < -1:
            raise RequestError(f"'logprob_start_len' must be ≥ -1, got {start}")
        with_text = _option(body, "return_text_in_logprobs", False, "bool")
        max_new = _option(sampling, "max_new_tokens", 128, "int")
        top_k = _option(sampling, "top_k", -1, "int")
        if top_k == 0 or top_k < -1:
            raise RequestError(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
        ignore_eos = _option(sampling, "ignore_eos", False, "bool")  # SGLang drops stop_token_ids too
        stop_token_ids = frozenset() if ignore_eos else _token_ids(sampling, "stop_token_ids")
        eos_ids = frozenset() if ignore_eos else self.engine.eos_ids
        temperature = 0.0 if top_k == 1 else _option(sampling, "temperature", 1.0, "number")  # SGLang: greedy
        results = self._run(prompts, k if return_logprob else None, Sampling(
            max_new=max_new, temperature=temperature, top_k=max(top_k, 0),
            seed=_option(sampling, "sampling_seed", None, "int"), stop_ids=stop_token_ids | eos_ids,
            output_k=k if return_logprob else None, logprobs="scaled"))
        texts = self.engine.texts.__getitem__ if with_text else None
        out = []
        for prompt, r in zip(prompts, results):
            prompt_scores = None
            if r.prompt_rows is not None:
                first = len(prompt) - 1 if start == -1 else min(start, len(prompt))
                scores = _SGLANG.render_scores(prompt, r.prompt_rows.of(prompt[1:]), texts)
                prompt_scores = {field: entries[first:] for field, entries in scores.items()}
            out.append(_SGLANG.render_generation(prompt, self._completion(r, max_new, stop_token_ids, eos_ids),
                                                 prompt_scores, texts))
        prompt_tokens, generated = sum(map(len, prompts)), sum(len(r.output) for r in results)
        summary = f"{len(prompts)} prompts, {prompt_tokens} tokens, K={k if return_logprob else None}, " \
                  f"{generated} generated"
        return (out if batched else out[0]), summary

    def _prompts(self, value: Any, key: str) -> tuple[list[list[int]], bool]:
        """The token-id lists of a prompt field (text, texts, token ids or lists of them), checked, and
        whether the field was a batch."""
        if isinstance(value, str) or isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            if not self.engine.has_tokenizer:
                raise RequestError(f"the model directory has no tokenizer: send '{key}' as token ids")
            prompts = self.engine.tokenize([value] if isinstance(value, str) else value)
            batched = isinstance(value, list)
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


class _HTTPServer(ThreadingHTTPServer):
    """A thread per connection, and a listen backlog for bursts: socketserver's default of 5 pending
    connections resets the rest of a burst of concurrent requests (a trainer's fetching ranks, a fleet
    probe) before a thread can accept them."""

    request_queue_size = LISTEN_BACKLOG


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
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="(default float32)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="(default cpu)")
    parser.add_argument(
        "--max-response-mb", type=float, default=DEFAULT_MAX_RESPONSE_MB, metavar="MB",
        help=f"largest response body; larger requests get 400 (default {DEFAULT_MAX_RESPONSE_MB:g})",
    )
    parser.add_argument(
        "--logprobs-mode", choices=LOGPROBS_MODES, default="raw_logprobs",
        help="vLLM's option: the generated tokens' log-probabilities before temperature and truncation "
             "(raw_logprobs, vLLM's default) or after both (processed_logprobs)",
    )


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
        logprobs_mode=args.logprobs_mode,
        max_response_mb=args.max_response_mb,
    ).serve_forever()
    return 0


if __name__ == "__main__":
    from megatron_mopd.cli import run_command

    sys.exit(run_command("serve-teacher", sys.argv[1:]))
