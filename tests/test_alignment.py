"""Specification: chunk alignment of two tokenizations of the same text (docs/design.md §4).

Student and teacher are the two really different tokenizers of ``megatron_mopd.demo.tokenizers``
(byte-level BPE with 3-digit number groups and byte tokens for CJK; SentencePiece-style ``▁`` BPE
with single digits, byte fallback and a ``<s>`` BOS), each in both roles. A chunk is a maximal span
between positions that are token boundaries on both sides; the losses consume the shifted
(next-token) chunk id of every student position and every teacher row.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from megatron_mopd.crosstok import AlignmentError, SequenceAlignment, align_batch, align_offsets, align_texts
from megatron_mopd.demo.tokenizers import byte_level_bpe, sentencepiece_bpe

ENGLISH = "The quick brown fox jumps over the lazy dog; distillation transfers knowledge."
NUMBERS = "In 2024 the sum 12345 + 678 = 13023 and 3.14159 * 2 = 6.28318."
CODE = "def forward(self, x):\n    return self.proj(x)  # twice\n\tif x is None:\n\t\treturn   None\n\n"
CJK = "He said 你好吗 and 我很好。Then: 你好!"
TEXTS = {"english": ENGLISH, "numbers": NUMBERS, "code": CODE, "cjk": CJK}
PROMPT = "Assistant:\n"  # no token of either tokenizer crosses the end of this prompt


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, PreTrainedTokenizerBase]:
    return {"byte_level": byte_level_bpe(), "sentencepiece": sentencepiece_bpe()}


ROLES = [("byte_level", "sentencepiece"), ("sentencepiece", "byte_level")]


def offsets_of(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], np.ndarray]:
    encoded = tokenizer(text, return_offsets_mapping=True)
    return list(encoded["input_ids"]), np.array(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)


def members(token_chunks: np.ndarray, chunk: int) -> np.ndarray:
    return np.flatnonzero(token_chunks == chunk)


def chunks_by_name(
    alignment: SequenceAlignment, student_name: str, teacher_name: str
) -> dict[str, np.ndarray]:
    """Each side's token chunks, keyed by its tokenizer's name."""
    return {student_name: alignment.student_token_chunks, teacher_name: alignment.teacher_token_chunks}


def variant(tokenizer: PreTrainedTokenizerFast, **components) -> PreTrainedTokenizerFast:
    """A copy of ``tokenizer`` with some backend components (normalizer, post_processor) replaced."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    for name, component in components.items():
        setattr(backend, name, component)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
@pytest.mark.parametrize("student_name, teacher_name", ROLES)
def test_chunks_tile_the_completion_and_hold_the_same_text_on_both_sides(
    tokenizers, student_name: str, teacher_name: str, text: str
) -> None:
    """Chunk spans tile the region; each side's tokens of a chunk cover exactly its text (up to the
    whitespace a side leaves between tokens); the byte-level tokens of a chunk decode to its text."""
    full = PROMPT + text
    region = [(len(PROMPT), len(full))]
    alignment, student_ids, teacher_ids = align_texts(
        full, full, tokenizers[student_name], tokenizers[teacher_name], region, region
    )
    spans = alignment.chunk_spans
    assert alignment.num_chunks > 0 and (spans[:, 0] == 0).all()
    assert spans[0, 1] == 0 and spans[-1, 2] == len(text) and (spans[1:, 1] == spans[:-1, 2]).all()
    assert "".join(text[start:end] for _, start, end in spans) == text

    for name, ids, token_chunks in (
        (student_name, student_ids, alignment.student_token_chunks),
        (teacher_name, teacher_ids, alignment.teacher_token_chunks),
    ):
        _, offsets = offsets_of(tokenizers[name], full)
        offsets = offsets - len(PROMPT)
        in_region = (offsets[:, 1] > offsets[:, 0]) & (offsets[:, 0] >= 0)
        assert (token_chunks[in_region] >= 0).all(), "every token of the completion is scored"
        assert (token_chunks[~in_region] == -1).all(), "prompt and special tokens are unscored"
        for chunk, (_, start, end) in enumerate(spans):
            tokens = members(token_chunks, chunk)
            assert len(tokens) >= 1
            assert (offsets[tokens, 0] >= start).all() and (offsets[tokens, 1] <= end).all()
            covered = np.zeros(end - start, dtype=bool)
            for token_start, token_end in offsets[tokens]:
                covered[token_start - start : token_end - start] = True
            assert all(c.isspace() for c, hit in zip(text[start:end], covered) if not hit)
            if name == "byte_level":
                assert tokenizers[name].decode([ids[t] for t in tokens]) == text[start:end]


