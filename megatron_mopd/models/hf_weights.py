"""Hugging Face safetensors weights in and out of a Megatron-Core GPTModel (``models.architecture``).

    load_hf_weights(model, hf_dir, arch)               # every rank: its pipeline stage, its TP shard
    export_hf_weights(model, arch, out_dir, tokenizer)  # collective; global rank 0 writes out_dir

Layouts. Megatron's *full* tensor is what a TP=1 model holds; TP rank r holds Megatron's split of it:
the full tensor cut into ``tp * partition_stride`` equal chunks along ``partition_dim``, chunks
r, r + tp, ... (the parameter attributes ``tensor_model_parallel``, ``partition_dim`` and
``partition_stride``; parameters without them are replicated). HF layer i is layer j of the pipeline
stage holding it (i = ``TransformerLayer.layer_number`` - 1):

    HF tensor                                  Megatron parameter, full layout
    model.embed_tokens.weight     [V, H]       embedding.word_embeddings.weight  [Vp, H], rows >= V zero
    model.layers.i.
      input_layernorm.weight                   decoder.layers.j.input_layernorm.weight (local spec)
                                               | ...self_attention.linear_qkv.layer_norm_weight (TE spec)
      self_attn.{q,k,v}_proj.weight / .bias    ...self_attention.linear_qkv.weight / .bias: for each
                                               query group g: [its q heads; k head g; v head g]
      self_attn.o_proj.weight                  ...self_attention.linear_proj.weight (split along dim 1)
      self_attn.{q,k}_norm.weight              ...self_attention.{q,k}_layernorm.weight
      post_attention_layernorm.weight          ...pre_mlp_layernorm.weight (local)
                                               | ...mlp.linear_fc1.layer_norm_weight (TE)
      mlp.{gate,up}_proj.weight                ...mlp.linear_fc1.weight = [gate; up], stride 2: TP rank r
                                               holds [gate rows of r; up rows of r]
      mlp.down_proj.weight                     ...mlp.linear_fc2.weight (split along dim 1)
    model.norm.weight                          decoder.final_layernorm.weight
    lm_head.weight                [V, H]       output_layer.weight [Vp, H]; tied embeddings: the
                                               checkpoint has no lm_head, the output layer is the
                                               embedding (a copy on the last stage when PP > 1)

Vp = ``arch.padded_vocab_size(tp)``. Loading reads only the tensors of this rank's stage, checks the
checkpoint's tensor names and shapes against the architecture first (``HFCheckpoint``) and fills
every parameter of the model exactly once. Export gathers each parameter over its TP group, converts
it on the first TP rank of each stage, gathers the stages' tensors on global rank 0, and writes
``model.safetensors`` + ``config.json`` (+ the tokenizer) into a staging directory renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator, Mapping, Optional, Union

import torch
import torch.distributed as dist
from safetensors import safe_open

from megatron_mopd.models.architecture import GPTArchitecture
from megatron_mopd.parallel.collectives import first_problem_of_all_ranks, on_rank0

__all__ = ["HFCheckpoint", "export_hf_weights", "hf_names_of", "hf_tensor_shapes", "load_hf_weights"]

PathLike = Union[str, Path]
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

# Megatron names inside decoder.layers.<j>. -> (kind, HF names inside model.layers.<i>.)
_LAYER_RECIPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "input_layernorm.weight": ("copy", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.layer_norm_weight": ("copy", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.weight": (
        "qkv", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
    "self_attention.linear_qkv.bias": (
        "qkv", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")),
    "self_attention.linear_proj.weight": ("copy", ("self_attn.o_proj.weight",)),
    "self_attention.q_layernorm.weight": ("copy", ("self_attn.q_norm.weight",)),
    "self_attention.k_layernorm.weight": ("copy", ("self_attn.k_norm.weight",)),
    "pre_mlp_layernorm.weight": ("copy", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.layer_norm_weight": ("copy", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.weight": ("gate_up", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": ("copy", ("mlp.down_proj.weight",)),
}
# Tensors some HF checkpoints carry that no parameter corresponds to (older Llama: RoPE buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class _Recipe:
    """How one Megatron parameter (full layout) is made of HF tensors.

    kind: "copy" (the same tensor), "vocab" (rows padded with zeros to the padded vocabulary),
    "qkv" (q, k, v interleaved by query group) or "gate_up" (gate rows, then up rows).
    """

    kind: str
    hf_names: tuple[str, ...]


def hf_tensor_shapes(arch: GPTArchitecture) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of ``arch`` holds, with its shape."""
    return dict(_hf_tensor_shapes(arch))


