"""The data of the two-domain on-policy distillation demo: deterministic, generated here, no download.

Each sample is a JSON line ``{"prompt", "completion", "domain"}``, trained on as the trainer renders
it (``trainer.data.render``: ``prompt + completion + EOS``):

``arithmetic``  the sums of two numbers below 30, ``{"prompt": "17 + 25 =", "completion": " 42"}``;
``text``        the first sentence (6 to 16 words, ASCII) of the docstrings of the standard library's
                modules, classes and functions (test packages left out), split after its first third
                of words: ``{"prompt": "Update state", "completion": " for menu item at index."}``.

Per domain, a fixed-seed shuffle puts ``HELDOUT_PER_DOMAIN`` samples in the held-out split and the
rest in the training split, so no held-out problem or sentence is trained on. Every sample fits
``MAX_STUDENT_TOKENS`` tokens of the student's tokenizer, EOS included. The training split mixes
both domains in one fixed-seed order.
"""

from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
from pathlib import Path
from typing import Literal

from transformers import AutoTokenizer

from megatron_mopd.demo.tokenizers import cache_root, corpus_key, tokenizer_dir
from megatron_mopd.trainer.files import atomic_write_text

Split = Literal["train", "heldout"]

DEMO_VOCAB_SIZE = 2000
DOMAINS = ("arithmetic", "text")
HELDOUT_PER_DOMAIN = 32
MAX_STUDENT_TOKENS = 48
DATA_VERSION = "d1"  # bump when the samples change: part of the cache names of the data and the teachers

_SEED = 0
_OPERAND_LIMIT = 30
_SKIPPED_PACKAGES = {"test", "tests", "idle_test", "site-packages"}


def domain_data_path(split: Split) -> Path:
    """The JSONL file of one split (``train`` or ``heldout``), written on first use (~10 s)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'heldout'")
    target = cache_root().parent / "data" / f"mopd-{split}-{DATA_VERSION}-{corpus_key()}.jsonl"
    if not target.exists():
        atomic_write_text(target, "".join(json.dumps(sample) + "\n" for sample in domain_samples()[split]))
    return target


def mix_data_path() -> Path:
    """The student's training prompts: every arithmetic sample of the training split and twice as many
    text samples (the first in the split's order; text is the harder domain to learn), in that order."""
    target = cache_root().parent / "data" / f"mopd-mix-{DATA_VERSION}-{corpus_key()}.jsonl"
    if not target.exists():
        train = domain_samples()["train"]
        arithmetic = sum(s["domain"] == "arithmetic" for s in train)
        room = {"arithmetic": arithmetic, "text": 2 * arithmetic}
        kept = []
        for sample in train:
            if room[sample["domain"]] > 0:
                room[sample["domain"]] -= 1
                kept.append(sample)
        atomic_write_text(target, "".join(json.dumps(sample) + "\n" for sample in kept))
    return target


def domain_samples() -> dict[str, list[dict[str, str]]]:
    """Both splits, built from scratch: ``{"train": [...], "heldout": [...]}`` (held-out grouped by domain)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("byte_level_bpe", DEMO_VOCAB_SIZE))
    train: list[dict[str, str]] = []
    heldout: list[dict[str, str]] = []
    for domain, pairs in (("arithmetic", _sums()), ("text", _docstring_sentences())):
        samples = [{**pair, "domain": domain} for pair in pairs]
        lengths = tokenizer([s["prompt"] + s["completion"] + tokenizer.eos_token for s in samples])["input_ids"]
        samples = [s for s, ids in zip(samples, lengths) if len(ids) <= MAX_STUDENT_TOKENS]
        random.Random(_SEED).shuffle(samples)
        heldout += samples[:HELDOUT_PER_DOMAIN]
        train += samples[HELDOUT_PER_DOMAIN:]
    random.Random(_SEED).shuffle(train)
    return {"train": train, "heldout": heldout}


def _sums() -> list[dict[str, str]]:
    return [
        {"prompt": f"{a} + {b} =", "completion": f" {a + b}"}
        for a in range(_OPERAND_LIMIT)
        for b in range(_OPERAND_LIMIT)
    ]


def _docstring_sentences() -> list[dict[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sentences: dict[str, None] = {}  # insertion-ordered and unique
    for path in sorted(stdlib.rglob("*.py")):
        if _SKIPPED_PACKAGES & set(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                paragraph = (ast.get_docstring(node) or "").split("\n\n")[0]
                first = re.match(r"(.+?[.!?])(\s|$)", " ".join(paragraph.split()))
                if first and first[1].isascii() and 6 <= len(first[1].split()) <= 16:
                    sentences[first[1]] = None
    return [split_text(sentence) for sentence in sentences]


def split_text(text: str) -> dict[str, str]:
    """``text`` as ``{"prompt", "completion"}``, cut after its first third of words (at least one)."""
    words = text.split(" ")
    cut = max(1, len(words) // 3)
    return {"prompt": " ".join(words[:cut]), "completion": " " + " ".join(words[cut:])}
