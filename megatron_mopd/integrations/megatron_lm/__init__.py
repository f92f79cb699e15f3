"""Multi-teacher distillation inside Megatron-LM's ``pretrain()``.

    from megatron_mopd.integrations.megatron_lm import MopdForwardStep, add_mopd_args

    forward_step = MopdForwardStep(get_batch)           # the loss of ``mopd train``, per micro-batch
    pretrain(datasets_provider, model_provider, ModelType.encoder_or_decoder, forward_step,
             extra_args_provider=add_mopd_args)         # the --mopd-* flags

``add_mopd_args`` / ``mopd_config_from_args`` (``args``): the teachers from flags or a YAML file, in the
trainer's schema. ``MopdForwardStep`` (``forward_step``): Megatron's ``forward_step`` contract, with the
teachers' requests overlapping the student's forward passes. ``examples/megatron_lm/pretrain_gpt_mopd.py``
is ``pretrain_gpt.py`` with both, and says how to run it from a Megatron-LM checkout.
"""

from megatron_mopd.integrations.megatron_lm.args import MegatronLMMopdConfig, add_mopd_args, mopd_config_from_args
from megatron_mopd.integrations.megatron_lm.forward_step import MopdForwardStep, teacher_sequences

__all__ = ["MegatronLMMopdConfig", "MopdForwardStep", "add_mopd_args", "mopd_config_from_args", "teacher_sequences"]
