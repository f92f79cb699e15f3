"""A colocated Megatron-Core teacher: a ``GPTModel`` with the student's TP/PP layout, run forward-only.

The teacher lives in the trainer's processes and shares Megatron's parallel state with the student
(docs/design.md §1 step 4, §3). Scoring runs the step's sequences through Megatron's own pipeline schedule
(``get_forward_backward_func()(..., forward_only=True, collect_non_loss_data=True)``), one micro-batch
of ``micro_batch_size`` sequences after another. On the last pipeline stage each micro-batch's
vocab-sharded logits ``[b, T, V_local]`` are reduced at once to what the loss needs:

- ``score`` / ``submit``: the vocab-parallel top-k log-probabilities and the log-probability of the
  actual next token (masked local gather + all-reduce over TP), so the step never holds more than one
  micro-batch's logits;
- ``iter_logits``: the sharded logits themselves, one micro-batch per iteration (full-vocabulary loss).

Every rank of the model-parallel group (all TP ranks of all pipeline stages) must call these with the
same sequences and in the same order, since each call runs collectives and pipeline sends. Non-last
pipeline stages run their part of the model and get ``None``. Ids at or above the true vocabulary size
(Megatron's vocabulary padding) are never selected. Scoring is synchronous (the accelerator is shared
with the student): ``submit`` computes at once and returns a completed future.

Not supported: context parallelism (the local layer spec has no CP attention) and virtual (interleaved)
pipeline stages (one model chunk per rank).
"""

from __future__ import annotations

from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

import torch

from megatron_mopd.parallel.chunking import chunk_rows, local_logsumexp
from megatron_mopd.parallel.topk import vocab_parallel_topk
from megatron_mopd.parallel.vocab import VocabShard
from megatron_mopd.teachers.types import TeacherLogprobs

__all__ = ["ColocatedTeacher"]

_Reduced = TypeVar("_Reduced")
MicroBatch = dict[str, torch.Tensor]


