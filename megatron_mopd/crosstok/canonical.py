"""Token strings read as the bytes of text they stand for, so that two vocabularies can be compared.

A vocabulary spells text in its token strings by one of three conventions, detected from the fast
tokenizer's backend (decoder, pre-tokenizer, normalizer and model JSON), never from its name:

``byte_level``  GPT-2's ``bytes_to_unicode`` alphabet: every character is one byte (``Ġ`` = space,
                ``Ċ`` = newline), so a token may hold a partial UTF-8 sequence.
``space``       SentencePiece: a word-boundary symbol (``▁``, from a Metaspace pre-tokenizer or
                decoder, or a ``Replace`` between it and a space) stands for a space; the rest is text.
plain           neither: the token string is its text.
With ``byte_fallback`` (the model's flag or a ``ByteFallback`` decoder) ``<0xNN>`` is the raw byte NN,
also when the tokenizer registers it as an added or special token (as some SentencePiece conversions
and trainers do): it is still the byte NN, never a control symbol.

The canonical key of a token is that byte string (``Ġthe`` and ``▁the`` are both ``b" the"``).
Special tokens (other than ``<0xNN>`` byte-fallback tokens) have no key: they are control symbols,
not text, and are matched by content only. A non-special added token's key is its content (added
tokens are stored verbatim).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

Advance = Optional[Callable[[int], object]]

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_ESCAPED_BYTE = re.compile("([\udc80-\udcff])")  # bytes that are not UTF-8, after surrogateescape
_ENCODE_BATCH = 8192


def _gpt2_byte_decoder() -> dict[int, str]:
    """``str.translate`` table inverting GPT-2's ``bytes_to_unicode``: each byte-level character to
    the latin-1 character of its byte; the latin-1 characters that are not byte-level symbols to a
    character latin-1 cannot encode (so a string holding one has no key)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = 256 + extra
            extra += 1
    decoder = {c: "\uffff" for c in range(256)}
    decoder.update({symbol: chr(b) for b, symbol in table.items()})
    return decoder


_BYTE_LEVEL_DECODER = _gpt2_byte_decoder()


@dataclass(frozen=True)
class TokenConvention:
    """How a vocabulary spells text in token strings (see the module docstring)."""

    byte_level: bool = False
    space: Optional[str] = None
    byte_fallback: bool = False

    @classmethod
    def from_backend(cls, spec: dict[str, Any]) -> "TokenConvention":
        """Detect the convention from a backend tokenizer's JSON (``Tokenizer.to_str()``, parsed)."""
        model = spec.get("model") or {}
        pre = list(_components(spec.get("pre_tokenizer")))
        dec = list(_components(spec.get("decoder")))
        norm = list(_components(spec.get("normalizer")))
        if model.get("type") == "WordPiece" or any(c["type"] == "WordPiece" for c in dec):
            raise ValueError("WordPiece vocabularies (## continuations) are not supported")
        byte_level = any(c["type"] == "ByteLevel" for c in pre + dec)
        spaces = {c.get("replacement", "▁") for c in pre + dec if c["type"] == "Metaspace"}
        spaces |= {_string(c["pattern"]) for c in dec if c["type"] == "Replace" and c.get("content") == " "}
        spaces |= {c["content"] for c in norm if c["type"] == "Replace" and _string(c["pattern"]) == " "}
        spaces.discard(None)
        if len(spaces) > 1 or (spaces and byte_level):
            raise ValueError(f"ambiguous token convention: byte_level={byte_level}, space symbols {spaces}")
        byte_fallback = bool(model.get("byte_fallback")) or any(c["type"] == "ByteFallback" for c in dec)
        return cls(byte_level, next(iter(spaces), None), byte_fallback)

    @classmethod
    def detect(cls, tokenizer: PreTrainedTokenizerBase) -> "TokenConvention":
        """The convention of a fast Hugging Face tokenizer."""
        return cls.from_backend(backend_spec(tokenizer))

    def is_byte_fallback(self, token: str) -> bool:
        """Whether ``token`` is a ``<0xNN>`` byte-fallback token of this vocabulary."""
        return self.byte_fallback and _BYTE_FALLBACK.fullmatch(token) is not None

    def canonical(self, token: str) -> Optional[bytes]:
        """The bytes a regular (non-added) token string, or a ``<0xNN>`` byte-fallback token however
        registered, stands for; None when it spells no bytes (e.g. a character outside the byte-level
        alphabet)."""
        if self.byte_fallback and (match := _BYTE_FALLBACK.fullmatch(token)):
            return bytes([int(match.group(1), 16)])
        try:
            if self.byte_level:
                return token.translate(_BYTE_LEVEL_DECODER).encode("latin-1")
            if self.space is not None:
                token = token.replace(self.space, " ")
            return token.encode("utf-8")
        except UnicodeEncodeError:
            return None


