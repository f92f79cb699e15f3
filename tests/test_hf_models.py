"""Specification: HF checkpoints (Llama, Qwen2, Qwen3) load into Megatron-Core GPTModel at any layout
and export back unchanged.

Four tiny fp32 HF models with random weights — norm weights and biases random too, so that any
mis-mapped tensor changes the logits — all with grouped-query attention (4 query heads, 2 key/value
heads) and a 200-token vocabulary (padded by Megatron to 256):

- ``llama``: untied embeddings, 4 layers;
- ``llama-tied-llama3-rope``: tied embeddings, Llama-3 RoPE scaling;
- ``qwen2-tied-linear-rope``: q/k/v biases, tied embeddings, linear RoPE scaling;
- ``qwen3-sharded``: q/k norms, heads wider than hidden_size / heads, saved as several safetensors
  shards with an index.

At TP=1, TP=2 and PP=2 the loaded Megatron model's logits equal those of ``transformers`` (eager
attention) within 1e-4 on the real vocabulary, and are exactly zero on the padded ids; the RoPE
rotation angles are HF's. Every HF tensor is the source of exactly one Megatron parameter. Exported from
TP=2 and from PP=2, the safetensors hold bit-identical tensors, ``AutoModelForCausalLM`` loads them to
the same logits, and config.json gives the same architecture. Unsupported configs and broken
checkpoints are refused with a ValueError naming the field or tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_mopd.models import (
    GPTArchitecture,
    HFCheckpoint,
    export_hf_weights,
    hf_names_of,
    hf_tensor_shapes,
    load_hf_weights,
)
from megatron_mopd.platform import destroy_parallel, initialize_parallel
from megatron_mopd.testing import run_on_ranks

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU mode runs only on hosts without an accelerator"
)

SEED, VOCAB, BATCH, SEQ_LEN, TOLERANCE = 1234, 200, 2, 12, 1e-4
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
EXPORT_LAYOUTS = ("tp2", "pp2")
LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
}


def _sizes(**changes: Any) -> dict[str, Any]:
    sizes = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
    return {**sizes, **changes}


def hf_configs() -> dict[str, Any]:
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    return {
        "llama": LlamaConfig(**_sizes(num_hidden_layers=4)),
        "llama-tied-llama3-rope": LlamaConfig(
            **_sizes(), tie_word_embeddings=True, rope_parameters=dict(LLAMA3_ROPE),
            max_position_embeddings=16384),
        "qwen2-tied-linear-rope": Qwen2Config(
            **_sizes(), tie_word_embeddings=True,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
        "qwen3-sharded": Qwen3Config(**_sizes(), head_dim=32),
    }


ARCHS = ("llama", "llama-tied-llama3-rope", "qwen2-tied-linear-rope", "qwen3-sharded")


def random_hf_model(config: Any, seed: int) -> torch.nn.Module:
    """An fp32 HF causal LM with every parameter random (norm weights around 1)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = 0.2 * torch.randn_like(param)
            param.copy_(1.0 + noise if "norm" in name else noise)
    return model.eval()


def tokens() -> torch.Tensor:
    return torch.randint(VOCAB, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(SEED))


def hf_logits_of(model_dir: str | Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens()).logits


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf")
    assert tuple(hf_configs()) == ARCHS
    dirs = {}
    for index, (name, config) in enumerate(hf_configs().items()):
        shard_size = "100KB" if name == "qwen3-sharded" else "50GB"
        random_hf_model(config, SEED + index).save_pretrained(root / name, max_shard_size=shard_size)
        dirs[name] = str(root / name)
    assert len(list(Path(dirs["qwen3-sharded"]).glob("*.safetensors"))) > 1
    return dirs


@pytest.fixture(scope="module")
def hf_logits(hf_dirs: dict[str, str]) -> dict[str, torch.Tensor]:
    return {name: hf_logits_of(path) for name, path in hf_dirs.items()}


# --- on the ranks ------------------------------------------------------------------------------


