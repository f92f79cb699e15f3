"""Errors that every rank learns of: a collective step that fails on one rank must fail on all of them,
or the others wait forever in their next collective.

``on_rank0`` runs an action on global rank 0 only (writing a file, calling a server) and tells every
rank how it went; ``first_problem_of_all_ranks`` gathers each rank's own check.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch.distributed as dist

__all__ = ["first_problem_of_all_ranks", "on_rank0"]


def on_rank0(action: Callable[[], object], what: str) -> None:
    """Run ``action`` on global rank 0; every rank returns after it, or raises if it failed there: rank 0
    the error itself, the other ranks a RuntimeError naming ``what`` and the error. Collective."""
    error: Optional[BaseException] = None
    if dist.get_rank() == 0:
        try:
            action()
        except BaseException as exc:  # every rank must learn of it, or they would wait forever
            error = exc
    outcome = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise RuntimeError(f"{what} failed on rank 0: {outcome[0]}")


def first_problem_of_all_ranks(problem: Optional[str]) -> Optional[str]:
    """The lowest rank's problem, on every rank, or None when no rank has one. Collective."""
    problems: list[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p is not None), None)
