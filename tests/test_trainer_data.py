"""Specification: the trainer's data, from JSONL files to Megatron micro-batches.

Samples load from JSONL (``messages`` or ``prompt``/``completion``, optional ``domain``) with errors
that name ``path:line``. Every tokenizer renders a sample as ``PROMPT + COMPLETION + EOS`` with the
completion's exact character span, so the student and a teacher with another tokenizer and chat
template find the same completion text. The loss mask covers the completion's tokens and the EOS;
truncation is counted, never a silent drop. The global batch is a deterministic, resumable stream
independent of the data-parallel size, and ``collate`` gives Megatron's next-token labels.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from megatron_mopd.demo.tokenizers import byte_level_bpe, sentencepiece_bpe
from megatron_mopd.trainer.data import (
    DataStats,
    GlobalBatchSampler,
    RenderedSample,
    Sample,
    TokenizedSample,
    collate,
    load_samples,
    rank_slice,
    render,
    tokenize,
)

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama-2 style; the generation prompt ends with a space, which SentencePiece merges into the
# completion's first token ("▁The").
INST = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<<SYS>>\n{{ message['content'] }}\n<</SYS>>\n\n"
    "{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %} {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} {% endif %}"
)

COMPLETION = "The sum 12345 + 678 = 13023.\n\tdef f(x):    return 你好吗"
CONVERSATION = (
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Add 12345 and 678."},
    {"role": "assistant", "content": "13023"},
    {"role": "user", "content": "Again, with code and a greeting."},
)


@pytest.fixture(scope="module")
def chatml():
    tokenizer = byte_level_bpe()
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def inst():
    tokenizer = sentencepiece_bpe()
    tokenizer.chat_template = INST
    return tokenizer


@pytest.fixture(params=["chatml", "inst"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# ----------------------------------------------------------------------------------------- loading


def test_jsonl_with_messages_and_prompt_completion_and_domain_loads(tmp_path) -> None:
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"messages": [*CONVERSATION, {"role": "assistant", "content": COMPLETION}], "domain": "math"},
            "",
            {"prompt": "2 + 2 =", "completion": " 4", "domain": None},
            {"prompt": "Say hi.", "completion": [{"role": "assistant", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "Tell a joke."}]},
            {"prompt": "Only a prompt."},
        ],
    )
    assert load_samples(path) == [
        Sample(CONVERSATION, COMPLETION, "math", 0),
        Sample("2 + 2 =", " 4", None, 1),
        Sample("Say hi.", "hi", None, 2),
        Sample(({"role": "user", "content": "Tell a joke."},), None, None, 3),
        Sample("Only a prompt.", None, None, 4),
    ]


def test_field_names_are_configurable(tmp_path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "1 + 1 =", "answer": " 2", "topic": "math"}])
    samples = load_samples(path, prompt_key="question", completion_key="answer", domain_key="topic")
    assert samples == [Sample("1 + 1 =", " 2", "math", 0)]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a", ', "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ({"text": "no prompt"}, "neither of 'messages' and 'prompt'"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "both of 'messages' and 'prompt'"),
        ({"prompt": 3}, "field 'prompt' must be a non-empty list"),
        ({"prompt": "a", "completion": 3}, "field 'completion' must be a string"),
        ({"prompt": "a", "domain": 3}, "field 'domain' must be a string or null"),
        ({"messages": []}, "field 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, "messages[0] must be an object with 'role' and 'content'"),
        ({"messages": [{"role": "robot", "content": "b"}]}, "messages[0] has unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": ["b"]}]}, "messages[0].content must be a string"),
        ({"messages": [{"role": "assistant", "content": "b"}]}, "holds only an assistant message"),
    ],
)
def test_a_bad_record_is_refused_naming_path_line_and_field(tmp_path, line, message) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "fine", "completion": "ok"}, "", line])
    with pytest.raises(ValueError) as error:
        load_samples(path)
    assert f"{path}:3: " in str(error.value)
    assert message in str(error.value)


def test_an_empty_file_is_refused(tmp_path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="the dataset is empty"):
        load_samples(path)


def test_a_missing_jsonl_file_is_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_samples(tmp_path / "nope.jsonl")


def test_a_dataset_directory_without_the_datasets_library_asks_to_install_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match="pip install datasets"):
        load_samples(tmp_path)


def test_a_saved_dataset_directory_is_read_through_datasets(tmp_path, monkeypatch) -> None:
    rows = [{"prompt": "a", "completion": "b", "domain": "x"}, {"prompt": 7}]
    fake = types.SimpleNamespace(load_from_disk=lambda path: {"train": rows[:1], "bad": rows})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_samples(tmp_path) == [Sample("a", "b", "x", 0)]
    with pytest.raises(ValueError, match=r"\[row 1\]: field 'prompt'"):
        load_samples(tmp_path, split="bad")
    with pytest.raises(ValueError, match="no split 'test'"):
        load_samples(tmp_path, split="test")


# --------------------------------------------------------------------------------------- rendering


def test_the_text_is_the_generation_prompt_then_the_completion_then_eos(tokenizer) -> None:
    sample = Sample(CONVERSATION, COMPLETION, None, 0)
    prompt = tokenizer.apply_chat_template(list(CONVERSATION), tokenize=False, add_generation_prompt=True)
    rendered = render(sample, tokenizer)
    assert rendered == RenderedSample(
        prompt + COMPLETION + tokenizer.eos_token, (len(prompt), len(prompt) + len(COMPLETION)), False
    )
    assert render(sample, tokenizer, with_completion=False) == RenderedSample(prompt, None, False)


def test_the_completion_span_covers_exactly_the_completion_with_both_tokenizers_and_templates(
    chatml, inst
) -> None:
    sample = Sample(CONVERSATION, COMPLETION, None, 0)
    student, teacher = render(sample, chatml), render(sample, inst)
    assert student.text != teacher.text  # different templates and EOS
    for rendered in (student, teacher):
        start, end = rendered.completion_span
        assert rendered.text[start:end] == COMPLETION


def test_a_plain_prompt_renders_as_prompt_completion_eos_with_the_tokenizers_own_bos(inst) -> None:
    rendered = render(Sample("2 + 2 =", " 4", None, 0), inst)
    assert rendered == RenderedSample("2 + 2 = 4</s>", (7, 9), True)
    tokens = tokenize(rendered, inst, max_length=64)
    assert tokens.input_ids[0] == inst.bos_token_id and not tokens.loss_mask[0]


def test_a_chat_sample_needs_a_chat_template() -> None:
    with pytest.raises(ValueError, match="has no chat template; set tokenizer.chat_template"):
        render(Sample(CONVERSATION, COMPLETION, None, 5), byte_level_bpe())


# ------------------------------------------------------------------------------------ tokenization


def test_the_loss_mask_covers_the_completion_tokens_and_eos_only(tokenizer) -> None:
    rendered = render(Sample(CONVERSATION, COMPLETION, None, 0), tokenizer)
    tokens = tokenize(rendered, tokenizer, max_length=1024)
    start, _ = rendered.completion_span
    first = tokens.loss_mask.index(True)
    assert tokens.loss_mask == [False] * first + [True] * (len(tokens.input_ids) - first)
    assert tokens.offsets[first - 1][1] <= start  # no prompt token holds completion text
    boundary = rendered.text[tokens.offsets[first][0] : start]
    assert boundary.strip() == ""  # at most the template's space, merged into the first completion token
    assert rendered.text[tokens.offsets[first][0] :] == boundary + COMPLETION + tokenizer.eos_token
    assert tokens.input_ids[-1] == tokenizer.eos_token_id
    assert tokens.num_completion_tokens == sum(tokens.loss_mask) and not tokens.truncated


def test_a_prompt_only_sample_has_no_completion_tokens(tokenizer) -> None:
    tokens = tokenize(render(Sample(CONVERSATION, None, None, 0), tokenizer), tokenizer, max_length=1024)
    assert tokens.num_completion_tokens == 0 and not any(tokens.loss_mask)


def test_truncation_keeps_the_start_is_counted_and_never_drops_a_sample(tokenizer) -> None:
    rendered = render(Sample(CONVERSATION, COMPLETION, None, 0), tokenizer)
    full = tokenize(rendered, tokenizer, max_length=1024)
    prompt_tokens = full.loss_mask.index(True)

    cut = tokenize(rendered, tokenizer, max_length=prompt_tokens + 3)
    assert cut.truncated and cut.num_completion_tokens == 3
    kept = prompt_tokens + 3
    assert cut.input_ids == full.input_ids[:kept] and cut.loss_mask == full.loss_mask[:kept]

    no_room = tokenize(rendered, tokenizer, max_length=prompt_tokens - 1)
    assert no_room.truncated and no_room.num_completion_tokens == 0 and len(no_room.input_ids) == prompt_tokens - 1

    batch = [full, cut, no_room]
    expected = DataStats(samples=3, truncated=2, without_completion=1, completion_tokens=full.num_completion_tokens + 3)
    assert DataStats.of(batch) == expected
    collated = collate(batch, seq_length=1024, pad_id=tokenizer.pad_token_id)
    assert collated["tokens"].shape[0] == 3 and collated["loss_mask"][2].sum() == 0


def test_data_stats_add_up_and_have_log_names() -> None:
    total = DataStats(4, 1, 0, 30) + DataStats(4, 0, 2, 10)
    assert total.as_dict() == {
        "data/samples": 8,
        "data/truncated_samples": 1,
        "data/samples_without_completion": 2,
        "data/completion_tokens": 40,
    }


# ---------------------------------------------------------------------------------------- sampling


def take(sampler: GlobalBatchSampler, steps: int) -> list[list[int]]:
    return [next(sampler) for _ in range(steps)]


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_the_global_batch_is_the_same_at_every_data_parallel_size(dp_size) -> None:
    reference = take(GlobalBatchSampler(50, 8, seed=3), 20)
    for batch, expected in zip(take(GlobalBatchSampler(50, 8, seed=3), 20), reference):
        parts = [rank_slice(batch, rank, dp_size) for rank in range(dp_size)]
        assert all(len(part) == 8 // dp_size for part in parts)
        assert sum(parts, []) == expected


def test_collating_the_rank_parts_gives_the_rows_of_the_global_batch() -> None:
    samples = [
        TokenizedSample(list(range(i, i + 3 + i % 4)), [False, True] + [True] * (1 + i % 4), [], False, 0)
        for i in range(8)
    ]
    whole = collate(samples, seq_length=8, pad_id=0)
    for dp_size in (2, 4):
        parts = [collate(rank_slice(samples, rank, dp_size), seq_length=8, pad_id=0) for rank in range(dp_size)]
        for key, value in whole.items():
            torch.testing.assert_close(torch.cat([part[key] for part in parts]), value)


def test_rank_slice_refuses_a_batch_that_does_not_divide() -> None:
    with pytest.raises(ValueError, match="choose a global_batch_size divisible by 4"):
        rank_slice(list(range(6)), 0, 4)
    with pytest.raises(ValueError, match="outside"):
        rank_slice(list(range(8)), 4, 4)


def test_shuffling_is_deterministic_per_seed_and_each_epoch_is_a_permutation() -> None:
    first, again, other = (take(GlobalBatchSampler(12, 4, seed=s), 6) for s in (7, 7, 8))
    assert first == again and first != other
    assert sorted(sum(first[:3], [])) == list(range(12)) and sorted(sum(first[3:], [])) == list(range(12))
    assert sum(first[:3], []) != sum(first[3:], [])  # a new order each epoch
    epoch_1 = torch.randperm(12, generator=torch.Generator().manual_seed(7 + 1)).tolist()
    assert sum(first[3:], []) == epoch_1
    in_order = take(GlobalBatchSampler(12, 4, seed=7, shuffle=False), 4)
    assert in_order == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [0, 1, 2, 3]]


def test_a_partial_last_batch_is_completed_from_the_next_epoch() -> None:
    assert take(GlobalBatchSampler(5, 2, seed=0, shuffle=False), 4) == [[0, 1], [2, 3], [4, 0], [1, 2]]
    sampler = GlobalBatchSampler(3, 4, seed=0, shuffle=False)  # a batch larger than the dataset
    assert take(sampler, 3) == [[0, 1, 2, 0], [1, 2, 0, 1], [2, 0, 1, 2]] and sampler.epoch == 4


def test_drop_last_skips_the_leftover_of_each_epoch() -> None:
    sampler = GlobalBatchSampler(5, 2, seed=0, shuffle=False, drop_last=True)
    assert take(sampler, 4) == [[0, 1], [2, 3], [0, 1], [2, 3]] and sampler.epoch == 2
    with pytest.raises(ValueError, match="leaves no batch"):
        GlobalBatchSampler(3, 4, seed=0, drop_last=True)


@pytest.mark.parametrize("drop_last", [False, True])
def test_resuming_from_state_dict_continues_exactly(drop_last) -> None:
    uninterrupted = take(GlobalBatchSampler(23, 6, seed=11, drop_last=drop_last), 15)
    before = GlobalBatchSampler(23, 6, seed=11, drop_last=drop_last)
    assert take(before, 7) == uninterrupted[:7]
    state = json.loads(json.dumps(before.state_dict()))  # as a checkpoint stores it
    assert state["consumed_samples"] == 42 and state["seed"] == 11

    resumed = GlobalBatchSampler(23, 6, seed=11, drop_last=drop_last)
    resumed.load_state_dict(state)
    assert take(resumed, 8) == uninterrupted[7:]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_samples": 24}, "num_samples: saved 23, now 24"),
        ({"seed": 12}, "seed: saved 11, now 12"),
        ({"global_batch_size": 3}, "global_batch_size: saved 6, now 3"),
        ({"shuffle": False}, "shuffle: saved True, now False"),
    ],
)
def test_load_state_dict_refuses_a_state_of_another_data_order(change, message) -> None:
    state = GlobalBatchSampler(23, 6, seed=11).state_dict()
    arguments = {"num_samples": 23, "global_batch_size": 6, "seed": 11, "shuffle": True, **change}
    sampler = GlobalBatchSampler(**arguments)
    with pytest.raises(ValueError, match="resume with the same dataset, seed and global batch size") as error:
        sampler.load_state_dict(state)
    assert message in str(error.value) and sampler.consumed_samples == 0


def test_load_state_dict_refuses_a_cursor_inside_a_batch() -> None:
    sampler = GlobalBatchSampler(23, 6, seed=11)
    with pytest.raises(ValueError, match="not a whole number of global batches"):
        sampler.load_state_dict({**sampler.state_dict(), "consumed_samples": 7})


# ---------------------------------------------------------------------------------------- batching


def test_collate_produces_megatron_next_token_labels() -> None:
    samples = [
        TokenizedSample([5, 6, 7, 8], [False, False, True, True], [], False, 2),
        TokenizedSample([9, 10, 11], [False, True, True], [], False, 2),
    ]
    batch = collate(samples, seq_length=6, pad_id=0)
    assert batch["tokens"].dtype == torch.int64 and batch["labels"].dtype == torch.int64
    assert batch["tokens"].tolist() == [[5, 6, 7, 8, 0, 0], [9, 10, 11, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 7, 8, -100, -100, -100], [10, 11, -100, -100, -100, -100]]
    assert batch["loss_mask"].dtype == torch.float32
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [list(range(6))] * 2


def test_collate_refuses_a_sample_longer_than_the_sequence() -> None:
    with pytest.raises(ValueError, match="tokenize with max_length <= seq_length"):
        collate([TokenizedSample([1, 2, 3], [False, True, True], [], False, 2)], seq_length=2, pad_id=0)


def test_tokenized_samples_collate_into_labels_on_the_completion(tokenizer) -> None:
    samples = [Sample(CONVERSATION, COMPLETION, None, 0), Sample("2 + 2 =", " 4", None, 1)]
    tokenized = [tokenize(render(s, tokenizer), tokenizer, max_length=128) for s in samples]
    batch = collate(tokenized, seq_length=128, pad_id=tokenizer.pad_token_id)
    for row, tokens in enumerate(tokenized):
        targets = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert targets == [i for i, m in zip(tokens.input_ids, tokens.loss_mask) if m]
        assert targets[-1] == tokenizer.eos_token_id
