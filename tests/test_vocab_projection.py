"""Specification: the cross-tokenizer vocabulary projection W (student vocabulary × teacher vocabulary).

Built between the two fixture tokenizers (GPT-2-style byte-level BPE and Llama-style SentencePiece
BPE with byte fallback, in both directions) and between two byte-level vocabularies of different
sizes:
- token strings are compared as canonical bytes (``Ġ``/``Ċ`` bytes, ``▁`` = space, ``<0xNN>`` = byte), so
  every single byte, control bytes included, maps one-hot between the two; ``<0xNN>`` is a byte also when
  a tokenizer registers it as a special token, while real special tokens stay control symbols;
- a student token the teacher has verbatim gets a one-hot row; any other is re-encoded by the
  teacher into pieces t₀…, weighted β·γ^i normalized (repeated pieces accumulate), pieces that must
  spell exactly the student token's bytes (no dummy prefix space, no special tokens, partial UTF-8 as
  single bytes) or the row stays empty; special tokens match by content;
- rows sum to 1 or are empty, the stats partition the rows, identical tokenizers give the identity;
- the safetensors file round-trips, and refuses other tokenizers (naming the side) and broken files;
- ``shard`` / ``common_pairs`` / ``teacher_reachable`` / the reverse pass / the ``mopd`` CLI, which takes
  local tokenizer directories only (a mistyped path never goes to the Hugging Face Hub) and creates the
  output's missing directory.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from megatron_mopd import cli
from megatron_mopd.crosstok import (
    CanonicalVocabulary,
    ProjectionStats,
    TokenConvention,
    VocabProjection,
    vocabulary_fingerprint,
)
from megatron_mopd.demo.tokenizers import MULTILINGUAL_SAMPLE, byte_level_bpe, sentencepiece_bpe, tokenizer_dir

BETA, GAMMA = 0.9, 0.1
PAIRS = ["bl_to_sp", "sp_to_bl", "bl_to_small"]


@pytest.fixture(scope="module")
def byte_level() -> PreTrainedTokenizerFast:
    return byte_level_bpe()


@pytest.fixture(scope="module")
def sentencepiece() -> PreTrainedTokenizerFast:
    return sentencepiece_bpe()


@pytest.fixture(scope="module")
def small_byte_level() -> PreTrainedTokenizerFast:
    return byte_level_bpe(1000)


@pytest.fixture(scope="module")
def bl_to_sp(byte_level, sentencepiece) -> VocabProjection:
    return VocabProjection.build(byte_level, sentencepiece)


@pytest.fixture(scope="module")
def sp_to_bl(sentencepiece, byte_level) -> VocabProjection:
    return VocabProjection.build(sentencepiece, byte_level)


@pytest.fixture(scope="module")
def bl_to_small(byte_level, small_byte_level) -> VocabProjection:
    return VocabProjection.build(byte_level, small_byte_level)


def row(projection: VocabProjection, student_id: int) -> dict[int, float]:
    """The non-empty slots of one row as {teacher id: weight}."""
    return {
        j: w
        for j, w in zip(projection.indices[student_id].tolist(), projection.weights[student_id].tolist())
        if j >= 0
    }


def tid(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    assert token_id is not None and tokenizer.convert_ids_to_tokens(token_id) == token, token
    return token_id


def piece_weights(pieces: list[int], max_pieces: int = 4) -> dict[int, float]:
    """The definition: β·γ^i on the first ``max_pieces`` pieces, normalized; repeated ids accumulate."""
    raw = [BETA * GAMMA**i for i in range(min(len(pieces), max_pieces))]
    weights: dict[int, float] = {}
    for piece, w in zip(pieces, raw):
        weights[piece] = weights.get(piece, 0.0) + w / sum(raw)
    return weights


def assert_row(projection: VocabProjection, student_id: int, expected: dict[int, float]) -> None:
    actual = row(projection, student_id)
    assert actual.keys() == expected.keys(), (student_id, actual, expected)
    for j, w in expected.items():
        assert actual[j] == pytest.approx(w, abs=1e-6), (student_id, actual, expected)


# --- canonical bytes ---------------------------------------------------------------------------


def test_byte_level_tokens_are_gpt2_bytes() -> None:
    convention = TokenConvention(byte_level=True)
    assert convention.canonical("Ġthe") == b" the"
    assert convention.canonical("Ċ") == b"\n"
    assert convention.canonical("ĠĠĊĉ") == b"  \n\t"
    assert convention.canonical("ä½ł") == "你".encode()
    assert convention.canonical("ä½") == b"\xe4\xbd"  # a partial UTF-8 sequence is a valid key
    assert convention.canonical("<0xE4>") == b"<0xE4>"  # no byte fallback in byte-level vocabularies
    assert convention.canonical("a b") is None  # a raw space is not a byte-level symbol


def test_sentencepiece_tokens_use_space_symbol_and_byte_fallback() -> None:
    convention = TokenConvention(space="▁", byte_fallback=True)
    assert convention.canonical("▁the") == b" the"
    assert convention.canonical("▁▁x") == b"  x"
    assert convention.canonical("<0xE4>") == b"\xe4"
    assert convention.canonical("<0x0A>") == b"\n"
    assert convention.canonical("你") == "你".encode()
    assert TokenConvention(space="▁").canonical("<0xE4>") == b"<0xE4>"  # literal text without byte fallback


def test_convention_is_detected_from_the_backend(byte_level, sentencepiece) -> None:
    assert TokenConvention.detect(byte_level) == TokenConvention(byte_level=True)
    assert TokenConvention.detect(sentencepiece) == TokenConvention(space="▁", byte_fallback=True)
    legacy_llama = {  # sentencepiece conversion without a pre-tokenizer: normalizer + decoder Replace
        "model": {"type": "BPE", "byte_fallback": True},
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        },
        "pre_tokenizer": None,
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
    }
    assert TokenConvention.from_backend(legacy_llama) == TokenConvention(space="▁", byte_fallback=True)
    with pytest.raises(ValueError, match="WordPiece"):
        TokenConvention.from_backend({"model": {"type": "WordPiece"}, "decoder": {"type": "WordPiece"}})


def test_reencoding_spells_the_bytes_mid_document(sentencepiece) -> None:
    vocab = CanonicalVocabulary.of(sentencepiece)
    tokens = sentencepiece.convert_ids_to_tokens
    word, spaced, special_text, partial, empty = vocab.encode([b"hello", b" hello", b"<s>", b"\xe4\xbd", b""])
    assert "".join(tokens(word)) == "hello"  # no dummy prefix "▁" (prepend_scheme) before a mid-word piece
    assert "".join(tokens(spaced)) == "▁hello"
    assert tid(sentencepiece, "<s>") not in special_text and "".join(tokens(special_text)) == "<s>"
    assert tokens(partial) == ["<0xE4>", "<0xBD>"]  # partial UTF-8 → single-byte tokens
    assert empty is None


# --- the passes ------------------------------------------------------------------------------------


def test_exact_matches_are_one_hot(byte_level, sentencepiece, bl_to_sp, sp_to_bl) -> None:
    (hao,) = byte_level.encode("好", add_special_tokens=False)  # "å¥½": one byte-level token
    pairs = [
        (bl_to_sp, tid(byte_level, "Ġthe"), tid(sentencepiece, "▁the")),  # leading-space conventions
        (bl_to_sp, tid(byte_level, "7"), tid(sentencepiece, "7")),
        (bl_to_sp, hao, tid(sentencepiece, "好")),  # CJK
        (bl_to_sp, tid(byte_level, "Ċ"), tid(sentencepiece, "\n")),  # a regular token beats <0x0A>
        (bl_to_sp, tid(byte_level, "ä"), tid(sentencepiece, "<0xE4>")),  # a byte
        (sp_to_bl, tid(sentencepiece, "▁the"), tid(byte_level, "Ġthe")),
        (sp_to_bl, tid(sentencepiece, "好"), hao),
        (sp_to_bl, tid(sentencepiece, "<0xE4>"), tid(byte_level, "ä")),
        (sp_to_bl, tid(sentencepiece, "<0x0A>"), tid(byte_level, "Ċ")),
    ]
    for projection, student_id, teacher_id in pairs:
        assert row(projection, student_id) == {teacher_id: 1.0}
        assert projection.exact[student_id]


def test_control_bytes_map_one_hot_to_the_teachers_byte_tokens(byte_level, sentencepiece, bl_to_sp, sp_to_bl) -> None:
    """Every byte-level token that spells one control byte (0x00–0x1F and 0x7F: ``Ā``…``ğ`` and ``ġ`` in
    GPT-2's byte alphabet) gets a one-hot row on the byte-fallback teacher's token of that byte: its
    ``<0xNN>``, or its regular token where it has one (tab, newline); and each such ``<0xNN>`` maps back
    one-hot to the byte-level token."""
    convention = TokenConvention(byte_level=True)
    controls = {
        key[0]: student_id
        for token, student_id in byte_level.get_vocab().items()
        if (key := convention.canonical(token)) is not None and len(key) == 1 and (key[0] < 0x20 or key[0] == 0x7F)
    }
    assert sorted(controls) == [*range(0x20), 0x7F]
    assert controls[0x00] == tid(byte_level, "Ā")
    regular = {0x09: tid(sentencepiece, "\t"), 0x0A: tid(sentencepiece, "\n")}
    for byte, student_id in controls.items():
        fallback = tid(sentencepiece, f"<0x{byte:02X}>")
        assert row(bl_to_sp, student_id) == {regular.get(byte, fallback): 1.0}, hex(byte)
        assert bl_to_sp.exact[student_id]
        assert row(sp_to_bl, fallback) == {student_id: 1.0}, hex(byte)
        assert sp_to_bl.exact[fallback]


@pytest.fixture(scope="module")
def special_bytes_teacher(tmp_path_factory) -> Path:
    """A small SentencePiece-style BPE tokenizer directory with byte fallback, trained with the ``tokenizers``
    library on the multilingual sample with ``<0x00>``…``<0xFF>`` among the trainer's special tokens, so that
    they are registered as added special tokens (as some SentencePiece conversions and trainers do)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                  show_progress=False)
    tokenizer.train_from_iterator([MULTILINGUAL_SAMPLE], trainer=trainer)
    directory = tmp_path_factory.mktemp("special_bytes_teacher")
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    wrapped.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def special_bytes_to_bl_without_specials(special_bytes_teacher, byte_level) -> VocabProjection:
    return VocabProjection.build(special_bytes_teacher, byte_level, match_special=False)


