"""Wire formats of remote teachers (docs/design.md §5): request bodies, and strict, fast response parsing.

A request carries S token sequences; its response is parsed into ``ScoredRows``: one row per scored
position, sequence after sequence (row r of sequence i is the distribution of token r + 1 given tokens
0..r). Nothing is ever filled in for the server: an entry count, length, id, rank, value or structure
that does not match what was sent raises ``ResponseMismatch`` naming the sequence (index within the
request), the token position and what is wrong. Checked for every row, besides the formats below:
ids are JSON integers (vLLM: keys of plain ASCII digits), log-probabilities JSON numbers (never
booleans or strings) ≤ 1e-3, no id twice in a row, the most probable of the top K has a finite
log-probability (a row of −inf / null only is no distribution, so it is an error, never a dropped
sample), the top K's probabilities sum to at most 1 + 1e-3 (log-probabilities, not logits), and, when
the caller gives the vocabulary size the ids index (``parse(..., vocab_size=V)``), every id is below V.
These are the checks the losses can make on the device (``losses.topk.validate_teacher_topk``), made
here on the host for free, so the trainer runs the losses without them (``loss.validate_inputs``).
The actual token's log-probability may be −inf: the teacher gives it probability 0 (e.g. vocabulary
padding, or a token its sampling forbids); it is kept as −inf.

Parsing is orjson plus vectorized numpy; the per-entry Python work is a few C-level ``map`` passes
over the decoded lists (values, then a ``set`` of their types). Automatic cyclic garbage collection is
held off while a response is parsed: decoding creates about a million containers per 8k-token batch
at K = 64, whose allocations would otherwise trigger collection after collection (5× slower for
SGLang's lists). It is held off by raising the generation-0 threshold, not by ``gc.disable()``, so a
trainer's own ``gc.disable()`` / ``gc.enable()`` (e.g. Megatron's manual GC), before or during a
parse, is never undone; see ``_gc_paused``.

``vllm``    ``POST /v1/completions`` with ``prompt_logprobs=K``. ``prompt_logprobs[0]`` is null; each
            other position is a dict keyed by token id strings holding ``{"logprob", "rank", ...}`` for
            the top K (ranks 1..K) plus the actual token when it is not among them (K or K + 1
            entries, in no guaranteed order); ``-9999.0`` stands for −inf. Ranks (read as integers, used
            only for this) are checked: with K entries the actual token's rank is ≤ K, and no entry
            but the actual token ranks > K (else one of the true top K is missing).
``sglang``  ``POST /generate`` with ``top_logprobs_num=K``: ``meta_info.input_token_logprobs`` gives
            ``[logprob, id, text]`` per position (the ids must be the ones sent; the first logprob is
            null) and ``meta_info.input_top_logprobs`` null first, then exactly K ``[logprob, id,
            text]`` per position, most probable first (``torch.topk``), the actual token not included.
            A null logprob past the first position reads as −inf, and so does −9999.0 (vLLM's
            encoding). orjson-based servers write every non-finite float as null, NaN included, so a
            top-K null is accepted only where −inf can be: after every finite entry of its position
            (a null first, above finite entries, is an error; a position of nulls only has no
            distribution). The actual token's null reads as −inf (JSON cannot tell it from a NaN).

Servers use the same protocol objects for the other direction (``teachers.server``, the reference
server, and ``testing.canned_server``): ``scoring_fields`` reads where a scoring request carries its
prompts and K (each server validates them with its own messages), ``render_scores`` writes one
prompt's ``ScoredPositions`` as the response carries them, ``render_generation`` writes one prompt's
``Completion`` (with those prompt scores, when asked for) as the result of a generation request, and
``wire_logprob`` is the protocol's one encoding of −inf (vLLM −9999.0, SGLang null), so a rendered body
parses back to the scores and completion it renders.

Generation (``generation_request`` / ``parse_generation``): one prompt per request, since both servers
seed a request's prompts alike (identical prompts with one seed would give identical completions).
The completion ids, the log-probability of each sampled id and the finish reason are read and checked
(ids are integers, one log-probability per id, ≤ 1e-3, −9999 / null → −inf; at most ``max_new_tokens``
ids; "stop" ends on a stop id, and no stop id comes before the end).

``vllm``    ``POST /v1/completions`` with the prompt's ids, ``max_tokens``, ``temperature``, ``top_p``,
            ``top_k`` (0: off), ``seed``, ``stop_token_ids`` with ``ignore_eos: true`` (so exactly those
            ids end a completion), neutral ``min_p`` and penalties (a model's generation_config.json
            would otherwise set vLLM's defaults), ``logprobs: 0``, ``return_token_ids: true`` (vLLM ≥
            0.10.2: ``choices[0].token_ids``, ``prompt_token_ids``, checked against the prompt) and
            ``return_tokens_as_token_ids: true`` (``logprobs.tokens`` as ``token_id:<id>``, checked
            against the ids). ``logprobs.token_logprobs`` are what vLLM's ``--logprobs-mode`` makes
            them: ``raw_logprobs`` (its default) before temperature, ``processed_logprobs`` after
            temperature and top-k/top-p truncation (see ``rollout.server_engine``).
``sglang``  ``POST /generate`` with ``input_ids``, ``sampling_params`` (``max_new_tokens``,
            ``temperature``, ``top_p``, ``top_k`` (-1: off), ``sampling_seed``, ``stop_token_ids``),
            ``return_logprob: true``; reads ``output_ids`` and ``meta_info.output_token_logprobs``
            (``[logprob, id, text]``, ids checked against ``output_ids``) and ``meta_info.finish_reason``
            (``{"type": "stop" | "length"}``). SGLang's ``ignore_eos`` would also switch off
            ``stop_token_ids``, so the model's EOS ids end a completion too. Its log-probabilities are
            log_softmax(logits / temperature) before truncation (unless SGLANG_RETURN_ORIGINAL_LOGPROB
            is set); it honours ``sampling_seed`` only with ``--enable-deterministic-inference``.
"""

