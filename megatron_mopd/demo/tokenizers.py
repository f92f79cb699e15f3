"""Two really different tokenizers, trained here (no download), for cross-tokenizer tests and demos.

``byte_level_bpe``     GPT-2/Qwen style: byte-level alphabet (``Ġ`` = space, ``Ċ`` = newline), numbers
                       pre-split in groups of up to 3 digits, ``<|endoftext|>``/``<|im_start|>``/
                       ``<|im_end|>`` specials, offsets trimmed of the leading space.
``sentencepiece_bpe``  Llama-2 style: ``▁`` for spaces (prepended to the first word), single digits,
                       byte fallback ``<0x00>``…``<0xFF>`` for characters outside the learned alphabet,
                       ``<unk>``/``<s>``/``</s>``, a ``<s>`` prepended by the post-processor.

Both are trained with the ``tokenizers`` library on ``training_corpus()``: a shipped multilingual
sample (English, numbers and arithmetic, code with whitespace runs, CJK such as 你好吗) plus the
standard library's sources, which every Python installation has. The trained tokenizer is saved
as a Hugging Face tokenizer directory under the cache (``$MOPD_CACHE`` or ``~/.cache/megatron_mopd``)
so test processes and ranks load it instead of retraining; the directory is written atomically.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Literal

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

TokenizerKind = Literal["byte_level_bpe", "sentencepiece_bpe"]

MULTILINGUAL_SAMPLE = """\
The quick brown fox jumps over the lazy dog. Distillation transfers knowledge from a teacher model to a student.
On-policy distillation: the student samples, the teachers score every token of the completion.
In 2024 the run cost $12,345.67 for 1,000,000 tokens; 3.14159 * 2 = 6.28318 and 12345 + 678 = 13023.
Call 555-0199 or write to team@example.com before 09:30 on 2025-11-23.
你好吗？我很好，谢谢。今天天气很好。我们一起学习机器学习和自然语言处理。
你好吗 你好 我很好 蒸馏 教师模型 学生模型 词表 分词器
こんにちは、元気ですか。ありがとうございます。
Ünïcödé façade naïve café — “quotes” and ‘apostrophes’ … ellipsis.
def forward(self, x):\n    return self.proj(x) * 2  # double it\n\tif x is None:\n\t\treturn   None
for i in range(10):    print(i,    i ** 2)        # whitespace   runs
    x = [1, 22, 333, 4444, 55555]\n\n\n    y = {"a": 1,    "b": 22}
SELECT id, name FROM users WHERE age >= 42 ORDER BY name;
"""


def training_corpus() -> Iterator[str]:
    """The training text: the multilingual sample (repeated so its words are learned) and stdlib sources."""
    for _ in range(50):
        yield MULTILINGUAL_SAMPLE
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        yield path.read_text(encoding="utf-8", errors="replace")


def byte_level_bpe(vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """A GPT-2/Qwen-style byte-level BPE tokenizer with ``vocab_size`` merges-plus-alphabet entries."""
    return AutoTokenizer.from_pretrained(tokenizer_dir("byte_level_bpe", vocab_size))


def sentencepiece_bpe(vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """A Llama-2-style ``▁`` BPE tokenizer with byte fallback (vocab_size includes the 259 specials)."""
    return AutoTokenizer.from_pretrained(tokenizer_dir("sentencepiece_bpe", vocab_size))


def tokenizer_dir(kind: TokenizerKind, vocab_size: int) -> Path:
    """The saved Hugging Face tokenizer directory of one trained tokenizer (trained on first use)."""
    builders: dict[str, Callable[[int], PreTrainedTokenizerFast]] = {
        "byte_level_bpe": _train_byte_level_bpe,
        "sentencepiece_bpe": _train_sentencepiece_bpe,
    }
    if kind not in builders:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {sorted(builders)}")
    target = cache_root() / f"{kind}-{vocab_size}-{corpus_key()}"
    if not (target / "tokenizer.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        builders[kind](vocab_size).save_pretrained(staging)
        try:
            os.replace(staging, target)  # atomic: concurrent trainers race harmlessly
        except OSError:
            if not (target / "tokenizer.json").exists():
                raise
    return target


def cache_root() -> Path:
    """Where trained tokenizers are kept: ``$MOPD_CACHE/tokenizers`` (default ``~/.cache/megatron_mopd``)."""
    root = os.environ.get("MOPD_CACHE") or Path.home() / ".cache" / "megatron_mopd"
    return Path(root) / "tokenizers"


@functools.cache
def corpus_key() -> str:
    """A short digest of the training corpus and this file's settings: part of every cache name."""
    digest = hashlib.sha256(f"v2|{sys.version_info[:3]}".encode())
    for text in training_corpus():
        digest.update(text.encode("utf-8", errors="replace"))
    return digest.hexdigest()[:12]


_BYTE_LEVEL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# GPT-4/Qwen2-style split: contractions, letters with an optional leading non-letter, 1-3 digits,
# punctuation runs, newlines, other whitespace.
_BYTE_LEVEL_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _train_byte_level_bpe(vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_BYTE_LEVEL_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_BYTE_LEVEL_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


_SP_SPECIALS = ["<unk>", "<s>", "</s>"]
_BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def _train_sentencepiece_bpe(vocab_size: int) -> PreTrainedTokenizerFast:
    def sentencepiece_tokenizer(model: models.BPE) -> Tokenizer:
        tokenizer = Tokenizer(model)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
                pre_tokenizers.Digits(individual_digits=True),
            ]
        )
        return tokenizer

    # Learn merges over a small alphabet (rare characters go through byte fallback), then lay the
    # vocabulary out as Llama does: specials, the 256 byte tokens, then the learned pieces.
    learner = sentencepiece_tokenizer(models.BPE(unk_token="<unk>"))
    reserved = len(_SP_SPECIALS) + len(_BYTE_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - reserved + len(_SP_SPECIALS),
        special_tokens=_SP_SPECIALS,
        limit_alphabet=300,
        show_progress=False,
    )
    learner.train_from_iterator(training_corpus(), trainer=trainer)
    learned = sorted(learner.get_vocab(with_added_tokens=False).items(), key=lambda item: item[1])
    pieces = [token for token, _ in learned if token not in _SP_SPECIALS and token not in _BYTE_TOKENS]
    vocab = {token: i for i, token in enumerate(_SP_SPECIALS + _BYTE_TOKENS + pieces)}
    merges = _merges_of(learner)

    tokenizer = sentencepiece_tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tokenizer.add_special_tokens(_SP_SPECIALS)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


def _merges_of(tokenizer: Tokenizer) -> list[tuple[str, str]]:
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]

