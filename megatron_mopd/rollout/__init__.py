"""On-policy rollouts: what an engine returns (``types``) and the Megatron-native engine, which
samples from the live student inside the training processes (``megatron_engine``)."""

from megatron_mopd.rollout.megatron_engine import MegatronRolloutEngine
from megatron_mopd.rollout.types import Rollout, RolloutEngine, SamplingParams

__all__ = ["MegatronRolloutEngine", "Rollout", "RolloutEngine", "SamplingParams"]
