"""Hugging Face dense decoders (Llama, Qwen2, Qwen3) as Megatron-Core GPTModels, and back.

``architecture``: ``GPTArchitecture``, an HF config in Megatron's terms — the ``TransformerConfig``,
the layer spec (Transformer Engine's when usable, else the local one) and this rank's ``GPTModel``.
``hf_weights``: ``load_hf_weights`` fills that model from HF safetensors at any TP/PP layout;
``export_hf_weights`` writes it back as an HF directory. Each module's docstring states the layouts.
"""

from megatron_mopd.models.architecture import (
    SUPPORTED_HF_MODEL_TYPES,
    GPTArchitecture,
    transformer_engine_usable,
)
from megatron_mopd.models.hf_weights import (
    HFCheckpoint,
    export_hf_weights,
    hf_names_of,
    hf_tensor_shapes,
    load_hf_weights,
)

__all__ = [
    "GPTArchitecture",
    "HFCheckpoint",
    "SUPPORTED_HF_MODEL_TYPES",
    "export_hf_weights",
    "hf_names_of",
    "hf_tensor_shapes",
    "load_hf_weights",
    "transformer_engine_usable",
]
