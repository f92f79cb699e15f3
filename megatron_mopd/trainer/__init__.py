"""The MOPD trainer on Megatron-Core: configuration, data, the step, checkpoints, metrics, the loop."""
