"""Bridges to training frameworks other than the ``mopd train`` trainer: ``megatron_lm`` (``pretrain()``)."""