@pytest.mark.parametrize("student_name, teacher_name", ROLES)
def test_numbers_split_differently_share_chunks(tokenizers, student_name: str, teacher_name: str) -> None:
    """"12345" is "12" "3" "45" for byte-level BPE (3-digit groups, then merges) and single digits for
    SentencePiece: each multi-digit byte-level token shares one chunk with exactly its digits, and the
    chunks inside a number hold every token of it on both sides and nothing else."""
    text = "Sum: 12345 + 678 = 13023"
    alignment, _, _ = align_texts(text, text, tokenizers[student_name], tokenizers[teacher_name])
    chunks_of = chunks_by_name(alignment, student_name, teacher_name)
    offsets_of_side = {name: offsets_of(tokenizers[name], text)[1] for name in chunks_of}
    byte_offsets, byte_chunks = offsets_of_side["byte_level"], chunks_of["byte_level"]
    sp_offsets, sp_chunks = offsets_of_side["sentencepiece"], chunks_of["sentencepiece"]
    multi_digit = [t for t, (s, e) in enumerate(byte_offsets) if e - s >= 2 and text[s:e].isdigit()]
    assert len(multi_digit) >= 3, "the fixture must split numbers differently on the two sides"
    for token in multi_digit:
        start, end = byte_offsets[token]
        chunk = byte_chunks[token]
        assert chunk >= 0 and members(byte_chunks, chunk).tolist() == [token]
        assert [text[s:e] for s, e in sp_offsets[members(sp_chunks, chunk)]] == list(text[start:end])

    for number in ("12345", "678", "13023"):
        lo = text.index(number)
        hi = lo + len(number)
        chunks = {int(c) for c, (_, s, e) in enumerate(alignment.chunk_spans) if lo <= s and e <= hi}
        assert sum(e - s for c, (_, s, e) in enumerate(alignment.chunk_spans) if c in chunks) == len(number)
        for name, token_chunks in chunks_of.items():
            starts, ends = offsets_of_side[name].T
            inside = np.flatnonzero((starts >= lo) & (ends <= hi) & (ends > starts))
            assert {int(c) for c in token_chunks[inside]} == chunks
            assert set(np.flatnonzero(np.isin(token_chunks, list(chunks)))) == set(inside)


@pytest.mark.parametrize("student_name, teacher_name", ROLES)
def test_cjk_byte_tokens_stay_inside_their_character(
    tokenizers, student_name: str, teacher_name: str
) -> None:
    """Byte-level BPE splits 你 into byte tokens that all report the span of the character: there is
    no boundary inside it, all of them share the chunk of the character, and the chunks of "你好吗"
    are whole characters that decode (byte-level side) to exactly their text."""
    text = "He said 你好吗 today."
    alignment, _, _ = align_texts(text, text, tokenizers[student_name], tokenizers[teacher_name])
    byte_chunks = chunks_by_name(alignment, student_name, teacher_name)["byte_level"]
    byte_ids, byte_offsets = offsets_of(tokenizers["byte_level"], text)
    lo = text.index("你好吗")
    ni = np.flatnonzero((byte_offsets[:, 0] == lo) & (byte_offsets[:, 1] == lo + 1))
    assert len(ni) >= 2, "the byte-level fixture must split 你 into byte tokens"
    assert len(set(byte_chunks[ni].tolist())) == 1 and byte_chunks[ni[0]] >= 0

    pieces = [text[s:e] for _, s, e in alignment.chunk_spans if lo <= s and e <= lo + 3]
    assert "".join(pieces) == "你好吗" and all(len(piece) >= 1 for piece in pieces)
    for chunk, (_, start, end) in enumerate(alignment.chunk_spans):
        if lo <= start and end <= lo + 3:
            decoded = tokenizers["byte_level"].decode([byte_ids[t] for t in members(byte_chunks, chunk)])
            assert decoded == text[start:end]


