"""Wire formats of remote teachers (DESIGN.md §5): request bodies, and strict, fast response parsing.

A request carries S token sequences; its response is parsed into ``ScoredRows``: one row per scored
position, sequence after sequence (row r of sequence i is the distribution of token r + 1 given tokens
0..r). Nothing is ever filled in for the server: an entry count, length, id or structure that does not
match what was sent raises ``ResponseMismatch`` naming the sequence (index within the request), the
token position and what is wrong. Parsing is orjson plus vectorized numpy; the only per-entry Python
work is one ``map`` over the decoded lists. The cyclic garbage collector is paused while a response is
parsed: decoding creates about a million containers per 8k-token batch at K = 64, whose allocations
would otherwise trigger collection after collection (5× slower for SGLang's lists).

``vllm``    ``POST /v1/completions`` with ``prompt_logprobs=K``. Each position is a dict keyed by token
            id strings holding the top K plus the actual token when it is not among them (K or K + 1
            entries, in no guaranteed order); ``-9999.0`` stands for −inf.
``sglang``  ``POST /generate`` with ``top_logprobs_num=K``: ``meta_info.input_token_logprobs`` gives
            ``[logprob, id, text]`` per position (the ids must be the ones sent) and
            ``meta_info.input_top_logprobs`` exactly K ``[logprob, id, text]`` per position, the actual
            token not included. A null logprob past the first position reads as −inf (orjson-based
            servers write non-finite floats as null), and so does −9999.0 (vLLM's encoding).
"""

from __future__ import annotations

import gc
import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Any, Iterator, Literal, Optional, Sequence

import numpy as np
import orjson

ProtocolName = Literal["vllm", "sglang"]
TokenIds = Sequence[Sequence[int]]

NEG_INF_ENCODING = -9999.0  # vLLM clamps log-probabilities to this value so that JSON can carry them
_EXCERPT_CHARS = 160


class TeacherError(RuntimeError):
    """Base class of the remote-teacher errors."""


class TeacherConfigError(TeacherError):
    """A server cannot serve the teacher as configured (K above its limit, no model name)."""


class TeacherRequestError(TeacherError):
    """A request failed: an HTTP error status, a timeout or a connection error, after any retries."""


class TeacherResponseError(TeacherError):
    """A response does not match its request (or is not JSON); never retried, never padded."""


class ResponseMismatch(ValueError):
    """What a parser found wrong, and where: ``sequence`` indexes the request's sequences, ``position``
    is the token position (entry ``position`` of that sequence's per-token list)."""

    def __init__(self, what: str, sequence: Optional[int] = None, position: Optional[int] = None):
        super().__init__(what)
        self.what, self.sequence, self.position = what, sequence, position


@dataclass(frozen=True)
class ScoredRows:
    """Rows of one response, sequence after sequence (``len(sequence) − 1`` rows each).

    Attributes:
        topk_logprobs: float32 ``[N, K]``, most probable first.
        topk_ids: int64 ``[N, K]``.
        token_logprobs: float32 ``[N]`` the log-probability of the actual next token.
    """

    topk_logprobs: np.ndarray
    topk_ids: np.ndarray
    token_logprobs: np.ndarray


class WireProtocol(ABC):
    """One server dialect: the scoring endpoint, its request body and its response parser."""

    name: str
    path: str

    @abstractmethod
    def request(self, sequences: TokenIds, k: int, model: Optional[str]) -> bytes:
        """The JSON body asking for the top-``k`` prompt log-probabilities of every sequence."""

    def parse(self, body: bytes, sequences: TokenIds, k: int) -> ScoredRows:
        """The rows of ``body``, the response to ``request(sequences, k, ...)``; raises ResponseMismatch."""
        with _gc_paused():
            return self._parse(body, sequences, k)

    @abstractmethod
    def _parse(self, body: bytes, sequences: TokenIds, k: int) -> ScoredRows: ...


