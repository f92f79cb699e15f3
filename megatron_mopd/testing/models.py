"""The tiny Hugging Face model directory: a demo asset (``megatron_mopd.demo.models``), used by tests too."""

from megatron_mopd.demo.models import tiny_causal_lm_dir

__all__ = ["tiny_causal_lm_dir"]