@lru_cache(maxsize=8)
def _hf_tensor_shapes(arch: GPTArchitecture) -> MappingProxyType:
    hidden, heads, head_dim = arch.hidden_size, arch.num_attention_heads, arch.kv_channels
    groups = arch.num_query_groups
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, hidden)}
    for i in range(arch.num_layers):
        prefix = f"model.layers.{i}."
        layer = {
            "input_layernorm.weight": (hidden,),
            "self_attn.q_proj.weight": (heads * head_dim, hidden),
            "self_attn.k_proj.weight": (groups * head_dim, hidden),
            "self_attn.v_proj.weight": (groups * head_dim, hidden),
            "self_attn.o_proj.weight": (hidden, heads * head_dim),
            "post_attention_layernorm.weight": (hidden,),
            "mlp.gate_proj.weight": (arch.ffn_hidden_size, hidden),
            "mlp.up_proj.weight": (arch.ffn_hidden_size, hidden),
            "mlp.down_proj.weight": (hidden, arch.ffn_hidden_size),
        }
        if arch.add_qkv_bias:
            layer.update({
                "self_attn.q_proj.bias": (heads * head_dim,),
                "self_attn.k_proj.bias": (groups * head_dim,),
                "self_attn.v_proj.bias": (groups * head_dim,),
            })
        if arch.qk_layernorm:
            layer.update({"self_attn.q_norm.weight": (head_dim,), "self_attn.k_norm.weight": (head_dim,)})
        shapes.update({prefix + name: shape for name, shape in layer.items()})
    shapes["model.norm.weight"] = (hidden,)
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, hidden)
    return MappingProxyType(shapes)


def _recipe(megatron_name: str, arch: GPTArchitecture) -> _Recipe:
    """The recipe of a Megatron parameter named with its global layer number (local or TE spec).

    Raises:
        ValueError: no tensor of an HF checkpoint of ``arch`` corresponds to it.
    """
    parts = megatron_name.split(".")
    recipe: Optional[_Recipe] = None
    if megatron_name == "embedding.word_embeddings.weight":
        recipe = _Recipe("vocab", ("model.embed_tokens.weight",))
    elif megatron_name == "output_layer.weight":
        source = "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
        recipe = _Recipe("vocab", (source,))
    elif megatron_name == "decoder.final_layernorm.weight":
        recipe = _Recipe("copy", ("model.norm.weight",))
    elif parts[:2] == ["decoder", "layers"] and len(parts) > 3 and parts[2].isdigit():
        kind_and_names = _LAYER_RECIPES.get(".".join(parts[3:]))
        if kind_and_names is not None:
            kind, names = kind_and_names
            recipe = _Recipe(kind, tuple(f"model.layers.{parts[2]}.{name}" for name in names))
    expected = _hf_tensor_shapes(arch)
    if recipe is None or any(name not in expected for name in recipe.hf_names):
        raise ValueError(
            f"model parameter {megatron_name} has no counterpart in an HF {arch.hf_model_type} checkpoint "
            f"of this architecture: build the model with GPTArchitecture.build of the same architecture"
        )
    return recipe


def hf_names_of(megatron_name: str, arch: GPTArchitecture) -> tuple[str, ...]:
    """The HF tensors a Megatron parameter is made of; ``megatron_name`` carries the global layer
    number (``decoder.layers.<i>.…``) and may use the local or the Transformer Engine spec's names.

    Raises:
        ValueError: no HF tensor of ``arch`` corresponds to it.
    """
    return _recipe(megatron_name, arch).hf_names


def _to_megatron(recipe: _Recipe, tensors: list[torch.Tensor], arch: GPTArchitecture, tp: int) -> torch.Tensor:
    """Megatron's full tensor from the recipe's HF tensors."""
    if recipe.kind == "copy":
        return tensors[0]
    if recipe.kind == "vocab":
        (table,) = tensors
        padding = table.new_zeros(arch.padded_vocab_size(tp) - table.shape[0], *table.shape[1:])
        return torch.cat([table, padding])
    if recipe.kind == "gate_up":
        return torch.cat(tensors)
    groups, head_dim = arch.num_query_groups, arch.kv_channels
    q, k, v = (t.reshape(groups, -1, head_dim, *t.shape[1:]) for t in tensors)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tensors[0].shape[1:])


