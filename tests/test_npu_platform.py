"""Specification: the Ascend NPU path through MindSpeed, on this CPU with stand-in packages.

The tests write small stand-ins for ``torch_npu`` and ``mindspeed`` into a temporary directory put first
on the ``PYTHONPATH`` of a subprocess; the stand-ins log, one JSON line per event, their import (with the
``megatron`` modules already imported then) and every call. ``torch_npu``'s stand-in makes ``torch.npu``
exist (an available device, ``set_device``, ``current_device``, ``device_count``, and ``npu`` as a device
type) and registers an ``hccl`` back-end that is gloo underneath; ``mindspeed.megatron_adaptor``'s
redirects ``torch.cuda``'s generator to that "NPU", as MindSpeed's ``torch_npu.contrib.transfer_to_npu``
redirects ``torch.cuda`` to ``torch.npu``. Tensors stay on the CPU, so a run goes as far as Megatron's
parallel state and the trainer's checks before the model; building the model would allocate on the
NPU, which needs the real packages (docs/npu.md).

- ``initialize_parallel(device="npu")`` imports ``torch_npu`` and MindSpeed's adaptor before any Megatron
  module, with only the program name in ``sys.argv``; sets the device to ``LOCAL_RANK``; creates the
  process group on HCCL; calls ``repatch`` with the parallel sizes and the given settings before
  Megatron's groups exist; keeps the (CUDA) Triton kernels off NPU devices; and leaves CPU mode and each of its
  redirections off (``enable_cpu_mode`` refuses while the NPU is available).
- Auto-selection picks the NPU when ``torch_npu`` reports one.
- The trainer's entry point (``python -m megatron_mopd.train``) imports the adaptor before it imports the
  trainer, from ``parallel.device`` in the configuration; on every rank of a torchrun job, each rank on
  its ``LOCAL_RANK`` and HCCL, ``repatch`` receives the trainer's settings (parallel sizes, sequence
  parallelism, precision, sequence length and batch sizes). The run is stopped by a data path that does
  not exist, which the trainer checks after the platform, the tokenizer and the layout checks and before
  it builds the model.
- ``mopd train`` (the CLI) imports it before any Megatron module too, in ``initialize_parallel``.
- ``configured_device`` reads ``parallel.device`` from the command line's configuration and its overrides.
- Megatron imported before the adaptor is refused with an error that names the fix; a missing
  ``torch_npu`` or MindSpeed is named too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_mopd.platform import prepare_platform
from megatron_mopd.train import configured_device

REPO = Path(__file__).resolve().parents[1]
LOG_ENV = "MOPD_NPU_STANDIN_LOG"
# Not inherited by the subprocesses: the torchrun environment, and the switches the tests watch being set.
UNSET_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "MOPD_DEVICE", "MOPD_DISABLE_TRITON")

STANDIN_LOG = f'''
"""The stand-ins' event log: one JSON object per line in the file named by {LOG_ENV}."""
import json
import os
import sys


def loaded_megatron():
    """Every imported module whose name starts with "megatron" (megatron_mopd's too)."""
    return sorted(name for name in sys.modules if name.startswith("megatron"))


def record(event, **fields):
    with open(os.environ["{LOG_ENV}"], "a") as log:
        log.write(json.dumps({{"event": event, "pid": os.getpid(), **fields}}) + "\\n")
'''

TORCH_NPU = '''
"""Stand-in torch_npu: torch.npu on the CPU, and an hccl back-end that is gloo."""
import types

import torch
import torch.distributed as dist

from npu_standin_log import loaded_megatron, record

record("import torch_npu", loaded=loaded_megatron())
torch.utils.rename_privateuse1_backend("npu")  # torch.device("npu", i), as torch_npu does
_current = [0]


def is_available():
    record("npu.is_available")
    return True


def set_device(device):
    record("npu.set_device", device=str(device))
    _current[0] = torch.device(device).index


def current_device():
    return _current[0]


def device_count():
    return 8