class ColocatedTeacher:
    """A forward-only Megatron ``GPTModel`` teacher implementing ``CollectiveTeacher`` (every rank calls it).

    Args:
        model: this rank's ``GPTModel`` (its pipeline stage and TP shard), built under the current
            Megatron parallel state; it is frozen here (eval mode, ``requires_grad_(False)``).
        topk: K, the number of teacher log-probabilities kept per token.
        vocab_size: the true vocabulary size; the model's (padded) output layer may be larger.
        micro_batch_size: sequences per micro-batch of the schedule.
        pad_token_id: the token fed at padded positions (never scored).
    """

    collective = True

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        topk: int,
        vocab_size: int,
        micro_batch_size: int = 1,
        pad_token_id: int = 0,
    ) -> None:
        from megatron.core import parallel_state

        config = model.config
        layout = (parallel_state.get_tensor_model_parallel_world_size(),
                  parallel_state.get_pipeline_model_parallel_world_size())
        if (config.tensor_model_parallel_size, config.pipeline_model_parallel_size) != layout:
            raise ValueError(
                f"teacher config has TP={config.tensor_model_parallel_size}, PP="
                f"{config.pipeline_model_parallel_size}; the parallel state has TP={layout[0]}, PP={layout[1]}"
            )
        if parallel_state.get_context_parallel_world_size() > 1:
            raise ValueError("the colocated teacher does not support context parallelism")
        if (parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1) > 1:
            raise ValueError(
                "the colocated teacher does not support virtual (interleaved) pipeline stages: run it "
                "with a plain pipeline layout"
            )
        if not 1 <= topk <= vocab_size:
            raise ValueError(f"topk must be in [1, vocab_size={vocab_size}], got {topk}")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
        if not 0 <= pad_token_id < vocab_size:
            raise ValueError(f"pad_token_id must be in [0, vocab_size={vocab_size}), got {pad_token_id}")
        self.model = model.eval().requires_grad_(False)
        self.topk = topk
        self.vocab_size = vocab_size
        self.micro_batch_size = micro_batch_size
        self.pad_token_id = pad_token_id

    @classmethod
    def from_config(
        cls,
        config: Any,
        layer_spec: Any,
        *,
        vocab_size: int,
        padded_vocab_size: int,
        max_sequence_length: int,
        topk: int,
        micro_batch_size: int = 1,
        checkpoint_dir: Optional[str | Path] = None,
        **gpt_model_kwargs: Any,
    ) -> "ColocatedTeacher":
        """Build this rank's ``GPTModel(config, layer_spec, ...)`` and, if given, load its weights
        from the Megatron distributed checkpoint ``checkpoint_dir`` (any TP/PP layout it was saved at).

        ``gpt_model_kwargs`` go to ``GPTModel`` (e.g. ``share_embeddings_and_output_weights``,
        ``position_embedding_type``); ``pre_process`` / ``post_process`` follow this rank's stage.
        """
        from megatron.core import parallel_state
        from megatron.core.models.gpt import GPTModel

        model = GPTModel(
            config,
            layer_spec,
            vocab_size=padded_vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            **gpt_model_kwargs,
        )
        teacher = cls(model, topk=topk, vocab_size=vocab_size, micro_batch_size=micro_batch_size)
        if checkpoint_dir is not None:
            teacher.load(checkpoint_dir)
        return teacher

    def save(self, checkpoint_dir: str | Path) -> None:
        """Write the weights as a Megatron distributed checkpoint (collective over all ranks).

        Megatron's ``torch_dist`` writer starts worker processes and needs ``psutil``: call it from a
        process that may have children (not a daemonic one)."""
        from megatron.core import dist_checkpointing

        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(self.model.sharded_state_dict(), str(checkpoint_dir))

    def load(self, checkpoint_dir: str | Path) -> None:
        """Load weights from a Megatron distributed checkpoint, resharded to this layout (collective)."""
        from megatron.core import dist_checkpointing

        state_dict = dist_checkpointing.load(self.model.sharded_state_dict(), str(checkpoint_dir))
        self.model.load_state_dict(state_dict)

    @property
    def is_last_stage(self) -> bool:
        from megatron.core import parallel_state

        return parallel_state.is_pipeline_last_stage()

    def submit(self, sequences: Sequence[Sequence[int]]) -> "Future[Optional[TeacherLogprobs]]":
        """``score`` computed now (the accelerator is shared), as a completed future."""
        future: "Future[Optional[TeacherLogprobs]]" = Future()
        try:
            future.set_result(self.score(sequences))
        except Exception as error:  # delivered through the future, like a remote source
            future.set_exception(error)
        return future

    def score(self, sequences: Sequence[Sequence[int]]) -> Optional[TeacherLogprobs]:
        """Score B token sequences (max length T): ``TeacherLogprobs`` with ``[B, T-1, ...]`` rows on
        the last pipeline stage (identical on its TP ranks), ``None`` on the other stages.

        Row j of sequence b is the teacher's distribution of token j+1; rows j + 1 >= len(b) are
        invalid (top-k log-probabilities −inf, ids 0, token log-probability 0).
        """
        batches, num_rows = self._micro_batches(sequences)
        outputs = self._run(batches, partial(self._topk_of_micro_batch, num_rows))
        if not self.is_last_stage:
            return None
        batch_size = len(sequences)
        topk_logprobs, topk_ids, token_logprobs, valid = (
            torch.cat(parts)[:batch_size] for parts in zip(*outputs)
        )
        return TeacherLogprobs(
            topk_logprobs, topk_ids, token_logprobs, valid, tuple(tuple(int(t) for t in s) for s in sequences)
        )

    def iter_logits(self, sequences: Sequence[Sequence[int]]) -> Iterator[Optional[torch.Tensor]]:
        """The teacher's vocab-sharded logits, one micro-batch per iteration (full-vocabulary loss).

        Item i covers ``sequences[i*micro_batch_size : (i+1)*micro_batch_size]``: float ``[b, T-1, V_local]``
        on the last pipeline stage (this TP rank's slice of the padded vocabulary; row j is the
        distribution of token j+1, rows j + 1 >= len are padding), ``None`` on the other stages. Each
        ``next`` runs one micro-batch through the schedule, so all ranks must advance together.
        """
        batches, num_rows = self._micro_batches(sequences)
        for index, batch in enumerate(batches):
            outputs = self._run([batch], lambda logits, _batch: logits)
            size = min(self.micro_batch_size, len(sequences) - index * self.micro_batch_size)
            yield outputs[0][:size, :num_rows] if self.is_last_stage else None

    def _micro_batches(self, sequences: Sequence[Sequence[int]]) -> tuple[list[MicroBatch], int]:
        """Right-padded micro-batches of ``micro_batch_size`` rows (the last one filled with empty
        rows, so every micro-batch has the pipeline's tensor shape), and the number of scored rows T-1."""
        if not sequences or min(len(s) for s in sequences) == 0:
            raise ValueError("need at least one sequence, and no empty sequence")
        lengths = torch.tensor([len(s) for s in sequences])
        max_length = int(lengths.max())
        if max_length > self.model.max_sequence_length:
            raise ValueError(f"a sequence has {max_length} tokens; the teacher takes at most "
                             f"{self.model.max_sequence_length}")
        config = self.model.config
        multiple = config.tensor_model_parallel_size if config.sequence_parallel else 1
        padded_length = -(-max_length // multiple) * multiple
        padded_batch = -(-len(sequences) // self.micro_batch_size) * self.micro_batch_size
        tokens = torch.full((padded_batch, padded_length + 1), self.pad_token_id, dtype=torch.int64)
        for row, sequence in enumerate(sequences):
            tokens[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.int64)
        if int(tokens.max()) >= self.vocab_size or int(tokens.min()) < 0:
            raise ValueError(f"token ids must be in [0, vocab_size={self.vocab_size})")
        lengths = torch.cat([lengths, lengths.new_zeros(padded_batch - len(sequences))])
        device = next(self.model.parameters()).device
        position_ids = torch.arange(padded_length, device=device).expand(self.micro_batch_size, -1)
        tokens = tokens.to(device)
        batches = [
            {"tokens": chunk[:, :-1], "labels": chunk[:, 1:], "position_ids": position_ids,
             "lengths": chunk_lengths.to(device)}
            for chunk, chunk_lengths in zip(tokens.split(self.micro_batch_size),
                                            lengths.split(self.micro_batch_size))
        ]
        return batches, max_length - 1

    def _run(
        self, batches: list[MicroBatch], reduce: Callable[[torch.Tensor, MicroBatch], _Reduced]
    ) -> list[_Reduced]:
        """Run the forward-only schedule over ``batches``; on the last stage return
        ``reduce(logits [b, T, V_local], batch)`` per micro-batch (the logits are dropped after it),
        elsewhere an empty list."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator: Iterator[MicroBatch], model: torch.nn.Module) -> tuple[Any, Callable]:
            batch = next(data_iterator)
            output = model(batch["tokens"], batch["position_ids"], None)
            return output, partial(_reduce_on_last_stage, reduce, batch)

        with torch.no_grad():
            return get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(batches),
                model=[self.model],
                num_microbatches=len(batches),
                seq_length=batches[0]["tokens"].shape[1],
                micro_batch_size=self.micro_batch_size,
                forward_only=True,
                collect_non_loss_data=True,
            )

    def _topk_of_micro_batch(
        self, num_rows: int, logits: torch.Tensor, batch: MicroBatch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(top-k log-probabilities [b, R, K], ids [b, R, K], token log-probabilities [b, R], valid [b, R])
        of one micro-batch's sharded logits [b, T, V_local], R = num_rows <= T, padding rows masked.

        Works on all T rows of the logits as a view (slicing R rows first would copy them)."""
        from megatron.core import parallel_state

        tp_group = parallel_state.get_tensor_model_parallel_group()
        shard = VocabShard.of(logits.shape[-1], self.vocab_size, tp_group)
        flat = logits.reshape(-1, shard.local_size)
        top_logits, topk_ids = vocab_parallel_topk(flat, self.topk, vocab_size=self.vocab_size, tp_group=tp_group)
        rows = chunk_rows(None, shard.local_size, flat.device)
        logsumexp = shard.logsumexp(local_logsumexp(flat, shard.num_valid, 1.0, rows))
        labels = batch["labels"].reshape(-1, 1)
        label_logits = shard.gather_columns(flat, labels, torch.ones_like(labels, dtype=torch.bool))[:, 0]

        def scored_rows(per_token: torch.Tensor) -> torch.Tensor:
            return per_token.view(*logits.shape[:2], *per_token.shape[1:])[:, :num_rows]

        valid = torch.arange(num_rows, device=logits.device) + 1 < batch["lengths"][:, None]
        topk_logprobs = scored_rows(top_logits - logsumexp[:, None]).masked_fill(~valid[..., None], -torch.inf)
        token_logprobs = scored_rows(label_logits - logsumexp).masked_fill(~valid, 0.0)
        return topk_logprobs, scored_rows(topk_ids).masked_fill(~valid[..., None], 0), token_logprobs, valid


def _reduce_on_last_stage(
    reduce: Callable[[torch.Tensor, MicroBatch], _Reduced],
    batch: MicroBatch,
    logits: torch.Tensor,
    non_loss_data: bool = False,
) -> _Reduced:
    """The schedule's loss function: with ``collect_non_loss_data`` it stores what this returns."""
    assert non_loss_data, "the teacher's schedule runs with collect_non_loss_data=True"
    return reduce(logits, batch)