from __future__ import annotations

import gc
import itertools
import math
import threading
import uuid
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Any, Callable, Iterator, Literal, Optional, Sequence

import numpy as np
import orjson

from megatron_mopd.rollout.types import SamplingParams

ProtocolName = Literal["vllm", "sglang"]
TokenIds = Sequence[Sequence[int]]
TokenTexts = Callable[[int], Optional[str]]  # the decoded text a server writes beside a token id

NEG_INF_ENCODING = -9999.0  # vLLM clamps log-probabilities to this value so that JSON can carry them
LOGPROB_TOLERANCE = 1e-3  # a log-probability above this is an error (rounding may leave a little above 0)
MASS_TOLERANCE = 1e-3  # the top K's probabilities may exceed 1 by this (rounding), as in losses/topk.py
_EXCERPT_CHARS = 160
_INT: frozenset[type] = frozenset({int})  # types as orjson decodes them (bool is its own type)
_NUMBER: frozenset[type] = frozenset({int, float})
_NUMBER_OR_NULL: frozenset[type] = frozenset({int, float, type(None)})
_NUMERIC_ERRORS = (TypeError, ValueError, OverflowError, KeyError, IndexError, AttributeError)


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


@dataclass(frozen=True)
class ScoredPositions:
    """What a server computed for consecutive positions of one sequence, before any wire encoding:
    entry i scores ``tokens[i]``: its log-probability ``logprobs[i]`` (−inf: probability 0), its 1-based
    rank in the vocabulary ``ranks[i]`` (vLLM's rule: the number of ids at least as probable, ties last),
    and the K most probable ids ``top_ids[i]`` with their ``top_logprobs[i]``, most probable first."""

    tokens: Sequence[int]
    logprobs: Sequence[float]
    ranks: Sequence[int]
    top_ids: Sequence[Sequence[int]]
    top_logprobs: Sequence[Sequence[float]]


@dataclass(frozen=True)
class Generated:
    """One completion as a server returned it: the sampled ``ids``, float32 ``logprobs [len(ids)]``,
    ``finish_reason`` ("stop" or "length") and the decoded ``text`` (None when the server gave none)."""

    ids: tuple[int, ...]
    logprobs: np.ndarray
    finish_reason: str
    text: Optional[str]


@dataclass(frozen=True)
class Completion:
    """What a server generated for one prompt, before any wire encoding (``render_generation``): the
    sampled ``ids`` and their decoded ``text``; ``finish_reason`` "stop" (the last id is a stop id) or
    "length" (``max_new_tokens`` ids, or the context's end); ``stop_reason`` the requested stop id
    (``stop_token_ids``) that ended it, None when it ended otherwise, at an end-of-sequence id included
    (vLLM's ``stop_reason``); ``max_new_tokens`` the request's token limit; ``scores`` the scores of
    ``ids`` (its ``tokens`` are ``ids``; None when log-probabilities were not asked for)."""

    ids: Sequence[int]
    text: str
    finish_reason: str
    stop_reason: Optional[int]
    max_new_tokens: int
    scores: Optional[ScoredPositions]


