"""Megatron-Core's parallel state on the selected platform: the process group, the local device, the
tensor / pipeline / context / data-parallel groups and the seeds."""

from __future__ import annotations

import os
from datetime import timedelta
from math import ceil
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from megatron_mopd.platform.devices import Platform, repatch_mindspeed, select_platform, use_device

__all__ = ["destroy_parallel", "initialize_parallel"]

_owns_process_group = False


def initialize_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    *,
    device: Optional[str] = None,
    seed: int = 1234,
    timeout_s: float = 600.0,
    mindspeed_args: Optional[Mapping[str, Any]] = None,
) -> Platform:
    """Initialize torch.distributed (if needed), the local device and Megatron's parallel groups.

    The process group comes from the torchrun environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``); without it, a single-process group (world size 1) is created. An existing
    process group is used as is. On the CPU, CPU mode is enabled. On NPU, MindSpeed's adaptor is
    imported before Megatron (refused when Megatron came first), the device is ``LOCAL_RANK``'s, the
    back-end HCCL, and MindSpeed's ``repatch`` receives the parallel sizes and ``mindspeed_args``
    before Megatron's groups are created. Finally the seeds are set: ``torch.manual_seed(seed)`` and
    Megatron's ``model_parallel_cuda_manual_seed(seed)``.

    Args:
        tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size: Megatron's
            parallel sizes; the data-parallel size is what remains of the world size.
        device: passed to ``select_platform``.
        seed: the random seed.
        timeout_s: the collective timeout of the process groups.
        mindspeed_args: NPU only: more of the run's settings under Megatron-LM's argument names
            (``sequence_parallel``, ``bf16``, ``params_dtype``, ...) for MindSpeed's ``repatch``; the
            three parallel sizes are added from the arguments above.

    Returns:
        The selected platform.

    Raises:
        ValueError: a size is below 1, or the world size is not divisible by tp * pp * cp.
        RuntimeError: on NPU, MindSpeed or torch_npu is missing, or Megatron was imported before
            MindSpeed's adaptor.
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
    use_device(platform)

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
    if platform.device_type == "npu":
        repatch_mindspeed({**(mindspeed_args or {}), **sizes})

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
