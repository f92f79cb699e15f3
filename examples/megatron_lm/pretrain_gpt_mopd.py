"""Distill teachers into a GPT student with Megatron-LM's ``pretrain()``: ``pretrain_gpt.py`` whose
``forward_step`` is ``megatron_mopd``'s and whose parser has the ``--mopd-*`` flags.

How to run it, from a Megatron-LM checkout whose version matches the installed megatron-core (tag
``core_v0.16.1`` for megatron-core 0.16.1; ``megatron.training`` is not on PyPI)::

    pip install -e /path/to/megatron_mopd          # in Megatron-LM's environment
    vllm serve TEACHER_DIR --max-logprobs 20       # or: mopd serve-teacher --model TEACHER_DIR --max-logprobs 20
    cd /path/to/Megatron-LM
    PYTHONPATH=$PWD torchrun --nproc-per-node 8 /path/to/megatron_mopd/examples/megatron_lm/pretrain_gpt_mopd.py \\
        <pretrain_gpt.py's flags: model shape, --data-path, --micro-batch-size, --global-batch-size,
         --lr, --train-iters, --save/--load, --tensor-model-parallel-size, --pipeline-model-parallel-size> \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model STUDENT_DIR \\
        --calculate-per-token-loss \\
        --mopd-teacher-url http://TEACHER_HOST:8000 --mopd-topk 20 --mopd-beta 0.5

``PYTHONPATH=$PWD`` makes the checkout's ``megatron.training`` and its top-level ``pretrain_gpt.py``,
``model_provider.py`` and ``gpt_builders.py`` importable. Required:

* ``--calculate-per-token-loss``: the loss of a micro-batch is a sum over its trained tokens, and
  Megatron divides by the global batch's trained tokens only with this flag;
* the teacher shares the student's tokenizer (``--tokenizer-model``, and the tokenizer the data was
  preprocessed with), and its server allows the top-K (``--max-logprobs`` >= ``--mopd-topk``).

Several teachers, weights, the ``mopd`` loss: ``--mopd-config teachers.yaml`` (a ``teachers:`` list and a
``loss:`` section, as in ``mopd train``) and ``--mopd-override teachers.0.weight=0.5``. The logs and
TensorBoard show ``loss``, ``divergence/<teacher>`` and, with ``--mopd-sft-alpha``, ``sft/nll`` per token.
Not supported yet (refused at start): context parallelism, virtual pipeline stages, ``--sft`` and
``--reset-attention-mask``/``--reset-position-ids`` (several documents per row), MTP layers.

What differs from ``pretrain_gpt.py``: ``get_batch`` gives the last pipeline stage the tokens too (the
teachers score them there); ``model_provider`` connects to the teachers first (collective, on every
rank, before the pipeline schedule); ``forward_step`` is ``MopdForwardStep``.
"""

from typing import Optional

from gpt_builders import gpt_builder
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.training import pretrain
from megatron.training.utils import get_batch_on_this_tp_rank, is_first_or_last_pipeline_stage
from model_provider import model_provider as megatron_model_provider
from pretrain_gpt import get_embedding_ranks, train_valid_test_datasets_provider

from megatron_mopd.integrations.megatron_lm import MopdForwardStep, add_mopd_args


def get_batch(data_iterator, vp_stage: Optional[int] = None):
    """``(tokens, labels, loss_mask, attention_mask, position_ids)`` of the next micro-batch.

    ``pretrain_gpt.get_batch`` without context parallelism or packed sequences (both refused), and with
    the tokens on the last pipeline stage: Megatron-LM's ``get_batch_on_this_tp_rank`` broadcasts only
    labels, loss mask and attention mask to that stage's tensor-parallel ranks unless MTP layers live
    there (``mtp_on_this_rank=True``: everything); the teachers score the tokens on that stage, so it
    takes that branch. Middle stages get nothing.
    """
    if not is_first_or_last_pipeline_stage(vp_stage):
        return None, None, None, None, None
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    batch = get_batch_on_this_tp_rank(data_iterator, mtp_on_this_rank=last)
    return batch["tokens"], batch["labels"], batch["loss_mask"], batch["attention_mask"], batch["position_ids"]


forward_step = MopdForwardStep(get_batch)


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """``pretrain_gpt``'s model (``gpt_builder``), after connecting to the teachers: ``open()`` is collective
    and must not run inside the pipeline schedule; every rank builds its model here, before training."""
    forward_step.open()
    return megatron_model_provider(gpt_builder, pre_process, post_process, vp_stage, config=config,
                                   pg_collection=pg_collection)


if __name__ == "__main__":
    train_valid_test_datasets_provider.is_distributed = True  # as in pretrain_gpt.py

    pretrain(
        train_valid_test_datasets_provider,
        model_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        args_defaults={"tokenizer_type": "HuggingFaceTokenizer"},
        extra_args_provider=add_mopd_args,
        get_embedding_ranks=get_embedding_ranks,
    )
    forward_step.close()
