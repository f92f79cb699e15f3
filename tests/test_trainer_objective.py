"""Specification of one micro-batch's objective (``trainer.objective``, ``trainer.forward_step.loss_func``):

- every teacher's loss is a sum over the student's completion tokens, and the step divides by their
  number: one unit for every teacher, whatever routes where;
- with routing, a sample's loss and gradient come only from its teacher;
- ``sft_alpha`` adds cross-entropy on dataset completions only, never on student-generated ones;
- the sampled-token MOPD loss has the gradient w · (log π_S − log π_T) · ∇ log π_S, with the truncated
  importance weight from the behaviour log-probabilities;
- a teacher that left a trained position unscored is an error, and a non-finite loss stops the step
  naming the step, rank and teacher.
"""

from __future__ import annotations

import pytest
import torch

from megatron_mopd.losses import topk_generalized_jsd
from megatron_mopd.teachers import TeacherLogprobs
from megatron_mopd.trainer.config import TeacherConfig
from megatron_mopd.trainer.forward_step import (
    MicroBatch,
    NonFiniteLossError,
    StepContext,
    StepTeacherScores,
    loss_func,
)
from megatron_mopd.trainer.objective import Targets, TeacherTerm, micro_batch_objective

B, S, V, K = 3, 8, 40, 5  # S divisible by 2 * cp for the context-parallel case


def make_logits(seed: int = 0) -> torch.Tensor:
    return (torch.randn(B, S, V, generator=torch.Generator().manual_seed(seed)) * 2).requires_grad_(True)


def make_labels() -> torch.Tensor:
    labels = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))
    labels[:, :2] = -100  # the prompt
    labels[:, -1] = -100
    return labels


def make_scores(seed: int) -> TeacherLogprobs:
    gen = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(B, S, V, generator=gen) * 3, -1)
    top, ids = logp.topk(K, -1)
    token = logp.gather(-1, make_labels().clamp_min(0)[..., None]).squeeze(-1)
    return TeacherLogprobs(top, ids, token, torch.ones(B, S, dtype=torch.bool), tuple(() for _ in range(B)))


def teacher(name: str, loss: str = "topk_jsd", **options) -> TeacherConfig:
    return TeacherConfig(name=name, urls=["http://unused"], loss=loss, topk=K, **{"temperature": 1.0, **options})


def objective(logits, teachers, routes, *, dataset=None, behaviour=None, sft_alpha=0.0):
    labels = make_labels()
    dataset = torch.ones(B, dtype=torch.bool) if dataset is None else dataset
    terms = [TeacherTerm(cfg, scores, route) for (cfg, scores), route in zip(teachers, routes)]
    return micro_batch_objective(logits, Targets(labels, dataset, behaviour), terms, sft_alpha=sft_alpha, vocab_size=V)


def test_a_teachers_loss_is_its_top_k_jsd_summed_over_completion_tokens() -> None:
    logits, scores = make_logits(), make_scores(2)
    parts = objective(logits, [(teacher("a"), scores)], [torch.ones(B, dtype=torch.bool)])
    per_token = topk_generalized_jsd(logits, scores.topk_logprobs, scores.topk_ids, beta=0.5, vocab_size=V)
    completion = make_labels() != -100
    assert parts.num_tokens == completion.sum()
    torch.testing.assert_close(parts.loss_sum, per_token[completion].sum())
    torch.testing.assert_close(parts.divergences["a"][0], per_token[completion].sum())
    assert parts.divergences["a"][1] == completion.sum()


def test_with_routing_each_samples_loss_and_gradient_come_only_from_its_teacher() -> None:
    routes = [torch.tensor([True, False, True]), torch.tensor([False, True, False])]

    def gradient(b_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = make_logits()
        parts = objective(logits, [(teacher("a"), make_scores(2)), (teacher("b"), make_scores(b_seed))], routes)
        parts.loss_sum.backward()
        return parts.divergences["a"][0], logits.grad

    a_loss, grad = gradient(3)
    a_loss_other_b, grad_other_b = gradient(4)  # teacher b says something else
    assert torch.equal(a_loss, a_loss_other_b)
    assert torch.equal(grad[routes[0]], grad_other_b[routes[0]])  # a's samples do not see b
    assert not torch.allclose(grad[routes[1]], grad_other_b[routes[1]])


def test_every_teacher_is_normalized_by_the_student_completion_tokens_it_scores() -> None:
    routes = [torch.tensor([True, False, False]), torch.tensor([False, True, True])]
    parts = objective(make_logits(), [(teacher("a"), make_scores(2)), (teacher("b"), make_scores(3))], routes)
    completion = make_labels() != -100
    assert parts.divergences["a"][1] == completion[0].sum()
    assert parts.divergences["b"][1] == completion[1:].sum()
    assert parts.num_tokens == completion.sum()


def test_static_weights_scale_each_teachers_part() -> None:
    every = torch.ones(B, dtype=torch.bool)
    one = objective(make_logits(), [(teacher("a"), make_scores(2))], [every]).loss_sum
    weighted = objective(make_logits(), [(teacher("a", weight=0.25), make_scores(2)),
                                         (teacher("b", weight=0.0), make_scores(3))], [every, every]).loss_sum
    torch.testing.assert_close(weighted, 0.25 * one)


def test_sft_applies_to_dataset_completions_only() -> None:
    logits = make_logits()
    dataset = torch.tensor([True, False, True])  # sample 1 was generated by the student
    parts = objective(logits, [(teacher("a", weight=0.0), make_scores(2))], [torch.ones(B, dtype=torch.bool)],
                      dataset=dataset, sft_alpha=0.5)
    parts.loss_sum.backward()
    assert torch.count_nonzero(logits.grad[1]) == 0
    labels = make_labels()
    logp = torch.log_softmax(logits.detach(), -1)
    kept = (labels != -100) & dataset[:, None]
    nll = -logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)[kept].sum()
    torch.testing.assert_close(parts.sft[0], nll)
    torch.testing.assert_close(parts.loss_sum, 0.5 * nll)