def test_byte_tokens_registered_as_special_are_still_bytes(
    byte_level, special_bytes_teacher, special_bytes_to_bl_without_specials
) -> None:
    """Every byte-level token that spells one byte gets a one-hot row on the teacher's token of that byte:
    its regular token where it has one, else its ``<0xNN>``, even though the teacher registers all its
    ``<0xNN>`` as special tokens (every non-ASCII byte goes there); and each ``<0xNN>`` maps back one-hot
    to the byte-level token, with the special-token pass off: it is matched as a byte, not by content."""
    teacher = AutoTokenizer.from_pretrained(special_bytes_teacher)
    byte_tokens = {byte: tid(teacher, f"<0x{byte:02X}>") for byte in range(256)}
    assert all(teacher.added_tokens_decoder[j].special for j in byte_tokens.values())
    regular = {
        key: j
        for token, j in teacher.get_vocab().items()
        if j not in teacher.added_tokens_decoder and len(key := token.replace("▁", " ").encode()) == 1
    }
    convention = TokenConvention(byte_level=True)
    single_bytes = {
        key[0]: student_id
        for token, student_id in byte_level.get_vocab().items()
        if (key := convention.canonical(token)) is not None and len(key) == 1
    }
    assert sorted(single_bytes) == list(range(256))
    bl_to_special_bytes = VocabProjection.build(byte_level, special_bytes_teacher)
    expected = {byte: regular.get(bytes([byte]), byte_tokens[byte]) for byte in range(256)}
    assert all(expected[byte] == byte_tokens[byte] for byte in range(0x80, 0x100))
    for byte, student_id in single_bytes.items():
        assert row(bl_to_special_bytes, student_id) == {expected[byte]: 1.0}, hex(byte)
        assert bl_to_special_bytes.exact[student_id]
        assert row(special_bytes_to_bl_without_specials, byte_tokens[byte]) == {student_id: 1.0}, hex(byte)
        assert special_bytes_to_bl_without_specials.exact[byte_tokens[byte]]


