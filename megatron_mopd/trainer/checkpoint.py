"""Training checkpoints: atomic, resumable exactly, loadable at another tensor/pipeline layout.

    path = save_checkpoint(output_dir, step, model, optimizer, scheduler, state, keep_last=3)
    path = latest_checkpoint(output_dir)          # None when there is none yet
    step, state = load_checkpoint(path, model, optimizer, scheduler)

Layout on disk::

    output_dir/checkpoints/
        latest                      text: the step of the newest complete checkpoint
        step_0000100/
            metadata.json, .metadata, common.pt, __*_*.distcp
                                    Megatron distributed checkpoint (torch_dist) of
                                    {"model": ..., "optimizer": ...}  ("model0", "model1", ... with
                                    several model chunks), sharded by global tensor name
            rng/rank_00000.pt ...   per-rank random-number-generator states
            trainer_state.pt        step, scheduler, the trainer's state, the parallel layout;
                                    written last: a directory without it is not a checkpoint
        step_0000100.tmp/           staging directory of a save in progress (or of a killed one)

Atomicity: a save writes everything into the staging directory, all ranks synchronize, then global
rank 0 renames it to its final name, rewrites ``latest`` (``files.atomic_write_text``: temporary file,
fsync, rename) and only then deletes checkpoints beyond ``keep_last``. A save killed at any point therefore leaves the
previous ``latest`` naming a complete checkpoint; the next save removes the leftover staging
directory. ``latest_checkpoint`` also survives a missing or corrupt ``latest`` by falling back to the
newest complete checkpoint.

Resharding: the model and optimizer state are saved by global tensor name (Megatron's
``sharded_state_dict``), so a checkpoint written at one tensor/pipeline/data-parallel layout loads at
another. The random-number-generator states are per rank; they are restored only when the layout is
unchanged (otherwise the streams restart from the seeds given at initialization, with a warning).

Saving uses Megatron's synchronous ``torch_dist`` writer, which starts worker processes (and a
``spawn`` manager process that re-imports the main module): call it from a process that may have
children (not a daemonic ``multiprocessing`` process), and guard entry scripts with
``if __name__ == "__main__":``. Asynchronous saving and the fully parallel save/load wrappers of
Megatron-Core assume CUDA and are not used here. ``output_dir`` must be one filesystem shared by all
ranks (rank 0 publishes what every rank wrote).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist

from megatron_mopd.parallel.collectives import on_rank0
from megatron_mopd.trainer.files import atomic_write_text

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint"]

logger = logging.getLogger(__name__)

CHECKPOINTS_SUBDIR = "checkpoints"
LATEST_FILE = "latest"
TRAINER_STATE_FILE = "trainer_state.pt"
RNG_SUBDIR = "rng"
STAGING_SUFFIX = ".tmp"
DELETING_SUFFIX = ".deleting"
FORMAT_VERSION = 1

_STEP_DIR = re.compile(r"step_(\d{7,})")
_LEFTOVER_DIR = re.compile(r"step_\d{7,}(?:\.tmp|\.deleting)")  # STAGING_SUFFIX, DELETING_SUFFIX
_DIST_CHECKPOINT_MARKER = "metadata.json"  # written by Megatron's save once all shards are written

# How the model and optimizer build their sharded state dicts (stored with the checkpoint, read back
# on load). The distributed optimizer's "fully_reshardable" format loads at another TP/PP/DP layout
# (Megatron-Core 0.16's default, "fully_sharded_model_space", is rejected by the torch_dist writer);
# the other two are Megatron-LM's settings for current checkpoints.
_SHARDED_STATE_DICT_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}

PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def save_checkpoint(
    output_dir: PathLike,
    step: int,
    model: Sequence[torch.nn.Module],
    optimizer: "MegatronOptimizer",
    scheduler: Optional["OptimizerParamScheduler"],
    state: dict[str, Any],
    *,
    keep_last: int,
) -> Path:
    """Save the training state of ``step`` atomically; keep the ``keep_last`` newest checkpoints.

    Collective: every rank calls it with the same ``step``, after Megatron's parallel state is
    initialized. What is saved:

    - the model chunks (Megatron DDP-wrapped or bare ``GPTModel``) and the Megatron optimizer, as one
      Megatron distributed checkpoint (sharded by global tensor name);
    - ``step``, ``scheduler.state_dict()``, ``state`` (as given on global rank 0: the trainer's data
      cursor, counters, configuration...; picklable) and the parallel layout, in ``trainer_state.pt``;
    - each rank's random-number-generator states (python, numpy, torch CPU, the accelerator's, and
      Megatron's tensor-parallel tracker).

    Before the first optimizer step the optimizer's state is created as the optimizer would create it
    (zero moments, step 0), so that such a checkpoint loads too; training continues identically.

    Args:
        output_dir: the run's output directory; checkpoints go to ``output_dir/checkpoints``.
        step: the training step just completed (``>= 0``); names the checkpoint.
        model: this rank's model chunks.
        optimizer: the optimizer from ``megatron.core.optimizer.get_megatron_optimizer``.
        scheduler: the learning-rate / weight-decay scheduler, or None.
        state: picklable trainer state, returned as is by ``load_checkpoint``.
        keep_last: how many checkpoints to keep (``>= 1``); older ones are deleted, oldest first, never
            the one ``latest`` names.

    Returns:
        The checkpoint's directory, ``output_dir/checkpoints/step_XXXXXXX``.

    Raises:
        ValueError: ``step`` is negative or ``keep_last`` is below 1 (on every rank, before any I/O).
        RuntimeError: ``torch.distributed`` is not initialized, or global rank 0 failed to prepare or
            publish the checkpoint (then the previous ``latest`` still stands).
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r}: expected a non-negative int")
    if not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last={keep_last!r}: expected an int >= 1 (the number of checkpoints to keep)")
    _require_distributed("save_checkpoint")
    from megatron.core import dist_checkpointing

    root = Path(output_dir) / CHECKPOINTS_SUBDIR
    final = root / _step_dir_name(step)
    staging = final.with_name(final.name + STAGING_SUFFIX)
    rank = dist.get_rank()

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root)
        staging.mkdir()

    on_rank0(prepare, f"preparing {staging}")

    _materialize_optimizer_state(optimizer)
    metadata = dict(_SHARDED_STATE_DICT_METADATA)
    sharded_state_dict = _model_and_optimizer_sharded_state_dict(model, optimizer, metadata, is_loading=False)
    # Synchronous save; ends with a barrier after rank 0 wrote metadata.json.
    dist_checkpointing.save(sharded_state_dict, str(staging), content_metadata=dict(metadata))

    rng_dir = staging / RNG_SUBDIR
    rng_dir.mkdir(exist_ok=True)
    _write_durably(rng_dir / _rng_file_name(rank), _rng_states())
    dist.barrier()  # every rank's files are written

    trainer_state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "state": state,
        "layout": _parallel_layout(),
        "model_chunks": len(model),
        "sharded_state_dict_metadata": metadata,
    }

    def publish() -> None:
        _write_durably(staging / TRAINER_STATE_FILE, trainer_state)  # the completeness marker, last
        _fsync_dir(staging)
        replaced = final.with_name(final.name + DELETING_SUFFIX)
        if final.exists():  # saving a step again: swap the directories, then drop the old one
            os.rename(final, replaced)
        os.rename(staging, final)
        _fsync_dir(root)
        _write_latest(root, step)
        if replaced.exists():
            shutil.rmtree(replaced)
        _prune(root, keep_last, keep=final)

    on_rank0(publish, f"publishing {final}")
    return final


