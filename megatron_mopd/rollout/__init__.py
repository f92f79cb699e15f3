"""On-policy rollouts: what an engine returns (``types``); the Megatron-native engine, which samples
from the live student inside the training processes (``megatron_engine``); and the server engine, which
samples through vLLM/SGLang servers serving the student, its weights pushed to them (``server_engine``)."""

from megatron_mopd.rollout.megatron_engine import MegatronRolloutEngine
from megatron_mopd.rollout.server_engine import DiskWeightSync, ServerRolloutEngine, WeightSync
from megatron_mopd.rollout.types import Rollout, RolloutEngine, SamplingParams

__all__ = ["DiskWeightSync", "MegatronRolloutEngine", "Rollout", "RolloutEngine", "SamplingParams",
           "ServerRolloutEngine", "WeightSync"]