def test_real_special_tokens_beside_special_byte_tokens_stay_control_symbols(
    special_bytes_teacher, special_bytes_to_bl_without_specials
) -> None:
    """``<s>``, ``</s>``, ``<unk>`` are special tokens matched by content only: they spell no bytes, so with
    the special-token pass off their rows stay empty (``<s>`` is not the text "<s>" split into pieces)."""
    teacher = AutoTokenizer.from_pretrained(special_bytes_teacher)
    vocabulary = CanonicalVocabulary.of(teacher)
    real_specials = {content: tid(teacher, content) for content in ("<unk>", "<s>", "</s>")}
    assert vocabulary.specials == real_specials
    for content, i in real_specials.items():
        assert vocabulary.keys[i] is None and not vocabulary.fallback[i]
        assert row(special_bytes_to_bl_without_specials, i) == {}, content
    assert special_bytes_to_bl_without_specials.stats.unmapped == len(real_specials)


def test_split_tokens_get_normalized_geometric_weights(byte_level, sentencepiece, bl_to_sp, sp_to_bl) -> None:
    """Student words with a leading space that the teacher splits into 2-3 pieces, both directions."""
    directions = [
        (bl_to_sp, byte_level, sentencepiece, "Ġ", "▁"),
        (sp_to_bl, sentencepiece, byte_level, "▁", "Ġ"),
    ]
    for projection, student, teacher, s_space, t_space in directions:
        checked = 0
        for token, student_id in sorted(student.get_vocab().items(), key=lambda item: item[1]):
            word = token[1:]
            if not (token.startswith(s_space) and word.isascii() and word.isalpha()):
                continue
            pieces = teacher.encode(" " + word, add_special_tokens=False)
            if not 2 <= len(pieces) <= 3:
                continue
            assert "".join(teacher.convert_ids_to_tokens(pieces)) == t_space + word
            assert_row(projection, student_id, piece_weights(pieces))
            assert not projection.exact[student_id]
            checked += 1
        assert checked >= 5