def _to_hf(recipe: _Recipe, full: torch.Tensor, arch: GPTArchitecture) -> dict[str, torch.Tensor]:
    """The recipe's HF tensors from Megatron's full tensor (inverse of ``_to_megatron``)."""
    if recipe.kind == "copy":
        parts = [full]
    elif recipe.kind == "vocab":
        parts = [full[: arch.vocab_size]]
    elif recipe.kind == "gate_up":
        parts = list(full.chunk(2))
    else:
        groups, head_dim = arch.num_query_groups, arch.kv_channels
        per_group = full.reshape(groups, -1, head_dim, *full.shape[1:])
        q_heads = arch.num_attention_heads // groups
        parts = [
            part.reshape(-1, *full.shape[1:]) for part in per_group.split([q_heads, 1, 1], dim=1)
        ]
    return dict(zip(recipe.hf_names, parts))


def _split_dim_and_stride(param: torch.nn.Parameter) -> tuple[int, int]:
    """(partition_dim, partition_stride) of a TP-sharded parameter."""
    return param.partition_dim, getattr(param, "partition_stride", 1)


def _is_tp_sharded(param: torch.nn.Parameter, tp: int) -> bool:
    return tp > 1 and bool(getattr(param, "tensor_model_parallel", False))


def _shard(full: torch.Tensor, param: torch.nn.Parameter, tp_rank: int, tp: int) -> torch.Tensor:
    """This TP rank's part of Megatron's full tensor (see the module docstring)."""
    if not _is_tp_sharded(param, tp):
        return full
    dim, stride = _split_dim_and_stride(param)
    if full.shape[dim] % (tp * stride):
        return full  # the caller's shape check reports it
    chunks = full.chunk(tp * stride, dim=dim)
    return torch.cat(chunks[tp_rank::tp], dim=dim)


def _unshard(pieces: list[torch.Tensor], param: torch.nn.Parameter, tp: int) -> torch.Tensor:
    """Megatron's full tensor from the TP ranks' parts, in TP rank order (inverse of ``_shard``)."""
    if not _is_tp_sharded(param, tp):
        return pieces[0]
    dim, stride = _split_dim_and_stride(param)
    per_rank = [piece.chunk(stride, dim=dim) for piece in pieces]
    return torch.cat([per_rank[rank][s] for s in range(stride) for rank in range(tp)], dim=dim)


class HFCheckpoint:
    """The safetensors tensors of an HF model directory, checked against an architecture.

    Reads ``model.safetensors``, or the files listed by ``model.safetensors.index.json``. On
    construction only the file headers are read: the tensor names must be exactly those of
    ``hf_tensor_shapes(arch)`` (besides RoPE ``inv_freq`` buffers, and a ``lm_head.weight`` that
    tied embeddings ignore, as ``transformers`` does) with those shapes. ``read`` then loads one tensor.

    Raises:
        ValueError: no safetensors weights in the directory, or a tensor is missing, unexpected or
            of another shape (the message names it).
    """

    def __init__(self, hf_dir: PathLike, arch: GPTArchitecture) -> None:
        self.hf_dir = Path(hf_dir)
        self.arch = arch
        self._files = _tensor_files(self.hf_dir)
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}
        try:
            self._check({name: tuple(self._handle(path).get_slice(name).get_shape())
                         for name, path in self._files.items()})
        except BaseException:
            self.close()
            raise

    def _handle(self, path: Path) -> Any:
        """The open safetensors file ``path`` (headers are read on opening, tensors on demand)."""
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._handles[path]

    def _check(self, present: Mapping[str, tuple[int, ...]]) -> None:
        expected = hf_tensor_shapes(self.arch)
        where = f"HF checkpoint {self.hf_dir} ({self.arch.hf_model_type}, {self.arch.num_layers} layers)"
        missing = [name for name in expected if name not in present]
        if missing:
            raise ValueError(f"{where} has no tensor {missing[0]}" + _and_more(missing))
        ignored = {"lm_head.weight"} if self.arch.tie_word_embeddings else set()
        unexpected = [
            name for name in present
            if name not in expected and name not in ignored and not name.endswith(_IGNORED_SUFFIXES)
        ]
        if unexpected:
            raise ValueError(
                f"{where} has unexpected tensor {unexpected[0]}" + _and_more(unexpected)
                + ": its architecture is not the one given"
            )
        for name, shape in expected.items():
            if present[name] != shape:
                raise ValueError(
                    f"{where}: tensor {name} has shape {list(present[name])}, the architecture expects {list(shape)}"
                )

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (one of ``hf_tensor_shapes(arch)``), loaded on the CPU."""
        return self._handle(self._files[name]).get_tensor(name)

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _and_more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def _tensor_files(hf_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of an HF model directory."""
    index = hf_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: hf_dir / file for name, file in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise ValueError(f"{index} lists {path.name}, which does not exist")
        return files
    single = hf_dir / SAFETENSORS_FILE
    if not single.is_file():
        raise ValueError(
            f"{hf_dir} has neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}: only safetensors "
            f"checkpoints can be loaded"
        )
    with safe_open(str(single), framework="pt") as handle:
        return {name: single for name in handle.keys()}