def test_the_mopd_loss_is_the_importance_weighted_sampled_token_advantage() -> None:
    logits, scores = make_logits(), make_scores(2)
    labels = make_labels()
    behaviour = torch.log_softmax(make_logits(9).detach(), -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    dataset = torch.tensor([False, False, True])
    cfg = teacher("m", loss="mopd", importance_ratio_min=0.5, importance_ratio_max=1.5)
    parts = objective(logits, [(cfg, scores)], [torch.ones(B, dtype=torch.bool)], dataset=dataset, behaviour=behaviour)
    parts.loss_sum.backward()

    reference = logits.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(reference, -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    weight = (logp.detach() - behaviour).exp().clamp(0.5, 1.5)
    weight[2] = 1.0  # a dataset completion has no behaviour policy
    advantage = scores.token_logprobs - logp.detach()
    completion = labels != -100
    (-(weight * advantage * logp)[completion].sum()).backward()
    torch.testing.assert_close(logits.grad, reference.grad)
    torch.testing.assert_close(parts.divergences["m"][0], (-advantage)[completion].sum())


def test_a_trained_position_without_a_teacher_score_is_an_error() -> None:
    scores = make_scores(2)
    valid = scores.valid.clone()
    valid[1, 3] = False
    broken = TeacherLogprobs(scores.topk_logprobs, scores.topk_ids, scores.token_logprobs, valid, scores.sequences)
    with pytest.raises(ValueError, match="teacher 'a' returned no score for position 3 of micro-batch sample 1"):
        objective(make_logits(), [(teacher("a"), broken)], [torch.ones(B, dtype=torch.bool)])


class _Ready:
    def __init__(self, scores: TeacherLogprobs) -> None:
        self.scores = scores

    def wait(self) -> TeacherLogprobs:
        return self.scores


def test_a_non_finite_loss_stops_the_step_naming_step_rank_and_teacher() -> None:
    scores = make_scores(2)
    rows = torch.arange(B)
    context = StepContext(7, [StepTeacherScores(teacher("good"), _Ready(scores), rows),
                              StepTeacherScores(teacher("bad", loss="mopd"), _Ready(scores), rows)],
                          {"good": torch.ones(B, dtype=torch.bool), "bad": torch.ones(B, dtype=torch.bool)},
                          0.0, V, rank=3)
    tokens = torch.zeros(B, S, dtype=torch.long)
    batch = MicroBatch(tokens, tokens, make_labels(), torch.ones(B, dtype=torch.bool), 0, context)
    logits = make_logits().detach()
    loss, count, logs = loss_func(batch, logits)
    assert torch.isfinite(loss) and count == (make_labels() != -100).sum()
    assert set(logs) == {"loss", "divergence/good", "divergence/bad"}
    logits[0, 3] = torch.nan  # the student's logits at a trained position
    with pytest.raises(NonFiniteLossError, match=r"step 7, rank 3: .*teacher\(s\) \['good', 'bad'\]"):
        loss_func(batch, logits)


def test_context_parallel_parts_add_up_to_the_whole_sequence() -> None:
    """Each CP rank holds Megatron's load-balanced part of the positions (and of the teacher's rows):
    the parts' loss sums and token counts add up to the whole sequence's."""
    from megatron_mopd.teachers.placement import cp_slice

    logits, scores, labels = make_logits().detach(), make_scores(2), make_labels()
    cfg, every = teacher("a"), torch.ones(B, dtype=torch.bool)
    whole = micro_batch_objective(logits, Targets(labels, every), [TeacherTerm(cfg, scores, every)],
                                  sft_alpha=0.5, vocab_size=V)
    parts = []
    for rank in range(2):
        def part(t: torch.Tensor, rank: int = rank) -> torch.Tensor:
            return cp_slice(t, 1, cp_size=2, cp_rank=rank)

        rows = TeacherLogprobs(part(scores.topk_logprobs), part(scores.topk_ids), part(scores.token_logprobs),
                               part(scores.valid), scores.sequences)
        parts.append(micro_batch_objective(part(logits), Targets(part(labels), every),
                                           [TeacherTerm(cfg, rows, every)], sft_alpha=0.5, vocab_size=V))
    torch.testing.assert_close(sum(p.loss_sum for p in parts), whole.loss_sum)
    assert sum(p.num_tokens for p in parts) == whole.num_tokens
