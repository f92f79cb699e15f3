"""Cross-tokenizer distillation losses on vocab-sharded student logits (docs/design.md §4).

The student and the teacher tokenize the same text differently; ``crosstok.align_batch`` cuts it into
aligned chunks (spans that both tokenizations cover with whole tokens) and gives each student position
and each teacher row the chunk of the token it predicts. Both losses compare, per chunk, the
student's chunk-averaged distribution with the teacher's (``chunk_teacher.chunk_teacher_distributions``),
and return one loss per chunk ``[C]`` (sum it and divide by C, or reduce (sum, C) across ranks).

``projected_kl`` (P-KL, CTKD / X-Token): the student's distribution is carried into teacher space by
the sparse projection W (``crosstok.VocabProjection``), q = Wᵀ p_S, restricted to the teacher's ids
of the chunk. The divergence is the generalized JSD(β) of docs/design.md §2 on the teacher's ids plus a tail
bucket (``tail``) or renormalized over them (``renorm``); β = 0 (default) is the forward KL(T‖S),
β = 1 the reverse KL(S‖T). Teacher ids that no student token projects to cannot be matched by any
student and are moved to the teacher's tail.

``gold_loss`` (GOLD / H-KL, TRL's hybrid ULD): the teacher's ids split into *common* ones (a student
token is an exact match or projects to it with weight ≥ ``common_threshold``; one-to-one pairs) and
the rest. Common ids: generalized JSD(β) between the student's probability of the paired student
token and the teacher's, over the common ids plus a tail bucket (or renormalized). The rest: ULD, the
L1 distance between the teacher's remaining probabilities sorted in descending order and the
student's largest probabilities over its non-common tokens, truncated to the shorter list. Weights as
TRL's ``uld_hybrid_matched_weight`` / ``uld_hybrid_unmatched_weight``; by default the matched weight is
the fraction of the teacher vocabulary that is common and the unmatched weight its complement.

Vocab parallelism: each TP rank uses only the projection rows of its vocabulary shard; partial
projected probabilities are summed with an identity-backward all-reduce (K values per position), the
ULD top list is merged from per-rank candidates (K per chunk and rank). Nothing of vocabulary size is
gathered.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_mopd.losses.chunk_projection import (
    ChunkStatistics,
    ProjectionRequest,
    ScoredPositions,
    TopListRequest,
    chunk_statistics,
    scored_logsumexp,
)
from megatron_mopd.losses.chunk_teacher import ChunkTeacher, chunk_teacher_distributions
from megatron_mopd.losses.divergence import (
    generalized_jsd_on_support,
    validate_beta,
    validate_temperature,
)
from megatron_mopd.losses.topk import TAIL_MODES, TailMode
from megatron_mopd.parallel.chunking import chunk_rows
from megatron_mopd.parallel.vocab import ProcessGroup, VocabShard

_TINY = torch.finfo(torch.float32).tiny


def projected_kl(
    student_logits: torch.Tensor,
    student_chunk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_chunk_ids: torch.Tensor,
    projection,
    *,
    num_chunks: Optional[int] = None,
    beta: float = 0.0,
    temperature: float = 1.0,
    tail: TailMode = "tail",
    vocab_size: Optional[int] = None,
    tp_group: Optional[ProcessGroup] = None,
    chunk_size: Optional[int] = None,
    scale_by_temperature_squared: bool = False,
    validate: bool = True,
) -> torch.Tensor:
    """P-KL per aligned chunk between vocab-sharded student logits and a cross-tokenizer teacher.

    Args:
        student_logits: ``[..., V_local]`` this rank's shard of the student's logits.
        student_chunk_ids: int ``[...]`` the chunk each student position predicts into, −1 = none;
            on any device (on the host, as the trainer's alignment gives them, they cost no device
            sync).
        teacher_topk_logprobs, teacher_topk_ids: ``[..., K]`` the teacher's raw top-K per teacher
            row (teacher-vocabulary ids; −inf = absent), e.g. ``TeacherLogprobs`` of a remote teacher.
        teacher_chunk_ids: int ``[...]`` (the teacher rows' leading shape) the chunk of each row.
        projection: the ``crosstok.VocabProjection`` from the student's to the teacher's vocabulary.
        num_chunks: C (default: 1 + the largest chunk id, a host sync: required with
            ``validate=False``); each chunk needs a student position and a teacher row.
        beta: 0 = forward KL(T‖S) (default), 1 = reverse KL(S‖T), between: generalized JSD.
        temperature, vocab_size, tp_group, chunk_size, scale_by_temperature_squared: as in
            ``generalized_jsd``; the teacher is tempered per row over its support.
        tail: ``"tail"`` (the teacher's ids plus one bucket for the rest, default) or ``"renorm"``.
        validate: check the chunk ids and the teacher's values on the device (``topk_generalized_jsd``'s
            checks, in the teacher vocabulary) and raise ValueError naming the first bad one; host
            syncs. False: none of these checks and no host sync for them; a chunk without a student
            position or a teacher row gets a NaN loss.
    Returns:
        float32 ``[C]``, identical on every TP rank.
    """
    validate_beta(beta)
    setup = _CrossTokenizerInputs.of(
        student_logits, student_chunk_ids, teacher_chunk_ids, projection, num_chunks,
        temperature, tail, vocab_size, tp_group, chunk_size, validate,
    )
    teacher = chunk_teacher_distributions(
        teacher_topk_logprobs, teacher_topk_ids, teacher_chunk_ids, setup.num_chunks,
        teacher_vocab_size=projection.teacher_vocab_size, temperature=temperature, tail=tail,
        allowed=projection.teacher_reachable(), validate=validate,
    )
    indices, weights = _projection_rows(projection, setup.shard, student_logits.device)
    student = setup.statistics(student_logits, projection=ProjectionRequest(teacher.ids, indices, weights))
    loss = _uncovered_chunks_nan(_chunk_divergence(student.projected, teacher, beta, tail), setup, teacher)
    return loss * temperature**2 if scale_by_temperature_squared else loss


def gold_loss(
    student_logits: torch.Tensor,
    student_chunk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_chunk_ids: torch.Tensor,
    projection,
    *,
    num_chunks: Optional[int] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: TailMode = "tail",
    common_threshold: float = 0.6,
    matched_weight: Optional[float] = None,
    unmatched_weight: Optional[float] = None,
    vocab_size: Optional[int] = None,
    tp_group: Optional[ProcessGroup] = None,
    chunk_size: Optional[int] = None,
    scale_by_temperature_squared: bool = False,
    validate: bool = True,
) -> torch.Tensor:
    """GOLD hybrid loss per aligned chunk: JSD(β) on common tokens + ULD on the rest.

    Arguments as in ``projected_kl``, plus:
        beta: the generalized JSD's β for the common tokens (TRL's ``beta``), default 0.5.
        common_threshold: a student token whose largest projection weight reaches it is common
            with that teacher token (exact matches always are); default 0.6.
        matched_weight, unmatched_weight: weights of the two parts, both given or both None (then
            matched = |common pairs| / teacher vocabulary size, unmatched = 1 − matched, as TRL).
    Returns:
        float32 ``[C]``, identical on every TP rank.
    """
    validate_beta(beta)
    if (matched_weight is None) != (unmatched_weight is None):
        raise ValueError(
            "matched_weight and unmatched_weight must be given together (both floats) or both left "
            "None for the vocabulary-overlap default"
        )
    if not 0.0 <= common_threshold <= 1.0:
        raise ValueError(f"common_threshold must be in [0, 1], got {common_threshold}")
    setup = _CrossTokenizerInputs.of(
        student_logits, student_chunk_ids, teacher_chunk_ids, projection, num_chunks,
        temperature, tail, vocab_size, tp_group, chunk_size, validate,
    )
    shard, device = setup.shard, student_logits.device
    teacher = chunk_teacher_distributions(
        teacher_topk_logprobs, teacher_topk_ids, teacher_chunk_ids, setup.num_chunks,
        teacher_vocab_size=projection.teacher_vocab_size, temperature=temperature, tail=tail,
        validate=validate,
    )
    common_student, common_teacher = (
        ids.to(device, non_blocking=True) for ids in projection.common_pairs(common_threshold)
    )
    if matched_weight is None:
        matched_weight = common_teacher.numel() / projection.teacher_vocab_size
        unmatched_weight = 1.0 - matched_weight

    # Common part: the one-to-one pairs as a one-hot projection of this rank's rows.
    student_of_teacher = torch.full((projection.teacher_vocab_size,), -1, dtype=torch.long, device=device)
    student_of_teacher[common_teacher] = common_student
    matched = teacher.present & (student_of_teacher[teacher.ids.clamp_min(0)] >= 0)
    matched_teacher = _restricted(teacher, matched, tail)
    local = common_student - shard.start
    mine = (local >= 0) & (local < shard.num_valid)
    one_hot_ids = torch.full((shard.local_size, 1), -1, dtype=torch.long, device=device)
    one_hot_ids[local[mine], 0] = common_teacher[mine]
    # The rest: the student's largest probabilities over its non-common tokens, for ULD.
    student = setup.statistics(
        student_logits,
        projection=ProjectionRequest(matched_teacher.ids, one_hot_ids,
                                     torch.ones((shard.local_size, 1), device=device)),
        top_list=TopListRequest(one_hot_ids[:, 0] >= 0, teacher.ids.shape[1]),
    )
    matched_loss = _chunk_divergence(student.projected, matched_teacher, beta, tail)
    teacher_rest = torch.where(teacher.present & ~matched, teacher.probs, -1.0).sort(dim=-1, descending=True).values
    both = (teacher_rest >= 0) & (student.top_ids >= 0)  # sorted lists: a prefix of each
    unmatched_loss = torch.where(both, (student.top_values - teacher_rest).abs(), 0.0).sum(-1)

    loss = _uncovered_chunks_nan(matched_weight * matched_loss + unmatched_weight * unmatched_loss, setup, teacher)
    return loss * temperature**2 if scale_by_temperature_squared else loss


class _CrossTokenizerInputs:
    """Validated shared inputs: the shard, the scored positions, their global logsumexp."""

    def __init__(
        self, shard: VocabShard, positions: ScoredPositions, lse: torch.Tensor, rows: int, num_chunks: int,
        temperature: float,
    ):
        self.shard, self.positions, self.lse, self.rows, self.num_chunks = shard, positions, lse, rows, num_chunks
        self.temperature = temperature

    def statistics(self, student_logits: torch.Tensor, **requests) -> ChunkStatistics:
        return chunk_statistics(student_logits, self.lse, self.positions, self.shard, self.temperature, **requests)

    @classmethod
    def of(
        cls,
        student_logits: torch.Tensor,
        student_chunk_ids: torch.Tensor,
        teacher_chunk_ids: torch.Tensor,
        projection,
        num_chunks: Optional[int],
        temperature: float,
        tail: str,
        vocab_size: Optional[int],
        tp_group: Optional[ProcessGroup],
        chunk_size: Optional[int],
        validate: bool,
    ) -> "_CrossTokenizerInputs":
        validate_temperature(temperature)
        if tail not in TAIL_MODES:
            raise ValueError(f"tail must be one of {TAIL_MODES}, got {tail!r}")
        if student_chunk_ids.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"student_chunk_ids {tuple(student_chunk_ids.shape)} must have the student logits' "
                f"leading shape {tuple(student_logits.shape[:-1])}"
            )
        shard = VocabShard.of(student_logits.shape[-1], vocab_size, tp_group)
        if projection.student_vocab_size > shard.vocab_size:
            raise ValueError(
                f"the projection maps a student vocabulary of {projection.student_vocab_size} tokens but "
                f"the student logits cover {shard.vocab_size}: it was built for another student "
                f"tokenizer (rebuild it with `mopd build-projection`) or vocab_size is wrong"
            )
        if num_chunks is None:
            if not validate:
                raise ValueError(
                    "num_chunks is required with validate=False (reading it off the chunk ids is a host "
                    "sync): pass the num_chunks of align_batch"
                )
            ids = [t.max().cpu() for t in (student_chunk_ids, teacher_chunk_ids) if t.numel()]
            num_chunks = int(torch.stack(ids).max()) + 1 if ids else 0
        rows = chunk_rows(chunk_size, shard.local_size, student_logits.device)
        positions = ScoredPositions.of(student_chunk_ids, num_chunks, rows, device=student_logits.device,
                                       validate=validate)
        logits_2d = student_logits.reshape(-1, shard.local_size)
        lse = scored_logsumexp(logits_2d.detach(), positions, shard, temperature)
        return cls(shard, positions, lse, rows, num_chunks, temperature)


def _uncovered_chunks_nan(loss: torch.Tensor, setup: _CrossTokenizerInputs, teacher: ChunkTeacher) -> torch.Tensor:
    """NaN for a chunk without a student position or a teacher row (unvalidated input only): such a
    chunk has no loss, and a finite stand-in would pass unnoticed."""
    return torch.where((setup.positions.count > 0) & (teacher.rows > 0), loss, torch.nan)


def _projection_rows(projection, shard: VocabShard, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of W: (teacher ids, weights) ``[V_local, R]`` on ``device``."""
    rows = projection.shard(shard.start, shard.start + shard.local_size)
    return rows.indices.to(device, non_blocking=True), rows.weights.to(device, non_blocking=True)