def get_rng_state(device="npu"):
    return torch.get_rng_state()


def manual_seed(seed):
    torch.manual_seed(seed)


npu = types.ModuleType("torch.npu")
for _function in (is_available, set_device, current_device, device_count, get_rng_state, manual_seed):
    setattr(npu, _function.__name__, _function)
torch.npu = npu


def npu_fusion_attention(*args, **kwargs):
    """Imported by transformers' NPU attention when torch_npu is installed; never called here."""
    raise NotImplementedError("stand-in torch_npu has no kernels")


def _hccl(store, rank, world_size, timeout):
    record("hccl process group", rank=rank, world_size=world_size)
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


dist.Backend.register_backend("hccl", _hccl, devices=["cpu"])
'''

MINDSPEED_ADAPTOR = '''
"""Stand-in mindspeed.megatron_adaptor: logs its import and repatch(); torch.cuda's generator is the NPU's."""
import atexit
import sys

import torch
import torch_npu

from npu_standin_log import loaded_megatron, record

record("import mindspeed.megatron_adaptor", loaded=loaded_megatron(), argv=sys.argv[1:])
torch.cuda.get_rng_state = torch.npu.get_rng_state  # MindSpeed: torch.cuda.* is torch.npu.*
torch.cuda.manual_seed = torch.npu.manual_seed
atexit.register(lambda: record("exit", loaded=loaded_megatron()))


def _plain(value):
    return value if isinstance(value, (bool, int, float, str, type(None))) else repr(value)


def repatch(args):
    record("repatch", args={key: _plain(value) for key, value in args.items()}, loaded=loaded_megatron())
