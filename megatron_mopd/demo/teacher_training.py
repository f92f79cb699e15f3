"""The two-domain demo's models: two teachers trained here on their domain, and the untrained student.

``TEACHERS``             the teachers' recipes: ``arith`` learns the ``arithmetic`` domain over the
                         student's byte-level BPE tokenizer, ``prose`` the ``text`` domain over the
                         SentencePiece-style one (``demo.domains`` has the data).
``trained_teacher_dir``  a teacher's Hugging Face directory (model, tokenizer and ``training.json``:
                         recipe, seconds, last loss), trained on first use (60 to 90 s each on one
                         core) with a progress bar, then cached.
``student_dir``          the student: ``untrained_model`` over the byte-level BPE tokenizer, saved.
``completion_nll``, ``greedy_exact_match``  held-out figures of a model.

Every model is a ``LlamaForCausalLM`` with head_dim 64 (hidden 128, 2 query and 2 key/value heads,
which split at tensor-parallel size 2; vLLM's CPU attention takes it) and untied embeddings; the
student has 2 layers of intermediate size 256, the teachers 2 of 512. A teacher starts from Hugging
Face's initialization (seed ``recipe.seed``) and learns with AdamW on its domain's training split,
rendered as the trainer renders it (``trainer.data.render``), on the completion tokens (completion and
EOS) only: a completion model. Training is deterministic: fixed seeds, batches drawn by a seeded
generator, one thread whatever the machine's core count (tiny matrices gain little from more, and on a
busy machine a multi-threaded step is many times slower). Directories are cached under
``$MOPD_CACHE/models`` with the data and recipe versions in their names, built once across concurrent
processes (a file lock) and published by an atomic rename.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedModel

from megatron_mopd.demo.domains import DATA_VERSION, DEMO_VOCAB_SIZE, domain_data_path
from megatron_mopd.demo.models import tiny_llama
from megatron_mopd.demo.tokenizers import TokenizerKind, cache_root, corpus_key, tokenizer_dir
from megatron_mopd.trainer.data import IGNORE_INDEX, Sample, collate, load_samples, render, tokenize

RECIPE_VERSION = "t1"  # bump when a recipe or the architecture changes: part of the teachers' cache names
STUDENT_SEED = 1
STUDENT_SHAPE = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 2,
                 "num_hidden_layers": 2, "intermediate_size": 256}
TEACHER_SHAPE = {**STUDENT_SHAPE, "intermediate_size": 512}
_MAX_TOKENS = 128
_TRAINING_THREADS = 1


@dataclass(frozen=True)
class TeacherRecipe:
    """How one teacher is trained: ``steps`` AdamW steps of ``batch_size`` samples of ``domain``,
    learning rate ``lr`` after a linear warmup of ``warmup_steps``, cosine-decayed to 0."""

    domain: str
    tokenizer: TokenizerKind
    steps: int
    batch_size: int
    lr: float = 3e-3
    warmup_steps: int = 30
    seed: int = 0


TEACHERS = {
    "arith": TeacherRecipe("arithmetic", "byte_level_bpe", steps=500, batch_size=128),
    "prose": TeacherRecipe("text", "sentencepiece_bpe", steps=250, batch_size=64),
}


def trained_teacher_dir(name: str, *, rebuild: bool = False) -> Path:
    """The directory of teacher ``name`` (``TEACHERS``), trained unless cached; ``rebuild`` retrains it."""
    if name not in TEACHERS:
        raise ValueError(f"unknown demo teacher {name!r}; the demo has {sorted(TEACHERS)}")
    recipe = TEACHERS[name]
    target = _models_dir() / f"mopd-{name}-{DATA_VERSION}{RECIPE_VERSION}-{corpus_key()}"

    def build(staging: Path) -> None:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir(recipe.tokenizer, DEMO_VOCAB_SIZE))
        model = tiny_llama(tok, seed=recipe.seed, **TEACHER_SHAPE)
        samples = [s for s in load_samples(domain_data_path("train")) if s.domain == recipe.domain]
        began = time.perf_counter()
        loss = _train(model, tok, samples, recipe, desc=f"training the demo teacher {name!r}")
        report = {"recipe": asdict(recipe), "samples": len(samples), "seconds": time.perf_counter() - began,
                  "last_loss": loss}
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        (staging / "training.json").write_text(json.dumps(report, indent=2) + "\n")

    return _cached_dir(target, build, rebuild=rebuild)


def student_dir() -> Path:
    """The directory of the untrained student (``untrained_model`` over the byte-level BPE tokenizer)."""
    tokenizer = tokenizer_dir("byte_level_bpe", DEMO_VOCAB_SIZE)

    def build(staging: Path) -> None:
        tok = AutoTokenizer.from_pretrained(tokenizer)
        untrained_model(tokenizer).save_pretrained(staging)
        tok.save_pretrained(staging)

    return _cached_dir(_models_dir() / f"mopd-student-s{STUDENT_SEED}-{corpus_key()}", build)


def untrained_model(tokenizer: Path) -> LlamaForCausalLM:
    """The student's architecture over ``tokenizer`` (a directory), Hugging Face's initialization, seed
    ``STUDENT_SEED``: over the byte-level BPE tokenizer, the student itself; the baseline of the figures."""
    return tiny_llama(AutoTokenizer.from_pretrained(tokenizer), seed=STUDENT_SEED, **STUDENT_SHAPE)


@torch.no_grad()
def completion_nll(model: PreTrainedModel, tokenizer: Any, samples: Sequence[Sample]) -> float:
    """The mean negative log-likelihood (nats) per completion token (completion and EOS, the trainer's
    ``loss_mask``) of the samples' reference completions after their prompts."""
    model.eval()
    examples = [tokenize(render(s, tokenizer), tokenizer, _MAX_TOKENS) for s in samples]
    batch = collate(examples, max(len(e.input_ids) for e in examples), tokenizer.pad_token_id)
    logits = model(input_ids=batch["tokens"]).logits
    total = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return (total / batch["loss_mask"].sum()).item()