def test_digit_groups_split_into_single_digits_and_repeats_accumulate(byte_level, sentencepiece, bl_to_sp) -> None:
    digit = {d: tid(sentencepiece, d) for d in "0123456789"}
    assert_row(bl_to_sp, tid(byte_level, "885"), piece_weights([digit["8"], digit["8"], digit["5"]]))
    assert_row(bl_to_sp, tid(byte_level, "12"), piece_weights([digit["1"], digit["2"]]))
    assert row(bl_to_sp, tid(byte_level, "000")) == {digit["0"]: pytest.approx(1.0)}


def test_whitespace_runs_and_partial_utf8(byte_level, sentencepiece, bl_to_sp) -> None:
    space = tid(sentencepiece, "▁")
    assert row(bl_to_sp, tid(byte_level, "ĠĠĠ")) == {space: pytest.approx(1.0)}  # "▁▁▁" is 3 × "▁"
    convention = TokenConvention(byte_level=True)
    partial = [
        (i, key)
        for token, i in byte_level.get_vocab().items()
        if (key := convention.canonical(token)) and len(key) >= 2 and min(key) >= 0x80 and _not_utf8(key)
    ]
    assert partial
    for student_id, key in partial:
        assert_row(bl_to_sp, student_id, piece_weights([tid(sentencepiece, f"<0x{b:02X}>") for b in key]))


def _not_utf8(key: bytes) -> bool:
    try:
        key.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_mid_word_tokens_get_no_dummy_prefix_space(byte_level, sentencepiece, bl_to_sp) -> None:
    checked = 0
    for token, student_id in byte_level.get_vocab().items():
        entries = row(bl_to_sp, student_id)
        if token.isascii() and token.isalpha() and len(entries) > 1 and len(set(entries.values())) == len(entries):
            pieces = sorted(entries, key=entries.get, reverse=True)  # distinct weights: slot order = piece order
            assert "".join(sentencepiece.convert_ids_to_tokens(pieces)) == token
            checked += 1
    assert checked >= 20


def test_pieces_that_do_not_spell_the_token_leave_the_row_empty(byte_level, sentencepiece, caplog) -> None:
    """A teacher that lowercases cannot spell "Foo" from pieces: such rows stay unmapped, loudly."""
    spec = json.loads(sentencepiece.backend_tokenizer.to_str())
    spec["normalizer"] = {"type": "Lowercase"}
    lowercasing = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    with caplog.at_level(logging.WARNING, logger="megatron_mopd.crosstok.projection"):
        projection = VocabProjection.build(byte_level, lowercasing)
    assert "could not be re-encoded" in caplog.text
    student_keys = CanonicalVocabulary.of(byte_level).keys
    uppercase = [i for i, key in enumerate(student_keys) if key and any(65 <= b <= 90 for b in key)]
    unmapped = [i for i in uppercase if not row(projection, i)]
    assert unmapped and all(projection.exact[i] or not row(projection, i) for i in uppercase)
    assert projection.stats.unmapped >= len(unmapped)


def test_special_tokens_match_by_content(byte_level, small_byte_level, sentencepiece, bl_to_small, sp_to_bl) -> None:
    for content in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert row(bl_to_small, tid(byte_level, content)) == {tid(small_byte_level, content): 1.0}
    assert bl_to_small.stats.special == 3
    for content in ("<s>", "</s>", "<unk>"):  # the byte-level teacher has no such special token
        assert row(sp_to_bl, tid(sentencepiece, content)) == {}
    no_special = VocabProjection.build(byte_level, small_byte_level, match_special=False)
    assert no_special.stats.special == 0 and no_special.stats.unmapped == 3
    assert row(no_special, tid(byte_level, "<|endoftext|>")) == {}


