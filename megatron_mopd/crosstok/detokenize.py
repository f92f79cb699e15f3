"""Text and character offsets of a token-id sequence, read from the ids themselves.

On-policy, the student samples token ids; the text a cross-tokenizer teacher must score is what those
ids spell, and the alignment needs each sampled token's character span in it. Re-tokenizing the
decoded text is not the same: sampled ids need not be the tokenizer's own segmentation of their text.
``decode_with_offsets`` concatenates the ids' canonical bytes (``canonical.py``) and maps every token's
byte span onto characters:

* a token holding part of a multi-byte character (byte-level pieces of 你, ``<0xE4>``) spans that
  whole character, as fast tokenizers' offsets do, so the alignment keeps such pieces together;
* special tokens (BOS, EOS, chat-template markers) spell no text: an empty span where they stand;
* bytes that are not valid UTF-8 (a sample cut inside a character) become U+FFFD, one per byte, so
  the offsets stay exact.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from megatron_mopd.crosstok.canonical import CanonicalVocabulary


def decode_with_offsets(vocabulary: CanonicalVocabulary, ids: Sequence[int]) -> tuple[str, np.ndarray]:
    """``(text, offsets [n, 2])``: the text ``ids`` spell and each token's character span in it.

    Args:
        vocabulary: ``CanonicalVocabulary.of(tokenizer)`` (build it once per tokenizer).
        ids: token ids of that tokenizer.
    Raises:
        ValueError: an id outside the vocabulary.
    """
    size = len(vocabulary.keys)
    bad = [i for i in ids if not 0 <= i < size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary of {size} tokens")
    pieces = [vocabulary.keys[i] or b"" for i in ids]
    byte_ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
    byte_starts = byte_ends - np.array([len(p) for p in pieces], dtype=np.int64)
    escaped = b"".join(pieces).decode("utf-8", errors="surrogateescape")
    codepoints = np.frombuffer(escaped.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")
    char_bytes = _utf8_length(codepoints)
    char_starts = np.cumsum(char_bytes) - char_bytes  # the byte where each character starts
    # A token starting inside a character starts at that character; one ending inside ends after it.
    starts = np.searchsorted(char_starts, byte_starts, side="right") - 1
    ends = np.searchsorted(char_starts, byte_ends, side="left")
    empty = byte_ends == byte_starts
    starts = np.where(empty, ends, starts.clip(min=0))
    text = "".join("\ufffd" if 0xDC80 <= c <= 0xDCFF else chr(c) for c in codepoints) if (
        (codepoints >= 0xDC80) & (codepoints <= 0xDCFF)
    ).any() else escaped
    return text, np.stack([starts, ends], axis=1).astype(np.int64).reshape(-1, 2)


def _utf8_length(codepoints: np.ndarray) -> np.ndarray:
    """Bytes of each character in UTF-8; an escaped invalid byte (U+DC80–U+DCFF) counts 1."""
    escaped = (codepoints >= 0xDC80) & (codepoints <= 0xDCFF)
    length = 1 + (codepoints >= 0x80).astype(np.int64) + (codepoints >= 0x800) + (codepoints >= 0x10000)
    return np.where(escaped, 1, length)
