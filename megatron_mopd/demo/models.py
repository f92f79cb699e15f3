"""A tiny Hugging Face causal LM built from a config (no download), saved with a trained tokenizer.

``tiny_causal_lm_dir()`` is a local model directory usable by ``AutoModelForCausalLM`` /
``AutoTokenizer`` and ``mopd serve-teacher --model DIR``: a 2-layer Llama-architecture model with
random weights (fixed seed) over the vocabulary of one of ``demo.tokenizers``' tokenizers. Saved
once under the cache (``$MOPD_CACHE`` or ``~/.cache/megatron_mopd``), atomically.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from megatron_mopd.demo.tokenizers import TokenizerKind, cache_root, corpus_key, tokenizer_dir


def tiny_llama(tokenizer: Any, *, seed: int, **shape: int) -> LlamaForCausalLM:
    """A Llama of ``shape`` (hidden_size, heads, ...) over ``tokenizer``'s vocabulary and special ids: untied
    embeddings, 512 positions, Hugging Face's initialization under ``torch.manual_seed(seed)``, eval mode."""
    config = LlamaConfig(vocab_size=len(tokenizer), **shape, max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_causal_lm_dir(
    tokenizer: TokenizerKind = "byte_level_bpe", vocab_size: int = 2000, seed: int = 0, lm_head_scale: float = 20.0
) -> Path:
    """The directory of a tiny random Llama-architecture model with the given trained tokenizer.

    ``lm_head_scale`` sharpens the output distribution (20: top-K differ clearly between positions,
    as a teacher's should; 1: Hugging Face's initialization, a near-uniform student).
    """
    scale = "" if lm_head_scale == 20.0 else f"-h{lm_head_scale:g}"
    target = cache_root().parent / "models" / f"tiny-llama-{tokenizer}-{vocab_size}-s{seed}{scale}-{corpus_key()}"
    if (target / "config.json").exists():
        return target
    tok = AutoTokenizer.from_pretrained(tokenizer_dir(tokenizer, vocab_size))
    model = tiny_llama(tok, seed=seed, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_head_scale)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    model.save_pretrained(staging)
    tok.save_pretrained(staging)
    try:
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    return target
