"""Where a remote teacher's scores are fetched and where they go (docs/design.md §1, §3, §5).

Only the last pipeline stage computes the loss, so only it needs teacher data. Per data-parallel rank,
one rank fetches: rank 0 of the last stage's tensor-and-context-parallel group (TP rank 0, CP rank 0)
asks the source for this data-parallel rank's sequences and broadcasts the result to the other TP
and CP ranks of its stage — first a header object (``broadcast_object_list``: the shapes, the scored
``sequences`` and ``offsets``, or the source's error), then the tensors packed in two (float32 values,
int64 ids and valid flags). Every rank then keeps the rows of its context-parallel slice (Megatron's
load-balanced split, as ``megatron.core.utils.get_batch_on_this_cp_rank`` slices the tokens). Other
pipeline stages get ``None`` and take part in nothing. Each data-parallel rank calls with its own
sequences; its groups do not span data-parallel ranks.

    pending = submit_teacher_scores(source, sequences)  # the fetching rank starts the request
    ...                                                 # student forward passes overlap with it
    scores = pending.wait()                             # collective over the TP (and CP) group

For remote sources (``TeacherSource``). A ``ColocatedTeacher`` (a ``CollectiveTeacher``) runs the model
on every rank and already leaves identical scores on every TP rank of the last stage: call it directly
on all ranks; ``submit_teacher_scores`` refuses it (on every rank, so nothing hangs).
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_mopd.teachers.types import TeacherLogprobs, TeacherSource

__all__ = ["PendingTeacherScores", "cp_slice", "fetch_teacher_scores", "local_rows", "submit_teacher_scores"]


def cp_slice(
    tensor: torch.Tensor, seq_dim: int, *, cp_size: Optional[int] = None, cp_rank: Optional[int] = None
) -> torch.Tensor:
    """This context-parallel rank's part of ``tensor`` along ``seq_dim``, as Megatron splits tokens.

    The sequence is cut into 2·cp equal chunks; rank r keeps chunks r and 2·cp−1−r, concatenated
    (``get_batch_on_this_cp_rank``'s load balancing for causal attention). ``cp_size`` / ``cp_rank``
    default to Megatron's context-parallel group. Returns ``tensor`` itself when cp_size is 1.

    Raises:
        ValueError: the sequence length is not divisible by 2·cp_size.
    """
    from megatron.core import parallel_state

    cp_size = parallel_state.get_context_parallel_world_size() if cp_size is None else cp_size
    if cp_size == 1:
        return tensor
    cp_rank = parallel_state.get_context_parallel_rank() if cp_rank is None else cp_rank
    if tensor.shape[seq_dim] % (2 * cp_size):
        raise ValueError(f"sequence length {tensor.shape[seq_dim]} (dim {seq_dim}) is not divisible by "
                         f"2 * context_parallel_size = {2 * cp_size}")
    chunks = tensor.chunk(2 * cp_size, dim=seq_dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=seq_dim)


class PendingTeacherScores:
    """Scores being fetched for this rank; ``wait`` delivers them (see ``submit_teacher_scores``)."""

    def __init__(self, future: Optional["Future[TeacherLogprobs]"], needed: bool, seq_length: Optional[int]) -> None:
        self._future = future
        self._needed = needed
        self._seq_length = seq_length

    def wait(self) -> Optional[TeacherLogprobs]:
        """This rank's ``TeacherLogprobs`` (tensors on the communication device, rows padded to
        ``seq_length`` and cut to this CP rank's slice); ``None`` off the last pipeline stage.

        Collective over the last stage's tensor-and-context-parallel group: its ranks must wait on
        their pending fetches in the same order. Raises on every rank of the group when the source
        failed (the original error on the fetching rank).
        """
        if not self._needed:
            return None
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_and_context_parallel_group()
        device = _communication_device(group)
        scores, error = None, None
        header: list[Any] = [None]
        if self._future is not None:
            try:
                scores = self._future.result()
            except Exception as caught:  # re-raised below, after telling the group
                error = caught
            header[0] = _header(scores, error)
        dist.broadcast_object_list(header, group=group, group_src=0, device=device)
        if header[0]["error"] is not None:
            if error is not None:
                raise error
            raise RuntimeError(f"the teacher fetch on the last stage's TP/CP rank 0 failed: {header[0]['error']}")
        scores = _broadcast_tensors(scores, header[0], group, device)
        return local_rows(scores, self._seq_length)


def submit_teacher_scores(
    source: TeacherSource, sequences: Sequence[Sequence[int]], *, seq_length: Optional[int] = None
) -> PendingTeacherScores:
    """Start fetching this data-parallel rank's scores; call on every rank, ``wait`` on the result.

    Only rank 0 of the last stage's TP/CP group calls ``source.submit(sequences)``; nothing is
    communicated until ``wait``.

    Args:
        source: the (remote) teacher.
        sequences: this data-parallel rank's token sequences (its micro-batches of the step).
        seq_length: the student's sequence length S (tokens per row of its batch): the teacher's
            rows (row j = token j+1) are padded with invalid rows to S so that they line up with the
            student's logits, then sliced for context parallelism as Megatron slices the S tokens.
            Required with context parallelism; without it, the rows as the source returns them.
    """
    from megatron.core import parallel_state

    if getattr(source, "collective", False):
        raise TypeError(
            f"{type(source).__name__} is a collective teacher (every rank runs it): call its score() on every "
            f"rank instead of submit_teacher_scores, which asks from one rank only and would hang the others"
        )
    if seq_length is None and parallel_state.get_context_parallel_world_size() > 1:
        raise ValueError(
            "with context parallelism pass seq_length=S, the student's sequence length: the teacher's rows "
            "must be padded to S before they are split the way Megatron splits the S tokens"
        )
    needed = parallel_state.is_pipeline_last_stage()
    future = None
    if needed and parallel_state.get_tensor_and_context_parallel_rank() == 0:
        try:
            future = source.submit(sequences)
        except Exception as error:  # delivered by wait(), after telling the group
            future = Future()
            future.set_exception(error)
    return PendingTeacherScores(future, needed, seq_length)


def fetch_teacher_scores(
    source: TeacherSource, sequences: Sequence[Sequence[int]], *, seq_length: Optional[int] = None
) -> Optional[TeacherLogprobs]:
    """``submit_teacher_scores(...).wait()``: this rank's scores, ``None`` off the last stage."""
    return submit_teacher_scores(source, sequences, seq_length=seq_length).wait()


def _header(scores: Optional[TeacherLogprobs], error: Optional[BaseException]) -> dict[str, Any]:
    if error is not None:
        return {"error": f"{type(error).__name__}: {error}"}
    return {"error": None, "shape": tuple(scores.topk_ids.shape), "sequences": scores.sequences,
            "offsets": scores.offsets}


def _broadcast_tensors(
    scores: Optional[TeacherLogprobs], header: dict[str, Any], group: dist.ProcessGroup, device: torch.device
) -> TeacherLogprobs:
    """Broadcast the fetching rank's tensors, packed as float32 ``[B, R, K+1]`` (top-k log-probabilities,
    token log-probability) and int64 ``[B, R, K+1]`` (top-k ids, valid)."""
    batch, rows, k = header["shape"]
    if scores is not None:
        values = torch.cat([scores.topk_logprobs, scores.token_logprobs[..., None]], dim=-1).to(device)
        ids = torch.cat([scores.topk_ids, scores.valid[..., None].long()], dim=-1).to(device)
    else:
        values = torch.empty(batch, rows, k + 1, dtype=torch.float32, device=device)
        ids = torch.empty(batch, rows, k + 1, dtype=torch.int64, device=device)
    dist.broadcast(values, group=group, group_src=0)
    dist.broadcast(ids, group=group, group_src=0)
    return TeacherLogprobs(values[..., :k], ids[..., :k], values[..., k], ids[..., k].bool(),
                           header["sequences"], header["offsets"])


def local_rows(scores: TeacherLogprobs, seq_length: Optional[int]) -> TeacherLogprobs:
    """Rows padded (invalid: −inf, id 0, token log-probability 0) to ``seq_length``, then this
    context-parallel rank's slice of them."""
    rows = scores.valid.shape[1]
    pad = 0 if seq_length is None else seq_length - rows
    if pad < 0:
        raise ValueError(f"seq_length={seq_length} is shorter than the teacher's {rows} rows")
    padded = (
        torch.nn.functional.pad(tensor, (0, 0) * (tensor.dim() - 2) + (0, pad), value=fill)
        for tensor, fill in ((scores.topk_logprobs, -torch.inf), (scores.topk_ids, 0),
                             (scores.token_logprobs, 0.0), (scores.valid, False))
    )
    return TeacherLogprobs(*(cp_slice(tensor, 1) for tensor in padded), scores.sequences, scores.offsets)


def _communication_device(group: dist.ProcessGroup) -> torch.device:
    """Where ``group``'s collectives take tensors: the CPU for gloo, else the current accelerator."""
    if dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()
    return torch.device(accelerator.type, torch.accelerator.current_device_index())