@torch.no_grad()
def greedy_exact_match(model: PreTrainedModel, tokenizer: Any, samples: Sequence[Sample]) -> float:
    """The fraction of samples whose greedy continuation of the prompt decodes exactly to the reference
    completion followed by EOS (at most twice the reference's token count is generated). For tokenizers
    that decode tokens back to their text (byte-level BPE; not a decoder that strips a leading space)."""
    model.eval()
    correct = 0
    for sample in samples:
        prompt = render(sample, tokenizer, with_completion=False)
        ids = tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens, return_tensors="pt")["input_ids"]
        expected = sample.completion + tokenizer.eos_token
        output = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=2 * len(tokenizer(expected, add_special_tokens=False)["input_ids"]),
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        correct += tokenizer.decode(output[0, ids.shape[1]:]) == expected
    return correct / len(samples)


def _train(model: LlamaForCausalLM, tokenizer: Any, samples: Sequence[Sample], recipe: TeacherRecipe,
           desc: str) -> float:
    """Train ``model`` in place on the completion tokens of ``samples``; the last step's loss."""
    examples = [tokenize(render(s, tokenizer), tokenizer, _MAX_TOKENS) for s in samples]
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / recipe.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / recipe.steps)),
    )
    draws = torch.Generator().manual_seed(recipe.seed)
    model.train()
    with _threads(_TRAINING_THREADS), tqdm(range(recipe.steps), desc=desc, unit="step", mininterval=1.0) as bar:
        for step in bar:
            rows = [examples[i] for i in torch.randint(len(examples), (recipe.batch_size,), generator=draws).tolist()]
            batch = collate(rows, max(len(e.input_ids) for e in rows), tokenizer.pad_token_id)
            logits = model(input_ids=batch["tokens"]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            if step % 20 == 0 or step == recipe.steps - 1:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return loss.item()


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _models_dir() -> Path:
    return cache_root().parent / "models"


def _cached_dir(target: Path, build: Callable[[Path], None], *, rebuild: bool = False) -> Path:
    """``target``, unless it exists (or ``rebuild``) first written by ``build(staging_directory)``: once
    across concurrent processes (an exclusive lock), visible only when complete (an atomic rename)."""
    if (target / "config.json").exists() and not rebuild:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists() and not rebuild:
            return target  # built by another process while this one waited
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(staging)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target
