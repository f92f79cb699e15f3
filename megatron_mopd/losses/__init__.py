"""Exact vocab-parallel distillation losses (docs/design.md §2-§4).

All take this rank's logits shard ``[..., V_local]``. The same-vocabulary losses return a float32
per-position loss with the input's leading shape (``masked_sum_and_count`` reduces it); the
cross-tokenizer losses (``projected_kl``, ``gold_loss``) return one loss per aligned chunk ``[C]``.
``tp_group=None`` means Megatron's tensor-parallel group when model parallelism is initialized, else
no tensor parallelism. ``teacher_losses`` / ``combine_teacher_losses`` combine several teachers.
``linear_topk_generalized_jsd``, ``linear_generalized_jsd`` and ``linear_cross_entropy`` take the output
layer's input and this rank's weight shard instead, and never materialize the logits (losses/linear.py).
"""

from megatron_mopd.losses.cross_tokenizer import gold_loss, projected_kl
from megatron_mopd.losses.divergence import generalized_jsd_terms
from megatron_mopd.losses.jsd import generalized_jsd
from megatron_mopd.losses.linear import (
    linear_cross_entropy,
    linear_generalized_jsd,
    linear_topk_generalized_jsd,
)
from megatron_mopd.losses.modules import (
    GeneralizedJSDLoss,
    GOLDLoss,
    ProjectedKLLoss,
    TopKGeneralizedJSDLoss,
)
from megatron_mopd.losses.multi_teacher import (
    CrossTokenizerTeacher,
    SameTokenizerTeacher,
    combine_teacher_losses,
    route_by_sample,
    teacher_losses,
)
from megatron_mopd.losses.reduction import IGNORE_INDEX, masked_sum_and_count
from megatron_mopd.losses.token_logprob import vocab_parallel_token_logprobs
from megatron_mopd.losses.topk import TAIL_MODES, topk_generalized_jsd
from megatron_mopd.parallel.topk import vocab_parallel_topk

__all__ = [
    "CrossTokenizerTeacher",
    "SameTokenizerTeacher",
    "combine_teacher_losses",
    "gold_loss",
    "projected_kl",
    "route_by_sample",
    "teacher_losses",
    "GeneralizedJSDLoss",
    "GOLDLoss",
    "ProjectedKLLoss",
    "TopKGeneralizedJSDLoss",
    "IGNORE_INDEX",
    "TAIL_MODES",
    "generalized_jsd",
    "generalized_jsd_terms",
    "linear_cross_entropy",
    "linear_generalized_jsd",
    "linear_topk_generalized_jsd",
    "masked_sum_and_count",
    "topk_generalized_jsd",
    "vocab_parallel_token_logprobs",
    "vocab_parallel_topk",
]
