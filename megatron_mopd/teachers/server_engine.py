"""The reference teacher server's model engine: a Hugging Face causal LM that scores and generates.

``TeacherEngine`` loads any local ``AutoModelForCausalLM`` directory (its tokenizer too when the
directory has one) and runs requests through it, one at a time under a lock; ``teachers.server`` puts
the vLLM and SGLang HTTP protocols in front of it.

The prompts of one request go through one forward (right-padded: a real position never sees a pad,
so each prompt's logits are those of running it alone); log-probabilities are float32 log_softmax of
the logits (−inf kept; the wire protocol encodes it). Each scored position has its token's 1-based
rank in the vocabulary as vLLM computes it (``batched_count_greater_than`` in vLLM's
``v1/sample/ops/logprobs.py``: the number of ids whose log-probability is ≥ the token's, so a token tied
with others takes the last of their ranks) and the K most probable ids (``torch.topk``).

Generation continues from the same forward with a KV cache, greedily when the temperature is 0 (< 1e-5,
like vLLM), else sampling at that temperature with one generator per prompt seeded by ``seed`` (so a
prompt's sample does not depend on its batch; identical prompts with one seed give identical
completions, as in vLLM): top-k, then top-p (vLLM's order: ties with the k-th logit stay, the most
probable id always stays), renormalized, one ``torch.multinomial`` draw. Generation stops after any of
the request's stop ids. Generated tokens are scored under ``Sampling.logprobs``: "raw" (log_softmax of
the logits), "scaled" (after temperature) or "processed" (after temperature and truncation; truncated
ids −inf); greedy requests score the raw logits.

Weight reloads load the directory without the model lock, then swap it in under the lock: a request
runs wholly on the old or wholly on the new weights. The new model must have the served vocabulary size.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_mopd.teachers.protocols import ScoredPositions

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS: smaller temperatures are greedy
_ROWS_PER_CHUNK = 1024  # rows of float32 log_softmax held at once


class RequestError(Exception):
    """A request the server refuses with HTTP ``status`` and ``message`` (and ``body``, when the real
    server answers that request with a body of its own instead of its error format)."""

    def __init__(self, message: str, status: int = 400, body: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status, self.body = status, body


@dataclass
class Rows:
    """Scores of m rows, each of one target token: its log-probability (−inf allowed), its 1-based
    vocabulary rank (vLLM's: the number of ids at least as probable, so ties rank last), and the row's K
    most probable ids with their log-probabilities, most probable first."""

    logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]

    @staticmethod
    def empty() -> "Rows":
        return Rows([], [], [], [])

    def extend(self, other: "Rows") -> None:
        self.logprobs += other.logprobs
        self.ranks += other.ranks
        self.top_ids += other.top_ids
        self.top_logprobs += other.top_logprobs

    def row(self, index: int) -> "Rows":
        """Row ``index`` alone."""
        return Rows(self.logprobs[index:index + 1], self.ranks[index:index + 1], self.top_ids[index:index + 1],
                    self.top_logprobs[index:index + 1])

    def of(self, tokens: list[int]) -> ScoredPositions:
        """These rows as the scores of ``tokens`` (row i scores ``tokens[i]``), for a wire protocol."""
        return ScoredPositions(tokens, self.logprobs, self.ranks, self.top_ids, self.top_logprobs)


def score_rows(logits: torch.Tensor, targets: torch.Tensor, k: int) -> Rows:
    """``Rows`` of ``logits`` [m, V] (any dtype; scored in float32 log_softmax) for the target ids [m]."""
    rows = Rows.empty()
    for start in range(0, logits.shape[0], _ROWS_PER_CHUNK):
        logprobs = logits[start:start + _ROWS_PER_CHUNK].float().log_softmax(-1)
        target = logprobs.gather(-1, targets[start:start + _ROWS_PER_CHUNK, None])
        ranks = (logprobs >= target).sum(-1)  # vLLM's batched_count_greater_than: ties rank last
        top = logprobs.topk(k, -1)
        rows.extend(Rows(target[:, 0].tolist(), ranks.tolist(), top.indices.tolist(), top.values.tolist()))
    return rows


@dataclass(frozen=True)
class Sampling:
    """How one request generates: ``max_new`` tokens at ``temperature`` (greedy below 1e-5), ``top_k``
    (0: off) and ``top_p``, per-prompt generators seeded by ``seed`` (None: random), ending after any of
    ``stop_ids``; generated tokens are scored (top ``output_k``; not when None) under ``logprobs``:
    "raw" (τ = 1, untruncated), "scaled" (τ, untruncated) or "processed" (τ, truncated)."""

    max_new: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_ids: frozenset[int] = frozenset()
    output_k: Optional[int] = None
    logprobs: str = "raw"

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_BELOW


@dataclass
class Result:
    """One prompt's result: ``prompt_rows`` row j scores prompt token j + 1 (None unless asked for),
    ``output`` the generated ids, ``output_rows`` row i scores ``output[i]`` (None unless asked for),
    ``stopped`` whether generation ended at a stop id (else at the token limit)."""

    prompt_rows: Optional[Rows]
    output: list[int]
    output_rows: Optional[Rows]
    stopped: bool


def _truncated(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits`` [B, V] with the ids outside the top-k, then outside the top-p nucleus, at −inf
    (vLLM's ``apply_top_k_top_p``: ties with the k-th largest stay; the most probable id always stays)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


class TeacherEngine:
    """A Hugging Face causal LM (module doc), loaded from ``model_dir`` in ``dtype`` ("float32" or
    "bfloat16") on ``device``. Thread-safe: the model and the tokenizer each have a lock."""

    def __init__(self, model_dir: str | os.PathLike, dtype: str = "float32", device: str = "cpu") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise ValueError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
        self.model_dir = str(model_dir)
        self._dtype = DTYPES[dtype]
        self._device = torch.device(device)
        self._model, self._tokenizer = _load(self.model_dir, self._dtype, self._device)
        self.vocab_size: int = self._model.get_output_embeddings().weight.shape[0]
        self.max_model_len: Optional[int] = getattr(self._model.config, "max_position_embeddings", None)
        self.eos_ids = _eos_ids(self._model, self._tokenizer)
        self.texts: list[Optional[str]] = [None] * self.vocab_size  # vLLM's decoded_token: each id decoded alone
        if self._tokenizer is not None:
            known = min(len(self._tokenizer), self.vocab_size)
            self.texts[:known] = self._tokenizer.batch_decode([[i] for i in range(known)])
        self._lock = threading.Lock()  # the model
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer may fail when used by two threads at once

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """The token ids of each text (the model directory must have a tokenizer)."""
        with self._tokenizer_lock:
            return [self._tokenizer(text)["input_ids"] for text in texts]

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids`` without special tokens ("" without a tokenizer)."""
        if self._tokenizer is None or not ids:
            return ""
        with self._tokenizer_lock:
            return self._tokenizer.decode(ids, skip_special_tokens=True)

    def run(self, prompts: list[list[int]], k: Optional[int], sampling: Sampling) -> list[Result]:
        """Score the prompts (top ``k`` per position; not when None) and generate from them, all in one
        batch; raises ``RequestError`` for sampling options out of range or a context too long."""
        if sampling.max_new < 0:
            raise RequestError(f"the number of tokens to generate must be ≥ 0, got {sampling.max_new}")
        if sampling.temperature < 0:
            raise RequestError(f"'temperature' must be ≥ 0, got {sampling.temperature}")
        if not 0 < sampling.top_p <= 1 or sampling.top_k < 0:
            raise RequestError(f"need top_p in (0, 1] and top_k ≥ 0 (-1: off); got {sampling.top_p}, "
                               f"{sampling.top_k}")
        if sampling.seed is not None and not -2**63 <= sampling.seed < 2**64:
            raise RequestError(f"the seed must be in [-2**63, 2**64), got {sampling.seed}")
        longest = max(map(len, prompts))
        if self.max_model_len is not None and longest + sampling.max_new > self.max_model_len:
            raise RequestError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                               f"requested {longest + sampling.max_new} tokens ({longest} in the messages, "
                               f"{sampling.max_new} in the completion). Please reduce the length of the messages "
                               f"or completion.")
        with self._lock:
            return self._forward(prompts, k, sampling)

    def reload(self, model_dir: Optional[str] = None) -> str:
        """Load the weights of ``model_dir`` (default: the served directory), which becomes the served
        directory, and swap them in; returns a summary. Raises ``RequestError`` when it cannot be loaded."""
        model_dir = self.model_dir if model_dir is None else str(model_dir)
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise RequestError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
        began = time.perf_counter()
        try:
            model, _ = _load(model_dir, self._dtype, self._device)
        except Exception as error:  # a half-written or foreign directory: the served weights stay
            raise RequestError(f"loading {model_dir} failed: {type(error).__name__}: {error}") from None
        vocab_size = model.get_output_embeddings().weight.shape[0]
        if vocab_size != self.vocab_size:
            raise RequestError(f"{model_dir} has a vocabulary of {vocab_size} ids; the served model has "
                               f"{self.vocab_size}")
        with self._lock:
            self._model, self.model_dir = model, model_dir
        return f"reloaded {model_dir} in {time.perf_counter() - began:.2f} s"

    @torch.inference_mode()
    def _forward(self, prompts: list[list[int]], k: Optional[int], sampling: Sampling) -> list[Result]:
        device, batch = self._device, len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        ids = torch.zeros(batch, int(lengths.max()), dtype=torch.long)
        for b, prompt in enumerate(prompts):
            ids[b, :len(prompt)] = torch.tensor(prompt)
        ids = ids.to(device)
        mask = (torch.arange(ids.shape[1], device=device) < lengths[:, None]).long()
        out = self._model(input_ids=ids, attention_mask=mask, use_cache=sampling.max_new > 1)
        results = [Result(None if k is None else score_rows(out.logits[b, :len(p) - 1], ids[b, 1:len(p)], k), [],
                          None if sampling.output_k is None else Rows.empty(), False)
                   for b, p in enumerate(prompts)]
        if sampling.max_new == 0:
            return results
        logits = out.logits[torch.arange(batch, device=device), lengths - 1]
        generators = None
        if not sampling.greedy:
            generators = [torch.Generator(device) for _ in prompts]
            for generator in generators:
                if sampling.seed is None:
                    generator.seed()
                else:
                    generator.manual_seed(sampling.seed)
        cache, positions, live = out.past_key_values, lengths.clone(), list(range(batch))
        for step in range(sampling.max_new):
            raw = logits.float()
            scaled = raw if sampling.greedy else raw / sampling.temperature
            truncated = scaled if sampling.greedy else _truncated(scaled, sampling.top_k, sampling.top_p)
            if generators is None:
                tokens = raw.argmax(-1)
            else:
                probs = truncated.softmax(-1)
                tokens = torch.cat([torch.multinomial(probs[b], 1, generator=generators[b]) for b in range(batch)])
            scored = None
            if sampling.output_k is not None:
                scored = score_rows({"raw": raw, "scaled": scaled, "processed": truncated}[sampling.logprobs],
                                    tokens, sampling.output_k)
            chosen = tokens.tolist()
            for b in list(live):
                result, token = results[b], chosen[b]
                result.output.append(token)
                if scored is not None:
                    result.output_rows.extend(scored.row(b))
                if token in sampling.stop_ids:
                    result.stopped = True
                    live.remove(b)
            if not live or step == sampling.max_new - 1:
                break
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=device)], 1)
            out = self._model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                              past_key_values=cache, use_cache=True)
            cache, positions, logits = out.past_key_values, positions + 1, out.logits[:, -1]
        return results


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
    ids = set([found] if isinstance(found, int) and not isinstance(found, bool) else found or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