class VLLMProtocol(WireProtocol):
    name, path = "vllm", "/v1/completions"

    def request(self, sequences: TokenIds, k: int, model: Optional[str]) -> bytes:
        if model is None:
            raise TeacherConfigError("the vLLM protocol needs a model name")
        return orjson.dumps(
            {"model": model, "prompt": sequences, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": k}
        )

    def _parse(self, body: bytes, sequences: TokenIds, k: int) -> ScoredRows:
        per_sequence = self._prompt_logprobs(_loads(body), sequences)
        rows = [entry for entries in per_sequence for entry in entries[1:]]
        try:
            counts = np.fromiter(map(len, rows), np.int64, len(rows))
            total = int(counts.sum())
            ids = np.fromiter(map(int, chain.from_iterable(rows)), np.int64, total)
            values = chain.from_iterable(map(dict.values, rows))
            logprobs = np.fromiter(map(itemgetter("logprob"), values), np.float32, total)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise _vllm_defect(rows, sequences, exc) from None
        locate = _RowLocator(sequences)
        if np.isnan(logprobs).any():
            row = int(np.repeat(np.arange(len(rows)), counts)[np.isnan(logprobs)][0])
            raise locate.mismatch(row, "a logprob is NaN")
        wrong = np.flatnonzero((counts < k) | (counts > k + 1))
        if wrong.size:
            row = int(wrong[0])
            raise locate.mismatch(row, f"{counts[row]} entries; expected {k} (the top {k}) or {k + 1} "
                                       f"(the top {k} and the actual token)")
        row_of = np.repeat(np.arange(len(rows)), counts)
        col_of = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        table_logprobs = np.full((len(rows), k + 1), -np.inf, np.float32)
        table_ids = np.full((len(rows), k + 1), -1, np.int64)
        table_logprobs[row_of, col_of] = logprobs
        table_ids[row_of, col_of] = ids
        actual = locate.next_tokens()
        hit = table_ids == actual[:, None]
        missing = np.flatnonzero(~hit.any(axis=1))
        if missing.size:
            row = int(missing[0])
            raise locate.mismatch(row, f"the actual token {actual[row]} is not among the {counts[row]} returned "
                                       f"entries {sorted(rows[row])[:8]}... (a response to other token ids?)")
        token_logprobs = table_logprobs[np.arange(len(rows)), hit.argmax(axis=1)]
        return _top_k(table_logprobs, table_ids, token_logprobs, k)

    @staticmethod
    def _prompt_logprobs(doc: Any, sequences: TokenIds) -> list[list]:
        """Each sequence's ``prompt_logprobs`` list, choices matched by their ``index``."""
        choices = doc.get("choices") if isinstance(doc, dict) else None
        if not isinstance(choices, list):
            raise ResponseMismatch(f"no 'choices' list in the response (keys: {_keys(doc)})")
        if len(choices) != len(sequences):
            raise ResponseMismatch(f"{len(choices)} choices for {len(sequences)} prompts")
        ordered: list[Optional[list]] = [None] * len(sequences)
        for choice in choices:
            index = choice.get("index") if isinstance(choice, dict) else None
            if not isinstance(index, int) or not 0 <= index < len(sequences) or ordered[index] is not None:
                raise ResponseMismatch(f"a choice has a missing, out-of-range or repeated index {index!r}")
            entries = choice.get("prompt_logprobs")
            if not isinstance(entries, list):
                raise ResponseMismatch(f"prompt_logprobs is {type(entries).__name__}, not a list", index)
            if len(entries) != len(sequences[index]):
                raise ResponseMismatch(
                    f"wrong length: {len(entries)} prompt_logprobs entries for {len(sequences[index])} tokens",
                    index,
                )
            if entries[0] is not None:
                raise ResponseMismatch("the first prompt_logprobs entry is not null", index, 0)
            ordered[index] = entries
        return ordered  # type: ignore[return-value]


class SGLangProtocol(WireProtocol):
    name, path = "sglang", "/generate"

    def request(self, sequences: TokenIds, k: int, model: Optional[str]) -> bytes:
        return orjson.dumps(
            {
                "input_ids": sequences,
                "sampling_params": {"max_new_tokens": 0},
                "return_logprob": True,
                "logprob_start_len": 0,
                "top_logprobs_num": k,
            }
        )

    def _parse(self, body: bytes, sequences: TokenIds, k: int) -> ScoredRows:
        token_lists, top_lists = self._meta_lists(_loads(body), sequences)
        locate = _RowLocator(sequences)
        tops = [top for per_sequence in top_lists for top in per_sequence[1:]]
        try:
            sent_ids = np.fromiter(chain.from_iterable(sequences), np.int64)
            got_ids = np.fromiter(map(itemgetter(1), chain.from_iterable(token_lists)), np.int64, len(sent_ids))
            token_logprobs = np.array([e[0] for entries in token_lists for e in entries[1:]], np.float32)
            counts = np.fromiter(map(len, tops), np.int64, len(tops))
            flat = [entry for top in tops for entry in top]
            logprobs = np.array([entry[0] for entry in flat], np.float32)
            ids = np.array([entry[1] for entry in flat], np.int64)
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise _sglang_defect(token_lists, tops, sequences, exc) from None
        if logprobs.ndim != 1 or ids.ndim != 1 or token_logprobs.ndim != 1:
            raise _sglang_defect(token_lists, tops, sequences, ValueError("nested values"))
        wrong_id = np.flatnonzero(got_ids != sent_ids)
        if wrong_id.size:
            flat_position = int(wrong_id[0])
            sequence, position = locate.token(flat_position)
            raise ResponseMismatch(f"input_token_logprobs has token id {got_ids[flat_position]} where "
                                   f"{sent_ids[flat_position]} was sent", sequence, position)
        wrong = np.flatnonzero(counts != k)
        if wrong.size:
            row = int(wrong[0])
            raise locate.mismatch(row, f"{counts[row]} input_top_logprobs entries; expected {k}")
        for array in (token_logprobs, logprobs):
            array[np.isnan(array)] = -np.inf  # null: a non-finite float written by orjson
        return _top_k(logprobs.reshape(-1, k), ids.reshape(-1, k), token_logprobs, k)

    @staticmethod
    def _meta_lists(doc: Any, sequences: TokenIds) -> tuple[list[list], list[list]]:
        """Each sequence's ``input_token_logprobs`` and ``input_top_logprobs``, lengths checked."""
        if not isinstance(doc, list):
            raise ResponseMismatch(f"expected a list of {len(sequences)} results, got {type(doc).__name__} "
                                   f"(keys: {_keys(doc)})")
        if len(doc) != len(sequences):
            raise ResponseMismatch(f"{len(doc)} results for {len(sequences)} sequences")
        token_lists, top_lists = [], []
        for index, (result, sequence) in enumerate(zip(doc, sequences)):
            meta = result.get("meta_info") if isinstance(result, dict) else None
            if not isinstance(meta, dict):
                raise ResponseMismatch("no meta_info", index)
            for key, target in (("input_token_logprobs", token_lists), ("input_top_logprobs", top_lists)):
                entries = meta.get(key)
                if not isinstance(entries, list):
                    raise ResponseMismatch(f"meta_info.{key} is {type(entries).__name__}, not a list", index)
                if len(entries) != len(sequence):
                    raise ResponseMismatch(f"wrong length: {len(entries)} {key} entries for {len(sequence)} "
                                           "tokens", index)
                target.append(entries)
        return token_lists, top_lists


PROTOCOLS: dict[str, WireProtocol] = {p.name: p for p in (VLLMProtocol(), SGLangProtocol())}


def get_protocol(name: str) -> WireProtocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown teacher protocol {name!r}; choose one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def excerpt(body: bytes, limit: int = _EXCERPT_CHARS) -> str:
    """The start of a response body, for error messages."""
    text = body[:limit].decode("utf-8", errors="replace")
    return repr(text + ("…" if len(body) > limit else ""))


class _RowLocator:
    """Maps flat rows (and flat token positions) back to (sequence, token position)."""

    def __init__(self, sequences: TokenIds):
        self.sequences = sequences
        lengths = np.fromiter(map(len, sequences), np.int64, len(sequences))
        self.row_ends = np.cumsum(lengths - 1)
        self.token_ends = np.cumsum(lengths)

    def row(self, row: int) -> tuple[int, int]:
        sequence = int(np.searchsorted(self.row_ends, row, side="right"))
        start = self.row_ends[sequence - 1] if sequence else 0
        return sequence, int(row - start) + 1

    def token(self, flat_position: int) -> tuple[int, int]:
        sequence = int(np.searchsorted(self.token_ends, flat_position, side="right"))
        start = self.token_ends[sequence - 1] if sequence else 0
        return sequence, int(flat_position - start)

    def mismatch(self, row: int, what: str) -> ResponseMismatch:
        return ResponseMismatch(what, *self.row(row))

    def next_tokens(self) -> np.ndarray:
        """int64 ``[N]``: the actual token of every row (token r + 1 of its sequence)."""
        return np.fromiter(chain.from_iterable(s[1:] for s in self.sequences), np.int64, int(self.row_ends[-1]))


def _top_k(logprobs: np.ndarray, ids: np.ndarray, token_logprobs: np.ndarray, k: int) -> ScoredRows:
    """The K largest of each row of ``[N, W]`` candidates, most probable first (ties keep column order);
    log-probabilities ≤ −9999 (vLLM's encoding of −inf, also used by some SGLang-style servers) → −inf."""
    for array in (logprobs, token_logprobs):
        array[array <= NEG_INF_ENCODING] = -np.inf
    order = np.argsort(-logprobs, axis=1, kind="stable")[:, :k]
    return ScoredRows(
        np.ascontiguousarray(np.take_along_axis(logprobs, order, axis=1)),
        np.ascontiguousarray(np.take_along_axis(ids, order, axis=1)),
        token_logprobs,
    )


_gc_lock = threading.Lock()
_gc_state = {"pausers": 0, "was_enabled": False}


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector (process-wide) while any thread parses; then restore it."""
    with _gc_lock:
        if _gc_state["pausers"] == 0:
            _gc_state["was_enabled"] = gc.isenabled()
            gc.disable()
        _gc_state["pausers"] += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_state["pausers"] -= 1
            if _gc_state["pausers"] == 0 and _gc_state["was_enabled"]:
                gc.enable()


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ResponseMismatch(f"malformed JSON ({exc}); {len(body)} bytes starting {excerpt(body)}") from None


def _keys(doc: Any) -> str:
    return str(sorted(doc)[:8]) if isinstance(doc, dict) else type(doc).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _vllm_defect(rows: list, sequences: TokenIds, cause: Exception) -> ResponseMismatch:
    """Locate the first malformed vLLM position (the slow path, run only after the fast one failed)."""
    locate = _RowLocator(sequences)
    for row, entry in enumerate(rows):
        if not isinstance(entry, dict):
            return locate.mismatch(row, "the entry is missing (null)" if entry is None else
                                   f"the entry is a {type(entry).__name__}, not a dict of token ids")
        for token, info in entry.items():
            if not token.isdigit():
                return locate.mismatch(row, f"key {token!r} is not a token id")
            if not isinstance(info, dict) or not _is_number(info.get("logprob")):
                return locate.mismatch(row, f"token {token}: {info!r} has no numeric 'logprob'")
    return ResponseMismatch(f"unreadable prompt_logprobs ({type(cause).__name__}: {cause})")


def _sglang_defect(token_lists: list, tops: list, sequences: TokenIds, cause: Exception) -> ResponseMismatch:
    """Locate the first malformed SGLang entry (the slow path, run only after the fast one failed)."""

    def bad(entry: Any, first: bool) -> Optional[str]:
        if not isinstance(entry, list) or len(entry) < 2:
            return f"{entry!r} is not a [logprob, id, text] triple"
        if not first and not (_is_number(entry[0]) or entry[0] is None):
            return f"{entry!r} has a non-numeric logprob"
        if not isinstance(entry[1], int) or isinstance(entry[1], bool):
            return f"{entry!r} has a non-integer token id"
        return None

    locate = _RowLocator(sequences)
    for sequence, entries in enumerate(token_lists):
        for position, entry in enumerate(entries):
            if what := bad(entry, position == 0):
                return ResponseMismatch(f"input_token_logprobs: {what}", sequence, position)
    for row, top in enumerate(tops):
        if not isinstance(top, list):
            return locate.mismatch(row, "the input_top_logprobs entry is missing (null)" if top is None else
                                   f"the input_top_logprobs entry is a {type(top).__name__}, not a list")
        for entry in top:
            if what := bad(entry, False):
                return locate.mismatch(row, f"input_top_logprobs: {what}")
    return ResponseMismatch(f"unreadable logprobs ({type(cause).__name__}: {cause})")
