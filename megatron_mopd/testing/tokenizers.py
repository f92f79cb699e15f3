"""The trained test tokenizers: the demo's assets (``megatron_mopd.demo.tokenizers``), used by tests too."""

from megatron_mopd.demo.tokenizers import byte_level_bpe, sentencepiece_bpe, tokenizer_dir

__all__ = ["byte_level_bpe", "sentencepiece_bpe", "tokenizer_dir"]