def _unwrap(model: Any) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers; one model chunk only."""
    from megatron.core import parallel_state
    from megatron.core.utils import unwrap_model

    if isinstance(model, (list, tuple)) or (parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1) > 1:
        raise ValueError("virtual (interleaved) pipeline stages are not supported: pass one model chunk")
    return unwrap_model(model)


def _global_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(name with the global layer number, parameter) of every parameter of this rank's model."""
    layers = model.decoder.layers
    for name, param in model.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(layers[int(parts[2])].layer_number - 1)
        yield ".".join(parts), param


def _tp_layout() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def load_hf_weights(model: torch.nn.Module, hf_dir: PathLike, arch: GPTArchitecture) -> None:
    """Fill this rank's ``GPTModel`` (built by ``arch.build`` at the current TP/PP layout; DDP or
    Float16Module wrappers are looked through) from the HF safetensors checkpoint in ``hf_dir``.

    Every rank reads only the tensors of its pipeline stage and keeps its TP part. Not collective.

    Raises:
        ValueError: the checkpoint does not match ``arch`` (missing, unexpected or misshapen tensor),
            or the model does not (a parameter with no HF counterpart, of another shape, or an HF
            tensor of this stage that no parameter takes). Each message names the tensor.
    """
    model = _unwrap(model)
    if model.share_embeddings_and_output_weights != arch.tie_word_embeddings:
        raise ValueError(
            f"the model has share_embeddings_and_output_weights={model.share_embeddings_and_output_weights}, "
            f"the architecture tie_word_embeddings={arch.tie_word_embeddings}"
        )
    tp_rank, tp = _tp_layout()
    with HFCheckpoint(hf_dir, arch) as checkpoint, torch.no_grad():
        used: set[str] = set()
        stage_layers: set[str] = set()
        for name, param in _global_parameters(model):
            recipe = _recipe(name, arch)
            used.update(recipe.hf_names)
            if name.startswith("decoder.layers."):
                stage_layers.add(name.split(".")[2])
            full = _to_megatron(recipe, [checkpoint.read(n) for n in recipe.hf_names], arch, tp)
            part = _shard(full, param, tp_rank, tp)
            if part.shape != param.shape:
                raise ValueError(
                    f"model parameter {name} has shape {list(param.shape)}; {' + '.join(recipe.hf_names)} "
                    f"give {list(part.shape)} at TP rank {tp_rank} of {tp}: the model was built for "
                    f"another architecture"
                )
            param.copy_(part)
        needed = {
            hf_name for hf_name in hf_tensor_shapes(arch)
            if hf_name.startswith("model.layers.") and hf_name.split(".")[2] in stage_layers
        }
        if model.pre_process:
            needed.add("model.embed_tokens.weight")
        if model.post_process:
            needed.update({"model.norm.weight", "lm_head.weight"} & set(hf_tensor_shapes(arch)))
        untaken = sorted(needed - used)
        if untaken:
            raise ValueError(
                f"no model parameter takes HF tensor {untaken[0]}{_and_more(untaken)}: the model was "
                f"built for another architecture"
            )


