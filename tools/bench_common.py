"""What bench_losses.py and bench_linear_losses.py share: timing, peak memory, Megatron at TP=1, the report.

A variant is a loss function of the leaves that ``leaves()`` makes fresh for each run (``loss_fn(*leaves())``,
then ``.backward()``). The benchmarks run as scripts, so this module is imported from their folder.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

import megatron_mopd

Loss = Callable[..., torch.Tensor]  # the leaves -> scalar loss
Leaves = Callable[[], tuple[torch.Tensor, ...]]  # fresh leaves (requires_grad) of the inputs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine(device: torch.device) -> str:
    """The GPU's name on CUDA; on CPU the processor, its cores and torch's version."""
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def time_variants(
    variants: dict[str, Loss], leaves: Leaves, repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Forward+backward wall time of each variant, interleaved round-robin (one warm-up round)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(repeats + 1):
        for name, loss_fn in variants.items():
            inputs = leaves()
            synchronize(device)
            start = time.perf_counter()
            loss_fn(*inputs).backward()
            synchronize(device)
            if round_index > 0:
                times[name].append(time.perf_counter() - start)
            del inputs
    return times


def peak_memory(name: str, loss_fn: Loss, leaves: Leaves, device: torch.device, *child_args: str) -> int:
    """Peak bytes allocated during one forward+backward beyond the inputs.

    CUDA: the caching allocator's peak statistics. CPU: the process's peak resident memory (VmHWM,
    reset through /proc/self/clear_refs, see ``measure_own_peak``) in a fresh child process, this
    script run again with its own arguments, ``--measure-memory-of name`` and ``child_args``, whose
    glibc returns every large free to the system at once (fixed mmap threshold), so the figure is
    what the run really held. The child imports the megatron_mopd this process measures, whatever
    an installed copy points to.
    """
    if device.type == "cuda":
        inputs = leaves()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss_fn(*inputs).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(megatron_mopd.__file__).parents[1]),
                                                     env.get("PYTHONPATH")]))
    child = subprocess.run(
        [sys.executable, *sys.argv, "--measure-memory-of", name, *child_args],
        env=env, capture_output=True, text=True, check=False,
    )
    if child.returncode != 0:
        raise RuntimeError(f"memory measurement of {name} failed:\n{child.stderr[-4000:]}")
    return int(child.stdout.strip().splitlines()[-1])


def memory_figures(args: argparse.Namespace, peak: int, grad_bytes: int) -> dict[str, float]:
    """A variant's peak bytes (``peak_memory``) as a table row's figures: in MiB and as a multiple of one float32
    logits tensor ``args.tokens x args.local_vocab``, and its workspace (peak minus the inputs' gradients,
    ``grad_bytes``, which every variant must return) as such a multiple."""
    fp32_logits = args.tokens * args.local_vocab * 4
    return dict(
        peak_mib=peak / 2**20,
        peak_x_fp32_logits=peak / fp32_logits,
        workspace_x_fp32_logits=(peak - grad_bytes) / fp32_logits,
    )


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.M).group(1))


def measure_own_peak(loss_fn: Loss, leaves: Leaves) -> int:
    """In the child: warm up once, reset the peak, run once; peak resident bytes beyond the start."""
    loss_fn(*leaves()).backward()
    gc.collect()
    inputs = leaves()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current resident size
    base = _proc_status_kib("VmRSS")
    loss_fn(*inputs).backward()
    return (_proc_status_kib("VmHWM") - base) * 1024


def init_megatron_tp1(device: torch.device, cpu_mode: bool) -> None:
    """Megatron's cross-entropy reads the TP group from parallel_state: initialize TP=1.

    ``cpu_mode`` (the timing process on CPU) also enables megatron_mopd's CPU mode, whose allocator
    setting applies to every variant alike; the memory-measuring child leaves glibc returning each
    large free at once, so its high-water mark is what the variant really held.
    """
    from megatron.core import parallel_state

    from megatron_mopd.platform import enable_cpu_mode

    if cpu_mode:
        enable_cpu_mode()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)


def finish(
    args: argparse.Namespace, device: torch.device, rows: list[dict], verdicts: list[dict],
    heading: str, verdict_line: Callable[[dict], str], **extra: object,
) -> None:
    """Print the targets (``heading``, then one ``verdict_line`` each), write the JSON report to ``args.out``
    (config, machine, rows, targets, then ``extra``) and destroy the process group."""
    if verdicts:
        print(f"\n{heading}")
        for v in verdicts:
            print(verdict_line(v))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = dict(config=config, machine=machine(device), rows=rows, targets=verdicts, **extra)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    if dist.is_initialized():
        dist.destroy_process_group()
