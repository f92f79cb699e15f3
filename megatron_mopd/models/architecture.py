"""The architecture of a dense Hugging Face decoder (Llama, Qwen2, Qwen3) as a Megatron-Core GPTModel.

    arch = GPTArchitecture.from_hf_config("/path/to/hf_model")   # reads config.json
    model = arch.build(tp, pp)         # after initialize_parallel(tp, pp): this rank's stage and TP shard
    load_hf_weights(model, "/path/to/hf_model", arch)              # models.hf_weights

The three families share one Megatron shape: RMSNorm before attention and MLP, rotary position
embeddings (rotate-half, not interleaved), grouped-query attention with a fused QKV projection,
a SwiGLU MLP (``silu(gate) * up``), no bias on the output projection or the MLP, a final RMSNorm, and
an output layer that may share the word embeddings. They differ in what attention carries:

- ``llama``: nothing more (``attention_bias`` and ``mlp_bias`` must be false);
- ``qwen2``: biases on q, k and v (Megatron ``add_qkv_bias``);
- ``qwen3``: RMSNorm over each head of q and k before RoPE (Megatron ``qk_layernorm``), no biases.

RoPE scaling: Megatron-Core 0.16 implements Llama-3 scaling with only the factor configurable
(``low_freq_factor=1``, ``high_freq_factor=4``, ``original_max_position_embeddings=8192`` are fixed,
the values of Llama 3.1 / 3.2), and linear scaling (position interpolation); other RoPE types (YaRN,
dynamic NTK, LongRoPE, multimodal RoPE) and partial rotary dimensions are refused.

The vocabulary is padded by Megatron-LM's rule (``padded_vocab_size``); the padded rows of the
embedding and output layer are zero after ``load_hf_weights`` and dropped by ``export_hf_weights``.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn.functional as F

__all__ = ["GPTArchitecture", "SUPPORTED_HF_MODEL_TYPES", "transformer_engine_usable"]

SUPPORTED_HF_MODEL_TYPES = ("llama", "qwen2", "qwen3")
_HF_CLASS_NAMES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_ROPE_TYPES = ("default", "llama3", "linear")
# Megatron-Core 0.16 RotaryEmbedding(rope_scaling=True) passes only the factor to _apply_scaling.
_MEGATRON_LLAMA3_FIXED = {
    "rope_low_freq_factor": ("low_freq_factor", 1.0),
    "rope_high_freq_factor": ("high_freq_factor", 4.0),
    "rope_original_max_position_embeddings": ("original_max_position_embeddings", 8192),
}
# GPTArchitecture fields that transformer_config() sets; overriding them would contradict the checkpoint.
_ARCHITECTURE_CONFIG_KEYS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "layernorm_epsilon", "normalization", "gated_linear_unit", "activation_func",
    "add_bias_linear", "add_qkv_bias", "qk_layernorm", "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class GPTArchitecture:
    """What a dense HF checkpoint's config says, in Megatron-Core's terms (see the module docstring).

    Build it with ``from_hf_config``; ``to_hf_config`` gives the HF config back. Invalid combinations
    (e.g. q/k norms on a Llama, a RoPE scaling Megatron-Core cannot express) raise ``ValueError`` on
    construction.
    """

    hf_model_type: str = field(metadata=_help(
        "The HF family, one of SUPPORTED_HF_MODEL_TYPES: 'llama', 'qwen2' or 'qwen3'; it fixes the HF "
        "tensor names and which attention extras exist."))
    vocab_size: int = field(metadata=_help(
        "The real vocabulary size (HF vocab_size); Megatron's layers use padded_vocab_size(tp)."))
    num_layers: int = field(metadata=_help("Transformer layers (HF num_hidden_layers)."))
    hidden_size: int = field(metadata=_help("Model width (HF hidden_size)."))
    ffn_hidden_size: int = field(metadata=_help(
        "Width of the SwiGLU MLP's gate and up projections each (HF intermediate_size)."))
    num_attention_heads: int = field(metadata=_help("Query heads (HF num_attention_heads)."))
    num_query_groups: int = field(metadata=_help(
        "Key/value heads, shared by num_attention_heads // num_query_groups query heads each "
        "(HF num_key_value_heads; equal to num_attention_heads without GQA)."))
    kv_channels: int = field(metadata=_help(
        "Width of one attention head (HF head_dim); Qwen3 may differ from hidden_size // heads."))
    norm_epsilon: float = field(default=1e-6, metadata=_help(
        "Epsilon of every RMSNorm, q/k norms included (HF rms_norm_eps)."))
    rotary_base: float = field(default=10000.0, metadata=_help(
        "RoPE base period theta (HF rope_parameters['rope_theta'])."))
    rope_type: str = field(default="default", metadata=_help(
        "RoPE scaling: 'default' (none), 'llama3' (Llama 3.x frequency-dependent scaling) or "
        "'linear' (position interpolation: positions divided by rope_scaling_factor)."))
    rope_scaling_factor: float = field(default=1.0, metadata=_help(
        "The scaling factor of 'llama3' and 'linear' RoPE (HF rope_parameters['factor'])."))
    rope_low_freq_factor: float = field(default=1.0, metadata=_help(
        "'llama3' RoPE low_freq_factor; Megatron-Core 0.16 supports only 1."))
    rope_high_freq_factor: float = field(default=4.0, metadata=_help(
        "'llama3' RoPE high_freq_factor; Megatron-Core 0.16 supports only 4."))
    rope_original_max_position_embeddings: int = field(default=8192, metadata=_help(
        "'llama3' RoPE pre-training context length; Megatron-Core 0.16 supports only 8192."))
    qk_layernorm: bool = field(default=False, metadata=_help(
        "RMSNorm over each query and key head before RoPE (Qwen3 q_norm / k_norm); true exactly "
        "for qwen3."))
    add_qkv_bias: bool = field(default=False, metadata=_help(
        "Biases on the q, k and v projections (Qwen2); true exactly for qwen2."))
    tie_word_embeddings: bool = field(default=False, metadata=_help(
        "The output layer shares the word embeddings (the checkpoint has no lm_head.weight)."))
    max_position_embeddings: int = field(default=4096, metadata=_help(
        "The longest sequence the model is meant for (HF max_position_embeddings; Megatron "
        "max_sequence_length)."))
    make_vocab_size_divisible_by: int = field(default=128, metadata=_help(
        "Megatron-LM's vocabulary padding unit, multiplied by the TP size (padded_vocab_size)."))

    def __post_init__(self) -> None:
        if self.hf_model_type not in SUPPORTED_HF_MODEL_TYPES:
            raise ValueError(
                f"hf_model_type={self.hf_model_type!r}: expected one of {list(SUPPORTED_HF_MODEL_TYPES)}"
            )
        for name in ("vocab_size", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "kv_channels", "max_position_embeddings",
                     "make_vocab_size_divisible_by"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_query_groups={self.num_query_groups}"
            )
        if not (self.norm_epsilon > 0 and self.rotary_base > 0):
            raise ValueError(f"norm_epsilon={self.norm_epsilon} and rotary_base={self.rotary_base} must be > 0")
        expected = {"llama": (False, False), "qwen2": (False, True), "qwen3": (True, False)}[self.hf_model_type]
        if (self.qk_layernorm, self.add_qkv_bias) != expected:
            raise ValueError(
                f"{self.hf_model_type} has qk_layernorm={expected[0]} and add_qkv_bias={expected[1]}, got "
                f"qk_layernorm={self.qk_layernorm}, add_qkv_bias={self.add_qkv_bias}"
            )
        if self.hf_model_type == "qwen2" and self.kv_channels * self.num_attention_heads != self.hidden_size:
            raise ValueError(
                f"kv_channels={self.kv_channels}: qwen2 heads are hidden_size // num_attention_heads = "
                f"{self.hidden_size // self.num_attention_heads} wide (the HF Qwen2 config has no head_dim)"
            )
        self._check_rope()

    def _check_rope(self) -> None:
        if self.rope_type not in _ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r}: expected one of {list(_ROPE_TYPES)}")
        if self.rope_type != "default" and not self.rope_scaling_factor >= 1.0:
            raise ValueError(f"rope_scaling_factor={self.rope_scaling_factor}: must be at least 1")
        if self.rope_type == "llama3":
            for name, (hf_name, fixed) in _MEGATRON_LLAMA3_FIXED.items():
                if getattr(self, name) != fixed:
                    raise ValueError(
                        f"{name}={getattr(self, name)} (HF rope_parameters['{hf_name}']): Megatron-Core "
                        f"0.16 implements 'llama3' RoPE scaling only with {hf_name}={fixed}"
                    )

    # --- Hugging Face config ------------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, config: Union[Any, str, Path], **overrides: Any) -> "GPTArchitecture":
        """The architecture of an HF ``PretrainedConfig``, or of the ``config.json`` in a model
        directory; ``overrides`` replace fields (e.g. ``make_vocab_size_divisible_by``).

        Raises:
            ValueError: the model type is not a supported dense family, or the config asks for a
                feature Megatron's GPTModel here does not reproduce; the message names the field.
        """
        if isinstance(config, (str, Path)):
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(config))
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_HF_MODEL_TYPES:
            hint = " (mixture-of-experts models are not supported)" if "moe" in str(model_type) else ""
            raise ValueError(
                f"model_type={model_type!r} is not supported{hint}: supported dense families are "
                f"{list(SUPPORTED_HF_MODEL_TYPES)}"
            )
        _refuse_unsupported_features(config, model_type)
        rope = _rope_parameters(config)
        num_heads = config.num_attention_heads
        values: dict[str, Any] = dict(
            hf_model_type=model_type,
            vocab_size=config.vocab_size,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            ffn_hidden_size=config.intermediate_size,
            num_attention_heads=num_heads,
            num_query_groups=getattr(config, "num_key_value_heads", None) or num_heads,
            kv_channels=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            norm_epsilon=config.rms_norm_eps,
            rotary_base=float(rope.get("rope_theta", 10000.0)),
            rope_type=rope.get("rope_type", "default"),
            qk_layernorm=model_type == "qwen3",
            add_qkv_bias=model_type == "qwen2",
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            max_position_embeddings=config.max_position_embeddings,
        )
        if values["rope_type"] != "default":
            values["rope_scaling_factor"] = float(rope["factor"])
        if values["rope_type"] == "llama3":
            values.update(
                rope_low_freq_factor=float(rope["low_freq_factor"]),
                rope_high_freq_factor=float(rope["high_freq_factor"]),
                rope_original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        values.update(overrides)
        return cls(**values)

    def hf_rope_parameters(self) -> dict[str, Any]:
        """The HF ``rope_parameters`` dict of this architecture."""
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rotary_base}
        if self.rope_type != "default":
            rope["factor"] = self.rope_scaling_factor
        if self.rope_type == "llama3":
            rope.update(
                low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_position_embeddings,
            )
        return rope

    def to_hf_config(self, dtype: Optional[torch.dtype] = None, **extra: Any) -> Any:
        """The HF config of this architecture (``LlamaConfig``, ``Qwen2Config`` or ``Qwen3Config``)
        with ``architectures`` set for ``AutoModelForCausalLM`` and vLLM; ``extra`` adds fields
        that are not architecture (token ids, ...)."""
        from transformers import AutoConfig

        values: dict[str, Any] = dict(
            architectures=[_HF_CLASS_NAMES[self.hf_model_type]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_query_groups,
            hidden_act="silu",
            rms_norm_eps=self.norm_epsilon,
            rope_parameters=self.hf_rope_parameters(),
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
        )
        if self.hf_model_type != "qwen2":
            values.update(head_dim=self.kv_channels, attention_bias=False)
        if self.hf_model_type == "llama":
            values["mlp_bias"] = False
        if dtype is not None:
            values["dtype"] = dtype
        values.update(extra)
        return AutoConfig.for_model(self.hf_model_type, **values)

    # --- Megatron-Core ------------------------------------------------------------------------

    def padded_vocab_size(self, tp: int) -> int:
        """Megatron-LM's rule: the vocabulary padded to a multiple of make_vocab_size_divisible_by * tp."""
        multiple = self.make_vocab_size_divisible_by * tp
        return math.ceil(self.vocab_size / multiple) * multiple

    def transformer_config(self, tp: int, pp: int, **overrides: Any) -> Any:
        """Megatron's ``TransformerConfig`` at tensor-parallel size ``tp`` and pipeline size ``pp``.

        fp32 parameters by default (``params_dtype=torch.bfloat16`` also sets ``bf16`` and the
        pipeline dtype); no dropout; every kernel fusion off (bias-dropout, bias-activation, masked
        softmax, persistent layer norm, RoPE, gradient accumulation), so that it runs on the CPU
        without Apex or Transformer Engine; ``overrides`` may turn them on. Fields that come from the
        architecture cannot be overridden.

        Raises:
            ValueError: an override names an architecture field.
        """
        from megatron.core.transformer import TransformerConfig

        fixed = sorted(set(overrides) & set(_ARCHITECTURE_CONFIG_KEYS))
        if fixed:
            raise ValueError(f"{fixed} come from the architecture (and tp, pp) and cannot be overridden")
        params_dtype = overrides.get("params_dtype", torch.float32)
        values: dict[str, Any] = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            layernorm_epsilon=self.norm_epsilon,
            normalization="RMSNorm",
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=self.add_qkv_bias,
            qk_layernorm=self.qk_layernorm,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            bias_dropout_fusion=False,
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            params_dtype=params_dtype,
            pipeline_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16,
            fp16=params_dtype == torch.float16,
        )
        values.update(overrides)
        return TransformerConfig(**values)

    def layer_spec(self, transformer_engine: Optional[bool] = None) -> Any:
        """Megatron's layer spec: Transformer Engine's (layer norms fused into ``linear_qkv`` and
        ``linear_fc1``) when ``transformer_engine`` is true, the local one (separate
        ``input_layernorm`` / ``pre_mlp_layernorm``, runs on the CPU) when false; by default TE's
        when ``transformer_engine`` is importable and CPU mode is off."""
        from megatron.core.models.gpt import gpt_layer_specs

        if transformer_engine is None:
            transformer_engine = transformer_engine_usable()
        if transformer_engine:
            return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=self.qk_layernorm)
        return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=self.qk_layernorm)

    def gpt_model_kwargs(self) -> dict[str, Any]:
        """``GPTModel`` arguments besides config, spec, vocabulary size and stage flags."""
        return dict(
            max_sequence_length=self.max_position_embeddings,
            share_embeddings_and_output_weights=self.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=self.rotary_base,
            rope_scaling=self.rope_type == "llama3",
            rope_scaling_factor=self.rope_scaling_factor if self.rope_type == "llama3" else 8.0,
            seq_len_interpolation_factor=self.rope_scaling_factor if self.rope_type == "linear" else None,
        )

    def build(
        self, tp: int, pp: int, *, transformer_engine: Optional[bool] = None, **config_overrides: Any
    ) -> torch.nn.Module:
        """This rank's ``GPTModel`` (its pipeline stage, its TP shard of the padded vocabulary),
        randomly initialized; fill it with ``load_hf_weights``. Megatron's parallel state must have
        been initialized with these sizes and no virtual pipeline stages.

        Raises:
            ValueError: the parallel state has other sizes.
        """
        from megatron.core import parallel_state
        from megatron.core.models.gpt import GPTModel

        layout = (parallel_state.get_tensor_model_parallel_world_size(),
                  parallel_state.get_pipeline_model_parallel_world_size())
        if layout != (tp, pp):
            raise ValueError(f"build(tp={tp}, pp={pp}): the parallel state has TP={layout[0]}, PP={layout[1]}")
        return GPTModel(
            self.transformer_config(tp, pp, **config_overrides),
            self.layer_spec(transformer_engine),
            vocab_size=self.padded_vocab_size(tp),
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            **self.gpt_model_kwargs(),
        )


