"""Device and communication back-end selection.

Three platforms (docs/design.md §6): CUDA with NCCL (production), Ascend NPU with HCCL through MindSpeed,
and CPU with gloo (tests, CI, demo; Megatron-Core runs there in CPU mode, see ``cpu_mode``).

NPU: ``import mindspeed.megatron_adaptor`` must run right after ``import torch`` and before anything
imports ``megatron``, because MindSpeed patches Megatron-Core at import time. Entry points that may
run on NPU should therefore start with::

    import torch
    import mindspeed.megatron_adaptor  # NPU only

``initialize_parallel(device="npu")`` (``distributed.py``) imports it too when it is installed
(``import_mindspeed_adaptor``), and refuses when Megatron was imported before it. When the configuration does not come from Megatron-LM's command line,
MindSpeed additionally needs ``repatch(...)`` with the model's settings.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_mopd.platform.cpu_mode import enable_cpu_mode

__all__ = ["Platform", "import_mindspeed_adaptor", "select_platform", "use_device"]

DEVICE_ENV = "MOPD_DEVICE"
_BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


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


def import_mindspeed_adaptor() -> None:
    """Import MindSpeed's Megatron adaptor if installed; it must precede every Megatron import."""
    if importlib.util.find_spec("mindspeed") is None:
        return
    if "mindspeed.megatron_adaptor" not in sys.modules and "megatron.core" in sys.modules:
        raise RuntimeError(
            "Megatron-Core was imported before mindspeed.megatron_adaptor; on NPU put "
            "`import mindspeed.megatron_adaptor` right after `import torch` in the entry point"
        )
    importlib.import_module("mindspeed.megatron_adaptor")  # patches Megatron-Core at import


def use_device(platform: Platform) -> None:
    """Make ``platform``'s device this process's current one: on NPU after MindSpeed's adaptor and
    ``torch_npu``; on the CPU, CPU mode."""
    if platform.device_type == "npu":
        import_mindspeed_adaptor()
        importlib.import_module("torch_npu")  # registers torch.npu
        torch.npu.set_device(platform.device)
    elif platform.device_type == "cuda":
        torch.cuda.set_device(platform.device)
    else:
        enable_cpu_mode()