def latest_checkpoint(output_dir: PathLike) -> Optional[Path]:
    """The newest complete checkpoint under ``output_dir/checkpoints``, or None if there is none.

    Reads ``latest``. When it is missing, unreadable, or names a directory that is not a complete
    checkpoint while complete ones exist, falls back to the complete one with the highest step and
    logs a warning. Staging directories (``*.tmp``: saves in progress or killed) are never returned.
    Not collective (reads the filesystem only).
    """
    root = Path(output_dir) / CHECKPOINTS_SUBDIR
    complete = _complete_checkpoints(root)
    latest_file = root / LATEST_FILE
    problem: Optional[str] = None
    try:
        text = latest_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        problem = "is missing"
    except OSError as exc:
        problem = f"cannot be read ({exc})"
    else:
        try:
            step = int(text.strip())
            if step < 0:
                raise ValueError
        except ValueError:
            problem = f"does not hold a step (it holds {text[:40]!r})"
        else:
            candidate = root / _step_dir_name(step)
            if _is_complete(candidate):
                return candidate
            problem = f"names step {step}, but {candidate} is not a complete checkpoint"
    if not complete:
        if problem != "is missing":
            logger.warning("%s %s and there is no complete checkpoint under %s", latest_file, problem, root)
        return None
    fallback = complete[-1][1]
    logger.warning("%s %s; using the newest complete checkpoint %s", latest_file, problem, fallback)
    return fallback


