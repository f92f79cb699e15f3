"""Device / communication back-end selection and Megatron-Core parallel initialization.

Three platforms (docs/design.md §6): CUDA with NCCL (production), Ascend NPU with HCCL through MindSpeed,
and CPU with gloo (tests, CI, demo; Megatron-Core runs there in CPU mode, see ``cpu_mode``).

NPU: ``import mindspeed.megatron_adaptor`` must run right after ``import torch`` and before anything
imports ``megatron``, because MindSpeed patches Megatron-Core at import time. Entry points that may
run on NPU should therefore start with::

    import torch
    import mindspeed.megatron_adaptor  # NPU only

``initialize_parallel(device="npu")`` imports it too when it is installed, and refuses when Megatron
was imported before it. When the configuration does not come from Megatron-LM's command line,
MindSpeed additionally needs ``repatch(...)`` with the model's settings.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from math import ceil
from typing import Optional

import torch
import torch.distributed as dist

from megatron_mopd.parallel.cpu_mode import enable_cpu_mode

__all__ = ["Platform", "select_platform", "initialize_parallel", "destroy_parallel"]

DEVICE_ENV = "MOPD_DEVICE"
_BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}

_owns_process_group = False


@dataclass(frozen=True)
class Platform:
    """Where this process computes and how its ranks communicate.

    Attributes:
        device_type: "cuda", "npu" or "cpu".
        backend: the torch.distributed back-end: "nccl", "hccl" or "gloo".
    """

    device_type: str
    backend: str

    @property
    def device(self) -> torch.device:
        """The torch.device of this local rank (``LOCAL_RANK``, default 0); the CPU has no index."""
        if self.device_type == "cpu":
            return torch.device("cpu")
        return torch.device(self.device_type, int(os.environ.get("LOCAL_RANK", "0")))


def _npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    importlib.import_module("torch_npu")  # registers torch.npu
    return torch.npu.is_available()


def select_platform(device: Optional[str] = None) -> Platform:
    """The platform for ``device``; else for env ``MOPD_DEVICE``; else the best available one.

    Auto-selection order: CUDA if available, NPU if ``torch_npu`` is installed and a device is
    available, else the CPU.

    Raises:
        ValueError: ``device`` (or ``MOPD_DEVICE``) is not one of "cuda", "npu", "cpu".
    """
    name = device if device is not None else os.environ.get(DEVICE_ENV)
    if name is None:
        if torch.cuda.is_available():
            name = "cuda"
        elif _npu_available():
            name = "npu"
        else:
            name = "cpu"
    name = name.strip().lower()
    if name not in _BACKENDS:
        source = "device" if device is not None else DEVICE_ENV
        raise ValueError(f"{source}={name!r}: expected one of {sorted(_BACKENDS)}")
    return Platform(device_type=name, backend=_BACKENDS[name])


def _import_mindspeed_adaptor() -> None:
    """Import MindSpeed's Megatron adaptor if installed; it must precede every Megatron import."""
    if importlib.util.find_spec("mindspeed") is None:
        return
    if "mindspeed.megatron_adaptor" not in sys.modules and "megatron.core" in sys.modules:
        raise RuntimeError(
            "Megatron-Core was imported before mindspeed.megatron_adaptor; on NPU put "
            "`import mindspeed.megatron_adaptor` right after `import torch` in the entry point"
        )
    importlib.import_module("mindspeed.megatron_adaptor")  # patches Megatron-Core at import


def initialize_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    *,
    device: Optional[str] = None,
    seed: int = 1234,
    timeout_s: float = 600.0,
) -> Platform:
    """Initialize torch.distributed (if needed), the local device and Megatron's parallel groups.

    The process group comes from the torchrun environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``); without it, a single-process group (world size 1) is created. An existing
    process group is used as is. On the CPU, CPU mode is enabled. Finally the seeds are set:
    ``torch.manual_seed(seed)`` and Megatron's ``model_parallel_cuda_manual_seed(seed)``.

    Args:
        tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size: Megatron's
            parallel sizes; the data-parallel size is what remains of the world size.
        device: passed to ``select_platform``.
        seed: the random seed.
        timeout_s: the collective timeout of the process groups.

    Returns:
        The selected platform.

    Raises:
        ValueError: a size is below 1, or the world size is not divisible by tp * pp * cp.
    """
    sizes = {
        "tensor_model_parallel_size": tensor_model_parallel_size,
        "pipeline_model_parallel_size": pipeline_model_parallel_size,
        "context_parallel_size": context_parallel_size,
    }
    for name, size in sizes.items():
        if size < 1:
            raise ValueError(f"{name}={size}: must be at least 1")
    if dist.is_initialized():
        world_size = dist.get_world_size()
    else:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size * "
            f"pipeline_model_parallel_size * context_parallel_size = {model_parallel}"
        )

    platform = select_platform(device)
    if platform.device_type == "npu":
        _import_mindspeed_adaptor()
        importlib.import_module("torch_npu")  # registers torch.npu
        torch.npu.set_device(platform.device)
    elif platform.device_type == "cuda":
        torch.cuda.set_device(platform.device)
    else:
        enable_cpu_mode()

    global _owns_process_group
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(platform.backend, timeout=timeout)
        else:
            dist.init_process_group(
                platform.backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
        _owns_process_group = True

    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        distributed_timeout_minutes=max(1, ceil(timeout_s / 60)),
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return platform


def destroy_parallel() -> None:
    """Undo ``initialize_parallel``: Megatron's groups, and the process group if it created it."""
    global _owns_process_group
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if _owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
    _owns_process_group = False
