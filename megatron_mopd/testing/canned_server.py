"""A canned teacher server for tests: real HTTP on 127.0.0.1, vLLM and SGLang bodies, scripted faults.

``CannedServer`` is a ``ThreadingHTTPServer`` (HTTP/1.1 keep-alive; HTTP/1.0, closing every connection
after its response, with ``keep_alive=False``) running in a background thread (a context manager) that
serves what ``RemoteTeacher`` talks to:

    GET  /health           200, or 503 while ``healthy`` is False
    GET  /v1/models        the OpenAI model list (vLLM), with ``model_name``
    POST /v1/completions   vLLM: ``prompt`` = token-id lists, ``prompt_logprobs`` = K (a 400 with
                           vLLM's message when K > ``max_logprobs``)
    POST /generate         SGLang: ``input_ids`` lists, ``top_logprobs_num`` = K (at most
                           ``max_logprobs`` entries are returned, like a server that caps K)

Scores come from ``BigramModel``, a deterministic model of arbitrary prompts (the distribution of
token j + 1 depends on token j through a fixed random table; the last ``impossible`` ids have
probability 0, like vocabulary padding), so tests can send any sequence and know the exact answer.
The bodies follow the real servers' formats (``vllm_completion_body`` / ``sglang_generate_body``,
also used by the benchmark): the scores are rendered by the wire protocols themselves
(``WireProtocol.render_scores``: vLLM positions list the actual token first, then the top K by rank,
with −inf written as −9999.0; SGLang writes −inf as null), inside envelopes like the real servers'.

Scripted behaviour: ``inject(fault, times)`` queues faults and ``replay(body, times)`` queues recorded
bodies; each scoring request (``/v1/completions``, ``/generate``) takes the next queued item, if any.
``latency_s`` delays every scoring response. ``requests`` counts requests per path and
``scoring_log`` records (sequences, tokens) of every scoring request.

``simulated_training_loop`` replays a trainer's use of a teacher (blocking per micro-batch, or
submitting every micro-batch first and waiting late) for the overlap test and benchmark.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Literal, Optional, Sequence, Union, get_args

import numpy as np
import orjson

from megatron_mopd.teachers.protocols import ScoredPositions, get_protocol, protocol_at
from megatron_mopd.teachers.types import TeacherLogprobs, TeacherSource

Fault = Literal[
    "http_503",          # 503 Service Unavailable
    "http_429",          # 429 Too Many Requests
    "http_400",          # 400 Bad Request (not about logprobs)
    "hang",              # no answer until ``hang_s`` has passed (past the client's timeout)
    "drop_connection",   # close the connection without an answer
    "malformed_json",    # the body cut in half
    "missing_position",  # one position of the last sequence is null
    "wrong_length",      # the last sequence's per-token list(s) one entry short
    "wrong_ids",         # the last sequence scored with one token replaced (see ``_substitute``)
]
FAULTS: tuple[str, ...] = get_args(Fault)
_SCORING_PATHS = ("/v1/completions", "/generate")


class BigramModel:
    """log p(token j + 1 = v | tokens ≤ j) = ``table[token j, v]``: a fixed random bigram model."""

    def __init__(self, vocab_size: int = 256, seed: int = 0, impossible: int = 4):
        rng = np.random.default_rng(seed)
        logits = rng.standard_normal((vocab_size, vocab_size)) * 3.0
        logits[:, vocab_size - impossible:] = -np.inf
        shifted = logits - logits.max(axis=1, keepdims=True)
        self.table = (shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))).astype(np.float32)
        self.vocab_size = vocab_size

    def logprobs(self, tokens: Sequence[int]) -> np.ndarray:
        """float32 ``[n − 1, V]``: row j is the distribution of token j + 1."""
        return self.table[np.asarray(tokens[:-1], dtype=np.int64)]

    def topk(self, tokens: Sequence[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        """The K most probable (logprobs, ids) of every row, most probable first (ties: lower id first)."""
        logprobs = self.logprobs(tokens)
        ids = np.argsort(-logprobs, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(logprobs, ids, axis=1), ids

    @staticmethod
    def decoded(token: int) -> Optional[str]:
        """A stand-in for the detokenized text; None for every 5th id (servers may send null)."""
        return None if token % 5 == 0 else f"<{token}>"


def scored_positions(model: BigramModel, tokens: Sequence[int], k: int) -> ScoredPositions:
    """The model's scores of ``tokens[1:]``: log-probabilities, ranks (vLLM's: ties last) and the top K."""
    logprobs = model.logprobs(tokens)
    actual = np.asarray(tokens[1:], dtype=np.int64)
    token_logprobs = logprobs[np.arange(actual.size), actual]
    ranks = (logprobs >= token_logprobs[:, None]).sum(axis=1)
    top_values, top_ids = model.topk(tokens, k)
    return ScoredPositions(actual.tolist(), token_logprobs.tolist(), ranks.tolist(), top_ids.tolist(),
                           top_values.tolist())


def vllm_completion_body(model: BigramModel, prompts: Sequence[Sequence[int]], k: int,
                         model_name: str = "canned-teacher") -> dict[str, Any]:
    """The body vLLM's ``/v1/completions`` returns for token-id prompts, ``max_tokens=1``, ``prompt_logprobs=k``."""
    vllm = get_protocol("vllm")
    choices = []
    for index, tokens in enumerate(prompts):
        generated = int(np.argmax(model.table[tokens[-1]]))
        choices.append({"index": index, "text": model.decoded(generated) or "", "logprobs": None,
                        "finish_reason": "length", "stop_reason": None,
                        **vllm.render_scores(tokens, scored_positions(model, tokens, k), model.decoded)})
    prompt_tokens = sum(len(tokens) for tokens in prompts)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
        "model": model_name, "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + len(prompts),
                  "completion_tokens": len(prompts), "prompt_tokens_details": None},
    }


