"""CPU mode: run Megatron-Core (GPTModel, DDP, optimizer, pipeline schedules) on CPU with gloo.

Megatron-Core assumes CUDA in a few places that a CPU run reaches. ``enable_cpu_mode()`` redirects
exactly those, for the rest of the process:

- tensor factories asked for a CUDA device (``device="cuda"``, ``torch.device("cuda", i)`` or an
  integer index) allocate on the CPU, and ``Tensor.cuda()`` returns the tensor itself; a
  ``TorchFunctionMode`` does both on the thread that enables CPU mode (the one that builds and
  trains the model);
- ``torch.cuda.current_device`` answers 0 (which the mode then maps to the CPU);
- ``torch.cuda.synchronize`` does nothing (CPU work is synchronous);
- glibc keeps freed blocks up to 32 MiB for reuse instead of returning them to the kernel, the CPU
  counterpart of CUDA's caching allocator (chunk-sized temporaries are otherwise page-faulted in
  again on every allocation);
- the "CUDA" random-number generator is the CPU default generator: ``torch.cuda.get_rng_state``,
  ``set_rng_state`` and ``manual_seed`` and Megatron's ``_get_cuda_rng_state`` /
  ``_set_cuda_rng_state`` read, write and seed it. Megatron's RNG tracker therefore keeps one CPU
  generator state per tracked name, and ``model_parallel_cuda_manual_seed(seed)`` gives each
  tensor-parallel rank its own reproducible stream (seed + 2718 + tp_rank) inside
  ``get_cuda_rng_tracker().fork()``, while the default stream (seed) is shared by the TP group.
  Because the tracker's stream *is* the CPU stream here, the tracker's warning "CPU RNG state
  changed within GPU RNG context" would fire on every random op inside fork(); it is filtered out;
- Megatron's inference helpers (``megatron.core.inference.communication_utils``:
  ``broadcast_from_last_pipeline_stage``, ``broadcast_tensor``) assert that the tensor they send is a
  CUDA tensor; the check accepts a CPU tensor instead (it still refuses None). The rollout engine
  broadcasts the sampled ids from the last pipeline stage with it at PP>1.

Still CUDA-only in Megatron-Core 0.16 (not redirected; configure around them on CPU):

- gradient clipping: ``OptimizerConfig.clip_grad`` must be 0 (``clip_grad_by_total_norm_fp32``
  asserts ``torch.cuda.FloatTensor`` grads); ``optimizer.step()`` still returns the grad norm;
- the fp16/bf16 optimizer and the distributed optimizer (both check ``torch.cuda.*Tensor`` types):
  use fp32 parameters and ``use_distributed_optimizer=False``;
- ``gradient_accumulation_fusion`` (an Apex CUDA extension), ``apply_rope_fusion`` and Transformer
  Engine. (Without Apex, the local spec's torch norm also refuses ``sequence_parallel`` and
  ``persist_layer_norm``, on any device.)

Production (CUDA, NPU) never calls this: ``enable_cpu_mode`` refuses to run where an accelerator is
available, and nothing here is active unless it was called.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Any, Callable, Optional, Sequence

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["enable_cpu_mode", "cpu_mode_enabled"]

_CPU = torch.device("cpu")
_FORK_RNG_WARNING = "CPU RNG state changed within GPU RNG context"

_mode: Optional["_CudaToCpuMode"] = None

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def _is_cuda_device(device: Any) -> bool:
    """True for what Megatron passes to mean "the current GPU": "cuda[:i]", a CUDA device, an index."""
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA devices in torch calls to the CPU (see the module docstring)."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Optional[dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        # LanguageModule.setup_embeddings_and_output_layer moves the shared embedding with .cuda().
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            # Schedules, p2p, DDP buffers, optimizer, attention, layers: device="cuda"/current_device().
            kwargs = {**kwargs, "device": _CPU}
        return func(*args, **kwargs)


class _DropForkRngWarning(logging.Filter):
    """Drops the tracker's fork() warning, which is expected when the CUDA stream is the CPU one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _FORK_RNG_WARNING not in record.getMessage()


def _get_cpu_rng_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def _check_tensor_present(tensor: Optional[torch.Tensor]) -> None:
    """communication_utils._is_cuda without the device check (a CPU tensor is what CPU mode sends)."""
    assert tensor is not None


def _seed_cpu_rng(seed: int) -> None:
    torch.default_generator.manual_seed(seed)


def _available_accelerator() -> Optional[str]:
    if torch.cuda.is_available():
        return "cuda"
    npu = getattr(torch, "npu", None)  # registered by torch_npu
    if npu is not None and npu.is_available():
        return "npu"
    return None


def _keep_freed_memory_for_reuse() -> None:
    """Make glibc keep freed blocks up to 32 MiB for reuse, as CUDA's caching allocator does.

    PyTorch's CPU allocator is plain malloc; by default glibc gives chunk-sized temporaries (the
    losses' per-chunk work) back to the kernel on free and page-faults them in again on the next
    allocation, which cost more than the arithmetic in measurements (tools/bench_losses.py).
    No effect where the C library has no ``mallopt`` (non-glibc).
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # blocks up to 32 MiB come from the reusable heap
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)  # keep up to 1 GiB of freed heap instead of trimming it


def cpu_mode_enabled() -> bool:
    """Whether ``enable_cpu_mode()`` has been called in this process."""
    return _mode is not None


def enable_cpu_mode() -> None:
    """Redirect Megatron-Core's CUDA assumptions to the CPU for the rest of this process.

    Idempotent. Call it on the thread that builds and trains the model, before building it.

    Raises:
        RuntimeError: an accelerator (CUDA or NPU) is available; CPU mode is for CPU-only hosts.
    """
    global _mode
    if _mode is not None:
        return
    accelerator = _available_accelerator()
    if accelerator is not None:
        raise RuntimeError(
            f"enable_cpu_mode(): a {accelerator} device is available; CPU mode only runs on CPU-only "
            "hosts and must never be enabled for CUDA/NPU training"
        )
    from megatron.core.inference import communication_utils as mcore_inference_communication
    from megatron.core.tensor_parallel import random as mcore_random

    # p2p_communication, layers, mappings, attention, rotary embedding: device=current_device().
    torch.cuda.current_device = lambda: 0
    # p2p_communication after every batch_isend_irecv (pipeline schedules).
    torch.cuda.synchronize = lambda device=None: None
    # CudaRNGStatesTracker.add reads the state, then seeds the per-TP-rank stream (else a no-op).
    torch.cuda.get_rng_state = _get_cpu_rng_state
    torch.cuda.manual_seed = _seed_cpu_rng
    # The rerun state machine restores the state with it (else a silent no-op).
    torch.cuda.set_rng_state = _set_cpu_rng_state
    # CudaRNGStatesTracker.add/fork and activation recomputation swap the tracker's states.
    mcore_random._get_cuda_rng_state = _get_cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state
    # CudaRNGStatesTracker.fork warns whenever the CPU stream moves, i.e. on every fork here.
    logging.getLogger(mcore_random.__name__).addFilter(_DropForkRngWarning())
    # broadcast_from_last_pipeline_stage / broadcast_tensor assert tensor.is_cuda (rollout engine, PP>1).
    mcore_inference_communication._is_cuda = _check_tensor_present

    _keep_freed_memory_for_reuse()

    mode = _CudaToCpuMode()
    mode.__enter__()  # stays on this thread's torch-function mode stack for the process lifetime
    _mode = mode