def _restricted(teacher: ChunkTeacher, keep: torch.Tensor, tail: str) -> ChunkTeacher:
    """The teacher's chunks restricted to the ``keep`` entries (the rest joins the tail / is dropped)."""
    probs = torch.where(keep, teacher.probs, 0.0)
    ids = torch.where(keep, teacher.ids, -1)
    if tail == "renorm":
        mass = probs.sum(-1, keepdim=True)
        return ChunkTeacher(ids, torch.where(mass > 0, probs / mass.clamp_min(_TINY), 0.0), teacher.tail_mass)
    return ChunkTeacher(ids, probs, (1.0 - probs.sum(-1)).clamp_min_(0.0))


def _chunk_divergence(projected: torch.Tensor, teacher: ChunkTeacher, beta: float, tail: str) -> torch.Tensor:
    """Generalized JSD per chunk between the student's projected probabilities [C, K] and the teacher.

    Absent entries are -inf on both sides (they add 0). Present probabilities are floored at float32's
    tiny (log ≈ −87.3): a projected probability of 0 (every student token projecting there at -inf)
    costs a large finite penalty, not the +inf of β = 0, and the gradient stays finite.
    """
    present = teacher.present
    teacher_logp = torch.where(present, teacher.probs.clamp_min(_TINY).log(), -torch.inf)
    if tail == "tail":
        student_logp = torch.where(present, projected.clamp_min(_TINY).log(), -torch.inf)
        student_tail = (1.0 - projected.sum(-1)).clamp_min(_TINY).log()
        teacher_tail = teacher.tail_mass.clamp_min(_TINY).log()
        student_logp = torch.cat([student_logp, student_tail[:, None]], dim=-1)
        teacher_logp = torch.cat([teacher_logp, teacher_tail[:, None]], dim=-1)
    else:
        mass = projected.sum(-1, keepdim=True).clamp_min(_TINY)
        student_logp = torch.where(present, (projected / mass).clamp_min(_TINY).log(), -torch.inf)
    return generalized_jsd_on_support(student_logp, teacher_logp, beta)