def backend_spec(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The parsed JSON of a fast tokenizer's backend (raises for a tokenizer without one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise TypeError(f"{type(tokenizer).__name__} has no fast (tokenizers) backend; load a fast tokenizer")
    return json.loads(backend.to_str())


def vocabulary_fingerprint(tokenizer: PreTrainedTokenizerBase, convention: Optional[TokenConvention] = None) -> str:
    """sha256 (hex) of what the tokenizer's ids mean: its sorted (token, id) pairs including added
    tokens, each added token's (id, content, special) and the token convention."""
    convention = convention or TokenConvention.detect(tokenizer)
    added = sorted((i, t.content, bool(t.special)) for i, t in tokenizer.added_tokens_decoder.items())
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "added": added,
        "size": len(tokenizer),
        "convention": asdict(convention),
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()


@dataclass(frozen=True, eq=False)
class CanonicalVocabulary:
    """One tokenizer's vocabulary read as canonical bytes, with an encoder for arbitrary bytes.

    Attributes:
        convention: how the token strings spell text.
        keys: ``[len(tokenizer)]`` canonical bytes of each id; None for special tokens and ids that
            spell no bytes. A ``<0xNN>`` byte-fallback token's key is its byte, whether it is a regular,
            added or special token.
        fallback: ``[len(tokenizer)]`` whether the id is a ``<0xNN>`` byte-fallback token (regular,
            added or special).
        specials: special-token content → id; byte-fallback tokens are not among them (they are bytes,
            matched by their key).
        fingerprint: ``vocabulary_fingerprint`` of the tokenizer.
    """

    convention: TokenConvention
    keys: list[Optional[bytes]]
    fallback: list[bool]
    specials: dict[str, int]
    fingerprint: str
    encoder: Tokenizer = field(repr=False)
    _regular: dict[bytes, int] = field(init=False, repr=False)
    _by_fallback: dict[bytes, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        regular: dict[bytes, int] = {}
        by_fallback: dict[bytes, int] = {}
        for i in range(len(self.keys) - 1, -1, -1):  # the lowest id wins
            if self.keys[i]:
                (by_fallback if self.fallback[i] else regular)[self.keys[i]] = i
        object.__setattr__(self, "_regular", regular)
        object.__setattr__(self, "_by_fallback", by_fallback)

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> "CanonicalVocabulary":
        spec = backend_spec(tokenizer)
        convention = TokenConvention.from_backend(spec)
        size = len(tokenizer)
        tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
        added = {i: t for i, t in tokenizer.added_tokens_decoder.items() if i < size}
        fallback = [t is not None and convention.is_byte_fallback(t) for t in tokens]
        special_ids = {i for i, t in added.items() if t.special} | {i for i in tokenizer.all_special_ids if i < size}
        special_ids = {i for i in special_ids if not fallback[i]}
        keys: list[Optional[bytes]] = []
        for i, token in enumerate(tokens):
            if token is None or i in special_ids:
                keys.append(None)
            elif i in added and not fallback[i]:
                keys.append(added[i].content.encode("utf-8"))
            else:
                keys.append(convention.canonical(token))
        return cls(
            convention=convention,
            keys=keys,
            fallback=fallback,
            specials={tokens[i]: i for i in sorted(special_ids) if tokens[i] is not None},
            fingerprint=vocabulary_fingerprint(tokenizer, convention),
            encoder=_verbatim_encoder(spec),
        )

    def __len__(self) -> int:
        return len(self.keys)

    def identical(self, key: bytes, prefer_fallback: bool = False) -> Optional[int]:
        """The id whose canonical bytes are ``key``: the lowest regular id, or the lowest ``<0xNN>``
        id when there is none (or first when ``prefer_fallback``, so that byte-fallback tokens map
        to each other between two byte-fallback vocabularies)."""
        first, second = (self._by_fallback, self._regular) if prefer_fallback else (self._regular, self._by_fallback)
        found = first.get(key)
        return second.get(key) if found is None else found

    def encode(self, keys: Sequence[bytes], advance: Advance = None) -> list[Optional[list[int]]]:
        """Split each byte string into this vocabulary's ids, verified.

        UTF-8 text runs are encoded by the tokenizer itself, as text in the middle of a document: no
        dummy prefix space, no special tokens (text that looks like one is encoded as text).
        Bytes that are not valid UTF-8 (partial characters) become single-byte tokens. A result is
        kept only when the canonical bytes of its ids concatenate to exactly the key; otherwise (a
        normalizer changed the text, a byte without a token, ...) it is None, as for an empty key.
        ``advance(n)`` is called as text runs get encoded (a progress bar's ``update``).
        """
        segments = [_segments(key) for key in keys]
        texts = [s for parts in segments for s in parts if isinstance(s, str)]
        encoded = iter(self._encode_texts(texts, advance))
        results: list[Optional[list[int]]] = []
        for key, parts in zip(keys, segments):
            ids: list[int] = []
            for part in parts:
                if isinstance(part, str):
                    ids.extend(next(encoded))
                else:
                    byte_id = self.identical(bytes([part]))
                    ids.append(-1 if byte_id is None else byte_id)
            spelled = [self.keys[i] if i >= 0 else None for i in ids]
            valid = bool(ids) and None not in spelled and b"".join(spelled) == key  # type: ignore[arg-type]
            results.append(ids if valid else None)
        return results

    def _encode_texts(self, texts: list[str], advance: Advance) -> Iterator[list[int]]:
        for start in range(0, len(texts), _ENCODE_BATCH):
            batch = self.encoder.encode_batch_fast(texts[start : start + _ENCODE_BATCH], add_special_tokens=False)
            if advance is not None:
                advance(len(batch))
            yield from (encoding.ids for encoding in batch)


def _segments(key: bytes) -> list[Union[str, int]]:
    """``key`` as UTF-8 text runs (str) and the bytes between them that are not UTF-8 (int)."""
    try:
        return [key.decode("utf-8")]
    except UnicodeDecodeError:
        parts = _ESCAPED_BYTE.split(key.decode("utf-8", "surrogateescape"))
        return [ord(p) - 0xDC00 if i % 2 else p for i, p in enumerate(parts) if p]


def _verbatim_encoder(spec: dict[str, Any]) -> Tokenizer:
    """A copy of the backend (built from ``spec``, which is modified) that encodes text as found
    mid-document: no post-processor (special tokens), no truncation or padding, no dummy prefix
    (Metaspace ``prepend_scheme``, ByteLevel ``add_prefix_space``, a normalizer ``Prepend``), added
    special tokens split as plain text."""
    spec.update(post_processor=None, truncation=None, padding=None)
    for component in _components(spec.get("pre_tokenizer")):
        if component["type"] == "Metaspace":
            component["prepend_scheme"] = "never"
            if "add_prefix_space" in component:
                component["add_prefix_space"] = False
        elif component["type"] == "ByteLevel":
            component["add_prefix_space"] = False
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer["type"] == "Prepend":
        spec["normalizer"] = None
    elif normalizer is not None and normalizer["type"] == "Sequence":
        normalizer["normalizers"] = [n for n in normalizer["normalizers"] if n["type"] != "Prepend"]
    encoder = Tokenizer.from_str(json.dumps(spec))
    encoder.encode_special_tokens = True
    return encoder


def _components(node: Optional[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """A normalizer / pre-tokenizer / decoder JSON node and, for a Sequence, its members (recursively)."""
    if node is None:
        return
    children = node.get("normalizers") or node.get("pretokenizers") or node.get("decoders")
    if node.get("type") == "Sequence" and children is not None:
        for child in children:
            yield from _components(child)
    else:
        yield node


def _string(pattern: Any) -> Optional[str]:
    """The literal of a ``{"String": ...}`` pattern (None for a regex)."""
    return pattern.get("String") if isinstance(pattern, dict) else pattern
