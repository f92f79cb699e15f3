"""Device and communication back-end selection.

Three platforms (docs/design.md §6): CUDA with NCCL (production), Ascend NPU with HCCL through MindSpeed,
and CPU with gloo (tests, CI, demo; Megatron-Core runs there in CPU mode, see ``cpu_mode``).

NPU (docs/npu.md): MindSpeed patches Megatron-Core, and through ``torch_npu.contrib.transfer_to_npu``
redirects ``torch.cuda`` to ``torch.npu``, when ``mindspeed.megatron_adaptor`` is imported; so that import
must come right after ``import torch`` and before anything imports ``megatron``.
``prepare_platform("npu")`` (the trainer's entry point) and ``initialize_parallel(device="npu")`` import
it (``import_mindspeed_adaptor``) and refuse when Megatron was imported before it. A script whose
configuration is Megatron-LM's command line starts with::

    import torch
    import mindspeed.megatron_adaptor

MindSpeed reads its settings from Megatron-LM's arguments; when the configuration comes from elsewhere
(``mopd train``'s YAML), ``repatch_mindspeed`` hands it the run's settings under those names.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from megatron_mopd.platform.cpu_mode import enable_cpu_mode

__all__ = [
    "Platform",
    "import_mindspeed_adaptor",
    "prepare_platform",
    "repatch_mindspeed",
    "select_platform",
    "use_device",
]

DEVICE_ENV = "MOPD_DEVICE"
MINDSPEED_ADAPTOR = "mindspeed.megatron_adaptor"
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

    Auto-selection order: NPU if ``torch_npu`` is installed and a device is available, then CUDA if
    available, else the CPU. NPU comes first because once MindSpeed's adaptor is imported,
    ``torch.cuda.is_available()`` answers for the NPU (``transfer_to_npu``).

    Raises:
        ValueError: ``device`` (or ``MOPD_DEVICE``) is not one of "cuda", "npu", "cpu".
    """
    name = device if device is not None else os.environ.get(DEVICE_ENV)
    if name is None:
        if _npu_available():
            name = "npu"
        elif torch.cuda.is_available():
            name = "cuda"
        else:
            name = "cpu"
    name = name.strip().lower()
    if name not in _BACKENDS:
        source = "device" if device is not None else DEVICE_ENV
        raise ValueError(f"{source}={name!r}: expected one of {sorted(_BACKENDS)}")
    return Platform(device_type=name, backend=_BACKENDS[name])


def _imported_megatron_modules() -> list[str]:
    """The ``megatron`` modules imported in this process so far (sorted; ``megatron_mopd`` is not one)."""
    return sorted(name for name in sys.modules if name == "megatron" or name.startswith("megatron."))


def import_mindspeed_adaptor() -> None:
    """Import ``torch_npu`` and MindSpeed's Megatron adaptor, unless the adaptor is imported already.

    MindSpeed parses ``sys.argv`` as Megatron-LM's command line when the adaptor is imported; the
    command line of this process is not (``mopd train --config FILE key=value``), so the adaptor is
    imported with ``sys.argv`` reduced to the program name (MindSpeed's defaults), and the run's
    settings follow with ``repatch_mindspeed``. An entry script that imported the adaptor itself
    (Megatron-LM's command line) keeps the settings it parsed.

    Raises:
        RuntimeError: ``torch_npu`` or MindSpeed is not installed; or a ``megatron`` module was
            imported before the adaptor (MindSpeed's patches would miss it). Both name the fix.
    """
    if MINDSPEED_ADAPTOR in sys.modules:
        return
    for package, what in (("torch_npu", "Ascend's PyTorch adapter"), ("mindspeed", "MindSpeed")):
        if importlib.util.find_spec(package) is None:
            raise RuntimeError(
                f"device npu needs {what} ({package}), which is not installed: install torch_npu, CANN and "
                "the MindSpeed branch matching megatron-core (docs/npu.md), or choose another device"
            )
    imported = _imported_megatron_modules()
    if imported:
        raise RuntimeError(
            f"Megatron was imported before mindspeed.megatron_adaptor ({', '.join(imported[:3])}"
            f"{', ...' if len(imported) > 3 else ''}); MindSpeed patches Megatron when its adaptor is "
            "imported. Fix: start the entry script with `import torch` and `import mindspeed.megatron_adaptor` "
            "before anything that imports megatron, or launch the trainer with `python -m megatron_mopd.train`"
        )
    importlib.import_module("torch_npu")  # registers torch.npu and the hccl back-end
    argv = sys.argv[:]
    del sys.argv[1:]
    try:
        importlib.import_module(MINDSPEED_ADAPTOR)
    finally:
        sys.argv[:] = argv


def repatch_mindspeed(megatron_args: Mapping[str, Any]) -> None:
    """Re-apply MindSpeed's patches for this run's settings: ``mindspeed.megatron_adaptor.repatch``.

    ``megatron_args`` maps Megatron-LM argument names (``tensor_model_parallel_size``,
    ``sequence_parallel``, ``bf16``, ``params_dtype``, ...) to this run's values. MindSpeed sets them
    on its argument namespace, then chooses its patches from it again; it also fills the fields a
    ``TransformerConfig`` is not given explicitly from that namespace. Needs the adaptor imported.
    """
    from mindspeed.megatron_adaptor import repatch

    repatch(dict(megatron_args))


def prepare_platform(device: Optional[str] = None) -> Platform:
    """``select_platform(device)``, made ready for Megatron's import: on NPU, MindSpeed's adaptor is
    imported (``import_mindspeed_adaptor``); nothing happens on the other platforms.

    Entry points call it before anything imports Megatron.

    Raises:
        ValueError: as ``select_platform``.
        RuntimeError: as ``import_mindspeed_adaptor``.
    """
    platform = select_platform(device)
    if platform.device_type == "npu":
        import_mindspeed_adaptor()
    return platform


def use_device(platform: Platform) -> None:
    """Make ``platform``'s device this process's current one: on NPU after MindSpeed's adaptor
    (``torch.npu.set_device(LOCAL_RANK)``); on the CPU, CPU mode."""
    if platform.device_type == "npu":
        import_mindspeed_adaptor()
        torch.npu.set_device(platform.device)
    elif platform.device_type == "cuda":
        torch.cuda.set_device(platform.device)
    else:
        enable_cpu_mode()