# --- invariants ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PAIRS)
def test_rows_are_distributions_sorted_by_weight(name: str, request) -> None:
    projection: VocabProjection = request.getfixturevalue(name)
    indices, weights = projection.indices, projection.weights
    assert indices.dtype == torch.int64 and weights.dtype == torch.float32 and projection.exact.dtype == torch.bool
    assert indices.shape == weights.shape and indices.shape[1] <= projection.params["top_k"]
    empty = indices < 0
    assert torch.all(weights[empty] == 0) and torch.all(weights[~empty] > 0)
    assert torch.all(indices < projection.teacher_vocab_size)
    sums = weights.sum(-1)
    mapped = ~empty[:, 0]
    assert torch.allclose(sums[mapped], torch.ones(()), atol=1e-6) and torch.all(sums[~mapped] == 0)
    assert torch.all(weights[:, 1:] <= weights[:, :-1])
    assert torch.all(empty[:, :-1] <= empty[:, 1:]), "empty slots come last"


@pytest.mark.parametrize("name", PAIRS)
def test_stats_partition_the_rows(name: str, request) -> None:
    projection: VocabProjection = request.getfixturevalue(name)
    stats = projection.stats.as_dict()
    assert set(stats) == {"exact", "multi_token", "reverse", "special", "unmapped"}
    assert sum(stats.values()) == projection.student_vocab_size
    assert stats["unmapped"] == int((projection.indices[:, 0] < 0).sum())
    assert stats["exact"] + stats["special"] == int(projection.exact.sum())


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_identical_tokenizers_give_the_identity(kind: str, request) -> None:
    tokenizer = request.getfixturevalue(kind)
    projection = VocabProjection.build(tokenizer, tokenizer)
    size = len(tokenizer)
    assert projection.indices.shape == (size, 1)
    assert torch.equal(projection.indices[:, 0], torch.arange(size))
    assert torch.all(projection.weights == 1) and torch.all(projection.exact)
    assert projection.stats.exact + projection.stats.special == size


def test_vocab_sizes_include_added_tokens(byte_level, sentencepiece, bl_to_sp) -> None:
    assert bl_to_sp.student_vocab_size == len(byte_level) and bl_to_sp.teacher_vocab_size == len(sentencepiece)


@pytest.mark.parametrize("bad", [{"beta": 0.0}, {"gamma": 1.5}, {"max_pieces": 0}, {"top_k": 0},
                                 {"reverse": True, "beta": 0.5}])
def test_invalid_parameters_are_refused(bad, byte_level, sentencepiece) -> None:
    with pytest.raises(ValueError):
        VocabProjection.build(byte_level, sentencepiece, **bad)


def test_top_k_truncates_and_renormalizes(byte_level, sentencepiece, bl_to_sp) -> None:
    narrow = VocabProjection.build(byte_level, sentencepiece, top_k=1)
    assert narrow.indices.shape[1] == 1
    mapped = bl_to_sp.indices[:, 0] >= 0
    assert torch.equal(narrow.indices[:, 0], bl_to_sp.indices[:, 0])
    assert torch.all(narrow.weights[mapped, 0] == 1)


# --- reverse pass ----------------------------------------------------------------------------------


def test_reverse_pass_reaches_more_teacher_tokens(sentencepiece, byte_level, sp_to_bl) -> None:
    projection = VocabProjection.build(sentencepiece, byte_level, reverse=True, top_k=64)
    forward_reached, reached = sp_to_bl.teacher_reachable(), projection.teacher_reachable()
    assert torch.all(reached >= forward_reached) and reached.sum() > forward_reached.sum()
    assert projection.stats.as_dict() == sp_to_bl.stats.as_dict()  # every row was mapped already
    student_keys = CanonicalVocabulary.of(sentencepiece).keys
    teacher_keys = CanonicalVocabulary.of(byte_level).keys
    changed = 0
    for i in range(projection.student_vocab_size):
        before, after = row(sp_to_bl, i), row(projection, i)
        added = {j: w for j, w in after.items() if j not in before}
        if not added:
            assert after.keys() == before.keys()
            continue
        changed += 1
        # the forward entries keep their proportions and β of the mass; the rest goes to teacher
        # tokens no forward row reached, which begin with this student token
        for j, w in before.items():
            assert after[j] == pytest.approx(BETA * w, abs=1e-6)
        assert sum(added.values()) == pytest.approx(1 - BETA, abs=1e-6)
        for j in added:
            assert not forward_reached[j]
            assert teacher_keys[j].startswith(student_keys[i]) and teacher_keys[j] != student_keys[i]
        if sp_to_bl.exact[i]:
            assert projection.indices[i, 0] == sp_to_bl.indices[i, 0]
    assert changed > 0