class WireProtocol(ABC):
    """One server dialect: the scoring endpoint (also the generation endpoint), its request bodies and
    their response parsers (client side), and the reading of scoring requests and the rendering of
    their scores (server side)."""

    name: str
    path: str
    prompts_field: str  # the request field holding the token sequences
    k_field: str  # the request field holding K

    @abstractmethod
    def request(self, sequences: TokenIds, k: int, model: Optional[str]) -> bytes:
        """The JSON body asking for the top-``k`` prompt log-probabilities of every sequence."""

    def scoring_fields(self, request: dict[str, Any]) -> tuple[Any, Any]:
        """The prompts and K of a decoded scoring request, as sent (None where absent): the server
        checks them."""
        return request.get(self.prompts_field), request.get(self.k_field)

    @abstractmethod
    def wire_logprob(self, value: float) -> Optional[float]:
        """``value`` as this protocol writes a log-probability (its encoding of −inf)."""

    @abstractmethod
    def render_scores(self, prompt: Sequence[int], scored: ScoredPositions,
                      texts: Optional[TokenTexts] = None) -> dict[str, list]:
        """The fields of one result of a scoring response that carry the scores of ``prompt`` (``scored``
        scores ``prompt[1:]``, its ``tokens``; ``texts`` gives each id's decoded text, None: null), as the
        real server writes them; ``parse`` reads them back."""

    def parse(self, body: bytes, sequences: TokenIds, k: int, vocab_size: Optional[int] = None) -> ScoredRows:
        """The rows of ``body``, the response to ``request(sequences, k, ...)``; raises ResponseMismatch.
        ``vocab_size``: the ids must be below it (None: not checked)."""
        with _gc_paused():
            return self._parse(body, sequences, k, vocab_size)

    @abstractmethod
    def _parse(self, body: bytes, sequences: TokenIds, k: int, vocab_size: Optional[int]) -> ScoredRows: ...

    @abstractmethod
    def generation_request(self, prompt: Sequence[int], sampling: SamplingParams, seed: int,
                           model: Optional[str]) -> bytes:
        """The JSON body asking for one completion of ``prompt`` (``seed`` replaces ``sampling.seed``)."""

    @abstractmethod
    def render_generation(self, prompt: Sequence[int], completion: Completion,
                          prompt_scores: Optional[dict[str, list]] = None,
                          texts: Optional[TokenTexts] = None) -> dict[str, Any]:
        """One result of a generation response, as the real server writes it: ``completion`` of
        ``prompt`` and, where the server puts them, ``prompt_scores`` (the fields ``render_scores``
        wrote for ``prompt``; None: not asked for). ``texts`` gives each generated id's decoded text in
        its log-probabilities (None: none). ``parse_generation`` reads it back."""

    def parse_generation(self, body: bytes, prompt: Sequence[int], sampling: SamplingParams) -> Generated:
        """The completion in ``body``, the response to ``generation_request(prompt, sampling, ...)``;
        raises ResponseMismatch."""
        ids, logprobs, finish_reason, text = self._parse_generation(_loads(body), prompt)
        if len(ids) > sampling.max_new_tokens:
            raise ResponseMismatch(f"{len(ids)} completion ids for max_new_tokens={sampling.max_new_tokens}")
        stops = set(sampling.stop_token_ids) | self._implicit_stops(finish_reason, ids)
        early = next((i for i, token in enumerate(ids[:-1]) if token in stops), None)
        if early is not None:
            raise ResponseMismatch(f"stop token {ids[early]} at position {early} does not end the completion "
                                   f"({len(ids)} ids)", None, early)
        if finish_reason == "stop" and (not ids or ids[-1] not in stops):
            raise ResponseMismatch(f"finish_reason 'stop' but the completion ends with {ids[-1:]}, not with a stop "
                                   f"token {sorted(stops)}")
        return Generated(ids, logprobs, finish_reason, text)

    @abstractmethod
    def _parse_generation(self, doc: Any, prompt: Sequence[int]) -> tuple[tuple[int, ...], np.ndarray, str,
                                                                        Optional[str]]: ...

    def _implicit_stops(self, finish_reason: str, ids: tuple[int, ...]) -> set[int]:
        """Ids the server stops at besides ``stop_token_ids`` (the model's EOS, where it cannot be switched
        off alone), as far as the response shows them."""
        return set()


