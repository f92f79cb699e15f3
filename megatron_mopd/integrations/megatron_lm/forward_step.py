"""``MopdForwardStep``: the trainer's ``forward_step`` and ``loss_func`` for Megatron-LM's ``pretrain()``.

    forward_step = MopdForwardStep(get_batch)
    pretrain(datasets_provider, model_provider, ModelType.encoder_or_decoder, forward_step,
             extra_args_provider=add_mopd_args)

Per micro-batch, on every rank:

1. ``get_batch(data_iterator)`` returns ``(tokens, labels, loss_mask, attention_mask, position_ids)``,
   optionally followed by ``packed_seq_params`` (which must be None): the order of Megatron-LM's
   ``pretrain_gpt.get_batch`` (core_r0.16). ``labels`` must be ``tokens`` shifted by one, as Megatron's
   GPT datasets make them. The last pipeline stage needs ``tokens`` too, since the teachers score them
   there: Megatron-LM's ``get_batch_on_this_tp_rank`` gives that stage only labels and the loss mask
   (unless MTP layers live there), so use the ``get_batch`` of ``examples/megatron_lm/pretrain_gpt_mopd.py``.
2. Labels outside the loss mask (``loss_mask == 0``) become −100: the loss is a sum over the trained
   tokens, and the schedule (``--calculate-per-token-loss``) divides by their number.
3. On the last stage, each teacher's request for the micro-batch's rows starts
   (``teachers.submit_teacher_scores``): the teacher's latency overlaps this micro-batch's forward pass.
   Each row is sent up to its last trained position plus that position's label, so the teacher scores
   every trained position and nothing after it.
4. ``trainer.forward_step.forward_step`` runs the student (``model(tokens, position_ids, None)``: causal
   attention; the batch's ``attention_mask`` is not used) and returns its ``loss_func``, the one loss
   boundary shared with ``mopd train``: ``(loss_sum, num_tokens, {name: [sum, count]})``, stopping on a
   NaN/inf loss with the step, rank and teacher.

Teachers. ``open()`` reads the ``--mopd-*`` flags and connects to the teachers (starting the
self-served ones); it is collective, so call it on every rank outside the schedule: the example calls it
from ``model_provider``. Without it the first ``forward_step`` call opens them, which only pipeline
parallelism forbids: the stages wait on each other inside the schedule, so a collective there would
deadlock. ``close()`` (collective) disconnects and stops self-served servers; it is also registered with
``atexit``, which covers Megatron-LM's ``sys.exit`` at ``--exit-interval`` and friends.

``step`` in error messages is Megatron-LM's ``args.curr_iteration`` when set, otherwise the number of
calls divided by the number of micro-batches per step.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_mopd.integrations.megatron_lm.args import MegatronLMMopdConfig, mopd_config_from_args
from megatron_mopd.teachers import submit_teacher_scores
from megatron_mopd.trainer.config import ConfigError
from megatron_mopd.trainer.data import IGNORE_INDEX
from megatron_mopd.trainer.forward_step import MicroBatch, StepContext, StepTeacherScores, forward_step

__all__ = ["MopdForwardStep", "teacher_sequences"]

GetBatch = Callable[[Iterator[Any]], Sequence[Optional[torch.Tensor]]]


class MopdForwardStep:
    """``forward_step(data_iterator, model) -> (logits, loss_func)`` for ``pretrain()`` (module docstring).

    Args:
        get_batch: ``data_iterator -> (tokens, labels, loss_mask, attention_mask, position_ids[,
            packed_seq_params])``, tensors ``[b, s]`` (None on stages that need no data).
        args: Megatron-LM's arguments with the ``--mopd-*`` flags (default: ``megatron.training.get_args()``).
        vocab_size: the tokenizer's vocabulary size, without Megatron's padding (default:
            ``megatron.training.get_tokenizer().vocab_size``); logits past it are left out of the loss.
        log_dir: where self-served teachers write their logs (default: ``<--save or .>/mopd-logs``).
    """

    def __init__(self, get_batch: GetBatch, *, args: Optional[argparse.Namespace] = None,
                 vocab_size: Optional[int] = None, log_dir: Optional[str | Path] = None) -> None:
        self._get_batch = get_batch
        self._args = args
        self._vocab_size = vocab_size
        self._log_dir = log_dir
        self._config: Optional[MegatronLMMopdConfig] = None
        self._stack: Optional[contextlib.ExitStack] = None
        self._clients: dict[str, Any] = {}
        self._model_checked = False
        self._calls = 0

    @property
    def config(self) -> MegatronLMMopdConfig:
        """The teachers and loss of the ``--mopd-*`` flags (read once; ``ConfigError`` on bad flags)."""
        if self._config is None:
            self._config = mopd_config_from_args(self._megatron_args())
        return self._config

    def open(self) -> None:
        """Connect to the teachers; collective over all ranks, after Megatron's initialization and outside
        the pipeline schedule. Does nothing when they are open.

        Raises:
            ConfigError: bad ``--mopd-*`` flags, or context parallelism.
            TeacherError: a teacher's servers are unreachable or refuse its top-K.
        """
        if self._stack is not None:
            return
        from megatron.core import parallel_state

        from megatron_mopd.trainer.teachers import open_teachers

        config = self.config
        cp = parallel_state.get_context_parallel_world_size()
        if cp > 1:
            raise ConfigError(f"--context-parallel-size {cp}: context parallelism is not supported by the MOPD loss "
                              f"yet; use tensor, pipeline or data parallelism")
        last_stage = parallel_state.is_pipeline_last_stage()
        fetching = last_stage and parallel_state.get_tensor_and_context_parallel_rank() == 0
        reporting = fetching and parallel_state.get_data_parallel_rank() == 0
        stack = contextlib.ExitStack()
        self._clients = stack.enter_context(open_teachers(
            config.teachers, fetching=fetching, log_dir=self._logs(), colocated=_no_colocated_teacher,
            say=(lambda line: print(f"[mopd] {line}", flush=True)) if reporting else (lambda _line: None)))
        self._stack = stack
        atexit.register(self.close)

    def close(self) -> None:
        """Disconnect from the teachers and stop the self-served ones; collective, like ``open``."""
        stack, self._stack = self._stack, None
        if stack is None:
            return
        atexit.unregister(self.close)
        self._clients = {}
        stack.close()

    def __call__(self, data_iterator: Iterator[Any], model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        from megatron.core import parallel_state

        self._start(model)
        step = self._step()
        self._calls += 1
        tokens, labels, loss_mask, _attention_mask, position_ids, *rest = self._get_batch(data_iterator)
        if rest and rest[0] is not None:
            raise ValueError("get_batch returned packed sequences (packed_seq_params): the MOPD loss does not "
                             "support them yet; train on unpacked rows")
        if not parallel_state.is_pipeline_last_stage():  # only the last stage computes the loss
            context = StepContext(step, [], {}, self.config.loss.sft_alpha, self._vocabulary(), dist.get_rank())
            return forward_step(iter([MicroBatch(tokens, position_ids, labels, None, 0, context)]), model)
        if tokens is None or labels is None or loss_mask is None:
            missing = [name for name, value in (("tokens", tokens), ("labels", labels), ("loss_mask", loss_mask))
                       if value is None]
            raise ValueError(f"get_batch returned no {', '.join(missing)} on the last pipeline stage, where the "
                             f"teachers score the tokens: broadcast tokens there too, as the get_batch of "
                             f"examples/megatron_lm/pretrain_gpt_mopd.py does")
        trained = loss_mask > 0
        rows = tokens.shape[0]
        context = StepContext(step, self._submit(tokens, labels, trained), self._routes(rows, tokens.device),
                              self.config.loss.sft_alpha, self._vocabulary(), dist.get_rank(),
                              validate_inputs=self.config.loss.validate_inputs,
                              fused_output_layer=self.config.loss.fused_output_layer)
        batch = MicroBatch(tokens, position_ids, torch.where(trained, labels, IGNORE_INDEX),
                           torch.ones(rows, dtype=torch.bool, device=tokens.device), 0, context)
        return forward_step(iter([batch]), model)

    def _start(self, model: torch.nn.Module) -> None:
        if not self._model_checked:
            from megatron.core.utils import get_attr_wrapped_model

            if not get_attr_wrapped_model(model, "config").calculate_per_token_loss:
                raise ConfigError("--calculate-per-token-loss is required: the MOPD loss returns (sum, completion "
                                  "tokens) per micro-batch, and Megatron divides by the global batch's completion "
                                  "tokens only with this flag")
            self._model_checked = True
        if self._stack is None:
            from megatron.core import parallel_state

            if parallel_state.get_pipeline_model_parallel_world_size() > 1:
                raise RuntimeError("MopdForwardStep.open() must run on every rank before training with pipeline "
                                   "parallelism (opening the teachers is collective, and inside the schedule the "
                                   "stages wait on each other); call it from model_provider as "
                                   "examples/megatron_lm/pretrain_gpt_mopd.py does")
            self.open()

    def _submit(self, tokens: torch.Tensor, labels: torch.Tensor, trained: torch.Tensor) -> list[StepTeacherScores]:
        """Start every teacher's request for this micro-batch (the fetching rank sends; the others wait)."""
        rows = torch.arange(tokens.shape[0])
        sequences = None
        scores = []
        for teacher in self.config.teachers:
            client = self._clients[teacher.name]
            if client is not None and sequences is None:
                sequences = teacher_sequences(tokens, labels, trained)
            pending = submit_teacher_scores(client, sequences or [], seq_length=tokens.shape[1])
            scores.append(StepTeacherScores(teacher, pending, rows))
        return scores

    def _routes(self, rows: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Every teacher scores every row (``loss.routing=weights``)."""
        return {t.name: torch.ones(rows, dtype=torch.bool, device=device) for t in self.config.teachers}

    def _step(self) -> int:
        iteration = getattr(self._megatron_args(), "curr_iteration", None)
        if iteration is not None:
            return int(iteration)
        from megatron.core.num_microbatches_calculator import get_num_microbatches

        try:
            return self._calls // get_num_microbatches()
        except AttributeError:  # no calculator: Megatron-Core's schedule driven directly
            return self._calls

    def _megatron_args(self) -> argparse.Namespace:
        if self._args is None:
            try:
                from megatron.training import get_args
            except ImportError:
                raise RuntimeError("megatron.training (Megatron-LM) is not importable: pass args= to "
                                   "MopdForwardStep, parsed with add_mopd_args") from None
            self._args = get_args()
        return self._args

    def _vocabulary(self) -> int:
        if self._vocab_size is None:
            try:
                from megatron.training import get_tokenizer
            except ImportError:
                raise RuntimeError("megatron.training (Megatron-LM) is not importable: pass vocab_size= (the "
                                   "tokenizer's vocabulary size, without padding) to MopdForwardStep") from None
            self._vocab_size = int(get_tokenizer().vocab_size)
        return self._vocab_size

    def _logs(self) -> Path:
        if self._log_dir is not None:
            return Path(self._log_dir)
        return Path(getattr(self._megatron_args(), "save", None) or ".") / "mopd-logs"


def _no_colocated_teacher(config: Any) -> None:
    raise ConfigError(f"teacher {config.name!r}: placement colocated is not available under Megatron-LM yet")


def teacher_sequences(tokens: torch.Tensor, labels: torch.Tensor, trained: torch.Tensor) -> list[list[int]]:
    """What the teachers score for each row: its tokens up to the last trained position n, then the label
    at n (the token after it), so that row j of the teacher's answer scores ``labels[:, j]`` for every
    trained j. A row with nothing to train sends its first token and label.

    Args:
        tokens, labels: int ``[b, s]``, labels = tokens shifted by one.
        trained: bool ``[b, s]``, the positions the loss covers.
    """
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    last = torch.where(trained, positions, 0).amax(dim=1)
    return [row[:n + 1].tolist() + [int(label[n])] for row, label, n in zip(tokens.cpu(), labels.cpu(), last.tolist())]
