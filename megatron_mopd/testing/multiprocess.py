"""Run a function on N gloo ranks in fresh processes, and surface every rank's failure.

    results = run_on_ranks(my_check, world_size=4, args=(cfg,))

`fn(*args)` runs on each rank after ``torch.distributed`` is initialized with the gloo backend on
loopback; it must be importable (a module-level function) because ranks are started with the
``spawn`` method. Each rank's return value (picklable) comes back in rank order. When a rank raises,
the other ranks are killed (they may be blocked in a collective) and a ``RankFailure`` carrying every
failing rank's traceback is raised. Process groups get ``collective_timeout_s`` so a rank waiting on a
dead peer fails instead of hanging; the whole run is bounded by ``timeout_s``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import traceback
from datetime import timedelta
from typing import Any, Callable, Sequence

from megatron_mopd.teachers.server_process import free_loopback_port


class RankFailure(RuntimeError):
    """One or more ranks raised, or the run exceeded its time limit."""


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    collective_timeout_s: float,
    fn: Callable[..., Any],
    args: Sequence[Any],
    results: "mp.Queue[tuple[int, str, Any]]",
) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=collective_timeout_s)
        )
        # Plain pickle copies tensors by value: torch's queue pickler would hand over shared-memory
        # handles that die with this process.
        results.put((rank, "ok", pickle.dumps(fn(*args))))
    except BaseException:  # every failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    timeout_s: float = 600.0,
    collective_timeout_s: float = 120.0,
    daemon: bool = True,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks; return the per-rank results in rank order.

    ``daemon=False`` lets the ranks start processes of their own (Megatron's checkpoint save does);
    either way no rank outlives the call.
    """
    ctx = mp.get_context("spawn")
    results: "mp.Queue[tuple[int, str, Any]]" = ctx.Queue()
    port = free_loopback_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(rank, world_size, port, collective_timeout_s, fn, args, results),
            daemon=daemon,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()

    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        while len(values) + len(errors) < world_size:
            try:
                rank, status, payload = results.get(timeout=timeout_s)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - values.keys() - errors.keys())
                raise RankFailure(
                    f"{fn.__qualname__}: ranks {missing} did not finish within {timeout_s:.0f} s"
                    + _format_errors(errors)
                ) from None
            if status == "ok":
                values[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
                _collect_late_errors(results, errors, grace_s=3.0)
                break  # the others may now be blocked in a collective: stop waiting for them
        if errors:
            raise RankFailure(f"{fn.__qualname__} failed" + _format_errors(errors))
        dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
        if dead:
            raise RankFailure(f"{fn.__qualname__}: a rank exited with code {dead[0]}")
        return [values[rank] for rank in range(world_size)]
    finally:
        for proc in procs:
            proc.join(timeout=5 if not errors else 0.5)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _collect_late_errors(
    results: "mp.Queue[tuple[int, str, Any]]", errors: dict[int, str], grace_s: float
) -> None:
    """After a first failure, give the other ranks a moment to report theirs too."""
    try:
        while True:
            rank, status, payload = results.get(timeout=grace_s)
            if status == "error":
                errors[rank] = payload
    except queue.Empty:
        pass


def _format_errors(errors: dict[int, str]) -> str:
    return "".join(f"\n--- rank {rank} ---\n{tb}" for rank, tb in sorted(errors.items()))
