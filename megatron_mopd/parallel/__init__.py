"""Platform selection, CPU mode and parallel initialization; vocab-parallel primitives."""

from megatron_mopd.parallel.cpu_mode import cpu_mode_enabled, enable_cpu_mode
from megatron_mopd.parallel.platform import (
    Platform,
    destroy_parallel,
    initialize_parallel,
    select_platform,
)

__all__ = [
    "Platform",
    "cpu_mode_enabled",
    "destroy_parallel",
    "enable_cpu_mode",
    "initialize_parallel",
    "select_platform",
]
