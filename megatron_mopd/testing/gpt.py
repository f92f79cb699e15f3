"""A tiny Qwen-like Megatron-Core GPTModel for CPU tests: RMSNorm, RoPE, SwiGLU, grouped-query attention
with QKV bias, tied embeddings, local (non-Transformer-Engine) layer spec, fp32, no dropout.

    TINY_GPT = TinyGPT()
    model = TINY_GPT.build(tp, pp)  # after initialize_parallel(tp, pp): this rank's stage and TP shard

The vocabulary (100 ids) is padded by Megatron-LM's rule to a multiple of 64·TP: 128 at TP = 1 and 2,
so checkpoints and logits line up across those layouts.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TinyGPT:
    """Sizes of the tiny model; ``init_method_std`` scales Megatron's random initialization."""

    vocab_size: int = 100
    make_vocab_size_divisible_by: int = 64
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 128
    max_sequence_length: int = 32
    init_method_std: float = 0.02

    def padded_vocab_size(self, tp: int) -> int:
        """Megatron-LM's rule: pad the vocabulary to a multiple of make_vocab_size_divisible_by * TP."""
        multiple = self.make_vocab_size_divisible_by * tp
        return math.ceil(self.vocab_size / multiple) * multiple

    def config(self, tp: int, pp: int, sequence_parallel: bool = False) -> Any:
        """The ``TransformerConfig`` at tensor-parallel size ``tp`` and pipeline size ``pp``."""
        from megatron.core.transformer import TransformerConfig

        return TransformerConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size,
            normalization="RMSNorm",
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=True,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            bias_dropout_fusion=False,
            init_method_std=self.init_method_std,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            pipeline_dtype=torch.float32,
            sequence_parallel=sequence_parallel,
        )

    def layer_spec(self) -> Any:
        """The local layer spec (runs without Transformer Engine and Apex)."""
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        return get_gpt_layer_local_spec(normalization="RMSNorm")

    def gpt_model_kwargs(self) -> dict[str, Any]:
        """``GPTModel`` arguments besides config, spec, sizes and stage flags."""
        return {"share_embeddings_and_output_weights": True, "position_embedding_type": "rope"}

    def build(self, tp: int, pp: int, sequence_parallel: bool = False) -> torch.nn.Module:
        """This rank's ``GPTModel`` (its pipeline stage, its TP shard); Megatron's parallel state must
        be initialized with these sizes."""
        from megatron.core import parallel_state
        from megatron.core.models.gpt import GPTModel

        return GPTModel(
            self.config(tp, pp, sequence_parallel),
            self.layer_spec(),
            vocab_size=self.padded_vocab_size(tp),
            max_sequence_length=self.max_sequence_length,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            **self.gpt_model_kwargs(),
        )

    def load_layout_independent_weights(self, model: torch.nn.Module, tp: int, pp: int) -> None:
        """Give every matrix this rank's slice of a full matrix drawn from a seed of its global name,
        so that the model is the same function at every TP/PP layout.

        Vectors keep Megatron's initialization (norm weights 1, biases 0), which is layout-independent.
        """
        from megatron.core import parallel_state

        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        layer_offset = parallel_state.get_pipeline_model_parallel_rank() * self.num_layers // pp
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() < 2:
                    continue
                parts = name.split(".")
                if parts[:2] == ["decoder", "layers"]:
                    parts[2] = str(int(parts[2]) + layer_offset)
                global_name = ".".join(parts).replace("output_layer.weight", "embedding.word_embeddings.weight")
                shape = list(param.shape)
                sharded = getattr(param, "tensor_model_parallel", False)
                if sharded:
                    shape[param.partition_dim] *= tp
                gen = torch.Generator().manual_seed(zlib.crc32(global_name.encode()))
                full = torch.randn(shape, generator=gen) * self.init_method_std
                if sharded:  # Megatron's split: tp * stride chunks, rank r takes chunks r, r + tp, ...
                    chunks = full.chunk(tp * param.partition_stride, dim=param.partition_dim)
                    full = torch.cat(chunks[tp_rank::tp], dim=param.partition_dim)
                param.copy_(full)
