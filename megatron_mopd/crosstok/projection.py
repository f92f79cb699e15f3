"""The vocabulary projection W (student vocabulary × teacher vocabulary, sparse) of CTKD / X-Token.

Row i says which teacher tokens student token i stands for (docs/design.md §4). It is built in passes
over canonical bytes (``canonical.py``), each row taking the first pass that maps it:

``special``      a special token ↔ the teacher's special token with the same content
                 (``<|endoftext|>``, ``</s>``); with ``match_special=False`` special rows stay empty.
                 A ``<0xNN>`` byte-fallback token registered as special is a byte, not a special
                 token: it is matched by ``exact`` (and reached by ``multi_token``) like any byte.
``exact``        the teacher has a token with identical canonical bytes: a one-hot row.
``multi_token``  the student token's bytes re-encoded by the teacher into t₀…t_{ℓ−1} (verified to
                 spell exactly those bytes; partial UTF-8 maps to single-byte tokens); the first
                 ``max_pieces`` get β·γ^i, normalized to sum 1 (repeated ids accumulate; β cancels).
``reverse``      (``reverse=True``) teacher tokens that no row above reaches are re-encoded by the
                 student into s₀…s_{m−1}; with 2 ≤ m ≤ ``max_pieces`` this adds column j to row s₀
                 with raw weight γ^(m−1) (m = 1 is a duplicate spelling of a reached token). A row
                 that also has forward entries keeps β of its mass on them and gives 1 − β to its
                 reverse entries (split ∝ γ^(m−1)), so ``reverse`` requires β > 1/2: an exact row's
                 first slot stays the identical token. A row with reverse entries only counts as
                 ``reverse``; rows mapped before keep their kind.
``unmapped``     none of the above: an all-zero row.
Every row then keeps its ``top_k`` largest entries (ties: lower teacher id) and is normalized.

Build cost, linear in the vocabulary sizes: one batched encode per direction (the teacher re-encodes
the non-exact student tokens; with ``reverse`` the student re-encodes unreached teacher tokens) in
the fast tokenizers' Rust code, one Python pass of string/dict operations per token (canonical keys,
verifying each split), numpy for the rest, and a fixed cost per tokenizer: serializing its backend
JSON (to build the verbatim encoder) and the fingerprint. These four parts weigh about the same; a
150k student against a 48k teacher builds in about 5 s on 2 CPU cores, two 32k vocabularies in 1 s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from megatron_mopd.crosstok.canonical import CanonicalVocabulary, vocabulary_fingerprint
from megatron_mopd.crosstok.local_tokenizer import load_local_tokenizer

logger = logging.getLogger(__name__)

TokenizerLike = Union[PreTrainedTokenizerBase, str, os.PathLike]

FORMAT = "megatron_mopd.vocab_projection"
FORMAT_VERSION = "1"
_TENSORS = ("indices", "weights", "exact")
_KINDS = ("exact", "multi_token", "reverse", "special", "unmapped")
_EXACT, _MULTI, _REVERSE, _SPECIAL, _UNMAPPED = range(len(_KINDS))


@dataclass(frozen=True)
class ProjectionStats:
    """How many student rows each pass mapped; the five counts add up to the student vocabulary."""

    exact: int
    multi_token: int
    reverse: int
    special: int
    unmapped: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class ProjectionShard:
    """Rows ``[start, start + len(indices))`` of the padded student vocabulary (one TP rank's range).

    ``indices`` int64 ``[rows, R]`` teacher ids (−1 = empty slot), ``weights`` float32 ``[rows, R]``;
    rows past the student vocabulary (padding) are empty.
    """

    start: int
    indices: torch.Tensor
    weights: torch.Tensor


@dataclass(frozen=True, eq=False)
class VocabProjection:
    """Sparse row-stochastic map from student tokens to teacher tokens.

    Attributes:
        indices: int64 ``[Vs, R]`` teacher ids, −1 in empty slots; slots sorted by weight descending.
        weights: float32 ``[Vs, R]``, 0 in empty slots; each row sums to 1 (mapped) or is all 0.
        exact: bool ``[Vs]``: the row's first slot is the identical teacher token (same canonical
            bytes, or the same special-token content); one-hot unless ``reverse`` added entries.
        teacher_vocab_size: ``len(teacher_tokenizer)`` (added tokens included).
        params: the build parameters (``beta``, ``gamma``, ``max_pieces``, ``top_k``, ``reverse``,
            ``match_special``).
        student_fingerprint, teacher_fingerprint: ``vocabulary_fingerprint`` of each tokenizer.
        fingerprint: sha256 over both vocabulary fingerprints and the parameters.
        stats: rows per pass.
    R (the slots per row) is the widest row, at most ``top_k``.
    """

    indices: torch.Tensor
    weights: torch.Tensor
    exact: torch.Tensor
    teacher_vocab_size: int
    params: dict[str, Any]
    student_fingerprint: str
    teacher_fingerprint: str
    stats: ProjectionStats
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        vs = self.indices.shape[0]
        if self.indices.dtype != torch.int64 or self.indices.dim() != 2 or self.indices.shape[1] < 1:
            raise ValueError(f"indices must be int64 [Vs, R], got {self.indices.dtype} {tuple(self.indices.shape)}")
        if self.weights.dtype != torch.float32 or self.weights.shape != self.indices.shape:
            raise ValueError(f"weights must be float32 {tuple(self.indices.shape)}, got {self.weights.dtype} "
                             f"{tuple(self.weights.shape)}")
        if self.exact.dtype != torch.bool or self.exact.shape != (vs,):
            raise ValueError(f"exact must be bool [{vs}], got {self.exact.dtype} {tuple(self.exact.shape)}")
        if vs and (self.indices.min() < -1 or self.indices.max() >= self.teacher_vocab_size):
            raise ValueError(f"indices must be teacher ids in [0, {self.teacher_vocab_size}) or -1")
        if sum(self.stats.as_dict().values()) != vs:
            raise ValueError(f"stats {self.stats.as_dict()} do not add up to the {vs} student rows")
        fingerprint = _fingerprint(self.student_fingerprint, self.teacher_fingerprint, self.params)
        object.__setattr__(self, "fingerprint", fingerprint)

    @property
    def student_vocab_size(self) -> int:
        return self.indices.shape[0]

    @classmethod
    def build(
        cls,
        student: TokenizerLike,
        teacher: TokenizerLike,
        *,
        beta: float = 0.9,
        gamma: float = 0.1,
        max_pieces: int = 4,
        top_k: int = 8,
        reverse: bool = False,
        match_special: bool = True,
        progress: bool = False,
    ) -> "VocabProjection":
        """Build the projection between two fast Hugging Face tokenizers (objects or local paths).

        The passes and weights are described in the module docstring; ``progress`` shows a tqdm bar
        per re-encoding pass. The stats are logged at INFO.
        """
        params = _validated_params(beta, gamma, max_pieces, top_k, reverse, match_special)
        began = time.perf_counter()
        s_vocab = CanonicalVocabulary.of(_tokenizer(student, "student"))
        t_vocab = CanonicalVocabulary.of(_tokenizer(teacher, "teacher"))
        vs, vt = len(s_vocab), len(t_vocab)
        kind = np.full(vs, _UNMAPPED, dtype=np.int8)
        entries = _Entries()

        if match_special:
            for content, i in s_vocab.specials.items():
                if (j := t_vocab.specials.get(content)) is not None:
                    kind[i] = _SPECIAL
                    entries.add(i, [j], [1.0])
        remaining: list[int] = []
        for i, key in enumerate(s_vocab.keys):
            j = t_vocab.identical(key, prefer_fallback=s_vocab.fallback[i]) if key else None
            if j is not None:
                kind[i] = _EXACT
                entries.add(i, [j], [1.0])
            elif key:
                remaining.append(i)

        with tqdm(total=len(remaining), desc="teacher re-encodes student tokens", disable=not progress) as bar:
            splits = t_vocab.encode([s_vocab.keys[i] for i in remaining], bar.update)
        decay = [gamma**n for n in range(max_pieces)]
        piece_weights = [[w / sum(decay[:n]) for w in decay[:n]] for n in range(max_pieces + 1)]  # by count
        for i, pieces in zip(remaining, splits):
            if pieces is not None:
                kind[i] = _MULTI
                entries.add(i, pieces[:max_pieces], piece_weights[min(len(pieces), max_pieces)])
        unverified = [s_vocab.keys[i] for i, pieces in zip(remaining, splits) if pieces is None]
        if unverified:
            logger.warning(
                "%d student tokens could not be re-encoded by the teacher into pieces spelling the same "
                "bytes (e.g. %r); their rows are unmapped", len(unverified), unverified[:5],
            )

        rows, cols, raw = entries.arrays()
        if reverse:
            rows, cols, raw = _with_reverse_entries(
                rows, cols, raw, kind, s_vocab, t_vocab, beta, gamma, max_pieces, progress
            )
        indices, weights = _top_rows(rows, cols, raw, vs, vt, top_k)
        projection = cls(
            indices=torch.from_numpy(indices),
            weights=torch.from_numpy(weights),
            exact=torch.from_numpy((kind == _EXACT) | (kind == _SPECIAL)),
            teacher_vocab_size=vt,
            params=params,
            student_fingerprint=s_vocab.fingerprint,
            teacher_fingerprint=t_vocab.fingerprint,
            stats=ProjectionStats(**dict(zip(_KINDS, np.bincount(kind, minlength=len(_KINDS)).tolist()))),
        )
        logger.info(
            "vocabulary projection %d -> %d built in %.1f s: %s",
            vs, vt, time.perf_counter() - began, projection.stats.as_dict(),
        )
        return projection

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write a safetensors file (tensors + metadata), atomically (temp file + ``os.replace``)."""
        path = Path(path)
        tensors = {name: getattr(self, name).contiguous() for name in _TENSORS}
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "params": json.dumps(self.params, sort_keys=True),
            "fingerprint": self.fingerprint,
            "student_fingerprint": self.student_fingerprint,
            "teacher_fingerprint": self.teacher_fingerprint,
            "student_vocab_size": str(self.student_vocab_size),
            "teacher_vocab_size": str(self.teacher_vocab_size),
            "stats": json.dumps(self.stats.as_dict()),
            "content_sha256": _content_digest(tensors),
        }
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            save_file(tensors, temporary, metadata=metadata)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    @classmethod
    def load(
        cls,
        path: Union[str, os.PathLike],
        student: Optional[TokenizerLike] = None,
        teacher: Optional[TokenizerLike] = None,
    ) -> "VocabProjection":
        """Read a file written by ``save``; with tokenizers given, refuse one built for others.

        Raises ValueError for a file that is not a (complete, unmodified) projection file, and for a
        tokenizer whose vocabulary fingerprint differs from the one the projection was built with.
        """
        tensors, metadata = _read(path)
        try:
            projection = cls(
                **tensors,
                teacher_vocab_size=int(metadata["teacher_vocab_size"]),
                params=json.loads(metadata["params"]),
                student_fingerprint=metadata["student_fingerprint"],
                teacher_fingerprint=metadata["teacher_fingerprint"],
                stats=ProjectionStats(**json.loads(metadata["stats"])),
            )
            if projection.fingerprint != metadata["fingerprint"]:
                raise ValueError("the fingerprint does not match the vocabularies and parameters")
            if projection.student_vocab_size != int(metadata["student_vocab_size"]):
                raise ValueError("the student vocabulary size does not match the rows")
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path} is not a valid vocabulary projection file: inconsistent metadata "
                             f"({type(error).__name__}: {error})") from error
        projection._check_tokenizers(path, student, teacher)
        return projection

    def _check_tokenizers(
        self, path: Union[str, os.PathLike], student: Optional[TokenizerLike], teacher: Optional[TokenizerLike]
    ) -> None:
        changed = [
            f"the {side} tokenizer (vocabulary fingerprint {actual[:12]}…, built for {stored[:12]}…)"
            for side, tokenizer, stored in (
                ("student", student, self.student_fingerprint),
                ("teacher", teacher, self.teacher_fingerprint),
            )
            if tokenizer is not None and (actual := vocabulary_fingerprint(_tokenizer(tokenizer, side))) != stored
        ]
        if changed:
            raise ValueError(
                f"{path} does not match {' and '.join(changed)}; rebuild it for these tokenizers: "
                f"mopd build-projection --student STUDENT_TOKENIZER --teacher TEACHER_TOKENIZER -o {path}"
                f"{_cli_flags(self.params)}"
            )

    def shard(self, start: int, end: int) -> ProjectionShard:
        """Rows ``[start, end)`` of the padded student vocabulary; rows ≥ ``student_vocab_size`` empty."""
        if not (isinstance(start, (int, np.integer)) and isinstance(end, (int, np.integer)) and 0 <= start <= end):
            raise ValueError(f"shard needs integers 0 <= start <= end, got start={start!r}, end={end!r}")
        start, end = int(start), int(end)
        rows = end - start
        indices = torch.full((rows, self.indices.shape[1]), -1, dtype=torch.int64)
        weights = torch.zeros((rows, self.indices.shape[1]), dtype=torch.float32)
        real = max(min(end, self.student_vocab_size) - start, 0)
        indices[:real] = self.indices[start : start + real]
        weights[:real] = self.weights[start : start + real]
        return ProjectionShard(start, indices, weights)

    def common_pairs(self, threshold: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
        """One-to-one (student id, teacher id) "common token" pairs for GOLD, int64 1-D, by student id.

        A row is a candidate with its first (largest) entry when it is ``exact`` or that weight is
        ≥ ``threshold``. Among candidates for one teacher id the exact row wins, then the larger
        weight, then the lower student id.
        """
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        top, top_weight, exact = self.indices[:, 0].numpy(), self.weights[:, 0].numpy(), self.exact.numpy()
        student = np.flatnonzero((top >= 0) & (exact | (top_weight >= threshold)))
        teacher = top[student]
        order = np.lexsort((student, -top_weight[student], ~exact[student], teacher))
        first = np.ones(len(order), dtype=bool)
        first[1:] = teacher[order][1:] != teacher[order][:-1]
        kept = np.sort(order[first])
        return torch.from_numpy(student[kept]), torch.from_numpy(teacher[kept])

    def teacher_reachable(self) -> torch.Tensor:
        """bool ``[Vt]``: the teacher ids that at least one student row maps to."""
        reachable = torch.zeros(self.teacher_vocab_size, dtype=torch.bool)
        reachable[self.indices[self.indices >= 0]] = True
        return reachable


class _Entries:
    """Accumulates the sparse (row, col, raw weight) entries of the passes."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.raw: list[float] = []

    def add(self, row: int, cols: list[int], raw: list[float]) -> None:
        self.rows.extend([row] * len(cols))
        self.cols.extend(cols)
        self.raw.extend(raw)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.array(self.rows, dtype=np.int64), np.array(self.cols, dtype=np.int64), np.array(self.raw)


def _with_reverse_entries(
    rows: np.ndarray,
    cols: np.ndarray,
    raw: np.ndarray,
    kind: np.ndarray,
    s_vocab: CanonicalVocabulary,
    t_vocab: CanonicalVocabulary,
    beta: float,
    gamma: float,
    max_pieces: int,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The forward entries plus the reverse pass's (module docstring); marks reverse-only rows in ``kind``."""
    reached = np.zeros(len(t_vocab), dtype=bool)
    reached[cols] = True
    candidates = [j for j, key in enumerate(t_vocab.keys) if key and not reached[j]]
    with tqdm(total=len(candidates), desc="student re-encodes teacher tokens", disable=not progress) as bar:
        splits = s_vocab.encode([t_vocab.keys[j] for j in candidates], bar.update)
    found = [(s[0], j, len(s)) for j, s in zip(candidates, splits) if s and 2 <= len(s) <= max_pieces]
    if not found:
        return rows, cols, raw
    r_rows, r_cols, r_pieces = (np.array(column, dtype=np.int64) for column in zip(*found))
    r_raw = gamma ** (r_pieces - 1.0)
    r_totals = np.bincount(r_rows, r_raw, minlength=len(kind))
    r_raw = np.divide(r_raw, r_totals[r_rows], out=np.zeros_like(r_raw), where=r_totals[r_rows] > 0)
    has_forward = np.zeros(len(kind), dtype=bool)
    has_forward[rows] = True
    has_reverse = np.zeros(len(kind), dtype=bool)
    has_reverse[r_rows] = True
    raw = np.where(has_reverse[rows], beta * raw, raw)
    r_raw = np.where(has_forward[r_rows], (1.0 - beta) * r_raw, r_raw)
    kind[r_rows[~has_forward[r_rows] & (r_raw > 0)]] = _REVERSE
    return np.concatenate([rows, r_rows]), np.concatenate([cols, r_cols]), np.concatenate([raw, r_raw])


def _top_rows(
    rows: np.ndarray, cols: np.ndarray, raw: np.ndarray, num_rows: int, num_cols: int, top_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sum repeated (row, col) entries, keep each row's ``top_k`` largest (ties: lower col), normalize.

    Returns int64 ``[num_rows, R]`` cols (−1 empty) and float32 weights, R = the widest kept row (≥ 1).
    Zero-weight entries are dropped.
    """
    keys, inverse = np.unique(rows * num_cols + cols, return_inverse=True)
    raw = np.bincount(inverse, raw, minlength=len(keys))
    nonzero = raw > 0
    rows, cols, raw = keys[nonzero] // num_cols, keys[nonzero] % num_cols, raw[nonzero]
    order = np.lexsort((cols, -raw, rows))
    rows, cols, raw = rows[order], cols[order], raw[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)
    kept = rank < top_k
    rows, cols, raw, rank = rows[kept], cols[kept], raw[kept], rank[kept]
    width = int(rank.max(initial=0)) + 1
    indices = np.full((num_rows, width), -1, dtype=np.int64)
    weights = np.zeros((num_rows, width), dtype=np.float64)
    indices[rows, rank] = cols
    weights[rows, rank] = raw
    totals = weights.sum(axis=1, keepdims=True)
    return indices, np.divide(weights, totals, out=weights, where=totals > 0).astype(np.float32)


def _validated_params(
    beta: float, gamma: float, max_pieces: int, top_k: int, reverse: bool, match_special: bool
) -> dict[str, Any]:
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    if reverse and beta <= 0.5:
        raise ValueError(f"reverse=True needs beta > 0.5 (the forward entries' share of a row), got {beta}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    for name, value in (("max_pieces", max_pieces), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return {
        "beta": float(beta),
        "gamma": float(gamma),
        "max_pieces": max_pieces,
        "top_k": top_k,
        "reverse": bool(reverse),
        "match_special": bool(match_special),
    }


def _cli_flags(params: dict[str, Any]) -> str:
    """The ``mopd build-projection`` options that reproduce ``params``."""
    flags = (f" --beta {params['beta']} --gamma {params['gamma']} --max-pieces {params['max_pieces']} "
             f"--top-k {params['top_k']}")
    return flags + " --reverse" * params["reverse"] + " --no-special" * (not params["match_special"])


def _fingerprint(student: str, teacher: str, params: dict[str, Any]) -> str:
    payload = json.dumps({"student": student, "teacher": teacher, "params": params}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _content_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in _TENSORS:
        digest.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _read(path: Union[str, os.PathLike]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a projection file; ValueError for anything else."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted?): {error}") from error
    if metadata.get("format") != FORMAT or sorted(tensors) != sorted(_TENSORS):
        raise ValueError(f"{path} is not a vocabulary projection file (format {metadata.get('format')!r}, "
                         f"tensors {sorted(tensors)}); write one with `mopd build-projection`")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has projection format version {metadata.get('format_version')!r}, this "
                         f"code reads {FORMAT_VERSION!r}: rebuild it with `mopd build-projection`")
    if _content_digest(tensors) != metadata.get("content_sha256"):
        raise ValueError(f"{path} is corrupted: its tensors do not match their recorded checksum")
    return tensors, metadata


def _tokenizer(tokenizer: TokenizerLike, side: str) -> PreTrainedTokenizerBase:
    """A tokenizer object, loading the local tokenizer directory when given a path (``side`` names it
    in errors: "student" or "teacher")."""
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_local_tokenizer(tokenizer, side)
    return tokenizer