class VLLMProtocol(WireProtocol):
    name, path = "vllm", "/v1/completions"
    prompts_field, k_field = "prompt", "prompt_logprobs"

    def request(self, sequences: TokenIds, k: int, model: Optional[str]) -> bytes:
        if model is None:
            raise TeacherConfigError("the vLLM protocol needs a model name")
        return orjson.dumps(
            {"model": model, self.prompts_field: sequences, "max_tokens": 1, "temperature": 1.0, self.k_field: k}
        )

    def wire_logprob(self, value: float) -> Optional[float]:
        """vLLM's clamp: ≤ −9999 (−inf included) is written −9999.0."""
        return max(value, NEG_INF_ENCODING)

    def render_scores(self, prompt: Sequence[int], scored: ScoredPositions,
                      texts: Optional[TokenTexts] = None) -> dict[str, list]:
        """``prompt_logprobs``: null, then per position a dict keyed by token id strings, the actual token
        first (its rank) and then the top K (ranks 1..K; an actual token among them takes its place
        there, first in the dict), each ``{"logprob", "rank", "decoded_token"}``."""
        text = texts or _no_text
        wire = self.wire_logprob
        entries: list[Optional[dict]] = [None]
        for token, logprob, rank, top_ids, top_logprobs in zip(
                scored.tokens, scored.logprobs, scored.ranks, scored.top_ids, scored.top_logprobs):
            entry = {str(token): {"logprob": wire(logprob), "rank": rank, "decoded_token": text(token)}}
            for r, (i, v) in enumerate(zip(top_ids, top_logprobs), 1):
                entry[str(i)] = {"logprob": wire(v), "rank": r, "decoded_token": text(i)}
            entries.append(entry)
        return {"prompt_logprobs": entries}

    def _parse(self, body: bytes, sequences: TokenIds, k: int, vocab_size: Optional[int]) -> ScoredRows:
        per_sequence = self._prompt_logprobs(_loads(body), sequences)
        rows = [entry for entries in per_sequence for entry in entries[1:]]
        try:
            counts = np.fromiter(map(len, rows), np.int64, len(rows))
            total = int(counts.sum())
            infos = list(chain.from_iterable(map(dict.values, rows)))
            ids = _decimal_ids(",".join(chain.from_iterable(rows)), total)
            raw_logprobs = list(map(itemgetter("logprob"), infos))
            well_typed = ids is not None and _types(raw_logprobs) <= _NUMBER
            if well_typed:
                logprobs = np.fromiter(raw_logprobs, np.float32, total)
                ranks = np.fromiter(map(itemgetter("rank"), infos), np.int64, total)  # read as integers: only checked
        except _NUMERIC_ERRORS as exc:
            raise _vllm_defect(rows, sequences, exc) from None
        if not well_typed:
            raise _vllm_defect(rows, sequences, None)
        locate = _RowLocator(sequences)
        wrong = np.flatnonzero((counts < k) | (counts > k + 1))
        if wrong.size:
            row = int(wrong[0])
            raise locate.mismatch(row, f"{counts[row]} entries; expected {k} (the top {k}) or {k + 1} "
                                       f"(the top {k} and the actual token)")
        row_of = np.repeat(np.arange(len(rows)), counts)
        col_of = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        table_logprobs = np.full((len(rows), k + 1), -np.inf, np.float32)
        table_ids = np.full((len(rows), k + 1), -1, np.int64)
        table_ranks = np.zeros((len(rows), k + 1), np.int64)
        table_logprobs[row_of, col_of], table_ids[row_of, col_of], table_ranks[row_of, col_of] = logprobs, ids, ranks
        _check_entries(locate, table_logprobs, table_ids, vocab_size)
        if (ranks < 1).any():
            entry = int(np.flatnonzero(ranks < 1)[0])
            raise locate.mismatch(int(row_of[entry]), f"token {ids[entry]} has rank {ranks[entry]} < 1")
        actual = locate.next_tokens()
        hit = table_ids == actual[:, None]
        missing = np.flatnonzero(~hit.any(axis=1))
        if missing.size:
            row = int(missing[0])
            raise locate.mismatch(row, f"the actual token {actual[row]} is not among the {counts[row]} returned "
                                       f"entries {sorted(rows[row])[:8]}... (a response to other token ids?)")
        column = hit.argmax(axis=1)
        every = np.arange(len(rows))
        outside = (table_ranks > k) & ~hit
        if outside.any():
            row = int(np.flatnonzero(outside.any(axis=1))[0])
            col = int(outside[row].argmax())
            raise locate.mismatch(row, f"token {table_ids[row, col]} has rank {table_ranks[row, col]} > {k} but is "
                                       f"not the actual token ({actual[row]}): one of the top {k} is missing")
        actual_ranks = table_ranks[every, column]
        short = np.flatnonzero((counts == k) & (actual_ranks > k))
        if short.size:
            row = int(short[0])
            raise locate.mismatch(row, f"the actual token {actual[row]} has rank {actual_ranks[row]} > {k} but "
                                       f"only {k} entries came: one of the top {k} is missing")
        served_order = np.where(table_ids < 0, np.iinfo(np.int64).max, table_ranks)  # no entry: last
        return _top_k(locate, table_logprobs, table_ids, table_logprobs[every, column], k, served_order)

    def generation_request(self, prompt: Sequence[int], sampling: SamplingParams, seed: int,
                           model: Optional[str]) -> bytes:
        if model is None:
            raise TeacherConfigError("the vLLM protocol needs a model name")
        return orjson.dumps({
            "model": model, "prompt": list(prompt), "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k, "min_p": 0.0,
            "seed": seed, "stop_token_ids": list(sampling.stop_token_ids), "ignore_eos": True,
            "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "logprobs": 0,
            "return_token_ids": True, "return_tokens_as_token_ids": True,
        })

    def render_generation(self, prompt: Sequence[int], completion: Completion,
                          prompt_scores: Optional[dict[str, list]] = None, texts: Optional[TokenTexts] = None, *,
                          return_tokens_as_token_ids: bool = False, return_token_ids: bool = False) -> dict[str, Any]:
        """A choice without its ``index``: ``text``, ``logprobs`` (null without ``completion.scores``, see
        ``_sample_logprobs``), ``finish_reason``, ``stop_reason``, ``prompt_logprobs`` (null without
        ``prompt_scores``), and ``prompt_token_ids`` and ``token_ids``, null unless ``return_token_ids``.
        ``return_tokens_as_token_ids`` names each generated token ``token_id:<id>``, else by its text
        ("" where ``texts`` gives none)."""
        text = texts or _no_text
        name = (lambda i: f"token_id:{i}") if return_tokens_as_token_ids else (lambda i: text(i) or "")
        scores = completion.scores
        return {
            "text": completion.text,
            "logprobs": None if scores is None else self._sample_logprobs(completion.ids, scores, name),
            "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason,
            **({"prompt_logprobs": None} if prompt_scores is None else prompt_scores),
            "prompt_token_ids": prompt if return_token_ids else None,
            "token_ids": completion.ids if return_token_ids else None,
        }

    def _sample_logprobs(self, ids: Sequence[int], scores: ScoredPositions,
                         name: Callable[[int], str]) -> dict[str, list]:
        """vLLM's ``choices[i].logprobs`` of the generated ``ids``: each token's ``name``, its
        log-probability, ``{name: logprob}`` of it and then the top K (a name twice keeps its first
        place), and the text offsets (cumulative name lengths)."""
        wire = self.wire_logprob
        tokens = [name(token) for token in ids]
        tops = []
        for token, logprob, top_ids, top_logprobs in zip(ids, scores.logprobs, scores.top_ids, scores.top_logprobs):
            top = {name(token): wire(logprob)}
            top.update((name(i), wire(v)) for i, v in zip(top_ids, top_logprobs))
            tops.append(top)
        offsets = list(itertools.accumulate(map(len, tokens[:-1]), initial=0)) if tokens else []
        return {"text_offset": offsets, "token_logprobs": list(map(wire, scores.logprobs)), "tokens": tokens,
                "top_logprobs": tops}

    def _parse_generation(self, doc: Any, prompt: Sequence[int]) -> tuple[tuple[int, ...], np.ndarray, str,
                                                                        Optional[str]]:
        choices = doc.get("choices") if isinstance(doc, dict) else None
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
            raise ResponseMismatch(f"expected 'choices' with one completion, got {_short(choices)} (keys: "
                                   f"{_keys(doc)})")
        choice = choices[0]
        ids = choice.get("token_ids")
        if ids is None:
            raise ResponseMismatch("no choices[0].token_ids: the server ignores return_token_ids (vLLM ≥ 0.10.2 "
                                   "returns them; upgrade the server)")
        ids = _id_tuple(ids, "choices[0].token_ids")
        sent = choice.get("prompt_token_ids")
        if sent is not None and list(sent) != list(prompt):
            raise ResponseMismatch(f"choices[0].prompt_token_ids {_short(sent)} are not the prompt sent "
                                   f"{_short(list(prompt))}")
        logprobs = choice.get("logprobs")
        if not isinstance(logprobs, dict):
            raise ResponseMismatch(f"choices[0].logprobs is {_short(logprobs)}, not vLLM's logprobs object (the "
                                   "server ignored logprobs=0)")
        values = _logprob_array(logprobs.get("token_logprobs"), len(ids), "choices[0].logprobs.token_logprobs")
        tokens = logprobs.get("tokens")
        named = [f"token_id:{token}" for token in ids]
        if isinstance(tokens, list) and tokens[:1] and str(tokens[0]).startswith("token_id:") and tokens != named:
            raise ResponseMismatch(f"choices[0].logprobs.tokens {_short(tokens)} do not name token_ids {_short(ids)}")
        finish = choice.get("finish_reason")
        if finish not in ("stop", "length"):
            raise ResponseMismatch(f"finish_reason {finish!r} (expected 'stop' or 'length'; stop_reason "
                                   f"{choice.get('stop_reason')!r})")
        text = choice.get("text")
        return ids, values, finish, text if isinstance(text, str) else None

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
    prompts_field, k_field = "input_ids", "top_logprobs_num"

    def request(self, sequences: TokenIds, k: int, model: Optional[str]) -> bytes:
        return orjson.dumps(
            {
                self.prompts_field: sequences,
                "sampling_params": {"max_new_tokens": 0},
                "return_logprob": True,
                "logprob_start_len": 0,
                self.k_field: k,
            }
        )

    def wire_logprob(self, value: float) -> Optional[float]:
        """orjson's writing of a non-finite float: null."""
        return value if math.isfinite(value) else None

    def render_scores(self, prompt: Sequence[int], scored: ScoredPositions,
                      texts: Optional[TokenTexts] = None) -> dict[str, list]:
        """``input_token_logprobs`` (``[null, id, text]`` for the first token) and ``input_top_logprobs``
        (null for the first token), as ``entries`` writes the others."""
        text = texts or _no_text
        token_entries, top_entries = self._entries(scored, texts)
        return {"input_token_logprobs": [[None, prompt[0], text(prompt[0])], *token_entries],
                "input_top_logprobs": [None, *top_entries]}

    def _entries(self, scored: ScoredPositions, texts: Optional[TokenTexts] = None) -> tuple[list, list]:
        """SGLang's ``[logprob, id, text]`` per scored token and ``[[logprob, id, text] × K]`` (its top K)
        per scored token (the ``*_token_logprobs`` and ``*_top_logprobs`` of prompts and outputs)."""
        text, wire = texts or _no_text, self.wire_logprob
        token_entries = [[wire(v), token, text(token)] for token, v in zip(scored.tokens, scored.logprobs)]
        top_entries = [[[wire(v), i, text(i)] for i, v in zip(top_ids, top_logprobs)]
                       for top_ids, top_logprobs in zip(scored.top_ids, scored.top_logprobs)]
        return token_entries, top_entries

    def _parse(self, body: bytes, sequences: TokenIds, k: int, vocab_size: Optional[int]) -> ScoredRows:
        token_lists, top_lists = self._meta_lists(_loads(body), sequences)
        locate = _RowLocator(sequences)
        tops = [top for per_sequence in top_lists for top in per_sequence[1:]]
        try:
            sent_ids = np.fromiter(chain.from_iterable(sequences), np.int64)
            raw_got = list(map(itemgetter(1), chain.from_iterable(token_lists)))
            raw_token_logprobs = [entry[0] for entries in token_lists for entry in entries[1:]]
            counts = np.fromiter(map(len, tops), np.int64, len(tops))
            flat = list(chain.from_iterable(tops))
            raw_logprobs, raw_ids = list(map(itemgetter(0), flat)), list(map(itemgetter(1), flat))
            well_typed = (_types(raw_got) <= _INT and _types(raw_ids) <= _INT
                          and _types(raw_token_logprobs) <= _NUMBER_OR_NULL and _types(raw_logprobs) <= _NUMBER_OR_NULL)
            if well_typed:
                got_ids = np.array(raw_got, np.int64)
                token_logprobs = np.array(raw_token_logprobs, np.float32)  # null → NaN
                logprobs, ids = np.array(raw_logprobs, np.float32), np.array(raw_ids, np.int64)
        except _NUMERIC_ERRORS as exc:
            raise _sglang_defect(token_lists, tops, sequences, exc) from None
        if not well_typed:
            raise _sglang_defect(token_lists, tops, sequences, None)
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
        logprobs, ids = logprobs.reshape(-1, k), ids.reshape(-1, k)
        nulls = np.isnan(logprobs)
        if nulls.any():  # most probable first (torch.topk): a null above a finite entry is no −inf but a NaN
            above = np.logical_or.accumulate(nulls, axis=1) & (logprobs > NEG_INF_ENCODING)
            if above.any():
                row = int(np.flatnonzero(above.any(axis=1))[0])
                raise locate.mismatch(row, "input_top_logprobs: a null log-probability (NaN or −inf, as orjson "
                                           "writes both) comes before a finite one, so it is no −inf")
            logprobs[nulls] = -np.inf
        token_logprobs[np.isnan(token_logprobs)] = -np.inf  # null: −inf (or a NaN, which JSON cannot tell apart)
        if (ids < 0).any():
            row = int(np.flatnonzero((ids < 0).any(axis=1))[0])
            raise locate.mismatch(row, f"input_top_logprobs: negative token id {ids[row].min()}")
        _check_entries(locate, logprobs, ids, vocab_size)
        positive = np.flatnonzero(token_logprobs > LOGPROB_TOLERANCE)
        if positive.size:
            row = int(positive[0])
            raise locate.mismatch(row, f"input_token_logprobs: the actual token's log-probability "
                                       f"{token_logprobs[row]} is positive")
        return _top_k(locate, logprobs, ids, token_logprobs, k)

    def generation_request(self, prompt: Sequence[int], sampling: SamplingParams, seed: int,
                           model: Optional[str]) -> bytes:
        return orjson.dumps({
            "input_ids": list(prompt),
            "sampling_params": {
                "max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                "top_p": sampling.top_p, "top_k": sampling.top_k or -1, "min_p": 0.0, "sampling_seed": seed,
                "stop_token_ids": list(sampling.stop_token_ids),
            },
            "return_logprob": True,
        })

    def render_generation(self, prompt: Sequence[int], completion: Completion,
                          prompt_scores: Optional[dict[str, list]] = None,
                          texts: Optional[TokenTexts] = None) -> dict[str, Any]:
        """``text``, ``output_ids`` and ``meta_info``: a fresh request ``id``, ``finish_reason``
        (``{"type": "stop", "matched": <the last id>}`` or ``{"type": "length", "length":
        <max_new_tokens>}``), the prompt and completion token counts, ``cached_tokens`` 0, then
        ``prompt_scores`` when given and ``output_token_logprobs`` / ``output_top_logprobs`` (as
        ``_entries`` writes them) when ``completion.scores`` is."""
        ids = completion.ids
        finish = ({"type": "stop", "matched": ids[-1]} if completion.finish_reason == "stop"
                  else {"type": "length", "length": completion.max_new_tokens})
        meta: dict[str, Any] = {"id": uuid.uuid4().hex, "finish_reason": finish, "prompt_tokens": len(prompt),
                                "completion_tokens": len(ids), "cached_tokens": 0}
        if prompt_scores is not None:
            meta.update(prompt_scores)
        if completion.scores is not None:
            meta["output_token_logprobs"], meta["output_top_logprobs"] = self._entries(completion.scores, texts)
        return {"text": completion.text, "output_ids": ids, "meta_info": meta}

    def _parse_generation(self, doc: Any, prompt: Sequence[int]) -> tuple[tuple[int, ...], np.ndarray, str,
                                                                        Optional[str]]:
        meta = doc.get("meta_info") if isinstance(doc, dict) else None
        if not isinstance(meta, dict):
            raise ResponseMismatch(f"expected one result with meta_info, got {_short(doc)}")
        entries = meta.get("output_token_logprobs")
        if not isinstance(entries, list) or not all(isinstance(e, list) and len(e) >= 2 for e in entries):
            raise ResponseMismatch(f"meta_info.output_token_logprobs is {_short(entries)}, not a list of [logprob, "
                                   "id, text] (the server ignored return_logprob)")
        ids = _id_tuple(doc.get("output_ids", [e[1] for e in entries]), "output_ids")
        if tuple(e[1] for e in entries) != ids:
            raise ResponseMismatch(f"output_token_logprobs ids {_short([e[1] for e in entries])} are not output_ids "
                                   f"{_short(list(ids))}")
        values = _logprob_array([e[0] for e in entries], len(ids), "meta_info.output_token_logprobs")
        finish = meta.get("finish_reason")
        kind = finish.get("type") if isinstance(finish, dict) else None
        if kind not in ("stop", "length"):
            raise ResponseMismatch(f"meta_info.finish_reason {_short(finish)} (expected type 'stop' or 'length')")
        text = doc.get("text")
        return ids, values, kind, text if isinstance(text, str) else None

    def _implicit_stops(self, finish_reason: str, ids: tuple[int, ...]) -> set[int]:
        return {ids[-1]} if finish_reason == "stop" and ids else set()  # the model's EOS ends it too

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
            first_token, first_top = token_lists[-1][:1], top_lists[-1][:1]
            if first_token and isinstance(first_token[0], list) and first_token[0][:1] != [None]:
                raise ResponseMismatch(f"the first input_token_logprobs entry {first_token[0]!r} has a logprob; "
                                       "expected null (no token precedes it)", index, 0)
            if first_top and first_top[0] is not None:
                raise ResponseMismatch(f"the first input_top_logprobs entry is {_short(first_top[0])}, not null (no "
                                       "token precedes it)", index, 0)
        return token_lists, top_lists