def load_checkpoint(
    path: PathLike,
    model: Sequence[torch.nn.Module],
    optimizer: "MegatronOptimizer",
    scheduler: Optional["OptimizerParamScheduler"],
) -> tuple[int, dict[str, Any]]:
    """Load a checkpoint written by ``save_checkpoint`` into this rank's model, optimizer, scheduler.

    Collective. The tensor/pipeline/data-parallel layout may differ from the saved one: tensors are
    resharded by global name. The random-number-generator states are restored only when the layout
    (tp, pp, cp, dp, world size) is the saved one; otherwise a warning says that the streams restart.

    Args:
        path: a checkpoint directory, e.g. ``latest_checkpoint(output_dir)``.
        model: this rank's model chunks, built for the current layout.
        optimizer: the Megatron optimizer over ``model``.
        scheduler: the scheduler to restore, or None (then the saved one is ignored).

    Returns:
        ``(step, state)``: the saved step and the trainer state given to ``save_checkpoint``.

    Raises:
        ValueError: ``path`` is not a complete checkpoint (checked before anything is modified).
        RuntimeError: ``torch.distributed`` is not initialized.
    """
    path = Path(path)
    if not _is_complete(path):
        raise ValueError(
            f"{path} is not a checkpoint written by save_checkpoint (expected a directory with "
            f"{TRAINER_STATE_FILE} and Megatron's {_DIST_CHECKPOINT_MARKER}); "
            "latest_checkpoint(output_dir) finds the newest one"
        )
    _require_distributed("load_checkpoint")
    from megatron.core import dist_checkpointing

    trainer_state = _read(path / TRAINER_STATE_FILE)
    saved_chunks = trainer_state.get("model_chunks", 1)
    if saved_chunks != len(model):
        logger.warning(
            "%s was saved with %d model chunk(s), loading into %d: tensors are matched by global name",
            path, saved_chunks, len(model),
        )

    # A complete optimizer state (zero moments and step 0 where none exists yet) before Megatron builds
    # the loading dict: it adds moments without ``step``, which the next optimizer step would trip on
    # if this load failed half-way.
    _materialize_optimizer_state(optimizer)
    metadata = dict(trainer_state.get("sharded_state_dict_metadata", _SHARDED_STATE_DICT_METADATA))
    sharded_state_dict = _model_and_optimizer_sharded_state_dict(model, optimizer, metadata, is_loading=True)
    loaded = dist_checkpointing.load(sharded_state_dict, str(path))

    for key, chunk in zip(_model_keys(len(model)), model):
        chunk.load_state_dict(loaded[key])
    _add_missing_zero_steps(loaded["optimizer"])
    optimizer.load_state_dict(loaded["optimizer"])

    if scheduler is not None:
        if trainer_state["scheduler"] is None:
            logger.warning("%s has no scheduler state; the scheduler keeps its current state", path)
        else:
            scheduler.load_state_dict(trainer_state["scheduler"])

    _restore_rng_states(path, trainer_state["layout"])
    return trainer_state["step"], trainer_state["state"]


# ---------------------------------------------------------------------------------------------------
# Model and optimizer state
# ---------------------------------------------------------------------------------------------------


