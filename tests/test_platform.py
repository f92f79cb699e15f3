"""Specification: platform selection, CPU mode and parallel initialization.

- ``select_platform`` takes the explicit argument, else ``MOPD_DEVICE``, else the best available
  device (the CPU here), pairs each device with its back-end, and rejects unknown names.
- ``enable_cpu_mode`` refuses where CUDA is available; on the CPU it is idempotent and maps CUDA
  tensor factories to the CPU.
- ``initialize_parallel`` validates the layout; without a torchrun environment it creates a
  single-process group, which ``destroy_parallel`` removes again; on the CPU its seeding gives every
  tensor-parallel rank its own reproducible stream inside Megatron's RNG tracker (seed + 2718 +
  tp_rank, continuing across forks) while the default stream (seed) is shared.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megatron_mopd.platform import (
    Platform,
    cpu_mode_enabled,
    destroy_parallel,
    enable_cpu_mode,
    initialize_parallel,
    select_platform,
)
from megatron_mopd.testing import run_on_ranks

SEED = 1234


@pytest.fixture(autouse=True)
def no_device_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOPD_DEVICE", raising=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto-selection picks CUDA on this host")
def test_select_platform_defaults_to_cpu_and_gloo() -> None:
    platform = select_platform()
    assert platform == Platform(device_type="cpu", backend="gloo")
    assert platform.device == torch.device("cpu")


def test_select_platform_env_override_and_explicit_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOPD_DEVICE", "cuda")
    monkeypatch.setenv("LOCAL_RANK", "3")
    platform = select_platform()
    assert platform == Platform(device_type="cuda", backend="nccl")
    assert platform.device == torch.device("cuda", 3)
    assert select_platform("npu") == Platform(device_type="npu", backend="hccl")
    assert select_platform("cpu") == Platform(device_type="cpu", backend="gloo")


def test_select_platform_rejects_unknown_names(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"device='tpu'.*\['cpu', 'cuda', 'npu'\]"):
        select_platform("tpu")
    monkeypatch.setenv("MOPD_DEVICE", "gpu")
    with pytest.raises(ValueError, match="MOPD_DEVICE='gpu'"):
        select_platform()


def test_initialize_parallel_rejects_a_layout_that_does_not_divide_the_world() -> None:
    with pytest.raises(ValueError, match="world size 1 is not divisible by .* = 2"):
        initialize_parallel(tensor_model_parallel_size=2)
    with pytest.raises(ValueError, match="context_parallel_size=0"):
        initialize_parallel(context_parallel_size=0)


def test_initialize_parallel_without_torchrun_environment_runs_a_single_process() -> None:
    script = """
import torch.distributed as dist
from megatron.core import parallel_state
from megatron_mopd.platform import Platform, cpu_mode_enabled, destroy_parallel, initialize_parallel

assert initialize_parallel(device="cpu") == Platform("cpu", "gloo") and cpu_mode_enabled()
assert dist.get_world_size() == 1 and parallel_state.get_data_parallel_world_size() == 1
destroy_parallel()
assert not dist.is_initialized() and not parallel_state.model_parallel_is_initialized()
"""
    torchrun_vars = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in torchrun_vars}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_enable_cpu_mode_refuses_when_cuda_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    if cpu_mode_enabled():
        pytest.skip("CPU mode is already enabled in this process")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="cuda device is available"):
        enable_cpu_mode()
    assert not cpu_mode_enabled()


def rng_streams() -> dict[str, object]:
    """On one rank of a TP=2 run: CPU-mode state and draws from the default and the TP streams."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    initialize_parallel(tensor_model_parallel_size=2, device="cpu", seed=SEED)
    try:
        enable_cpu_mode()  # a second call is a no-op
        with get_cuda_rng_tracker().fork():
            first = torch.rand(4)
        default = torch.rand(4)
        with get_cuda_rng_tracker().fork():
            second = torch.rand(4)
        return {
            "enabled": cpu_mode_enabled(),
            "cuda_factory_device": torch.zeros(1, device="cuda").device,
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "default": default,
            "tp_stream": torch.cat([first, second]),
        }
    finally:
        destroy_parallel()


def test_cpu_mode_rng_tracker_gives_each_tp_rank_its_own_reproducible_stream() -> None:
    for result in run_on_ranks(rng_streams, 2, timeout_s=120):
        assert result["enabled"]
        assert result["cuda_factory_device"] == torch.device("cpu")
        default = torch.rand(4, generator=torch.Generator().manual_seed(SEED))
        tp_seed = SEED + 2718 + result["tp_rank"]
        tp_stream = torch.rand(8, generator=torch.Generator().manual_seed(tp_seed))
        assert torch.equal(result["default"], default)
        assert torch.equal(result["tp_stream"], tp_stream)
