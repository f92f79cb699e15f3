"""megatron_mopd: multi-teacher on-policy distillation (MOPD) for Megatron-Core.

Rooms: ``parallel`` (platform selection, CPU mode, vocab-parallel primitives), ``losses`` (exact
vocab-parallel divergences), ``testing`` (multi-rank harness).
"""

__version__ = "0.1.0"
