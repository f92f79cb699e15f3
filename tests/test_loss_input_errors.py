"""Specification: bad input to the losses raises ValueError naming the argument and the fix.

-inf logits are tokens of probability 0 and legal; NaN or +inf teacher logits (or a teacher position
of only -inf) raise. NaN or +inf student logits are not checked (that would cost a device sync) but
never give a finite loss where the loss reads them (every logit, except in top-k ``renorm`` mode,
which reads only the logits at the teacher's ids).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_mopd.losses import generalized_jsd, masked_sum_and_count, topk_generalized_jsd
from megatron_mopd.testing import run_on_ranks

V = 32


def student() -> torch.Tensor:
    return torch.randn(4, 2, V)


def teacher_topk(k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    logprobs, ids = torch.log_softmax(torch.randn(4, 2, V), -1).topk(k, dim=-1)
    return logprobs, ids


@pytest.mark.parametrize("beta", [-0.1, 1.5])
def test_beta_outside_unit_interval(beta: float) -> None:
    with pytest.raises(ValueError, match="beta must be in"):
        generalized_jsd(student(), student(), beta=beta)
    with pytest.raises(ValueError, match="beta must be in"):
        topk_generalized_jsd(student(), *teacher_topk(), beta=beta)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_temperature_not_positive(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature must be"):
        generalized_jsd(student(), student(), temperature=temperature)
    with pytest.raises(ValueError, match="temperature must be"):
        topk_generalized_jsd(student(), *teacher_topk(), temperature=temperature)


def test_teacher_logits_of_another_shape() -> None:
    with pytest.raises(ValueError, match="teacher_logits must have the student's shape"):
        generalized_jsd(student(), torch.randn(4, 2, V + 1))


def test_topk_tensors_of_mismatched_shapes() -> None:
    logprobs, ids = teacher_topk()
    with pytest.raises(ValueError, match="same shape"):
        topk_generalized_jsd(student(), logprobs, ids[..., :3])
    with pytest.raises(ValueError, match="leading shape"):
        topk_generalized_jsd(student(), logprobs[:3], ids[:3])


def test_teacher_ids_must_be_integers() -> None:
    logprobs, ids = teacher_topk()
    with pytest.raises(ValueError, match="teacher_topk_ids must be an integer tensor"):
        topk_generalized_jsd(student(), logprobs, ids.float())


@pytest.mark.parametrize("bad_id", [-1, V, V + 5])
def test_teacher_ids_outside_the_vocabulary(bad_id: int) -> None:
    logprobs, ids = teacher_topk()
    ids[2, 1, 0] = bad_id
    with pytest.raises(ValueError, match=rf"teacher_topk_ids\[2, 1, 0\] = {bad_id} is outside"):
        topk_generalized_jsd(student(), logprobs, ids)


def test_teacher_ids_in_the_padded_vocabulary() -> None:
    logprobs, ids = teacher_topk()
    ids[0, 0, 0] = V - 1
    with pytest.raises(ValueError, match="outside the student vocabulary"):
        topk_generalized_jsd(student(), logprobs, ids, vocab_size=V - 2)


def test_absent_entries_may_carry_any_id() -> None:
    logprobs, ids = teacher_topk()
    logprobs[1, 1, 2:] = -torch.inf
    ids[1, 1, 2:] = -1
    assert torch.isfinite(topk_generalized_jsd(student(), logprobs, ids)).all()


def test_repeated_teacher_ids() -> None:
    logprobs, ids = teacher_topk()
    ids[3, 0, 1] = ids[3, 0, 0]
    with pytest.raises(ValueError, match="repeated id at position \\(3, 0\\)"):
        topk_generalized_jsd(student(), logprobs, ids)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_teacher_logprobs_nan_or_positive_infinity(bad_value: float) -> None:
    logprobs, ids = teacher_topk()
    logprobs[0, 0, 0] = bad_value
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        topk_generalized_jsd(student(), logprobs, ids)


@pytest.mark.parametrize(
    ("bad_value", "problem"), [(float("nan"), "has a NaN logit"), (float("inf"), "has a \\+inf logit")]
)
def test_teacher_logits_nan_or_positive_infinity(bad_value: float, problem: str) -> None:
    teacher = student()
    teacher[2, 1, 5] = bad_value
    with pytest.raises(ValueError, match=rf"teacher_logits\[2, 1\] {problem}.*mask banned tokens with -inf"):
        generalized_jsd(student(), teacher)


def test_teacher_logits_all_minus_infinity_at_a_position() -> None:
    teacher = student()
    teacher[1, 0, :] = -torch.inf
    with pytest.raises(ValueError, match=r"teacher_logits\[1, 0\] is -inf at every vocabulary id"):
        generalized_jsd(student(), teacher)


def test_teacher_minus_inf_logits_are_legal_and_padding_is_never_read() -> None:
    teacher = student()
    teacher[..., V - 2 :] = torch.nan  # padding is never read
    teacher[..., : V - 2 : 3] = -torch.inf
    assert torch.isfinite(generalized_jsd(student(), teacher, vocab_size=V - 2)).all()


def _nan_teacher_on_rank_1() -> str:
    """Rank 1's shard holds the NaN: every rank must raise the same error (none waits in a collective)."""
    gen = torch.Generator().manual_seed(0)
    student_logits, teacher_logits = torch.randn(2, 3, 2 * V, generator=gen).unbind(0)
    teacher_logits[2, V + 4] = torch.nan
    columns = slice(dist.get_rank() * V, (dist.get_rank() + 1) * V)
    try:
        generalized_jsd(student_logits[:, columns], teacher_logits[:, columns], tp_group=dist.group.WORLD)
    except ValueError as error:
        return str(error)
    return "no error"