def megatron_logits(model: torch.nn.Module) -> Optional[torch.Tensor]:
    """Logits ``[B, T, padded vocabulary]`` through Megatron's forward-only schedule on the last
    pipeline stage (gathered over TP), None on the other stages."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    position_ids = torch.arange(SEQ_LEN).expand(BATCH, SEQ_LEN)

    def forward_step(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Callable[..., Any]]:
        return model(next(data_iterator), position_ids, None), lambda logits, non_loss_data=False: logits

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens()]), model=[model],
            num_microbatches=1, seq_length=SEQ_LEN, micro_batch_size=BATCH,
            forward_only=True, collect_non_loss_data=True,
        )
    if not parallel_state.is_pipeline_last_stage():
        return None
    tp_group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(outputs[0]) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(shards, outputs[0].contiguous(), group=tp_group)
    return torch.cat(shards, dim=-1)


def value_error_of(action: Callable[[], Any]) -> str:
    """The message of the ValueError ``action`` raises."""
    try:
        action()
    except ValueError as error:
        return str(error)
    raise AssertionError("expected a ValueError")


def load_and_run(tp: int, pp: int, hf_dirs: dict[str, str], export_root: Optional[str]) -> dict[str, Any]:
    """Load every checkpoint at (tp, pp) (data-parallel over the remaining ranks), run it, and export
    it under ``export_root`` if given.

    Returns the messages of the refusals checked at this layout (on every rank) and, on the first
    rank of the last stage, per architecture: the logits, the RoPE angles and the parameter names.
    """
    from megatron.core import parallel_state

    initialize_parallel(tp, pp, device="cpu", seed=SEED)
    try:
        results: dict[str, Any] = {"logits": {}, "rope_angles": {}, "names": {}}
        refusals: dict[str, str] = {}
        for name, path in hf_dirs.items():
            arch = GPTArchitecture.from_hf_config(path)
            model = arch.build(tp, pp)
            load_hf_weights(model, path, arch)
            results["logits"][name] = megatron_logits(model)
            results["rope_angles"][name] = model.rotary_pos_emb.get_freqs_non_repeated(SEQ_LEN)
            results["names"][name] = [param_name for param_name, _ in model.named_parameters()]
            if export_root is not None:
                export_hf_weights(model, arch, Path(export_root) / name)
        if export_root is not None:
            refusals["export into a non-empty directory"] = value_error_of(
                lambda: export_hf_weights(model, arch, Path(export_root) / name))
        if tp == pp == 1:
            llama_model = GPTArchitecture.from_hf_config(hf_dirs["llama-tied-llama3-rope"]).build(1, 1)
            qwen2_dir = hf_dirs["qwen2-tied-linear-rope"]
            refusals["qwen2 checkpoint into a llama model"] = value_error_of(
                lambda: load_hf_weights(llama_model, qwen2_dir, GPTArchitecture.from_hf_config(qwen2_dir)))
        reporting = (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
                     and parallel_state.get_data_parallel_rank() == 0)
        return {**results, "refusals": refusals} if reporting else {"refusals": refusals}
    finally:
        destroy_parallel()


def run_layouts(hf_dirs: dict[str, str], export_roots: dict[str, Optional[str]]) -> dict[str, dict[str, Any]]:
    """``load_and_run`` at every layout of LAYOUTS, one after the other in the same ranks."""
    torch.set_num_threads(1)
    return {layout: load_and_run(*LAYOUTS[layout], hf_dirs, export_roots[layout]) for layout in LAYOUTS}


# --- in the test process -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def megatron_runs(hf_dirs: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """layout -> the reporting rank's results, the export directory, and every rank's refusals.

    One launch of two ranks runs all layouts (TP=1 then with two data-parallel replicas)."""
    export_roots = {
        layout: str(tmp_path_factory.mktemp(f"export-{layout}")) if layout in EXPORT_LAYOUTS else None
        for layout in LAYOUTS
    }
    per_rank = run_on_ranks(run_layouts, 2, args=(hf_dirs, export_roots), timeout_s=600)
    runs = {}
    for layout in LAYOUTS:
        reporting = [ranks[layout] for ranks in per_rank if "logits" in ranks[layout]]
        assert len(reporting) == 1
        runs[layout] = {**reporting[0], "export_root": export_roots[layout],
                        "rank_refusals": [ranks[layout]["refusals"] for ranks in per_rank]}
    return runs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_megatron_logits_equal_hf_logits(megatron_runs: dict, hf_logits: dict, layout: str, arch: str) -> None:
    logits = megatron_runs[layout]["logits"][arch]
    assert logits.shape == (BATCH, SEQ_LEN, 256)
    difference = (logits[..., :VOCAB] - hf_logits[arch]).abs().max().item()
    assert difference <= TOLERANCE, f"{arch} at {layout}: max |Megatron - HF| = {difference}"
    assert torch.count_nonzero(logits[..., VOCAB:]) == 0, "padded vocabulary rows must be zero"


@pytest.mark.parametrize("arch", ARCHS)
def test_rope_angles_are_hf_ones(megatron_runs: dict, hf_dirs: dict[str, str], arch: str) -> None:
    """Position x frequency for every position and frequency (RoPE scaling included)."""
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(hf_dirs[arch])
    expected = torch.outer(torch.arange(SEQ_LEN, dtype=torch.float32), hf_model.model.rotary_emb.inv_freq)
    torch.testing.assert_close(megatron_runs["tp1"]["rope_angles"][arch], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_hf_tensor_feeds_exactly_one_parameter(megatron_runs: dict, hf_dirs: dict[str, str], arch: str) -> None:
    """At TP=1 (one stage: local layer numbers are global ones), tied embeddings included."""
    architecture = GPTArchitecture.from_hf_config(hf_dirs[arch])
    sources = [name for param in megatron_runs["tp1"]["names"][arch] for name in hf_names_of(param, architecture)]
    assert sorted(sources) == sorted(hf_tensor_shapes(architecture))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layout", EXPORT_LAYOUTS)
def test_export_writes_bit_identical_tensors(megatron_runs: dict, hf_dirs: dict, layout: str, arch: str) -> None:
    exported_dir = Path(megatron_runs[layout]["export_root"]) / arch
    assert sorted(p.name for p in exported_dir.iterdir()) == ["config.json", "model.safetensors"]
    original = {}
    for shard in Path(hf_dirs[arch]).glob("*.safetensors"):
        original.update(load_file(shard))
    exported = load_file(exported_dir / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layout", EXPORT_LAYOUTS)
def test_exported_directory_reloads_in_transformers(megatron_runs: dict, hf_dirs: dict, hf_logits: dict,
                                                    layout: str, arch: str) -> None:
    exported_dir = Path(megatron_runs[layout]["export_root"]) / arch
    assert torch.equal(hf_logits_of(exported_dir), hf_logits[arch])
    assert GPTArchitecture.from_hf_config(exported_dir) == GPTArchitecture.from_hf_config(hf_dirs[arch])


def test_export_refuses_a_non_empty_directory_on_every_rank(megatron_runs: dict) -> None:
    for refusals in megatron_runs["tp2"]["rank_refusals"]:
        assert "already exists and is not an empty directory" in refusals["export into a non-empty directory"]


def test_loading_into_a_model_of_another_architecture_is_refused(megatron_runs: dict) -> None:
    message = megatron_runs["tp1"]["refusals"]["qwen2 checkpoint into a llama model"]
    assert "no model parameter takes HF tensor model.layers.0.self_attn.k_proj.bias" in message, message


def test_architecture_reads_the_hf_config() -> None:
    arch = GPTArchitecture.from_hf_config(hf_configs()["qwen3-sharded"])
    assert (arch.hf_model_type, arch.num_layers, arch.num_query_groups, arch.kv_channels) == ("qwen3", 2, 2, 32)
    assert (arch.qk_layernorm, arch.add_qkv_bias, arch.tie_word_embeddings) == (True, False, False)
    llama3 = GPTArchitecture.from_hf_config(hf_configs()["llama-tied-llama3-rope"])
    assert (llama3.rope_type, llama3.rope_scaling_factor, llama3.rotary_base) == ("llama3", 8.0, 500000.0)
    assert llama3.padded_vocab_size(1) == llama3.padded_vocab_size(2) == 256
    assert llama3.padded_vocab_size(4) == 512
    assert GPTArchitecture.from_hf_config(llama3.to_hf_config()) == llama3


def test_transformer_engine_names_map_to_the_same_hf_tensors() -> None:
    arch = GPTArchitecture.from_hf_config(hf_configs()["llama"])
    for local, fused in [("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
                         ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")]:
        assert hf_names_of(f"decoder.layers.3.{fused}", arch) == hf_names_of(f"decoder.layers.3.{local}", arch)


@pytest.mark.filterwarnings("ignore:full scope is deprecated:UserWarning")  # Megatron's own default
def test_transformer_config_runs_without_fusions() -> None:
    arch = GPTArchitecture.from_hf_config(hf_configs()["qwen2-tied-linear-rope"])
    config = arch.transformer_config(2, 1)
    assert config.add_qkv_bias and not config.add_bias_linear and config.gated_linear_unit
    assert not (config.apply_rope_fusion or config.masked_softmax_fusion or config.persist_layer_norm
                or config.bias_dropout_fusion or config.gradient_accumulation_fusion)
    with pytest.raises(ValueError, match="num_layers"):
        arch.transformer_config(1, 1, num_layers=3)


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_type", "match"),
    [("qwen3_moe", "mixture-of-experts"), ("mistral", "'mistral' is not supported"), ("gemma", "'gemma'")],
)
def test_unsupported_model_types_are_refused(model_type: str, match: str) -> None:
    from transformers import AutoConfig

    with pytest.raises(ValueError, match=match):
        GPTArchitecture.from_hf_config(AutoConfig.for_model(model_type))


def _unsupported_configs() -> list[tuple[str, Callable[[], Any], str]]:
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    def llama3(**changes: Any) -> dict[str, Any]:
        return {**LLAMA3_ROPE, **changes}

    return [
        ("attention bias", lambda: LlamaConfig(**_sizes(), attention_bias=True), "attention_bias"),
        ("qwen3 attention bias", lambda: Qwen3Config(**_sizes(), attention_bias=True), "attention_bias"),
        ("mlp bias", lambda: LlamaConfig(**_sizes(), mlp_bias=True), "mlp_bias"),
        ("gelu", lambda: LlamaConfig(**_sizes(), hidden_act="gelu"), "hidden_act"),
        ("sliding window", lambda: Qwen2Config(**_sizes(), use_sliding_window=True), "use_sliding_window"),
        ("yarn", lambda: LlamaConfig(**_sizes(), rope_parameters={
            "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 512}),
         "rope_type 'yarn'"),
        ("llama3 low_freq_factor", lambda: LlamaConfig(
            **_sizes(), rope_parameters=llama3(low_freq_factor=2.0), max_position_embeddings=16384),
         "low_freq_factor"),
        ("llama3 original context", lambda: LlamaConfig(
            **_sizes(), rope_parameters=llama3(original_max_position_embeddings=4096), max_position_embeddings=16384),
         "original_max_position_embeddings"),
        ("mrope", lambda: Qwen2Config(**_sizes(), rope_parameters={
            "rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}), "mrope_section"),
    ]


@pytest.mark.parametrize(("feature", "make_config", "match"), _unsupported_configs(),
                         ids=[case[0] for case in _unsupported_configs()])
def test_unsupported_features_are_refused(feature: str, make_config: Callable[[], Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GPTArchitecture.from_hf_config(make_config())


def _edited_checkpoint(source: str, target: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    tensors = load_file(Path(source) / "model.safetensors")
    edit(tensors)
    target.mkdir()
    save_file(tensors, target / "model.safetensors")
    return target


@pytest.mark.parametrize(
    ("case", "edit", "match"),
    [
        ("missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
         "has no tensor model.layers.1.mlp.up_proj.weight"),
        ("unexpected", lambda t: t.update({"model.layers.4.input_layernorm.weight": torch.ones(64)}),
         "unexpected tensor model.layers.4.input_layernorm.weight"),
        ("misshapen", lambda t: t.update({"model.layers.2.self_attn.k_proj.weight": torch.zeros(48, 64)}),
         r"tensor model.layers.2.self_attn.k_proj.weight has shape \[48, 64\], the architecture expects \[32, 64\]"),
    ],
)
def test_broken_checkpoints_are_refused(hf_dirs: dict[str, str], tmp_path: Path, case: str,
                                        edit: Callable, match: str) -> None:
    arch = GPTArchitecture.from_hf_config(hf_dirs["llama"])
    broken = _edited_checkpoint(hf_dirs["llama"], tmp_path / case, edit)
    with pytest.raises(ValueError, match=match):
        HFCheckpoint(broken, arch)


def test_a_directory_without_safetensors_is_refused(tmp_path: Path) -> None:
    arch = GPTArchitecture.from_hf_config(hf_configs()["llama"])
    with pytest.raises(ValueError, match="only safetensors checkpoints"):
        HFCheckpoint(tmp_path, arch)