def export_hf_weights(
    model: torch.nn.Module,
    arch: GPTArchitecture,
    out_dir: PathLike,
    *,
    tokenizer: Any = None,
    dtype: Optional[torch.dtype] = None,
    hf_config_fields: Optional[Mapping[str, Any]] = None,
) -> None:
    """Write this model as an HF checkpoint directory loadable by ``transformers`` and vLLM.

    Collective: every rank of the world calls it; global rank 0 writes ``out_dir``:
    ``model.safetensors`` (the vocabulary padding stripped), ``config.json`` (``arch.to_hf_config``
    plus ``hf_config_fields``, e.g. token ids; also the legacy ``rope_theta`` / ``rope_scaling`` keys
    for readers on transformers 4) and, if given, the tokenizer's files. They are written into a
    staging directory next to ``out_dir``, which is then renamed to ``out_dir``. Rank 0 holds the
    whole model on the CPU meanwhile.

    Args:
        model: this rank's ``GPTModel`` (wrappers are looked through).
        arch: its architecture.
        out_dir: a directory that does not exist yet, or is empty.
        tokenizer: anything with ``save_pretrained(directory)``.
        dtype: the dtype of the written tensors; by default each parameter's.
        hf_config_fields: extra HF config fields that are not architecture.

    Raises:
        ValueError: ``out_dir`` exists and is not an empty directory, or a parameter has no HF
            counterpart in ``arch`` (on every rank).
        RuntimeError: writing failed on rank 0 (on the other ranks; rank 0 raises the error itself).
    """
    from megatron.core import parallel_state

    model = _unwrap(model)
    out_dir = Path(out_dir)
    try:  # every rank checks its stage's parameters, rank 0 the directory; all raise if one fails
        recipes = [(name, param, _recipe(name, arch)) for name, param in _global_parameters(model)]
        problem = _out_dir_problem(out_dir) if dist.get_rank() == 0 else None
    except ValueError as error:
        problem = str(error)
    problem = first_problem_of_all_ranks(problem)
    if problem is not None:
        raise ValueError(problem)

    tp_rank, tp = _tp_layout()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    writer = tp_rank == 0 and parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
    stage_tensors: dict[str, torch.Tensor] = {}
    for name, param, recipe in recipes:
        if name == "output_layer.weight" and arch.tie_word_embeddings:
            continue  # the last stage's copy of the embedding (PP > 1)
        pieces = [param.detach()]
        if _is_tp_sharded(param, tp):
            pieces = [torch.empty_like(param) for _ in range(tp)]
            dist.all_gather(pieces, param.detach().contiguous(), group=tp_group)
        if writer:
            full = _unshard(pieces, param, tp)
            for hf_name, tensor in _to_hf(recipe, full, arch).items():
                # Own storage per tensor: safetensors refuses tensors sharing memory.
                stage_tensors[hf_name] = tensor.to("cpu", dtype or tensor.dtype).clone(
                    memory_format=torch.contiguous_format)
    gathered: Optional[list[Any]] = None
    if writer:
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        gathered = [None] * dist.get_world_size(pp_group) if dist.get_rank() == 0 else None
        dist.gather_object(stage_tensors, gathered, dst=0, group=pp_group)
    on_rank0(lambda: _write_hf_dir({name: tensor for stage in gathered for name, tensor in stage.items()}, arch,
                                   out_dir, tokenizer, hf_config_fields), "export_hf_weights")


def _out_dir_problem(out_dir: Path) -> Optional[str]:
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        return f"out_dir {out_dir} already exists and is not an empty directory: export to a new directory"
    return None


def _write_hf_dir(
    tensors: dict[str, torch.Tensor],
    arch: GPTArchitecture,
    out_dir: Path,
    tokenizer: Any,
    hf_config_fields: Optional[Mapping[str, Any]],
) -> None:
    """Check ``tensors`` against ``arch`` and write the HF directory atomically (staging + rename)."""
    from safetensors.torch import save_file

    expected = hf_tensor_shapes(arch)
    if set(tensors) != set(expected):
        raise RuntimeError(
            f"gathered tensors differ from the architecture's: missing {sorted(set(expected) - set(tensors))}, "
            f"extra {sorted(set(tensors) - set(expected))}"
        )
    dtype = tensors["model.embed_tokens.weight"].dtype
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        save_file({name: tensors[name] for name in expected}, str(staging / SAFETENSORS_FILE),
                  metadata={"format": "pt"})
        arch.to_hf_config(dtype=dtype, **dict(hf_config_fields or {})).save_pretrained(str(staging))
        _add_legacy_rope_keys(staging / "config.json", arch)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _add_legacy_rope_keys(config_json: Path, arch: GPTArchitecture) -> None:
    """Add ``rope_theta`` and ``rope_scaling`` (transformers 4's keys) next to ``rope_parameters``."""
    config = json.loads(config_json.read_text())
    rope = arch.hf_rope_parameters()
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = None if arch.rope_type == "default" else rope
    config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