def test_teacher_nan_on_one_tensor_parallel_rank_raises_on_every_rank() -> None:
    messages = run_on_ranks(_nan_teacher_on_rank_1, 2)
    assert messages[0] == messages[1] and messages[0].startswith("teacher_logits[2] has a NaN logit")


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_student_logits_nan_or_positive_infinity_give_a_non_finite_loss(bad_value, beta) -> None:
    """Not an error (no device sync is spent on the student), but never a finite loss."""
    logits = student()
    logits[3, 0, 7] = bad_value
    loss = generalized_jsd(logits, student(), beta=beta)
    assert not torch.isfinite(loss[3, 0]) and torch.isfinite(loss[:3]).all()
    logprobs, ids = teacher_topk()
    assert not torch.isfinite(topk_generalized_jsd(logits, logprobs, ids, beta=beta)[3, 0])


def test_logits_passed_as_logprobs_in_tail_mode() -> None:
    raw_logits, ids = torch.randn(4, 2, V).add(3.0).topk(4, dim=-1)
    with pytest.raises(ValueError, match="not logits, or use tail='renorm'"):
        topk_generalized_jsd(student(), raw_logits, ids, tail="tail")
    assert torch.isfinite(topk_generalized_jsd(student(), raw_logits, ids, tail="renorm")).all()


def test_unknown_tail_mode() -> None:
    with pytest.raises(ValueError, match="tail must be one of"):
        topk_generalized_jsd(student(), *teacher_topk(), tail="ghost")


@pytest.mark.parametrize("vocab_size", [0, V + 1])
def test_vocab_size_that_does_not_fit_the_logits(vocab_size: int) -> None:
    with pytest.raises(ValueError, match=f"vocab_size={vocab_size} does not fit"):
        generalized_jsd(student(), student(), vocab_size=vocab_size)
    with pytest.raises(ValueError, match=f"vocab_size={vocab_size} does not fit"):
        topk_generalized_jsd(student(), *teacher_topk(), vocab_size=vocab_size)


def test_chunk_size_not_positive() -> None:
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        generalized_jsd(student(), student(), chunk_size=0)


def test_mask_of_another_shape() -> None:
    with pytest.raises(ValueError, match="labels has shape"):
        masked_sum_and_count(torch.zeros(4, 2), torch.zeros(2, 4))


def test_masked_positions_contribute_nothing_even_when_not_finite() -> None:
    loss = torch.tensor([1.0, float("nan"), 3.0], requires_grad=True)
    total, count = masked_sum_and_count(loss, torch.tensor([5, -100, 7]))
    (total / count).backward()
    assert total.item() == 4.0 and count.item() == 2.0
    assert loss.grad.tolist() == [0.5, 0.0, 0.5]
