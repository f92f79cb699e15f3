"""Test utilities shipped with the package: multi-rank gloo runs (used by tests/ and tools/)."""

from megatron_mopd.testing.multiprocess import RankFailure, run_on_ranks

__all__ = ["RankFailure", "run_on_ranks"]
