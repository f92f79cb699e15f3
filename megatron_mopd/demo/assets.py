"""The demo's assets, built on first use and cached (``$MOPD_CACHE``, default ``~/.cache/megatron_mopd``).

A configuration names them as ``${demo:NAME}`` (an OmegaConf resolver registered by
``trainer.config``):

``tokenizer``  a byte-level BPE tokenizer trained on the shipped multilingual sample and the standard
               library's sources (``demo.tokenizers``);
``teacher``    a small Llama-architecture Hugging Face model over that tokenizer, sharp output layer;
``student``    a smaller-norm Llama-architecture model of the same shape (another seed): the student;
``data``       a JSONL file of prompt/completion pairs cut from the same text;
``routed_data``  the same pairs with a ``domain``: ``numbers`` where the text has digits, else ``text``;
``teacher_b``  a second teacher with the student's tokenizer (another seed), for routed runs;
``sp_tokenizer``, ``sp_teacher``, ``sp_projection``  a teacher with *another* tokenizer (a
               SentencePiece-style BPE with byte fallback), and the vocabulary projection from the
               student's tokenizer into it (``mopd build-projection``), for cross-tokenizer runs.

The two-domain on-policy distillation demo (``demo.domains`` for the data, ``demo.teacher_training``
for the models):

``mopd_train``, ``mopd_heldout``  JSONL of ``prompt``/``completion``/``domain`` samples, domains
               ``arithmetic`` (sums) and ``text`` (docstring sentences): the training split, both
               domains mixed, and the held-out one (32 per domain, none of them trained on);
``mopd_mix``   the student's training data: every arithmetic sample of the training split and
               twice as many text samples (text is the harder domain);
``arith_teacher``  a Llama trained on the arithmetic training samples, over the student's tokenizer;
``prose_teacher``  a Llama trained on the text training samples, over ``sp_tokenizer`` (the student
               reaches it through ``sp_projection``);
``mopd_student``   the untrained student: a Llama over the student's tokenizer, Hugging Face's
               initialization (hidden 128, 2 heads of 64, 2 layers).

Nothing is downloaded; each asset is written atomically, so concurrent ranks race harmlessly.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from megatron_mopd.demo.domains import DEMO_VOCAB_SIZE, domain_data_path, mix_data_path, split_text
from megatron_mopd.demo.models import tiny_causal_lm_dir
from megatron_mopd.demo.teacher_training import student_dir, trained_teacher_dir
from megatron_mopd.demo.tokenizers import MULTILINGUAL_SAMPLE, cache_root, corpus_key, tokenizer_dir

DEMO_CONFIG = Path(__file__).with_name("demo_cpu.yaml")


def demo_asset_path(name: str) -> Path:
    """The path of the demo asset ``name`` (module docstring), built if missing."""
    builders = {
        "tokenizer": lambda: tokenizer_dir("byte_level_bpe", DEMO_VOCAB_SIZE),
        "teacher": lambda: tiny_causal_lm_dir("byte_level_bpe", DEMO_VOCAB_SIZE, seed=0),
        "student": lambda: tiny_causal_lm_dir("byte_level_bpe", DEMO_VOCAB_SIZE, seed=1, lm_head_scale=1.0),
        "data": demo_data_path,
        "routed_data": lambda: demo_data_path(routed=True),
        "teacher_b": lambda: tiny_causal_lm_dir("byte_level_bpe", DEMO_VOCAB_SIZE, seed=2),
        "sp_tokenizer": lambda: tokenizer_dir("sentencepiece_bpe", DEMO_VOCAB_SIZE),
        "sp_teacher": lambda: tiny_causal_lm_dir("sentencepiece_bpe", DEMO_VOCAB_SIZE, seed=0),
        "sp_projection": demo_projection_path,
        "mopd_train": lambda: domain_data_path("train"),
        "mopd_mix": mix_data_path,
        "mopd_heldout": lambda: domain_data_path("heldout"),
        "arith_teacher": lambda: trained_teacher_dir("arith"),
        "prose_teacher": lambda: trained_teacher_dir("prose"),
        "mopd_student": student_dir,
    }
    if name not in builders:
        raise ValueError(f"unknown demo asset {name!r}; the demo has {sorted(builders)}")
    return builders[name]()


def demo_data_path(routed: bool = False) -> Path:
    """``prompt``/``completion`` JSONL: each line of the multilingual sample and the first paragraph of
    standard-library module docstrings, split after their first third of words (deterministic); with
    ``routed``, each sample also has a ``domain`` (``numbers`` if it has a digit, else ``text``)."""
    from megatron_mopd.trainer.files import atomic_write_text

    target = cache_root().parent / "data" / f"demo{'-routed' if routed else ''}-{corpus_key()}.jsonl"
    if target.exists():
        return target
    rows = [json.dumps({**split_text(text), **({"domain": _domain(text)} if routed else {})}) for text in _demo_texts()]
    atomic_write_text(target, "\n".join(rows) + "\n")
    return target


def demo_projection_path() -> Path:
    """The projection from the demo tokenizer into the SentencePiece-style one (built once, ~1 s)."""
    from megatron_mopd.crosstok import VocabProjection

    student, teacher = demo_asset_path("tokenizer"), demo_asset_path("sp_tokenizer")
    target = cache_root().parent / "projections" / f"{student.name}-to-{teacher.name}.safetensors"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        VocabProjection.build(student, teacher).save(target)  # an atomic write
    return target


def _demo_texts(limit: int = 256) -> list[str]:
    texts = [line for line in MULTILINGUAL_SAMPLE.splitlines() if len(line.split()) >= 4]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        source = path.read_text(encoding="utf-8", errors="replace").lstrip()
        if source[:3] in ('"""', "'''"):
            paragraph = source[3:].split(source[:3])[0].split("\n\n")[0]
            words = paragraph.split()
            if len(words) >= 6:
                texts.append(" ".join(words[:40]))
        if len(texts) >= limit:
            break
    return texts


def _domain(text: str) -> str:
    return "numbers" if any(c.isdigit() for c in text) else "text"

