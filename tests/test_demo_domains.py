"""Specification: the assets of the two-domain on-policy distillation demo.

The data (``mopd_train``, ``mopd_heldout``) is generated here, the same on every build: sums in the
``arithmetic`` domain, standard-library docstring sentences in the ``text`` domain, every sample short
enough for the demo's 64-token sequences. No held-out problem or sentence is in the training split.

The teachers (``arith_teacher`` over the student's tokenizer, ``prose_teacher`` over the
SentencePiece-style one) are worth imitating: on held-out samples of their domain, their negative
log-likelihood per completion token is a small fraction of the untrained student architecture's, and
``arith`` completes at least half the held-out sums exactly. Teachers and student load with ``AutoModelForCausalLM``
and have head_dim 64 and key/value heads that split at tensor-parallel size 2; the student is Hugging
Face's initialization, reproducible from its seed.

The models come from the cache (built once, about 3 minutes, by the first test that needs them).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_mopd.demo.assets import demo_asset_path
from megatron_mopd.demo.domains import DOMAINS, HELDOUT_PER_DOMAIN, MAX_STUDENT_TOKENS, domain_samples
from megatron_mopd.demo.teacher_training import completion_nll, greedy_exact_match, untrained_model
from megatron_mopd.trainer.data import Sample, load_samples, render, tokenize

DEMO_SEQ_LENGTH = 64


@pytest.fixture(scope="module")
def splits() -> dict[str, list[Sample]]:
    return {split: load_samples(demo_asset_path(f"mopd_{split}")) for split in ("train", "heldout")}


def heldout_of(splits: dict[str, list[Sample]], domain: str) -> list[Sample]:
    return [sample for sample in splits["heldout"] if sample.domain == domain]


def test_the_data_files_equal_a_fresh_build():
    fresh = domain_samples()
    for split in ("train", "heldout"):
        lines = demo_asset_path(f"mopd_{split}").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == fresh[split]


def test_both_splits_hold_both_domains_and_only_them(splits):
    for samples in splits.values():
        assert {sample.domain for sample in samples} == set(DOMAINS)
        assert all(isinstance(sample.prompt, str) and sample.completion for sample in samples)
    assert all(len(heldout_of(splits, domain)) == HELDOUT_PER_DOMAIN for domain in DOMAINS)


def test_no_heldout_problem_or_sentence_is_trained_on(splits):
    trained = {(sample.domain, sample.prompt + sample.completion) for sample in splits["train"]}
    trained_problems = {sample.prompt for sample in splits["train"] if sample.domain == "arithmetic"}
    assert not any((sample.domain, sample.prompt + sample.completion) in trained for sample in splits["heldout"])
    assert not any(sample.prompt in trained_problems for sample in heldout_of(splits, "arithmetic"))


def test_arithmetic_completions_are_the_sums(splits):
    for sample in [*splits["train"], *splits["heldout"]]:
        if sample.domain == "arithmetic":
            left, right = sample.prompt.removesuffix(" =").split(" + ")
            assert sample.completion == f" {int(left) + int(right)}"


def test_every_sample_fits_the_demo_sequence_length(splits):
    tokenizer = AutoTokenizer.from_pretrained(demo_asset_path("tokenizer"))
    for sample in [*splits["train"], *splits["heldout"]]:
        tokens = tokenize(render(sample, tokenizer), tokenizer, DEMO_SEQ_LENGTH)
        assert len(tokens.input_ids) <= MAX_STUDENT_TOKENS < DEMO_SEQ_LENGTH
        assert tokens.num_completion_tokens >= 2  # at least one completion token, and EOS


@pytest.mark.parametrize(
    "name, tokenizer",
    [("arith_teacher", "tokenizer"), ("prose_teacher", "sp_tokenizer"), ("mopd_student", "tokenizer")],
)
def test_models_load_with_head_dim_64_and_the_expected_tokenizer(name, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(demo_asset_path(name))
    expected = AutoTokenizer.from_pretrained(demo_asset_path(tokenizer))
    config = model.config
    assert config.model_type == "llama" and not config.tie_word_embeddings
    assert config.hidden_size // config.num_attention_heads == 64
    assert config.num_attention_heads % 2 == 0 and config.num_key_value_heads % 2 == 0
    assert AutoTokenizer.from_pretrained(demo_asset_path(name)).get_vocab() == expected.get_vocab()
    assert config.vocab_size == len(expected)


@pytest.mark.parametrize("name, domain, bound", [("arith_teacher", "arithmetic", 0.1), ("prose_teacher", "text", 0.6)])
def test_a_teacher_predicts_heldout_completions_far_better_than_the_untrained_student_architecture(
    splits, name, domain, bound
):
    directory = demo_asset_path(name)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    heldout = heldout_of(splits, domain)
    trained = completion_nll(AutoModelForCausalLM.from_pretrained(directory), tokenizer, heldout)
    untrained = completion_nll(untrained_model(directory), tokenizer, heldout)
    assert untrained > 0.9 * math.log(len(tokenizer))  # near uniform
    assert trained < bound * untrained


def test_the_arithmetic_teacher_completes_at_least_half_the_heldout_sums_exactly(splits):
    directory = demo_asset_path("arith_teacher")
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert greedy_exact_match(model, AutoTokenizer.from_pretrained(directory), heldout_of(splits, "arithmetic")) >= 0.5


def test_the_student_is_the_seeded_untrained_model():
    directory = demo_asset_path("mopd_student")
    saved = AutoModelForCausalLM.from_pretrained(directory).state_dict()
    fresh = untrained_model(directory).state_dict()
    assert saved.keys() == fresh.keys()
    assert all(torch.equal(saved[key], fresh[key]) for key in saved)
