"""Specification: the text and character offsets of sampled token ids, read from the ids themselves.

On-policy the student's sampled ids need not be its tokenizer's segmentation of their text, so the
cross-tokenizer alignment takes the offsets from the ids: byte pieces of one character span that
character, special tokens spell nothing, a sample cut inside a character stays exact (U+FFFD).
"""

from __future__ import annotations

import numpy as np
import pytest

from megatron_mopd.crosstok import CanonicalVocabulary, align_offsets, decode_with_offsets
from megatron_mopd.demo.tokenizers import byte_level_bpe, sentencepiece_bpe

TEXT = "The sum 12345 + 678 = 13023.\n\tdef f(x):    return 你好吗"


@pytest.fixture(scope="module")
def byte_level():
    tokenizer = byte_level_bpe()
    return tokenizer, CanonicalVocabulary.of(tokenizer)


@pytest.fixture(scope="module")
def sentencepiece():
    tokenizer = sentencepiece_bpe()
    return tokenizer, CanonicalVocabulary.of(tokenizer)


def test_the_tokenizers_own_segmentation_gives_its_text_and_offsets(byte_level) -> None:
    tokenizer, vocabulary = byte_level
    encoded = tokenizer(TEXT, return_offsets_mapping=True)
    text, offsets = decode_with_offsets(vocabulary, encoded["input_ids"])
    assert text == TEXT
    np.testing.assert_array_equal(offsets, np.array(encoded["offset_mapping"]))


def test_sentencepiece_spaces_and_specials(sentencepiece) -> None:
    tokenizer, vocabulary = sentencepiece
    ids = tokenizer(TEXT)["input_ids"] + [tokenizer.eos_token_id]  # <s> ... </s>
    text, offsets = decode_with_offsets(vocabulary, ids)
    assert text == " " + TEXT  # the "▁" of the first word is a space
    assert tuple(offsets[0]) == (0, 0) and tuple(offsets[-1]) == (len(text), len(text))
    assert all(text[a:b] for a, b in offsets[1:-1])


def test_a_segmentation_the_tokenizer_would_not_choose(byte_level) -> None:
    tokenizer, vocabulary = byte_level
    ids = [tokenizer.convert_tokens_to_ids(c) for c in ["T", "h", "e", "Ġ", "s", "u", "m"]]
    text, offsets = decode_with_offsets(vocabulary, ids)
    assert text == "The sum"
    assert offsets.tolist() == [[i, i + 1] for i in range(7)]


def test_byte_pieces_span_their_character_and_a_cut_character_stays_exact(byte_level) -> None:
    tokenizer, vocabulary = byte_level
    byte_ids = [tokenizer.convert_tokens_to_ids(t) for t in ["ä", "½", "ł"]]  # the three bytes of 你
    text, offsets = decode_with_offsets(vocabulary, [tokenizer.convert_tokens_to_ids("Ġ")] + byte_ids)
    assert text == " 你" and offsets.tolist() == [[0, 1], [1, 2], [1, 2], [1, 2]]
    text, offsets = decode_with_offsets(vocabulary, byte_ids[:2])  # a sample cut inside 你
    assert text == "\ufffd\ufffd" and offsets.tolist() == [[0, 1], [1, 2]]


def test_ids_outside_the_vocabulary_are_refused(byte_level) -> None:
    _, vocabulary = byte_level
    with pytest.raises(ValueError, match="token id 5000 is outside the vocabulary of 2000"):
        decode_with_offsets(vocabulary, [1, 5000])


def test_sampled_student_ids_align_with_the_teachers_tokenization_of_their_text(byte_level, sentencepiece) -> None:
    student, student_vocabulary = byte_level
    teacher = sentencepiece[0]
    # "sampled" ids: the tokenizer's ids with one word respelled character by character
    ids = student("The answer: ")["input_ids"] + [student.convert_tokens_to_ids(c) for c in "13023"]
    ids += student(" 你好吗")["input_ids"]
    text, student_offsets = decode_with_offsets(student_vocabulary, ids)
    teacher_offsets = teacher(text, return_offsets_mapping=True)["offset_mapping"]
    alignment = align_offsets(student_offsets, teacher_offsets, text, text)
    spans = alignment.chunk_spans[:, 1:]
    assert alignment.num_chunks > 5
    assert np.array_equal(spans[1:, 0], spans[:-1, 1]) and spans[-1, 1] == len(text)  # contiguous to the end
    assert [text[a:b] for a, b in spans if text[a:b].isdigit()] == list("13023")  # one chunk per sampled digit
