"""``RemoteTeacher``: top-K prompt log-probabilities from vLLM or SGLang servers (docs/design.md §5).

``submit`` splits a batch into requests of at most ``max_sequences_per_request`` sequences and
``max_tokens_per_request`` tokens and sends them from a thread pool: at most
``max_in_flight_per_server`` per server, each to the usable server with the fewest outstanding
requests. Every worker thread keeps one keep-alive connection per server (one the server closed is
dropped and replaced). Each response is parsed (``protocols``) straight into the batch's arrays as it
arrives; the returned future resolves once all have, or fails with the first error. Rows past a
sequence's end (``valid`` False) hold −inf log-probabilities, id 0 and a token log-probability of 0.0,
as the colocated teacher's do, so ``(token_logprobs * valid).sum()`` is finite; in a valid row the
token log-probability is −inf when the teacher gives the actual token probability 0.

Failures. Timeouts, connection errors, 5xx and 429 are retried
``retries`` times with jittered exponential backoff (``backoff_s · 2^i · U(0.5, 1.5)``), on another
server when there is one; a server that just failed is passed over for ``cooldown_s``. Other 4xx fail
at once. Either way a ``TeacherRequestError`` names the server(s), the request size, the attempts and
their causes. There are two timeouts: ``timeout_s`` bounds each socket operation (the connect,
each send, each wait for data), and ``request_deadline_s`` (default ``2 · timeout_s``) the whole
exchange of one attempt (connect, send and the entire response), so a server that trickles its answer
cannot hold a request for long; a request past its deadline is a timeout like the other, its cause
naming the deadline. A response that does not match its request raises ``TeacherResponseError`` (not retried:
the server answered, wrongly), naming the server, request, sequence, token position and the defect.

Start-up (``check``, run by the constructor and again whenever the caller wants): ``GET /health`` on
every server (servers failing it are left out until the next ``check``; none healthy is a
``TeacherRequestError`` that leaves the servers in use as they were, so requests never wait for a
server that cannot come), the model name from ``GET /v1/models`` (vLLM, when ``model`` is None), and a
two-token probe asking for K on every healthy server: a vLLM 400 about the logprob limit, or fewer
than K entries, is a ``TeacherConfigError`` that says how to fix it. A request that finds no server in
use fails at once (``TeacherRequestError``) instead of waiting.

Text mode (cross-tokenizer teachers): ``submit_texts`` tokenizes with the teacher's fast tokenizer
(special tokens as it adds them) and returns the teacher ids as ``sequences`` and their character
``offsets``, for ``megatron_mopd.crosstok.align_offsets``.

Generation (``generate``: a served student's rollouts, or a teacher's completions for sequence-level
KD): one request per prompt (``protocols``: the servers seed all prompts of a request alike), each with
its own seed drawn from ``(sampling.seed, prompt index)``, sent from the same pool with the same load
balancing, retries, timeouts and errors as scoring. ``timeout_s`` bounds each wait for data, and a
server answers a generation only once it is complete: it, and ``request_deadline_s``, must exceed the
time of the longest one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import random
import re
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Sequence
from urllib.parse import urlsplit

import numpy as np
import orjson
import torch

from megatron_mopd.rollout.types import Rollout, SamplingParams, mixed_seed
from megatron_mopd.teachers.protocols import (
    ProtocolName,
    ResponseMismatch,
    ScoredRows,
    TeacherConfigError,
    TeacherRequestError,
    TeacherResponseError,
    excerpt,
    get_protocol,
)
from megatron_mopd.teachers.types import TeacherLogprobs

_JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
_PROBE = ((0, 1),)  # two token ids every vocabulary has: one scored position
_LOGPROB_LIMIT = re.compile(r"max\w*[ _-]?(allowed|logprobs)|logprobs?\b.{0,80}\bmax", re.IGNORECASE)
_STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


@dataclass(eq=False)
class _Server:
    url: str
    https: bool
    host: str
    port: Optional[int]
    base_path: str
    enabled: bool = True
    outstanding: int = 0
    assigned: int = 0
    down_until: float = 0.0

    @classmethod
    def from_url(cls, url: str) -> "_Server":
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"teacher server URL {url!r} must look like http://host:port")
        return cls(url.rstrip("/"), parts.scheme == "https", parts.hostname, parts.port, parts.path.rstrip("/"))

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        """A new (unconnected) connection whose socket operations each time out after ``timeout`` s."""
        kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return kind(self.host, self.port, timeout=timeout)


class _Batch:
    """The arrays of one submitted batch, filled request by request, and its future."""

    def __init__(self, sequences: tuple[tuple[int, ...], ...], k: int, offsets: Optional[tuple[np.ndarray, ...]]):
        self.sequences, self.offsets = sequences, offsets
        rows = max(max((len(s) for s in sequences), default=0) - 1, 0)
        self.topk_logprobs = np.full((len(sequences), rows, k), -np.inf, np.float32)
        self.topk_ids = np.zeros((len(sequences), rows, k), np.int64)
        self.token_logprobs = np.zeros((len(sequences), rows), np.float32)
        self.valid = np.zeros((len(sequences), rows), bool)
        self.future: Future[TeacherLogprobs] = Future()
        self.future.set_running_or_notify_cancel()  # not cancellable: its requests are already queued
        self._lock = threading.Lock()
        self._pending = 0

    def expect(self, requests: int) -> None:
        self._pending = requests
        if requests == 0:
            self._finish()

    def fill(self, indices: Sequence[int], rows: ScoredRows) -> None:
        start = 0
        for index in indices:
            n = len(self.sequences[index]) - 1
            self.topk_logprobs[index, :n] = rows.topk_logprobs[start:start + n]
            self.topk_ids[index, :n] = rows.topk_ids[start:start + n]
            self.token_logprobs[index, :n] = rows.token_logprobs[start:start + n]
            self.valid[index, :n] = True
            start += n
        with self._lock:
            self._pending -= 1
            last = self._pending == 0
        if last:
            self._finish()

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if not self.future.done():
                self.future.set_exception(error)

    def _finish(self) -> None:
        result = TeacherLogprobs(
            torch.from_numpy(self.topk_logprobs), torch.from_numpy(self.topk_ids),
            torch.from_numpy(self.token_logprobs), torch.from_numpy(self.valid), self.sequences, self.offsets,
        )
        with self._lock:
            if not self.future.done():
                self.future.set_result(result)


class RemoteTeacher:
    """A ``TeacherSource`` served by one or more vLLM (``protocol="vllm"``) or SGLang servers.

    Args:
        urls: one base URL (``http://host:port``) or several, load-balanced.
        protocol: ``"vllm"`` (``/v1/completions`` with ``prompt_logprobs``) or ``"sglang"`` (``/generate``).
        topk: K, the number of (id, logprob) pairs kept per position.
        model: the served model name (vLLM); None asks ``GET /v1/models``.
        max_sequences_per_request, max_tokens_per_request: how a batch is split into requests (a longer
            sequence goes alone).
        max_in_flight_per_server: concurrent requests per server.
        timeout_s: socket timeout of each request (connect, send, each wait for data).
        request_deadline_s: the most one attempt of a request may take in all (connect, send and the entire
            response), however the server paces its bytes; past it the attempt is a timeout (retried).
            None: ``2 * timeout_s``.
        retries, backoff_s: retries of a failed request, and the base of their exponential backoff.
        tokenizer: the teacher's fast tokenizer, for ``submit_texts`` / ``score_texts``.
        wait_for_servers_s: at start-up, keep polling ``/health`` this long until every server answers.
        vocab_size: the vocabulary the returned ids must index (the loss's: the student's, or the
            teacher's own for a teacher with another tokenizer); an id at or above it fails the response
            (``TeacherResponseError``), checked on the host as it is parsed. None: not checked. The
            ``vocab_size`` attribute may be set later, before the requests it should check.
    """

    cooldown_s = 5.0  # a server that just failed a request is passed over this long when another is usable
    reevaluate_s = 1.0  # a request waiting for a slot looks again at least this often (e.g. a cooldown ended)

    collective = False  # one rank asks for its group (placement.submit_teacher_scores)

    def __init__(
        self,
        urls: str | Sequence[str],
        protocol: ProtocolName = "vllm",
        topk: int = 20,
        *,
        model: Optional[str] = None,
        max_sequences_per_request: int = 64,
        max_tokens_per_request: int = 16384,
        max_in_flight_per_server: int = 4,
        timeout_s: float = 300.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        tokenizer: Any = None,
        wait_for_servers_s: float = 0.0,
        vocab_size: Optional[int] = None,
        request_deadline_s: Optional[float] = None,
    ):
        for name, value in (("topk", topk), ("max_sequences_per_request", max_sequences_per_request),
                            ("max_tokens_per_request", max_tokens_per_request),
                            ("max_in_flight_per_server", max_in_flight_per_server)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise ValueError(f"need timeout_s > 0, retries >= 0, backoff_s >= 0; got {timeout_s}, {retries}, "
                             f"{backoff_s}")
        if request_deadline_s is not None and not request_deadline_s > 0:
            raise ValueError(f"request_deadline_s must be > 0 or None, got {request_deadline_s}")
        if tokenizer is not None and not getattr(tokenizer, "is_fast", False):
            raise ValueError("text mode needs a fast (Rust) tokenizer: it reads character offsets")
        self.protocol = get_protocol(protocol)
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                       or vocab_size < 1):
            raise ValueError(f"vocab_size must be a positive integer or None, got {vocab_size!r}")
        self.topk, self.model, self.tokenizer, self.vocab_size = topk, model, tokenizer, vocab_size
        self.max_sequences_per_request, self.max_tokens_per_request = max_sequences_per_request, max_tokens_per_request
        self.max_in_flight_per_server = max_in_flight_per_server
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.request_deadline_s = 2.0 * timeout_s if request_deadline_s is None else float(request_deadline_s)
        self._servers = [_Server.from_url(url) for url in ([urls] if isinstance(urls, str) else urls)]
        if not self._servers:
            raise ValueError("no teacher server URL given")
        self._cond = threading.Condition()
        self._local = threading.local()
        self._connections: set[http.client.HTTPConnection] = set()  # open ones, for close()
        self._pool = ThreadPoolExecutor(max_in_flight_per_server * len(self._servers), "remote-teacher")
        try:
            self.check(wait_s=wait_for_servers_s)
        except BaseException:
            self.close()
            raise

    # ---- the TeacherSource interface -----------------------------------------------------------

    def submit(self, sequences: Sequence[Sequence[int]]) -> "Future[TeacherLogprobs]":
        """Start scoring token sequences (unpadded, teacher vocabulary); returns at once."""
        return self._submit(_token_tuples(sequences), None)

    def score(self, sequences: Sequence[Sequence[int]]) -> TeacherLogprobs:
        return self.submit(sequences).result()

    def submit_texts(self, texts: Sequence[str]) -> "Future[TeacherLogprobs]":
        """Tokenize with the teacher's tokenizer and start scoring; the result carries ids and offsets."""
        if self.tokenizer is None:
            raise ValueError("submit_texts needs RemoteTeacher(..., tokenizer=<the teacher's fast tokenizer>)")
        encoded = self.tokenizer(list(texts), return_offsets_mapping=True)
        offsets = tuple(np.asarray(o, np.int64).reshape(-1, 2) for o in encoded["offset_mapping"])
        return self._submit(_token_tuples(encoded["input_ids"]), offsets)

    def score_texts(self, texts: Sequence[str]) -> TeacherLogprobs:
        return self.submit_texts(texts).result()

    # ---- generation --------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, *,
                 max_total_tokens: Optional[int] = None) -> list[Rollout]:
        """One completion per prompt (token ids of the served vocabulary), in order; blocks until all came.

        Each ``Rollout`` has the completion ids, the log-probability of each under the server's sampling
        distribution (as its protocol defines it: ``protocols``), the finish reason and the server's text.
        Prompt ``i`` is sampled with seed ``mixed_seed(sampling.seed, i)``; its completion has at most
        ``sampling.max_new_tokens`` tokens, and at most ``max_total_tokens - len(prompt)`` when given.

        Raises:
            ValueError: a prompt is empty, holds a negative id, or leaves no room within ``max_total_tokens``.
            TeacherRequestError / TeacherResponseError: as for scoring (module doc), naming the prompt.
        """
        prompts = _token_tuples(prompts)
        budgets = []
        for index, prompt in enumerate(prompts):
            room = sampling.max_new_tokens if max_total_tokens is None else \
                min(sampling.max_new_tokens, max_total_tokens - len(prompt))
            if not prompt or room < 1:
                raise ValueError(f"prompt {index} is empty" if not prompt else
                                 f"prompt {index} has {len(prompt)} tokens: no room for a completion within "
                                 f"max_total_tokens={max_total_tokens}")
            budgets.append(dataclasses.replace(sampling, max_new_tokens=room))
        futures = [self._pool.submit(self._generate_one, index, prompt, budget)
                   for index, (prompt, budget) in enumerate(zip(prompts, budgets))]
        try:
            return [future.result() for future in futures]
        finally:
            for future in futures:
                future.cancel()

    def _generate_one(self, index: int, prompt: tuple[int, ...], sampling: SamplingParams) -> Rollout:
        """Prompt ``index``'s completion (``sampling`` with its own token budget; its seed is mixed here)."""
        size = f"1 prompt (prompt {index}: {len(prompt)} tokens, up to {sampling.max_new_tokens} new)"
        body = self.protocol.generation_request(prompt, sampling, mixed_seed(sampling.seed, index), self.model)
        server, reply = self._post(body, size)
        try:
            generated = self.protocol.parse_generation(reply, prompt, sampling)
        except ResponseMismatch as mismatch:
            raise TeacherResponseError(f"{server.url}{self.protocol.path}: bad response to a generation request of "
                                       f"{size}: {mismatch.what}") from None
        return Rollout(prompt, generated.ids, generated.logprobs, generated.finish_reason, generated.text)

    # ---- start-up and life cycle -----------------------------------------------------------------

    @property
    def healthy_urls(self) -> list[str]:
        """The servers in use: those that passed the last ``check``."""
        return [server.url for server in self._servers if server.enabled]

    def check(self, wait_s: float = 0.0) -> None:
        """Health-check every server, find the model name, and verify every healthy server serves top-K.

        The healthy servers become the ones in use (requests waiting for a slot are woken to see them).
        When none is healthy this raises ``TeacherRequestError`` and the servers in use stay as they were.
        """
        deadline = time.monotonic() + wait_s
        while True:
            causes = {server.url: self._health(server) for server in self._servers}
            if all(cause is None for cause in causes.values()) or time.monotonic() >= deadline:
                break
            time.sleep(min(0.25, max(deadline - time.monotonic(), 0.0)))
        healthy = [server for server in self._servers if causes[server.url] is None]
        if not healthy:
            raise TeacherRequestError("no teacher server is healthy: " +
                                      "; ".join(f"{url}/health: {cause}" for url, cause in causes.items()))
        with self._cond:
            for server in self._servers:
                server.enabled, server.down_until = causes[server.url] is None, 0.0
            self._cond.notify_all()
        if self.protocol.name == "vllm" and self.model is None:
            self.model = self._discover_model(healthy[0])
        for server in healthy:
            self._probe(server)

    def close(self) -> None:
        """Wait for the requests in flight, then close every connection."""
        self._pool.shutdown(wait=True)
        with self._cond:
            connections, self._connections = self._connections, set()
        for connection in connections:
            connection.close()

    def __enter__(self) -> "RemoteTeacher":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"RemoteTeacher({self.healthy_urls}, protocol={self.protocol.name!r}, topk={self.topk}, "
                f"model={self.model!r})")

    def _health(self, server: _Server) -> Optional[str]:
        try:
            status, body = self._once(server, "GET", "/health", timeout=min(self.timeout_s, 30.0))
        except (OSError, http.client.HTTPException) as exc:
            return self._describe(exc, min(self.timeout_s, 30.0))
        return None if status == 200 else f"HTTP {status}: {excerpt(body)}"

    def _discover_model(self, server: _Server) -> str:
        try:
            status, body = self._once(server, "GET", "/v1/models")
            cause = f"HTTP {status}: {excerpt(body)}"
            if status == 200:
                return str(orjson.loads(body)["data"][0]["id"])
        except (OSError, http.client.HTTPException) as exc:
            cause = self._describe(exc)
        except (orjson.JSONDecodeError, LookupError, TypeError):
            cause = f"unexpected body {excerpt(body)}"
        raise TeacherConfigError(f"{server.url}/v1/models gave no model name ({cause}); pass "
                                 "RemoteTeacher(..., model=<the served model name>)")

    def _probe(self, server: _Server) -> None:
        fix = (f"start vLLM with --max-logprobs >= {self.topk}, or lower topk" if self.protocol.name == "vllm"
               else "lower topk to what the server returns")
        where = f"{server.url}{self.protocol.path}"
        try:
            status, body = self._once(server, "POST", self.protocol.path,
                                      self.protocol.request(_PROBE, self.topk, self.model))
        except (OSError, http.client.HTTPException) as exc:
            raise TeacherRequestError(f"{where}: the start-up probe (top-{self.topk}) failed: "
                                      f"{self._describe(exc)}") from None
        if status == 200:
            try:
                self.protocol.parse(body, _PROBE, self.topk)
            except ResponseMismatch as mismatch:
                raise TeacherConfigError(f"{where} does not return top-{self.topk} log-probabilities "
                                         f"({mismatch.what}): {fix}") from None
            try:
                self.protocol.parse(body, _PROBE, self.topk, self.vocab_size)
            except ResponseMismatch as mismatch:
                raise TeacherConfigError(f"{where}: the start-up probe's answer: {mismatch.what}") from None
            return
        message = excerpt(body, 400)
        if 400 <= status < 500 and _LOGPROB_LIMIT.search(message):
            raise TeacherConfigError(f"{where} rejects top-{self.topk} log-probabilities (HTTP {status}: "
                                     f"{message}): {fix}")
        raise TeacherRequestError(f"{where}: the start-up probe (top-{self.topk}) got HTTP {status}: {message}")

    # ---- requests --------------------------------------------------------------------------------

    def _submit(self, sequences: tuple[tuple[int, ...], ...],
                offsets: Optional[tuple[np.ndarray, ...]]) -> "Future[TeacherLogprobs]":
        batch = _Batch(sequences, self.topk, offsets)
        requests = self._split(sequences)
        batch.expect(len(requests))
        for indices in requests:
            self._pool.submit(self._score_request, batch, indices)
        return batch.future

    def _split(self, sequences: tuple[tuple[int, ...], ...]) -> list[list[int]]:
        """Indices of the sequences with something to score (≥ 2 tokens), grouped into requests in order."""
        requests: list[list[int]] = []
        current: list[int] = []
        tokens = 0
        for index, sequence in enumerate(sequences):
            if len(sequence) < 2:
                continue
            if current and (len(current) == self.max_sequences_per_request
                            or tokens + len(sequence) > self.max_tokens_per_request):
                requests.append(current)
                current, tokens = [], 0
            current.append(index)
            tokens += len(sequence)
        return requests + [current] if current else requests

    def _score_request(self, batch: _Batch, indices: list[int]) -> None:
        if batch.future.done():  # an earlier request of this batch failed
            return
        try:
            sequences = [batch.sequences[i] for i in indices]
            size = f"{len(sequences)} sequences / {sum(map(len, sequences))} tokens"
            server, body = self._post(self.protocol.request(sequences, self.topk, self.model), size)
            try:
                rows = self.protocol.parse(body, sequences, self.topk, self.vocab_size)
            except ResponseMismatch as mismatch:
                where = ("" if mismatch.sequence is None else
                         f"sequence {indices[mismatch.sequence]} (item {mismatch.sequence} of the request)"
                         + ("" if mismatch.position is None else f", token position {mismatch.position}") + ": ")
                raise TeacherResponseError(f"{server.url}{self.protocol.path}: bad response to a request of "
                                           f"{size}: {where}{mismatch.what}") from None
            batch.fill(indices, rows)
        except BaseException as error:
            batch.fail(error)

    def _post(self, body: bytes, size: str) -> tuple[_Server, bytes]:
        """POST one scoring request with retries; returns the server that answered and its body."""
        causes: list[str] = []
        server: Optional[_Server] = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
            server = self._acquire(avoid=server)
            status, cause, reply = None, None, b""
            try:
                status, reply = self._exchange(server, body, time.monotonic() + self.request_deadline_s)
                if not 200 <= status < 300:
                    cause = f"HTTP {status}: {excerpt(reply)}"
            except (OSError, http.client.HTTPException) as exc:
                cause = self._describe(exc)
            finally:
                self._release(server, failed=status is None or status >= 500 or status == 429)
            if cause is None:
                return server, reply
            if status is not None and status < 500 and status != 429:
                raise TeacherRequestError(f"{server.url}{self.protocol.path} refused a request of {size}: {cause} "
                                          "(client errors are not retried)")
            causes.append(f"attempt {attempt + 1} at {server.url}: {cause}")
        raise TeacherRequestError(f"a request of {size} to {self.protocol.path} failed after {self.retries + 1} "
                                  f"attempts: " + "; ".join(causes))

    def _acquire(self, avoid: Optional[_Server]) -> _Server:
        """A slot on the usable server with the fewest outstanding requests. Blocks while all are full
        (woken by a release or a ``check``, and every ``reevaluate_s``); raises ``TeacherRequestError`` at
        once when no server is in use, since nothing would ever free a slot."""
        with self._cond:
            while True:
                now = time.monotonic()
                enabled = [s for s in self._servers if s.enabled]
                if not enabled:
                    raise TeacherRequestError(
                        f"no teacher server is in use (none of {', '.join(s.url for s in self._servers)} passed "
                        "the last health check): call check() once one is healthy")
                others = [s for s in enabled if s is not avoid]
                usable = [s for s in others if s.down_until <= now] or others or enabled
                free = [s for s in usable if s.outstanding < self.max_in_flight_per_server]
                if free:
                    server = min(free, key=lambda s: (s.outstanding, s.assigned))
                    server.outstanding += 1
                    server.assigned += 1
                    return server
                self._cond.wait(self.reevaluate_s)

    def _release(self, server: _Server, failed: bool) -> None:
        with self._cond:
            server.outstanding -= 1
            if failed:
                server.down_until = time.monotonic() + self.cooldown_s
            self._cond.notify_all()

    def _exchange(self, server: _Server, body: bytes, deadline: float, fresh: bool = False) -> tuple[int, bytes]:
        """POST on this thread's keep-alive connection to ``server``, done by ``deadline`` (``time.monotonic``)
        or ``_DeadlineExceeded``; a stale connection is replaced once, within the same deadline."""
        connections: dict[str, http.client.HTTPConnection] = self._local.__dict__.setdefault("connections", {})
        connection = None if fresh else connections.get(server.url)
        reused = connection is not None
        if connection is None:
            connection = connections[server.url] = server.connection(min(self.timeout_s, self.request_deadline_s))
            with self._cond:
                self._connections.add(connection)
        try:
            status, reply, will_close = _exchange_by(connection, "POST", server.base_path + self.protocol.path, body,
                                                     deadline)
        except BaseException as exc:
            self._drop(connections, server, connection)
            if reused and isinstance(exc, _STALE_CONNECTION):
                return self._exchange(server, body, deadline, fresh=True)
            raise
        if will_close:
            self._drop(connections, server, connection)
        return status, reply

    def _drop(self, connections: dict[str, http.client.HTTPConnection], server: _Server,
              connection: http.client.HTTPConnection) -> None:
        """Close a connection and forget it (this thread's, and the set ``close`` closes)."""
        connection.close()
        if connections.get(server.url) is connection:
            del connections[server.url]
        with self._cond:
            self._connections.discard(connection)

    def _once(self, server: _Server, method: str, path: str, body: Optional[bytes] = None,
              timeout: Optional[float] = None) -> tuple[int, bytes]:
        """One request on a fresh connection (start-up checks), within ``request_deadline_s`` like any other."""
        connection = server.connection(min(self.timeout_s if timeout is None else timeout, self.request_deadline_s))
        try:
            status, reply, _ = _exchange_by(connection, method, server.base_path + path, body,
                                            time.monotonic() + self.request_deadline_s)
            return status, reply
        finally:
            connection.close()

    def _describe(self, exc: BaseException, timeout_s: Optional[float] = None) -> str:
        """The cause of a failed exchange, for an error message (``timeout_s``: the socket timeout it had)."""
        if isinstance(exc, _DeadlineExceeded):
            return f"timed out (not answered in full within request_deadline_s={self.request_deadline_s:g} s)"
        if isinstance(exc, TimeoutError):
            return f"timed out (no data for {self.timeout_s if timeout_s is None else timeout_s:g} s)"
        return f"{type(exc).__name__}: {exc}"