def _model_keys(num_chunks: int) -> list[str]:
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def _model_and_optimizer_sharded_state_dict(
    model: Sequence[torch.nn.Module],
    optimizer: "MegatronOptimizer",
    metadata: dict[str, Any],
    is_loading: bool,
) -> dict[str, Any]:
    """``{"model"|"model0"...: ..., "optimizer": ...}`` as Megatron-LM builds it for ``torch_dist``.

    ``metadata`` is the serializable part; the data-parallel group is added to a copy (Megatron's
    modules require it and would otherwise add it to the dict in place).
    """
    from megatron.core import parallel_state
    from megatron.core.utils import unwrap_model

    dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    runtime_metadata = {**metadata, "dp_cp_group": dp_cp_group}
    # Unwrapped (no DDP / Float16Module prefix): the checkpoint's names do not depend on the wrapper.
    sharded = {
        key: chunk.sharded_state_dict(metadata=runtime_metadata)
        for key, chunk in zip(_model_keys(len(model)), unwrap_model(list(model)))
    }
    sharded["optimizer"] = optimizer.sharded_state_dict(
        sharded, is_loading=is_loading, metadata=runtime_metadata
    )
    return sharded


def _torch_optimizers(optimizer: "MegatronOptimizer") -> list[tuple[Any, torch.optim.Optimizer]]:
    """``(megatron_optimizer, torch_optimizer)`` for each non-stub optimizer inside ``optimizer``."""
    wrappers = getattr(optimizer, "chained_optimizers", None)
    if wrappers is None:
        wrappers = [optimizer]
    pairs = []
    for wrapper in wrappers:
        if getattr(wrapper, "is_stub_optimizer", False):
            continue
        inner = getattr(wrapper, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            pairs.append((wrapper, inner))
    return pairs


def _materialize_optimizer_state(optimizer: "MegatronOptimizer") -> None:
    """Create the state the optimizer would create lazily at its first step, where it is missing.

    Megatron's ``init_state_fn`` creates Adam's zero moments (what ``sharded_state_dict(is_loading=
    True)`` calls too) but not torch Adam's per-parameter ``step``; the step is added here, as
    ``torch.optim.Adam`` initializes it. Existing state is left alone, so this never changes training.
    """
    for wrapper, inner in _torch_optimizers(optimizer):
        init_state_fn = getattr(wrapper, "init_state_fn", None)
        if init_state_fn is not None:
            init_state_fn(inner, getattr(wrapper, "config", None))
        if not isinstance(inner, torch.optim.Adam):  # AdamW included; fused Adams keep the step elsewhere
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                param_state = inner.state[param]
                if param_state and "step" not in param_state:
                    param_state["step"] = _adam_initial_step(group, param)


def _add_missing_zero_steps(optimizer_state_dict: Any) -> None:
    """Give Adam states saved at step 0 their step back, in a loaded optimizer state dict.

    Megatron stores torch Adam's per-parameter step once, as ``state["common_step"]``, and only when
    it is non-zero; torch Adam refuses to load moments without a step. A checkpoint saved before the
    first optimizer step therefore gets ``common_step = 0`` here, which Megatron's ``load_state_dict``
    hands to every parameter. Optimizers that keep the step in their parameter groups are left alone.
    """
    if isinstance(optimizer_state_dict, dict):
        state, groups = optimizer_state_dict.get("state"), optimizer_state_dict.get("param_groups")
        if isinstance(state, dict) and isinstance(groups, list):
            per_param = [v for k, v in state.items() if isinstance(k, int) and isinstance(v, dict)]
            if (
                "common_step" not in state
                and any("exp_avg" in v and "step" not in v for v in per_param)
                and not any(isinstance(g, dict) and "step" in g for g in groups)
            ):
                state["common_step"] = torch.tensor(0.0)
            return
        for value in optimizer_state_dict.values():
            _add_missing_zero_steps(value)
    elif isinstance(optimizer_state_dict, (list, tuple)):
        for value in optimizer_state_dict:
            _add_missing_zero_steps(value)


def _adam_initial_step(group: dict[str, Any], param: torch.Tensor) -> torch.Tensor:
    """Step 0 as ``torch.optim.Adam`` creates it: on the parameter's device for capturable/fused."""
    if group.get("capturable") or group.get("fused"):
        return torch.zeros((), dtype=torch.float32, device=param.device)
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return torch.tensor(0.0, dtype=dtype, device="cpu")


# ---------------------------------------------------------------------------------------------------
# Layout and random-number generators
# ---------------------------------------------------------------------------------------------------


def _parallel_layout() -> dict[str, int]:
    from megatron.core import parallel_state

    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "cp": parallel_state.get_context_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
        "world_size": dist.get_world_size(),
    }


