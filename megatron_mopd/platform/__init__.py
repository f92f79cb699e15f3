"""Where the code runs: the device and back-end (CUDA/NCCL, Ascend NPU/HCCL through MindSpeed, CPU/gloo),
CPU mode (Megatron-Core on the CPU), and Megatron's parallel state on them.

The vocab-parallel math lives in ``megatron_mopd.parallel``; nothing there depends on the platform.
"""

from megatron_mopd.platform.cpu_mode import cpu_mode_enabled, enable_cpu_mode
from megatron_mopd.platform.devices import Platform, prepare_platform, select_platform
from megatron_mopd.platform.distributed import destroy_parallel, initialize_parallel

__all__ = [
    "Platform",
    "cpu_mode_enabled",
    "destroy_parallel",
    "enable_cpu_mode",
    "initialize_parallel",
    "prepare_platform",
    "select_platform",
]