PROTOCOLS: dict[str, WireProtocol] = {p.name: p for p in (VLLMProtocol(), SGLangProtocol())}


def get_protocol(name: str) -> WireProtocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown teacher protocol {name!r}; choose one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def protocol_at(path: str) -> Optional[WireProtocol]:
    """The protocol whose scoring endpoint is ``path`` (None: no protocol's)."""
    return next((p for p in PROTOCOLS.values() if p.path == path), None)


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


def _check_entries(locate: _RowLocator, logprobs: np.ndarray, ids: np.ndarray, vocab_size: Optional[int]) -> None:
    """Rows ``[N, W]`` of candidate log-probabilities and ids (id < 0: no entry): every log-probability
    ≤ ``LOGPROB_TOLERANCE`` (not NaN), every id below ``vocab_size`` (when given), and no id twice in a
    row."""
    bad = ~(logprobs <= LOGPROB_TOLERANCE)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        value, token = logprobs[row][bad[row]][0], ids[row][bad[row]][0]
        raise locate.mismatch(row, f"token {token} has log-probability {value}: "
                                   f"{'NaN' if np.isnan(value) else 'positive'}, not a log-probability")
    if vocab_size is not None and (ids >= vocab_size).any():
        row = int(np.flatnonzero((ids >= vocab_size).any(axis=1))[0])
        raise locate.mismatch(row, f"token id {ids[row][ids[row] >= vocab_size][0]} is outside the vocabulary the "
                                   f"loss indexes, [0, {vocab_size}): the server serves a model with another "
                                   f"vocabulary (a teacher with another tokenizer needs that tokenizer and a "
                                   f"projection built for it; check the server's model and the teacher's tokenizer)")
    ordered = np.sort(ids, axis=1)
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if repeated.any():
        row = int(np.flatnonzero(repeated.any(axis=1))[0])
        raise locate.mismatch(row, f"token {ordered[row, 1:][repeated[row]][0]} appears twice in one position")