def sglang_generate_body(model: BigramModel, prompts: Sequence[Sequence[int]], k: int) -> list[dict[str, Any]]:
    """The body SGLang's ``/generate`` returns for ``input_ids`` lists with ``max_new_tokens=0``,
    ``return_logprob``, ``logprob_start_len=0`` and ``top_logprobs_num=k``."""
    sglang = get_protocol("sglang")
    return [{"text": "", "meta_info": {
        "id": uuid.uuid4().hex, "finish_reason": {"type": "length", "length": 0},
        "prompt_tokens": len(tokens), "completion_tokens": 0, "cached_tokens": 0, "e2e_latency": 0.001,
        **sglang.render_scores(tokens, scored_positions(model, tokens, k)),
        "output_token_logprobs": [], "output_top_logprobs": [],
    }} for tokens in prompts]


class CannedServer:
    """A vLLM/SGLang-speaking test server (see the module docstring); ``with CannedServer() as s: s.url``."""

    def __init__(self, *, vocab_size: int = 256, max_logprobs: int = 20, latency_s: float = 0.0,
                 hang_s: float = 30.0, model_name: str = "canned-teacher", seed: int = 0, keep_alive: bool = True):
        self.model = BigramModel(vocab_size, seed)
        self.keep_alive = keep_alive
        self.max_logprobs, self.latency_s, self.hang_s, self.model_name = max_logprobs, latency_s, hang_s, model_name
        self.healthy = True
        self.requests: collections.Counter[str] = collections.Counter()
        self.scoring_log: list[tuple[int, int]] = []
        self._script: collections.deque[Union[str, bytes]] = collections.deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: Optional[ThreadingHTTPServer] = None

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the server is not running (use it as a context manager)")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def scoring_requests(self) -> int:
        return sum(self.requests[path] for path in _SCORING_PATHS)

    def inject(self, fault: Fault, times: int = 1) -> None:
        """Answer the next ``times`` scoring requests with ``fault``."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; choose one of {FAULTS}")
        with self._lock:
            self._script.extend([fault] * times)

    def replay(self, body: bytes, times: int = 1) -> None:
        """Answer the next ``times`` scoring requests with this recorded body, whatever they ask."""
        with self._lock:
            self._script.extend([body] * times)

    def __enter__(self) -> "CannedServer":
        canned = self

        class Handler(_Handler):
            server_state = canned
            protocol_version = "HTTP/1.1" if canned.keep_alive else "HTTP/1.0"

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="canned-teacher", daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    # ---- called by the handler -------------------------------------------------------------------

    def _count(self, path: str) -> Union[str, bytes, None]:
        """Count a request; for a scoring request, also take the next scripted item (None: behave)."""
        with self._lock:
            self.requests[path] += 1
            return self._script.popleft() if self._script and path in _SCORING_PATHS else None

    def _score(self, path: str, request: dict[str, Any], scripted: Optional[str]) -> tuple[int, bytes]:
        protocol = protocol_at(path)
        assert protocol is not None, path
        vllm = protocol.name == "vllm"
        prompts, k = protocol.scoring_fields(request)
        if (not isinstance(prompts, list) or not prompts or not all(isinstance(p, list) and p for p in prompts)
                or not isinstance(k, int) or k < 1):
            return 400, _error("expected token-id lists and a positive number of logprobs")
        if any(not 0 <= t < self.model.vocab_size for p in prompts for t in p):
            return 400, _error(f"token id out of vocabulary (size {self.model.vocab_size})")
        with self._lock:
            self.scoring_log.append((len(prompts), sum(map(len, prompts))))
        if vllm and k > self.max_logprobs:
            return 400, _error(f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                               f"{self.max_logprobs}")
        k = min(k, self.max_logprobs)
        if scripted == "wrong_ids":
            prompts = prompts[:-1] + [_substitute(self.model, prompts[-1], k)]
        body: Any = (vllm_completion_body(self.model, prompts, k, self.model_name) if vllm
                     else sglang_generate_body(self.model, prompts, k))
        last = body["choices"][-1]["prompt_logprobs"] if vllm else body[-1]["meta_info"]["input_top_logprobs"]
        if scripted == "missing_position" and len(last) > 1:
            last[len(last) // 2] = None
        if scripted == "wrong_length":
            last.pop()
        encoded = orjson.dumps(body)
        return 200, encoded[: len(encoded) // 2] if scripted == "malformed_json" else encoded


def _substitute(model: BigramModel, tokens: list[int], k: int) -> list[int]:
    """``tokens`` with one token replaced by the most probable one at its position: the first position
    whose actual token is outside the top K (where vLLM's format can reveal it), else the middle."""
    top_ids = model.topk(tokens, k)[1]
    outside = [row for row in range(len(tokens) - 1) if tokens[row + 1] not in top_ids[row]]
    row = outside[0] if outside else (len(tokens) - 1) // 2
    replaced = list(tokens)
    best = int(top_ids[row, 0])
    replaced[row + 1] = best if best != tokens[row + 1] else int(top_ids[row, 1])
    return replaced


def _error(message: str, status: int = 400) -> bytes:
    kind = {400: "BadRequestError", 429: "RateLimitError", 503: "ServiceUnavailableError"}.get(status, "Error")
    return orjson.dumps({"object": "error", "message": message, "type": kind, "param": None, "code": status})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_state: CannedServer
    timeout = 120  # idle keep-alive connections end eventually

    def log_message(self, format: str, *args: Any) -> None:  # the base class's signature
        pass

    def do_GET(self) -> None:  # the base class's naming
        state = self.server_state
        state._count(self.path)
        if self.path == "/health":
            self._send(200 if state.healthy else 503, b"")
        elif self.path == "/v1/models":
            self._send(200, orjson.dumps({"object": "list", "data": [{
                "id": state.model_name, "object": "model", "created": int(time.time()), "owned_by": "vllm",
                "root": state.model_name, "parent": None, "max_model_len": 4096}]}))
        else:
            self._send(404, _error(f"no route {self.path}", 404))

    def do_POST(self) -> None:  # the base class's naming
        state = self.server_state
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        scripted = state._count(self.path)
        if self.path not in _SCORING_PATHS:
            self._send(404, _error(f"no route {self.path}", 404))
            return
        if state.latency_s:
            state._stop.wait(state.latency_s)
        if isinstance(scripted, bytes):
            self._send(200, scripted)
        elif scripted in ("http_503", "http_429", "http_400"):
            status = int(scripted[-3:])
            self._send(status, _error(f"scripted HTTP {status}", status))
        elif scripted == "hang":
            state._stop.wait(state.hang_s)
            self.close_connection = True
        elif scripted == "drop_connection":
            self.close_connection = True
        else:
            try:
                request = orjson.loads(body)
            except orjson.JSONDecodeError:
                self._send(400, _error("the request body is not JSON"))
                return
            self._send(*state._score(self.path, request, scripted))

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@dataclass(frozen=True)
class LoopTiming:
    """What ``simulated_training_loop`` measured: the scores, and seconds spent waiting / in total."""

    results: list[TeacherLogprobs]
    waited_s: float
    total_s: float

    @property
    def waiting_fraction(self) -> float:
        return self.waited_s / self.total_s


def simulated_training_loop(teacher: TeacherSource, micro_batches: Sequence[Sequence[Sequence[int]]],
                            student_step: Callable[[], object], submit_early: bool) -> LoopTiming:
    """One step over ``micro_batches``: per micro-batch a student step (``student_step()``) and the
    teacher's scores for its loss. Blocking: score, then step. Submit-early (the trainer's way): submit
    every micro-batch first, then per micro-batch step and only then wait for its scores."""
    start = time.perf_counter()
    futures = [teacher.submit(batch) for batch in micro_batches] if submit_early else []
    results, waited = [], 0.0
    for index, batch in enumerate(micro_batches):
        if submit_early:
            student_step()
        began = time.perf_counter()
        results.append(futures[index].result() if submit_early else teacher.score(batch))
        waited += time.perf_counter() - began
        if not submit_early:
            student_step()
    return LoopTiming(results, waited, time.perf_counter() - start)