'''


class NpuStandins:
    """The stand-in packages in a directory, and the environment of a subprocess that sees them."""

    def __init__(self, root: Path, *, with_mindspeed: bool = True) -> None:
        site = root / "site"
        (site / "torch_npu").mkdir(parents=True)
        (site / "npu_standin_log.py").write_text(STANDIN_LOG)
        (site / "torch_npu" / "__init__.py").write_text(TORCH_NPU)
        if with_mindspeed:
            (site / "mindspeed").mkdir()
            (site / "mindspeed" / "__init__.py").write_text('"""Stand-in MindSpeed."""\n')
            (site / "mindspeed" / "megatron_adaptor.py").write_text(MINDSPEED_ADAPTOR)
        self.log = root / "events.jsonl"
        env = {k: v for k, v in os.environ.items() if k not in UNSET_VARS}
        path = [str(site), str(REPO), env.get("PYTHONPATH", "")]
        self.env = {**env, "PYTHONPATH": os.pathsep.join(p for p in path if p), LOG_ENV: str(self.log),
                    "OMP_NUM_THREADS": "1"}

    def run(self, args: list[str], **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], env={**self.env, **env}, capture_output=True, text=True,
                              timeout=600, cwd=REPO)

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []


def megatron_only(loaded: list[str]) -> list[str]:
    return [name for name in loaded if name == "megatron" or name.startswith("megatron.")]


def names(events: list[dict]) -> list[str]:
    return [e["event"] for e in events]


@pytest.fixture
def standins(tmp_path: Path) -> NpuStandins:
    return NpuStandins(tmp_path)


INITIALIZE_ON_NPU = """
import torch
import torch.distributed as dist

from megatron_mopd.platform import Platform, cpu_mode_enabled, destroy_parallel, enable_cpu_mode, initialize_parallel
from megatron_mopd.platform import cpu_mode

platform = initialize_parallel(device="npu", mindspeed_args={"sequence_parallel": False, "bf16": True})
assert platform == Platform("npu", "hccl") and platform.device == torch.device("npu", 3), platform
assert dist.get_backend() == "hccl", dist.get_backend()

from megatron.core.inference import communication_utils
from megatron.core.tensor_parallel import random as mcore_random

from megatron_mopd.kernels import use_triton

assert not use_triton(torch.device("npu", 3))  # the CUDA kernels, decided by the device type (not is_cuda)
assert not cpu_mode_enabled()
try:
    torch.zeros(1, device="cuda")
except (AssertionError, RuntimeError):
    pass  # not redirected to the CPU
else:
    raise AssertionError("a CUDA tensor factory was redirected")
assert mcore_random._get_cuda_rng_state is not cpu_mode._get_cpu_rng_state
assert communication_utils._is_cuda is not cpu_mode._check_tensor_present
assert torch.cuda.current_device.__module__ == "torch.cuda" and torch.cuda.synchronize.__module__ == "torch.cuda"
try:
    enable_cpu_mode()
except RuntimeError as error:
    assert "npu device is available" in str(error), error
else:
    raise AssertionError("enable_cpu_mode ran on an NPU host")
assert not cpu_mode_enabled()
destroy_parallel()
assert not dist.is_initialized()
"""


def test_initialize_parallel_on_npu_imports_mindspeed_first_and_uses_hccl_on_local_rank(
        standins: NpuStandins) -> None:
    result = standins.run(["-c", INITIALIZE_ON_NPU], LOCAL_RANK="3")
    assert result.returncode == 0, result.stderr[-5000:]
    events = standins.events()
    assert names(events)[:5] == ["import torch_npu", "import mindspeed.megatron_adaptor", "npu.set_device",
                                 "hccl process group", "repatch"]
    later = names(events)[5:-1]  # Megatron's groups, on HCCL too; enable_cpu_mode asks whether an NPU is there
    assert "hccl process group" in later and set(later) == {"hccl process group", "npu.is_available"}
    torch_npu, adaptor, set_device, group, repatch, finished = *events[:5], events[-1]
    assert megatron_only(torch_npu["loaded"]) == [] and megatron_only(adaptor["loaded"]) == []
    assert adaptor["argv"] == []
    assert set_device["device"] == "npu:3"
    assert (group["rank"], group["world_size"]) == (0, 1)
    assert repatch["args"] == {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                               "context_parallel_size": 1, "sequence_parallel": False, "bf16": True}
    assert megatron_only(repatch["loaded"]) == []  # before Megatron's groups
    assert "megatron.core.parallel_state" in finished["loaded"]


def test_auto_selection_picks_the_npu_that_torch_npu_reports(standins: NpuStandins) -> None:
    script = ("from megatron_mopd.platform import Platform, select_platform; "
              "assert select_platform() == Platform('npu', 'hccl')")
    result = standins.run(["-c", script])
    assert result.returncode == 0, result.stderr[-3000:]
    assert names(standins.events()) == ["import torch_npu", "npu.is_available"]


def trainer_config(path: Path) -> Path:
    """A fine-tuning run on NPU with TP=2, sequence parallelism and bf16, whose data does not exist."""
    from megatron_mopd.demo.assets import demo_asset_path

    path.write_text(textwrap.dedent(f"""\
        output_dir: {path.parent / "run"}
        model:
          path: {demo_asset_path("student")}
        parallel:
          device: npu
          tp: 2
          sequence_parallel: true
        data:
          path: {path.parent / "no-such-data.jsonl"}
          seq_length: 64
        train:
          precision: bf16
          micro_batch_size: 2
          global_batch_size: 4
        loss:
          sft_alpha: 1.0
        """))
    return path


def test_trainer_entry_point_imports_mindspeed_before_the_trainer_and_repatches_with_its_settings(
        standins: NpuStandins, tmp_path: Path) -> None:
    config = trainer_config(tmp_path / "run.yaml")
    result = standins.run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "megatron_mopd.train", "--config", str(config), "train.steps=3"])
    assert result.returncode != 0
    assert "data.path" in result.stderr and "no-such-data.jsonl" in result.stderr, result.stderr[-5000:]
    by_rank: dict[int, list[dict]] = {}
    for event in standins.events():
        by_rank.setdefault(event["pid"], []).append(event)
    assert len(by_rank) == 2
    devices = set()
    for events in by_rank.values():
        assert names(events)[:5] == ["import torch_npu", "import mindspeed.megatron_adaptor", "npu.set_device",
                                     "hccl process group", "repatch"]
        later = names(events)[5:-1]  # Megatron's groups; libraries asking whether an NPU is there
        assert "hccl process group" in later and set(later) <= {"hccl process group", "npu.is_available"}
        assert names(events)[-1] == "exit"
        adaptor, set_device, group, repatch = events[1:5]
        assert megatron_only(adaptor["loaded"]) == []
        assert "megatron_mopd.cli" not in adaptor["loaded"]  # the entry point's first step
        assert adaptor["argv"] == []  # the trainer's command line is not Megatron-LM's
        devices.add(set_device["device"])
        assert group["world_size"] == 2
        assert repatch["args"] == {
            "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1, "context_parallel_size": 1,
            "sequence_parallel": True, "bf16": True, "fp16": False, "params_dtype": "torch.bfloat16",
            "seq_length": 64, "micro_batch_size": 2, "global_batch_size": 4, "use_distributed_optimizer": True,
        }
        assert "megatron.core.parallel_state" in events[-1]["loaded"]
    assert devices == {"npu:0", "npu:1"}


def test_mopd_train_imports_mindspeed_before_megatron_too(standins: NpuStandins, tmp_path: Path) -> None:
    config = trainer_config(tmp_path / "run.yaml")
    result = standins.run(["-m", "megatron_mopd.cli", "train", "--config", str(config), "parallel.tp=1",
                           "parallel.sequence_parallel=false"])
    assert result.returncode == 1 and "data.path" in result.stderr, result.stderr[-5000:]
    events = standins.events()
    assert names(events)[:5] == ["import torch_npu", "import mindspeed.megatron_adaptor", "npu.set_device",
                                 "hccl process group", "repatch"]
    adaptor, repatch = events[1], events[4]
    assert megatron_only(adaptor["loaded"]) == [] and adaptor["argv"] == []
    assert repatch["args"]["tensor_model_parallel_size"] == 1 and repatch["args"]["sequence_parallel"] is False


def test_configured_device_reads_the_configuration_and_its_overrides(tmp_path: Path) -> None:
    config = trainer_config(tmp_path / "run.yaml")
    assert configured_device(["--config", str(config)]) == "npu"
    assert configured_device(["--config", str(config), "parallel.device=cuda", "train.steps=2"]) == "cuda"
    assert configured_device(["--config", str(config), "parallel.device=null"]) is None
    assert configured_device(["--config", str(tmp_path / "missing.yaml")]) is None
    assert configured_device(["--config"]) is None


MEGATRON_FIRST = """
import megatron.core
from megatron_mopd.platform import initialize_parallel

try:
    initialize_parallel(device="npu")
except RuntimeError as error:
    print(error)
else:
    raise AssertionError("initialize_parallel accepted Megatron imported before MindSpeed")
"""


def test_megatron_imported_before_mindspeed_is_refused_naming_the_fix(standins: NpuStandins) -> None:
    result = standins.run(["-c", MEGATRON_FIRST])
    assert result.returncode == 0, result.stderr[-3000:]
    message = result.stdout
    assert "Megatron was imported before mindspeed.megatron_adaptor (megatron" in message
    assert "`import mindspeed.megatron_adaptor` before anything that imports megatron" in message
    assert "import mindspeed.megatron_adaptor" not in names(standins.events())


def test_npu_without_torch_npu_or_mindspeed_is_refused_naming_them(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"device npu needs Ascend's PyTorch adapter \(torch_npu\)"):
        prepare_platform("npu")
    standins = NpuStandins(tmp_path, with_mindspeed=False)
    script = "from megatron_mopd.platform import prepare_platform; prepare_platform('npu')"
    result = standins.run(["-c", script])
    assert result.returncode != 0
    assert "device npu needs MindSpeed (mindspeed), which is not installed" in result.stderr