def _top_k(locate: _RowLocator, logprobs: np.ndarray, ids: np.ndarray, token_logprobs: np.ndarray,
           k: int, tiebreak: Optional[np.ndarray] = None) -> ScoredRows:
    """The K largest of each row of ``[N, W]`` candidates, most probable first; ties go to the smaller
    ``tiebreak`` (vLLM: the rank the server gave, so its top K and their order stand, an actual token
    outside them ranking after them), else keep column order;
    log-probabilities ≤ −9999 (vLLM's encoding of −inf, also used by some SGLang-style servers) → −inf.
    A row whose most probable candidate is not finite (all −inf / null) is an error: no distribution."""
    for array in (logprobs, token_logprobs):
        array[array <= NEG_INF_ENCODING] = -np.inf
    if tiebreak is None:
        order = np.argsort(-logprobs, axis=1, kind="stable")[:, :k]
    else:
        order = np.lexsort((tiebreak, -logprobs), axis=1)[:, :k]
    top_logprobs = np.ascontiguousarray(np.take_along_axis(logprobs, order, axis=1))
    empty = np.flatnonzero(~np.isfinite(top_logprobs[:, 0]))
    if empty.size:
        raise locate.mismatch(int(empty[0]), f"no finite log-probability among the top {k} (all −inf, −9999 or "
                                             "null): the position has no distribution")
    mass = np.exp(top_logprobs).sum(axis=1, dtype=np.float32)
    over = np.flatnonzero(mass > 1.0 + MASS_TOLERANCE)
    if over.size:
        row = int(over[0])
        raise locate.mismatch(row, f"the top {k} probabilities sum to {mass[row]:.4f} > 1: these are not the "
                                   f"log-probabilities of one distribution (logits? e.g. vLLM's --logprobs-mode "
                                   f"raw_logits or processed_logits); serve log-probabilities (vLLM's default "
                                   f"raw_logprobs)")
    return ScoredRows(top_logprobs, np.ascontiguousarray(np.take_along_axis(ids, order, axis=1)), token_logprobs)