def transformer_engine_usable() -> bool:
    """Whether Transformer Engine is importable and the process is not in CPU mode."""
    from megatron_mopd.platform import cpu_mode_enabled

    return importlib.util.find_spec("transformer_engine") is not None and not cpu_mode_enabled()


def _rope_parameters(config: Any) -> Mapping[str, Any]:
    """HF RoPE settings: ``rope_parameters`` (transformers 5), else ``rope_theta`` + ``rope_scaling``."""
    rope = getattr(config, "rope_parameters", None)
    if rope is None:
        rope = dict(getattr(config, "rope_scaling", None) or {})
        rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if any(isinstance(value, Mapping) for value in rope.values()):
        raise ValueError(f"rope_parameters={dict(rope)}: per-layer-type RoPE is not supported")
    rope = dict(rope)
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


def _refuse_unsupported_features(config: Any, model_type: str) -> None:
    """Raise a ValueError naming the first config field this conversion cannot reproduce."""

    def refuse(field_name: str, why: str) -> None:
        raise ValueError(f"{model_type} config {field_name}={getattr(config, field_name, None)!r}: {why}")

    if getattr(config, "hidden_act", "silu") != "silu":
        refuse("hidden_act", "only 'silu' (SwiGLU) is supported")
    if model_type in ("llama", "qwen3") and getattr(config, "attention_bias", False):
        refuse("attention_bias", "biases on q/k/v and o_proj are not supported (Megatron's add_qkv_bias "
                                 "has no o_proj bias)")
    if getattr(config, "mlp_bias", False):
        refuse("mlp_bias", "MLP biases are not supported")
    if getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None):
        refuse("num_experts", "mixture-of-experts models are not supported")
    if getattr(config, "use_sliding_window", False):
        refuse("use_sliding_window", "sliding-window attention is not supported")
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        refuse("layer_types", "only full attention in every layer is supported (no sliding window)")
    rope = _rope_parameters(config)
    if "mrope_section" in rope or getattr(config, "mrope_section", None):
        refuse("rope_parameters", "multimodal RoPE (mrope_section) is not supported")
    if rope["rope_type"] not in _ROPE_TYPES:
        refuse("rope_parameters", f"rope_type {rope['rope_type']!r} is not supported: Megatron-Core 0.16's "
                                  f"GPTModel reproduces only {list(_ROPE_TYPES)}")
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if partial not in (None, 1, 1.0):
        refuse("rope_parameters", f"partial_rotary_factor={partial}: only full rotary dimensions are supported")