# --- storage ---------------------------------------------------------------------------------------


def test_save_load_round_trip(bl_to_sp, byte_level, sentencepiece, tmp_path: Path) -> None:
    path = tmp_path / "projection.safetensors"
    bl_to_sp.save(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    loaded = VocabProjection.load(path, student=byte_level, teacher=sentencepiece)
    for name in ("indices", "weights", "exact"):
        assert torch.equal(getattr(loaded, name), getattr(bl_to_sp, name))
    assert loaded.fingerprint == bl_to_sp.fingerprint
    assert loaded.params == bl_to_sp.params == {
        "beta": 0.9, "gamma": 0.1, "max_pieces": 4, "top_k": 8, "reverse": False, "match_special": True
    }
    assert loaded.stats == bl_to_sp.stats and isinstance(loaded.stats, ProjectionStats)
    assert (loaded.student_vocab_size, loaded.teacher_vocab_size) == (len(byte_level), len(sentencepiece))
    assert VocabProjection.load(path).fingerprint == bl_to_sp.fingerprint  # no tokenizers: no check


def test_fingerprint_covers_vocabularies_and_parameters(byte_level, sentencepiece, small_byte_level, bl_to_sp):
    assert vocabulary_fingerprint(byte_level) == vocabulary_fingerprint(byte_level_bpe())
    assert vocabulary_fingerprint(byte_level) != vocabulary_fingerprint(small_byte_level)
    assert bl_to_sp.student_fingerprint == vocabulary_fingerprint(byte_level)
    assert bl_to_sp.teacher_fingerprint == vocabulary_fingerprint(sentencepiece)
    assert VocabProjection.build(byte_level, sentencepiece, gamma=0.2).fingerprint != bl_to_sp.fingerprint


def test_load_refuses_other_tokenizers_naming_the_side(
    bl_to_sp, byte_level, sentencepiece, small_byte_level, tmp_path: Path
) -> None:
    path = tmp_path / "projection.safetensors"
    bl_to_sp.save(path)
    with pytest.raises(ValueError, match="teacher tokenizer") as teacher_error:
        VocabProjection.load(path, student=byte_level, teacher=small_byte_level)
    assert "student tokenizer" not in str(teacher_error.value)
    assert "mopd build-projection" in str(teacher_error.value)
    with pytest.raises(ValueError, match="student tokenizer") as student_error:
        VocabProjection.load(path, student=small_byte_level)
    assert "teacher tokenizer" not in str(student_error.value)


def test_load_refuses_broken_and_foreign_files(bl_to_sp, tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    bl_to_sp.save(good)
    data = good.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "garbage": b"this is not a safetensors file" * 10,
        "flipped": data[:-1] + bytes([data[-1] ^ 0xFF]),  # last data byte: the header still parses
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match="truncated or corrupted|corrupted"):
            VocabProjection.load(tmp_path / name)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="not a vocabulary projection"):
        VocabProjection.load(foreign)


# --- sharding, common pairs, reachability ----------------------------------------------------------