_GC_PAUSE_THRESHOLD = 1 << 30  # generation-0 allocations before an automatic collection: none within a parse
_gc_lock = threading.Lock()
_gc_state: dict[str, Any] = {"pausers": 0, "saved": None}


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Hold off automatic cyclic garbage collection (process-wide) while any thread parses.

    The first of concurrent parses raises the generation-0 threshold to ``_GC_PAUSE_THRESHOLD`` (unless
    it is 0 or already that high) and saves the thresholds; the last one to finish restores them only if
    they are still the ones it set, so a ``gc.set_threshold`` made meanwhile stands. ``gc.isenabled()``
    is never changed: a trainer's ``gc.disable()`` / ``gc.enable()`` (e.g. Megatron's manual GC), made
    before or during a parse, stays as it made it, and ``gc.collect()`` works throughout. A caller that
    reads ``gc.get_threshold()`` during a parse sees the raised threshold."""
    with _gc_lock:
        if _gc_state["pausers"] == 0:
            saved = gc.get_threshold()
            _gc_state["saved"] = saved if 0 < saved[0] < _GC_PAUSE_THRESHOLD else None
            if _gc_state["saved"] is not None:
                gc.set_threshold(_GC_PAUSE_THRESHOLD, *saved[1:])
        _gc_state["pausers"] += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_state["pausers"] -= 1
            saved = _gc_state["saved"]
            if _gc_state["pausers"] == 0 and saved is not None:
                _gc_state["saved"] = None
                if gc.get_threshold() == (_GC_PAUSE_THRESHOLD, *saved[1:]):
                    gc.set_threshold(*saved)


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ResponseMismatch(f"malformed JSON ({exc}); {len(body)} bytes starting {excerpt(body)}") from None


def _id_tuple(value: Any, what: str) -> tuple[int, ...]:
    """``value`` as token ids (a list of non-negative JSON integers)."""
    if not isinstance(value, list) or _types(value) - _INT or any(token < 0 for token in value):
        raise ResponseMismatch(f"{what} is {_short(value)}, not a list of token ids")
    return tuple(value)


def _logprob_array(values: Any, count: int, what: str) -> np.ndarray:
    """float32 ``[count]`` log-probabilities of ``values`` (numbers; null and ≤ −9999 → −inf)."""
    if not isinstance(values, list) or len(values) != count or _types(values) - _NUMBER_OR_NULL:
        raise ResponseMismatch(f"{what} is {_short(values)}, not {count} log-probabilities (one per completion id)")
    array = np.array(values, np.float32)
    array[np.isnan(array) | (array <= NEG_INF_ENCODING)] = -np.inf
    if (array > LOGPROB_TOLERANCE).any():
        position = int(np.flatnonzero(array > LOGPROB_TOLERANCE)[0])
        raise ResponseMismatch(f"{what}: log-probability {array[position]} of completion id {position} is positive",
                               None, position)
    return array


def _keys(doc: Any) -> str:
    return str(sorted(doc)[:8]) if isinstance(doc, dict) else type(doc).__name__


def _decimal_ids(joined: str, count: int) -> Optional[np.ndarray]:
    """The ids of ``count`` comma-joined vLLM keys; None unless every key is a non-empty string of ASCII
    digits (no sign, space, underscore or other digits, which ``int`` would accept) below 2^62."""
    if count == 0:
        return np.zeros(0, np.int64)
    if (not joined.isascii() or joined.count(",") != count - 1 or ",," in joined or joined[0] == ","
            or joined[-1] == ","):
        return None
    chars = np.frombuffer(joined.encode("ascii"), np.uint8)
    if not (((chars - 48) <= 9) | (chars == 44)).all():  # uint8: 0-9 are 48-57, "," is 44
        return None
    ids = np.fromstring(joined, np.int64, sep=",")
    return ids if ids.size == count and (ids < 2 ** 62).all() else None


def _no_text(token: int) -> None:
    return None


def _types(values: list) -> set[type]:
    return set(map(type, values))


def _is_number(value: Any) -> bool:
    return type(value) in _NUMBER


def _is_int64(value: Any) -> bool:
    return type(value) is int and -2 ** 63 <= value < 2 ** 63


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "…"


def _unreadable(what: str, cause: Optional[Exception]) -> ResponseMismatch:
    return ResponseMismatch(f"unreadable {what}" + ("" if cause is None else f" ({type(cause).__name__}: {cause})"))


def _vllm_defect(rows: list, sequences: TokenIds, cause: Optional[Exception]) -> ResponseMismatch:
    """Locate the first malformed vLLM position (the slow path, run only after the fast one failed)."""
    locate = _RowLocator(sequences)
    for row, entry in enumerate(rows):
        if not isinstance(entry, dict):
            return locate.mismatch(row, "the entry is missing (null)" if entry is None else
                                   f"the entry is a {type(entry).__name__}, not a dict of token ids")
        for token, info in entry.items():
            if not (token.isascii() and token.isdigit() and len(token) <= 18):
                return locate.mismatch(row, f"key {token!r} is not a token id (a string of decimal digits)")
            if not isinstance(info, dict) or not _is_number(info.get("logprob")):
                return locate.mismatch(row, f"token {token}: {_short(info)} has no numeric 'logprob'")
            if not _is_int64(info.get("rank")):
                return locate.mismatch(row, f"token {token}: {_short(info)} has no integer 'rank'")
    return _unreadable("prompt_logprobs", cause)


def _sglang_defect(token_lists: list, tops: list, sequences: TokenIds, cause: Optional[Exception]) -> ResponseMismatch:
    """Locate the first malformed SGLang entry (the slow path, run only after the fast one failed)."""

    def bad(entry: Any, first: bool) -> Optional[str]:
        if not isinstance(entry, list) or len(entry) < 2:
            return f"{_short(entry)} is not a [logprob, id, text] triple"
        if not first and not (_is_number(entry[0]) or entry[0] is None):
            return f"{_short(entry)} has a non-numeric logprob"
        if type(entry[1]) is not int:
            return f"{_short(entry)} has a non-integer token id"
        if not 0 <= entry[1] < 2 ** 63:
            return f"{_short(entry)} has an out-of-range token id"
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
    return _unreadable("logprobs", cause)