def _token_tuples(sequences: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    """Token-id sequences (lists, tuples, 1-D arrays or tensors) as tuples of Python ints, checked."""
    result = []
    for index, sequence in enumerate(sequences):
        ids = tuple(map(int, sequence.tolist() if hasattr(sequence, "tolist") else sequence))
        if ids and min(ids) < 0:
            raise ValueError(f"sequence {index} holds a negative token id ({min(ids)}); pass unpadded sequences")
        result.append(ids)
    return tuple(result)


class _DeadlineExceeded(TimeoutError):
    """An exchange outlasted its request deadline (a ``TimeoutError``: retried like any timeout)."""


class _Watchdog:
    """Shuts a connection's socket down once a deadline passes, which ends the connect, send or wait for
    data in progress on it at once; ``finish`` disarms it and says whether it fired."""

    def __init__(self, connection: http.client.HTTPConnection, seconds: float):
        self._connection = connection
        self._lock = threading.Lock()
        self._done = self.fired = False
        self._timer = threading.Timer(max(seconds, 0.0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.fired = True
            sock = self._connection.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def finish(self) -> bool:
        self._timer.cancel()
        with self._lock:
            self._done = True
            return self.fired


def _exchange_by(connection: http.client.HTTPConnection, method: str, path: str, body: Optional[bytes],
                 deadline: float) -> tuple[int, bytes, bool]:
    """One request on ``connection``, answered in full by ``deadline`` (``time.monotonic``): the status, the
    body, and whether the server closes the connection. Raises ``_DeadlineExceeded`` once the deadline
    passed (the connection is then unusable), else what ``http.client`` raises."""
    watchdog = _Watchdog(connection, deadline - time.monotonic())
    try:
        if connection.sock is None:
            connection.connect()  # bounded by the socket timeout, itself at most the deadline
        if watchdog.fired:  # it fired during the connect, before there was a socket to shut down
            raise _DeadlineExceeded()
        connection.request(method, path, body=body, headers=_JSON_HEADERS if body is not None else {})
        response = connection.getresponse()
        reply = response.read()
    except BaseException as exc:
        if watchdog.finish():
            raise _DeadlineExceeded() from exc
        raise
    if watchdog.finish():  # a body read to the end of a shut-down connection may be cut short
        raise _DeadlineExceeded()
    return response.status, reply, response.will_close