def bytes_with_one_cross_character_merge() -> PreTrainedTokenizerFast:
    """Byte-level tokens, plus one merge of the last byte of 你 (ł) with the first byte of 好 (å)."""
    vocab = {token: i for i, token in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab["łå"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("ł", "å")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.mark.parametrize("byte_side", ["student", "teacher"])
def test_a_token_holding_bytes_of_two_characters_joins_them(tokenizers, byte_side: str) -> None:
    """"łå" holds the last byte of 你 and the first of 好: it reports the span of both characters, so
    the position between them is no boundary of the byte side, though "ä" "½" end there."""
    text = "He said 你好吗"
    lo = text.index("你")
    byte_tokenizer = bytes_with_one_cross_character_merge()
    pair = (byte_tokenizer, tokenizers["sentencepiece"])
    alignment, *_ = align_texts(text, text, *(pair if byte_side == "student" else pair[::-1]))
    byte_chunks, sp_chunks = alignment.student_token_chunks, alignment.teacher_token_chunks
    if byte_side == "teacher":
        byte_chunks, sp_chunks = sp_chunks, byte_chunks
    _, byte_offsets = offsets_of(byte_tokenizer, text)
    ni, ni_hao, hao, ma = (lo, lo + 1), (lo, lo + 2), (lo + 1, lo + 2), (lo + 2, lo + 3)
    assert [tuple(span) for span in byte_offsets[-8:]] == [ni, ni, ni_hao, hao, hao, ma, ma, ma]
    assert [text[s:e] for _, s, e in alignment.chunk_spans[-2:]] == ["你好", "吗"]
    joined, last = alignment.num_chunks - 2, alignment.num_chunks - 1
    assert byte_chunks[-8:].tolist() == [joined] * 5 + [last] * 3
    _, sp_offsets = offsets_of(tokenizers["sentencepiece"], text)
    assert [text[s:e] for s, e in sp_offsets[members(sp_chunks, joined)]] == ["你", "好"]


@pytest.mark.parametrize("byte_side", ["student", "teacher"])
def test_whitespace_one_side_strips_belongs_to_the_neighbouring_token(
    tokenizers, byte_side: str
) -> None:
    """A normalizer that strips the text's leading and trailing whitespace leaves it uncovered on that
    side: the leading run belongs to the first token, the trailing run to the last one; no error,
    and every byte-level token (but token 0's chunk) is scored."""
    text = "  Hello world.\n\t 12345  \n "
    stripping = variant(tokenizers["sentencepiece"], normalizer=normalizers.Strip())
    _, stripped = offsets_of(stripping, text)
    assert stripped[1:, 0].min() == 2 and stripped[:, 1].max() == text.rindex("5") + 1
    pair = (tokenizers["byte_level"], stripping)
    alignment, *_ = align_texts(text, text, *(pair if byte_side == "student" else pair[::-1]))
    byte_chunks = (alignment.student_token_chunks, alignment.teacher_token_chunks)[byte_side == "teacher"]
    _, byte_offsets = offsets_of(tokenizers["byte_level"], text)
    last_start, last_end = alignment.chunk_spans[-1, 1:]
    assert last_end == len(text) and last_start <= text.rindex("5"), "the trailing run joins the last chunk"
    scored = byte_offsets[:, 0] >= alignment.chunk_spans[0, 1]
    assert (byte_chunks[scored] >= 0).all() and (byte_chunks[~scored] == -1).all()


@pytest.mark.parametrize("student_name, teacher_name", ROLES)
def test_chat_templates_do_not_change_the_alignment(
    tokenizers, student_name: str, teacher_name: str
) -> None:
    """The same prompt and completion rendered with two different chat templates align, region by
    region, exactly as the completion tokenized on its own (chunk spans and each chunk's token ids)."""
    prompt, completion = "What is 12345 + 678?", " It is 13023.\n你好吗\n\tdone  now"
    student_text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{completion}<|im_end|>"
    teacher_text = f"<s>[INST] {prompt} [/INST]\n{completion}</s>"

    def regions(text: str) -> list[tuple[int, int]]:
        p, c = text.index(prompt), text.index(completion)
        return [(p, p + len(prompt)), (c, c + len(completion))]

    templated, student_ids, teacher_ids = align_texts(
        student_text,
        teacher_text,
        tokenizers[student_name],
        tokenizers[teacher_name],
        regions(student_text),
        regions(teacher_text),
    )
    alone_student_ids, alone_student = offsets_of(tokenizers[student_name], completion)
    alone_teacher_ids, alone_teacher = offsets_of(tokenizers[teacher_name], completion)
    # A special token in front of each side (as in the templates), so no chunk holds token 0.
    bos = np.zeros((1, 2), dtype=np.int64)
    alone = align_offsets(
        np.concatenate([bos, alone_student]), np.concatenate([bos, alone_teacher]), completion, completion
    )
    alone_student_ids, alone_teacher_ids = [-1, *alone_student_ids], [-1, *alone_teacher_ids]

    in_completion = templated.chunk_spans[:, 0] == 1
    assert (templated.chunk_spans[~in_completion, 0] == 0).all() and (~in_completion).sum() > 0
    first = int(np.argmax(in_completion))
    assert np.array_equal(templated.chunk_spans[in_completion, 1:], alone.chunk_spans[:, 1:])
    for chunk in range(alone.num_chunks):
        for ids, chunks, reference_ids, reference_chunks in (
            (student_ids, templated.student_token_chunks, alone_student_ids, alone.student_token_chunks),
            (teacher_ids, templated.teacher_token_chunks, alone_teacher_ids, alone.teacher_token_chunks),
        ):
            assert [ids[t] for t in members(chunks, first + chunk)] == [
                reference_ids[t] for t in members(reference_chunks, chunk)
            ]


def test_regions_must_hold_the_same_text(tokenizers) -> None:
    student_text, teacher_text = "Q: hi\nA: 12345", "[Q] hi [A] 12345"
    _, student = offsets_of(tokenizers["byte_level"], student_text)
    _, teacher = offsets_of(tokenizers["sentencepiece"], teacher_text)
    texts = (student_text, teacher_text)
    mismatch = r"region 1 differs: student text \[9:14\] '12345' vs teacher text \[10:16\] ' 12345'"
    with pytest.raises(AlignmentError, match=mismatch):
        align_offsets(student, teacher, *texts, [(3, 5), (9, 14)], [(4, 6), (10, 16)])
    with pytest.raises(AlignmentError, match="2 student regions but 1 teacher regions"):
        align_offsets(student, teacher, *texts, [(3, 5), (9, 14)], [(11, 16)])
    with pytest.raises(ValueError, match="ascending, disjoint"):
        align_offsets(student, teacher, *texts, [(9, 14), (3, 5)], [(11, 16), (4, 6)])
    aligned = align_offsets(student, teacher, *texts, [(3, 5), (9, 14)], [(4, 6), (11, 16)])
    assert aligned.num_chunks >= 3 and set(aligned.chunk_spans[:, 0].tolist()) == {0, 1}


@pytest.mark.parametrize("student_name, teacher_name", ROLES)
def test_a_token_crossing_a_region_edge_unscores_its_chunk(
    tokenizers, student_name: str, teacher_name: str
) -> None:
    """ "Assistant: The…" tokenizes the space before "The" into "ĠThe"/"▁The", which crosses the start
    of the completion "The fox jumps": the chunk "The" is unscored on both sides, the rest is not."""
    text = "Assistant: The fox jumps"
    region = [(text.index("The"), len(text))]
    pair = (tokenizers[student_name], tokenizers[teacher_name])
    alignment, _, _ = align_texts(text, text, *pair, region, region)
    assert alignment.chunk_spans[0, 1] == len("The") and alignment.chunk_spans[-1, 2] == len("The fox jumps")
    for name, chunks in chunks_by_name(alignment, student_name, teacher_name).items():
        _, offsets = offsets_of(tokenizers[name], text)
        crossing = np.flatnonzero((offsets[:, 0] < region[0][0]) & (offsets[:, 1] > region[0][0]))
        assert len(crossing) == 1 and chunks[crossing[0]] == -1
        assert (chunks[offsets[:, 0] >= region[0][0] + len("The")] >= 0).all()


@pytest.mark.parametrize("student_name, teacher_name", ROLES)
def test_special_tokens_and_padding_are_unscored_and_change_nothing(
    tokenizers, student_name: str, teacher_name: str
) -> None:
    """BOS (span (0, 0): the sentencepiece tokenizer's own ``<s>``, one put in front of the byte-level
    tokens), an appended EOS and padding get chunk -1 and change no other token's chunk. With a BOS
    on both sides no real token is token 0, so the first chunk is kept too."""
    text = CODE + NUMBERS
    plain = {name: offsets_of(tokenizers[name], text)[1] for name in (student_name, teacher_name)}
    assert tokenizers["sentencepiece"](text)["input_ids"][0] == tokenizers["sentencepiece"].bos_token_id
    assert tuple(plain["sentencepiece"][0]) == (0, 0)
    without = align_offsets(plain[student_name], plain[teacher_name], text, text)

    def with_specials(name: str) -> np.ndarray:
        bos = np.zeros((int(name == "byte_level"), 2), dtype=np.int64)
        return np.concatenate([bos, plain[name], np.zeros((3, 2), dtype=np.int64)])  # + EOS, 2 × pad

    specials = align_offsets(with_specials(student_name), with_specials(teacher_name), text, text)
    assert specials.num_chunks == without.num_chunks + 1
    assert np.array_equal(specials.chunk_spans[1:], without.chunk_spans)
    reference = chunks_by_name(without, student_name, teacher_name)
    for name, chunks in chunks_by_name(specials, student_name, teacher_name).items():
        real = chunks[int(name == "byte_level") : len(chunks) - 3]
        assert (chunks[-3:] == -1).all() and chunks[0] == -1
        scored = reference[name] >= 0
        assert np.array_equal(real[scored], reference[name][scored] + 1)
        starts, ends = plain[name].T
        first_chunk = (ends > starts) & (ends <= specials.chunk_spans[0, 2])
        assert np.array_equal(real == 0, first_chunk) and (reference[name][first_chunk] == -1).all()


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
@pytest.mark.parametrize("student_name, teacher_name", ROLES)
def test_shifted_position_chunks(tokenizers, student_name: str, teacher_name: str, text: str) -> None:
    """Student position i and teacher row j carry the chunk of the token they predict (i + 1, j + 1);
    the chunk holding token 0 of either side is dropped; ids are 0..C-1 and both sides hold them all."""
    alignment, _, _ = align_texts(text, text, tokenizers[student_name], tokenizers[teacher_name])
    student, teacher = alignment.student_token_chunks, alignment.teacher_token_chunks
    student_positions = alignment.student_position_chunks()
    teacher_rows = alignment.teacher_position_chunks()
    assert student_positions.shape == student.shape and teacher_rows.shape == (len(teacher) - 1,)
    assert np.array_equal(student_positions[:-1], student[1:]) and student_positions[-1] == -1
    assert np.array_equal(teacher_rows, teacher[1:])
    every_chunk = set(range(alignment.num_chunks))
    assert set(student_positions[student_positions >= 0].tolist()) == every_chunk
    assert set(teacher_rows[teacher_rows >= 0].tolist()) == every_chunk
    for chunk in every_chunk:  # the position predicting a chunk's first token carries the chunk
        assert student_positions[members(student, chunk)[0] - 1] == chunk
        assert teacher_rows[members(teacher, chunk)[0] - 1] == chunk

    # Token 0 of the byte-level side (no BOS) is a real token: its chunk is gone on both sides.
    chunks_of = chunks_by_name(alignment, student_name, teacher_name)
    first_end = offsets_of(tokenizers["byte_level"], text)[1][0, 1]
    assert chunks_of["byte_level"][0] == -1 and alignment.chunk_spans[0, 1] >= first_end
    sp_ends = offsets_of(tokenizers["sentencepiece"], text)[1][:, 1]
    assert (chunks_of["sentencepiece"][sp_ends <= first_end] == -1).all()


@pytest.mark.parametrize("student_name, teacher_name", ROLES)
def test_text_covered_by_one_side_only_raises(tokenizers, student_name: str, teacher_name: str) -> None:
    """A non-whitespace span one side's tokens do not cover is reported with its range, its text and
    the side: a token removed from the teacher's offsets, or a normalizer that drops digits."""
    text = ENGLISH
    _, student = offsets_of(tokenizers[student_name], text)
    _, teacher = offsets_of(tokenizers[teacher_name], text)
    fox = int(np.flatnonzero(teacher[:, 1] == text.index("fox") + 3)[0])
    start = teacher[fox, 0] + (text[teacher[fox, 0]] == " ")
    fox_end = text.index("fox") + 3
    with pytest.raises(AlignmentError, match=rf"characters \[{start}:{fox_end}\] of the teacher text '\w*x'"):
        align_offsets(student, np.delete(teacher, fox, axis=0), text, text)

    no_digits = variant(tokenizers[teacher_name], normalizer=normalizers.Replace(Regex("[0-9]"), ""))
    text = NUMBERS
    lo = text.index("2024")
    message = rf"characters \[{lo}:{lo + 4}\] of the teacher text '2024' \(region 0\) are covered by student "
    with pytest.raises(AlignmentError, match=message + "tokens but by no teacher token"):
        align_texts(text, text, tokenizers[student_name], no_digits)
    with pytest.raises(AlignmentError, match=rf"characters \[{lo}:{lo + 4}\] of the student text '2024'"):
        align_texts(text, text, no_digits, tokenizers[student_name])


def test_trimmed_byte_level_offsets_align_like_untrimmed(tokenizers) -> None:
    """Trimmed offsets leave the leading space out of "Ġword" and report whitespace-only tokens as
    empty spans at their end; the gap rule gives the whitespace back: the alignment is unchanged."""
    trimmed = variant(tokenizers["byte_level"], post_processor=processors.ByteLevel(trim_offsets=True))
    text = PROMPT + CODE + NUMBERS + "  trailing  "
    _, offsets = offsets_of(trimmed, text)
    assert ((offsets[:, 0] == offsets[:, 1]) & (offsets[:, 0] > 0)).any(), "a whitespace token is empty"
    reference, _, _ = align_texts(text, text, tokenizers["byte_level"], tokenizers["sentencepiece"])
    aligned, _, _ = align_texts(text, text, trimmed, tokenizers["sentencepiece"])
    assert np.array_equal(aligned.chunk_spans, reference.chunk_spans)
    assert np.array_equal(aligned.student_token_chunks, reference.student_token_chunks)
    assert np.array_equal(aligned.teacher_token_chunks, reference.teacher_token_chunks)


def test_batch_of_alignments(tokenizers) -> None:
    """align_batch pads with -1 to [B, T_s] and [B, T_t - 1], offsets the ids so they are global and
    contiguous over the batch, and records each chunk's sample and span."""
    alignments: list[SequenceAlignment] = []
    lengths = []
    for text in (ENGLISH, CJK, NUMBERS):
        alignment, student_ids, teacher_ids = align_texts(
            text, text, tokenizers["byte_level"], tokenizers["sentencepiece"]
        )
        alignments.append(alignment)
        lengths.append((len(student_ids), len(teacher_ids)))
    t_s, t_t = max(s for s, _ in lengths) + 3, max(t for _, t in lengths) + 2
    batch = align_batch(alignments, t_s, t_t)

    assert batch.student_chunk_ids.shape == (3, t_s) and batch.teacher_chunk_ids.shape == (3, t_t - 1)
    assert batch.student_chunk_ids.dtype == batch.teacher_chunk_ids.dtype == torch.int64
    counts = [a.num_chunks for a in alignments]
    assert batch.num_chunks == sum(counts)
    assert batch.chunk_sample.tolist() == [b for b, n in enumerate(counts) for _ in range(n)]
    spans = np.concatenate([a.chunk_spans for a in alignments])
    assert torch.equal(batch.chunk_spans, torch.from_numpy(spans))
    first = np.cumsum([0, *counts])
    for b, (alignment, (n_s, n_t)) in enumerate(zip(alignments, lengths)):
        for ids, local, n in (
            (batch.student_chunk_ids[b], alignment.student_position_chunks(), n_s),
            (batch.teacher_chunk_ids[b], alignment.teacher_position_chunks(), n_t - 1),
        ):
            assert torch.equal(ids[:n], torch.from_numpy(np.where(local >= 0, local + first[b], -1)))
            assert (ids[n:] == -1).all()
    for ids in (batch.student_chunk_ids, batch.teacher_chunk_ids):
        assert set(ids[ids >= 0].tolist()) == set(range(batch.num_chunks))
        sample_of_row = torch.arange(3)[:, None].expand_as(ids)
        assert torch.equal(batch.chunk_sample[ids[ids >= 0]], sample_of_row[ids >= 0])

    with pytest.raises(ValueError, match="more than student_length"):
        align_batch(alignments, t_s - 4, t_t)
    with pytest.raises(ValueError, match="teacher_length"):
        align_batch(alignments, t_s, t_t - 3)
    empty = align_batch([], 5, 4)
    assert empty.student_chunk_ids.shape == (0, 5) and empty.teacher_chunk_ids.shape == (0, 3)
    assert empty.num_chunks == 0 and empty.chunk_spans.shape == (0, 3)


def test_bad_offsets_are_refused() -> None:
    with pytest.raises(ValueError, match=r"student_offsets must be \[n, 2\]"):
        align_offsets([[0, 1, 2]], [[0, 1]], "a", "a")
    with pytest.raises(ValueError, match=r"teacher_offsets\[1\] = \(1, 3\) is not a span of the teacher"):
        align_offsets([[0, 2]], [[0, 1], [1, 3]], "ab", "ab")
    empty = align_offsets(np.zeros((0, 2)), [], "", "")
    assert empty.num_chunks == 0 and empty.student_position_chunks().shape == (0,)