def test_shards_cover_the_padded_vocabulary(bl_to_sp) -> None:
    vs, tp = bl_to_sp.student_vocab_size, 3
    local = -(-vs // (tp * 8)) * 8  # Megatron-style padding to a multiple of 8 per rank
    shards = [bl_to_sp.shard(r * local, (r + 1) * local) for r in range(tp)]
    assert [s.start for s in shards] == [0, local, 2 * local]
    indices = torch.cat([s.indices for s in shards])
    weights = torch.cat([s.weights for s in shards])
    assert indices.shape == (tp * local, bl_to_sp.indices.shape[1])
    assert torch.equal(indices[:vs], bl_to_sp.indices) and torch.equal(weights[:vs], bl_to_sp.weights)
    assert torch.all(indices[vs:] == -1) and torch.all(weights[vs:] == 0)
    beyond = bl_to_sp.shard(vs + 10, vs + 20)
    assert torch.all(beyond.indices == -1) and beyond.weights.shape == (10, bl_to_sp.indices.shape[1])
    for start, end in [(5, 3), (-1, 3), (0.0, 3)]:
        with pytest.raises(ValueError):
            bl_to_sp.shard(start, end)


def handmade_projection() -> VocabProjection:
    """8 student rows over 10 teacher ids with competing claims (see test_common_pairs_resolve_conflicts)."""
    indices = torch.tensor([[5, -1], [5, -1], [6, 7], [6, 7], [7, 9], [8, 9], [-1, -1], [7, 9]])
    weights = torch.tensor([[1, 0], [1, 0], [.7, .3], [.7, .3], [.8, .2], [.55, .45], [0, 0], [.75, .25]])
    exact = torch.tensor([False, True, False, False, False, False, False, False])
    stats = ProjectionStats(exact=1, multi_token=6, reverse=0, special=0, unmapped=1)
    return VocabProjection(indices, weights, exact, 10, {}, "student", "teacher", stats)


def test_common_pairs_resolve_conflicts() -> None:
    projection = handmade_projection()

    def pairs(threshold: float) -> list[tuple[int, int]]:
        student, teacher = projection.common_pairs(threshold)
        assert student.dtype == teacher.dtype == torch.int64
        return list(zip(student.tolist(), teacher.tolist()))

    # row 1 (exact) beats row 0 (one-hot, not exact) for teacher 5; rows 2 and 3 tie for teacher 6:
    # the lower student id wins; row 4 (0.8) beats row 7 (0.75) for teacher 7; row 5 (0.55) is below.
    assert pairs(0.6) == [(1, 5), (2, 6), (4, 7)]
    assert pairs(0.5) == [(1, 5), (2, 6), (4, 7), (5, 8)]
    assert pairs(0.78) == [(1, 5), (4, 7)]
    assert pairs(1.0) == [(1, 5)]  # exact rows qualify at any threshold (row 0 loses to row 1)
    with pytest.raises(ValueError):
        projection.common_pairs(1.5)


@pytest.mark.parametrize("threshold", [0.0, 0.6, 0.95])
def test_common_pairs_follow_the_definition(bl_to_sp, threshold: float) -> None:
    best: dict[int, tuple[tuple, int]] = {}
    for i in range(bl_to_sp.student_vocab_size):
        t, w, exact = int(bl_to_sp.indices[i, 0]), float(bl_to_sp.weights[i, 0]), bool(bl_to_sp.exact[i])
        if t >= 0 and (exact or w >= threshold):
            key = (not exact, -w, i)
            if t not in best or key < best[t][0]:
                best[t] = (key, i)
    expected = sorted((i, t) for t, (_, i) in best.items())
    student, teacher = bl_to_sp.common_pairs(threshold)
    assert list(zip(student.tolist(), teacher.tolist())) == expected
    assert len(set(student.tolist())) == len(student) and len(set(teacher.tolist())) == len(teacher)


def test_teacher_reachable(bl_to_small, small_byte_level) -> None:
    assert handmade_projection().teacher_reachable().nonzero().flatten().tolist() == [5, 6, 7, 8, 9]
    reachable = bl_to_small.teacher_reachable()
    assert reachable.shape == (len(small_byte_level),) and reachable.dtype == torch.bool
    used = set(bl_to_small.indices[bl_to_small.indices >= 0].tolist())
    assert set(reachable.nonzero().flatten().tolist()) == used
    assert reachable.all()  # the larger byte-level vocabulary contains the smaller one's tokens


# --- command line ----------------------------------------------------------------------------------


def test_cli_builds_a_loadable_projection(tmp_path: Path) -> None:
    student, teacher = tokenizer_dir("byte_level_bpe", 2000), tokenizer_dir("sentencepiece_bpe", 2000)
    output = tmp_path / "w.safetensors"
    command = [sys.executable, "-m", "megatron_mopd.cli", "build-projection", "--student", str(student),
               "--teacher", str(teacher), "-o", str(output), "--top-k", "4", "--reverse"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "built in" in result.stdout
    printed = json.loads(result.stdout.split("rows: ", 1)[1].splitlines()[0])
    projection = VocabProjection.load(output, student=student, teacher=teacher)
    assert printed == projection.stats.as_dict()
    assert projection.params["top_k"] == 4 and projection.params["reverse"] is True
    with pytest.raises(ValueError, match="--top-k 4 --reverse"):  # the error tells how to rebuild
        VocabProjection.load(output, teacher=student)


def test_cli_reports_invalid_arguments(tmp_path: Path, capsys) -> None:
    student, teacher = tokenizer_dir("byte_level_bpe", 2000), tokenizer_dir("sentencepiece_bpe", 2000)
    output = tmp_path / "w.safetensors"
    argv = ["build-projection", "--student", str(student), "--teacher", str(teacher), "-o", str(output),
            "--reverse", "--beta", "0.4"]
    assert cli.main(argv) == 1
    assert "beta" in capsys.readouterr().err and not output.exists()


@pytest.fixture
def recorded_tokenizer_loads(monkeypatch) -> list[str]:
    """The paths ``AutoTokenizer.from_pretrained`` is called with; it loads existing directories only and
    answers anything else with OSError, never looking a name up on the Hugging Face Hub."""
    original = AutoTokenizer.from_pretrained.__func__
    paths: list[str] = []

    def recording(cls, path, *args, **kwargs):
        paths.append(str(path))
        if not Path(path).is_dir():
            raise OSError(f"the test does not let {path!r} reach the Hub")
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(recording))
    return paths


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("mopd build-projection: error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


BAD_TOKENIZER_PATHS = {  # kind: (the path, relative to the working directory; what the error says after it)
    "mistyped": ("mytok", r"no such file or directory; {flag} must name a local directory that holds a tokenizer; "
                          r"download one from the Hugging Face Hub first: hf download NAME --local-dir DIR$"),
    "a file": ("tok.txt", r"is a file, not a directory; {flag} must name a local directory that holds a tokenizer"),
    "no vocabulary file": ("model", r"no tokenizer in this directory \(none of tokenizer.json, .*vocab.json \+ "
                                    r"merges.txt.*\); .*hf download NAME --local-dir DIR$"),
}


@pytest.mark.parametrize("flag", ["--student", "--teacher"])
@pytest.mark.parametrize("kind", list(BAD_TOKENIZER_PATHS))
def test_cli_refuses_a_path_that_is_no_local_tokenizer_directory_without_asking_the_hub(
    flag: str, kind: str, tmp_path: Path, monkeypatch, capsys, recorded_tokenizer_loads
) -> None:
    """A mistyped name is not taken for a Hugging Face Hub name (from_pretrained never sees it); a file,
    or a directory without a vocabulary file (only a tokenizer_config.json, say), is refused before
    transformers tries to convert it. One line on stderr names the flag, the path and the fix."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tok.txt").write_text("not a tokenizer")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tokenizer_config.json").write_text("{}")
    bad, message = BAD_TOKENIZER_PATHS[kind]
    good = str(tokenizer_dir("byte_level_bpe", 2000))
    paths = {"--student": good, "--teacher": good, flag: bad}
    argv = ["build-projection", "--student", paths["--student"], "--teacher", paths["--teacher"], "-o", "w.safetensors"]
    assert cli.main(argv) == 1
    error = one_error_line(capsys.readouterr().err)
    assert error.startswith(f"mopd build-projection: error: {flag} {bad}: ")
    assert re.search(message.format(flag=flag), error), error
    assert bad not in recorded_tokenizer_loads and not (tmp_path / "w.safetensors").exists()


def test_the_api_names_the_side_of_a_path_that_is_no_tokenizer_directory(
    byte_level, bl_to_sp, tmp_path: Path, recorded_tokenizer_loads
) -> None:
    with pytest.raises(ValueError, match=r"^teacher .*missing: no such file or directory"):
        VocabProjection.build(byte_level, tmp_path / "missing")
    bl_to_sp.save(tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=r"^student .*missing: no such file or directory"):
        VocabProjection.load(tmp_path / "w.safetensors", student=tmp_path / "missing")
    assert recorded_tokenizer_loads == []


def test_cli_creates_a_missing_output_directory_and_says_so(tmp_path: Path, capsys) -> None:
    student, teacher = tokenizer_dir("byte_level_bpe", 2000), tokenizer_dir("sentencepiece_bpe", 2000)
    output = tmp_path / "new" / "nested" / "w.safetensors"
    assert cli.main(["build-projection", "--student", str(student), "--teacher", str(teacher), "-o", str(output)]) == 0
    assert f"created directory {output.parent}" in capsys.readouterr().out
    assert VocabProjection.load(output, student=student, teacher=teacher).student_vocab_size == 2000


def test_cli_refuses_an_output_that_is_a_directory(tmp_path: Path, capsys) -> None:
    student, teacher = tokenizer_dir("byte_level_bpe", 2000), tokenizer_dir("sentencepiece_bpe", 2000)
    arguments = ["build-projection", "--student", str(student), "--teacher", str(teacher), "-o", str(tmp_path)]
    assert cli.main(arguments) == 1
    error = one_error_line(capsys.readouterr().err)
    assert f"-o {tmp_path}: is a directory; -o takes the projection file to write" in error
    assert list(tmp_path.iterdir()) == []