def _accelerator() -> Optional[tuple[str, Any]]:
    """``(name, module)`` of the accelerator whose generator to save: CUDA or Ascend NPU; None on CPU."""
    if torch.cuda.is_available():
        return "cuda", torch.cuda
    npu = getattr(torch, "npu", None)  # registered by torch_npu
    if npu is not None and npu.is_available():
        return "npu", npu
    return None


def _rng_states() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    accelerator = _accelerator()
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "accelerator": (accelerator[0], accelerator[1].get_rng_state()) if accelerator else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _restore_rng_states(path: Path, saved_layout: dict[str, int]) -> None:
    from megatron.core import tensor_parallel

    layout = _parallel_layout()
    rng_file = path / RNG_SUBDIR / _rng_file_name(dist.get_rank())
    if saved_layout != layout:
        _warn_rank0(
            f"{path} was saved at layout {saved_layout}, loading at {layout}: random-number generators "
            "are not restored; their streams restart from this run's seeds"
        )
        return
    if not rng_file.is_file():
        logger.warning("%s is missing: this rank's random-number generators are not restored", rng_file)
        return
    states = _read(rng_file)
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    accelerator, saved = _accelerator(), states["accelerator"]
    if saved is not None and accelerator is not None and saved[0] == accelerator[0]:
        accelerator[1].set_rng_state(saved[1])
    tensor_parallel.get_cuda_rng_tracker().set_states(states["tracker"])


def _warn_rank0(message: str) -> None:
    if dist.get_rank() == 0:
        logger.warning(message)


# ---------------------------------------------------------------------------------------------------
# Files and directories
# ---------------------------------------------------------------------------------------------------


def _step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _rng_file_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _is_complete(path: Path) -> bool:
    """A directory holding a finished save: the marker written last, and Megatron's metadata."""
    return (path / TRAINER_STATE_FILE).is_file() and (path / _DIST_CHECKPOINT_MARKER).is_file()


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of the complete checkpoints under ``root``, by increasing step."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match and entry.is_dir() and _is_complete(entry):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _remove_leftovers(root: Path) -> None:
    """Remove staging directories of killed saves and half-deleted old checkpoints."""
    for entry in root.iterdir():
        if _LEFTOVER_DIR.fullmatch(entry.name) and entry.is_dir():
            logger.warning("removing %s, left by an interrupted save", entry)
            shutil.rmtree(entry)


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    """Delete complete checkpoints beyond the ``keep_last`` newest, oldest first, never ``keep``."""
    checkpoints = _complete_checkpoints(root)
    for _, directory in checkpoints[: max(0, len(checkpoints) - keep_last)]:
        if directory == keep:
            continue
        # Renamed first: a deletion cut short leaves a leftover, never a half checkpoint by its name.
        doomed = directory.with_name(directory.name + DELETING_SUFFIX)
        os.rename(directory, doomed)
        shutil.rmtree(doomed)


def _write_latest(root: Path, step: int) -> None:
    atomic_write_text(root / LATEST_FILE, f"{step}\n")
    _fsync_dir(root)


def _write_durably(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _read(path: Path) -> Any:
    # Not weights_only: the files hold the trainer's own picklable objects (trusted: our checkpoints).
    return torch.load(path, map_location="cpu", weights_only=False)


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (where the OS supports syncing directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------
# Collectives
# ---------------------------------------------------------------------------------------------------


def _require_distributed(caller: str) -> None:
    if not dist.is_initialized():
        raise RuntimeError(
            f"{caller}: torch.distributed is not initialized; call "
            "megatron_mopd.platform.initialize_parallel(...) first"
        )
