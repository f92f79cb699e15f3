"""Specification: ``loss.fused_output_layer`` — the trainer's losses without the student's logits.

- The objective of one micro-batch on the output layer's input and weight (``OutputLayerInput``) equals
  the objective on the logits ``hidden @ W.T``: loss, logs, hidden-state and weight gradients (float32,
  relative 1e-5), for routed top-K JSD teachers (tail and renorm), the MOPD loss with importance weights
  at another temperature, and SFT; with validation on and off. Alone, SFT reuses the gradients the
  forward computed; with MOPD's per-token weights they are recomputed.
- Megatron's ``forward_step`` on a Megatron-Core student at TP=1 and TP=2: with the switch, the last
  stage returns the hidden states, and the loss, its logs and every parameter's gradient equal the
  unfused step's (the tied embedding gets both its gradients); the output layer is itself again after
  the forward. With sequence parallel (each TP rank holding a slice of the sequence's hidden states)
  the loss, logs and gradients are the replicated ones. With validation off the loss's forward and
  backward make no host sync.
- The configuration refuses a teacher loss that needs the logits (jsd, ctkd, gold) under the switch,
  naming the teacher and the fix.

The trainer end to end with the switch (``python -m megatron_mopd.train`` at TP=1 and TP=2) gives the
unfused run's losses: ``test_trainer_e2e``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import dense_reference as dense
from megatron_mopd.teachers import TeacherLogprobs
from megatron_mopd.testing.gpt import TinyGPT
from megatron_mopd.trainer.config import ConfigError, TeacherConfig, load_config
from megatron_mopd.trainer.objective import Targets, TeacherTerm, micro_batch_objective
from megatron_mopd.trainer.student_output import OutputLayerInput, StudentLogits
from test_host_syncs import HostSyncCounter

B, S, H, V, PADDED_V, K = 2, 16, 24, 100, 128, 4
TOLERANCE = 1e-5


def make_labels() -> torch.Tensor:
    labels = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))
    labels[:, :3] = -100  # the prompt
    labels[1, -4:] = -100  # padding
    return labels


def make_scores(seed: int) -> TeacherLogprobs:
    gen = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(B, S, V, generator=gen) * 2, -1)
    top, ids = logp.topk(K, -1)
    top[0, 5, 2:] = -torch.inf  # a position with part of its K entries
    token = logp.gather(-1, make_labels().clamp_min(0)[..., None]).squeeze(-1)
    return TeacherLogprobs(top, ids, token, torch.ones(B, S, dtype=torch.bool), ((),) * B)


def teacher(name: str, loss: str = "topk_jsd", **options: Any) -> TeacherConfig:
    return TeacherConfig(name=name, urls=["http://unused"], loss=loss, topk=K, **{"temperature": 1.0, **options})


def teacher_terms() -> list[TeacherTerm]:
    every, first = torch.ones(B, dtype=torch.bool), torch.tensor([True, False])
    return [TeacherTerm(teacher("tail", beta=0.3, temperature=2.0), make_scores(2), every),
            TeacherTerm(teacher("renorm", tail="renorm", beta=0.0, weight=0.5), make_scores(3), first),
            TeacherTerm(teacher("mopd", "mopd"), make_scores(4), ~first)]


def targets() -> Targets:
    behaviour = torch.log_softmax(torch.randn(B, S, generator=torch.Generator().manual_seed(5)), -1)
    return Targets(make_labels(), torch.tensor([True, False]), behaviour, 0.7)


def objective_and_grads(fused: bool, terms: list[TeacherTerm], sft_alpha: float, validate: bool):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, S, H, generator=gen).requires_grad_(True)  # batch first, as GPTModel returns it
    weight = (torch.randn(PADDED_V, H, generator=gen) * 0.5).requires_grad_(True)
    if fused:
        student = OutputLayerInput(hidden, weight, sequence_parallel=False, vocab_size=V, validate=validate)
    else:
        student = StudentLogits(hidden @ weight.T, vocab_size=V, validate=validate)
    parts = micro_batch_objective(student, targets(), terms, sft_alpha=sft_alpha, vocab_size=V, validate=validate)
    parts.loss_sum.backward()
    logs = {name: torch.stack(pair) for name, pair in parts.divergences.items()}
    if parts.sft is not None:
        logs["sft"] = torch.stack(parts.sft)
    return parts.loss_sum.detach(), logs, hidden.grad, weight.grad


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("teachers, sft_alpha", [("all", 0.5), ("topk", 0.0), ("none", 1.0)])
def test_the_objective_on_the_output_layer_input_equals_the_objective_on_its_logits(teachers, sft_alpha,
                                                                                    validate) -> None:
    terms = {"all": teacher_terms(), "topk": teacher_terms()[:2], "none": []}[teachers]
    unfused = objective_and_grads(False, terms, sft_alpha, validate)
    fused = objective_and_grads(True, terms, sft_alpha, validate)
    assert dense.rel_err(fused[0], unfused[0]) <= TOLERANCE
    assert fused[1].keys() == unfused[1].keys()
    for name in fused[1]:
        assert dense.rel_err(fused[1][name], unfused[1][name]) <= TOLERANCE, name
    assert dense.rel_err(fused[2], unfused[2]) <= TOLERANCE
    assert dense.rel_err(fused[3], unfused[3]) <= TOLERANCE


def test_alone_sft_reuses_the_forward_gradients_and_mopd_recomputes(monkeypatch) -> None:
    from megatron_mopd.losses import linear as linear_module

    recomputed = []
    original = linear_module._recompute_grads
    monkeypatch.setattr(linear_module, "_recompute_grads", lambda *a: recomputed.append(1) or original(*a))
    objective_and_grads(True, [], 1.0, validate=False)
    assert recomputed == []
    objective_and_grads(True, teacher_terms()[2:], 1.0, validate=False)
    assert recomputed == [1]


def test_a_student_without_logits_names_the_teacher_that_needs_them() -> None:
    student = OutputLayerInput(torch.zeros(B, S, H), torch.zeros(PADDED_V, H), sequence_parallel=False,
                               vocab_size=V, validate=True)
    with pytest.raises(ValueError, match=r"teacher 'full' \(loss jsd\) needs the student's logits, which "
                                         r"loss.fused_output_layer never computes: "
                                         r".* set loss.fused_output_layer=false"):
        student.logits("teacher 'full' (loss jsd)")


@pytest.mark.parametrize("loss", ["jsd", "ctkd", "gold"])
def test_the_configuration_refuses_a_teacher_loss_that_needs_the_logits(loss: str, tmp_path) -> None:
    placement = ["teachers.0.placement=colocated", "teachers.0.model=/m"] if loss == "jsd" else \
        ["teachers.0.urls=[http://x]", "teachers.0.tokenizer=/t", "teachers.0.projection=/p.safetensors"]
    overrides = ["model.path=/s", "data.path=/d", "teachers=[{name: other}]", f"teachers.0.loss={loss}", *placement,
                 "loss.fused_output_layer=true"]
    with pytest.raises(ConfigError, match=rf"loss.fused_output_layer computes the losses topk_jsd, mopd \(and "
                                          rf"loss.sft_alpha\) without the student's logits; teacher\(s\) 'other' "
                                          rf"\({loss}\) need the logits: set loss.fused_output_layer=false"):
        load_config(None, overrides)


# ---- Megatron's forward_step on a Megatron-Core student ------------------------------------------

class Arrived:
    def __init__(self, scores: TeacherLogprobs) -> None:
        self.scores = scores

    def wait(self) -> TeacherLogprobs:
        return self.scores


def forward_step_on_rank(tp: int) -> list[dict[str, Any]]:
    """On each rank: one micro-batch through ``forward_step`` unfused, fused with validation off (host
    syncs of the loss counted), fused with validation on; each run's loss, logs, parameter gradients.
    At TP=2 also the fused loss on this rank's slice of the sequence (sequence parallel), with the
    gradients the loss gives the hidden states and the output layer's weight."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_mopd.platform import destroy_parallel, initialize_parallel
    from megatron_mopd.trainer.forward_step import (
        MicroBatch,
        StepContext,
        StepTeacherScores,
        forward_step,
        loss_func,
    )
    from megatron_mopd.trainer.student_output import output_layer_weight

    torch.set_num_threads(1)
    tiny = TinyGPT()
    initialize_parallel(tp, 1, device="cpu", seed=11)
    try:
        model = tiny.build(tp, 1)
        tiny.load_layout_independent_weights(model, tp, 1)
        weight = output_layer_weight(model)
        tokens = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(9))
        position_ids = torch.arange(S).expand(B, S)
        rows = torch.arange(B)

        def micro_batch(fused: bool, validate: bool) -> MicroBatch:
            terms = teacher_terms()
            teachers = [StepTeacherScores(term.config, Arrived(term.scores), rows) for term in terms]
            routes = {term.config.name: term.route for term in terms}
            context = StepContext(0, teachers, routes, 0.5, V, dist.get_rank(), validate_inputs=validate,
                                  check_loss_per_micro_batch=validate, fused_output_layer=fused)
            target = targets()
            return MicroBatch(tokens, position_ids, target.labels, target.dataset_completion, 0, context,
                              target.behaviour_logprobs, target.behaviour_temperature)

        results = []
        for fused, validate in ((False, False), (True, False), (True, True)):
            model.zero_grad()
            output, loss_fn = forward_step(iter([micro_batch(fused, validate)]), model)
            leaf = output.detach().requires_grad_(True)  # the loss alone under the counter
            with HostSyncCounter() as counter:
                loss, _, logs = loss_fn(leaf)
                loss.backward()
            loss_weight_grad = None if weight.grad is None else weight.grad.clone()  # unfused: the loss has no weight
            output.backward(leaf.grad)
            again = model(tokens, position_ids, None)
            results.append({"output_shape": tuple(output.shape), "after_shape": tuple(again.shape),
                            "syncs": counter.count, "loss": loss.detach(), "hidden": leaf.detach(),
                            "hidden_grad": leaf.grad, "loss_weight_grad": loss_weight_grad,
                            "logs": {name: value.detach() for name, value in logs.items()},
                            "grads": {name: p.grad.clone() for name, p in model.named_parameters()}})
        if tp > 1:
            rank, local = parallel_state.get_tensor_model_parallel_rank(), S // tp
            positions = slice(rank * local, (rank + 1) * local)
            model.zero_grad()
            leaf = results[1]["hidden"][:, positions].clone().requires_grad_(True)
            with HostSyncCounter() as counter:
                loss, _, logs = loss_func(micro_batch(True, False), leaf, output_weight=weight, sequence_parallel=True)
                loss.backward()
            results.append({"syncs": counter.count, "loss": loss.detach(), "positions": positions,
                            "hidden_grad": leaf.grad, "loss_weight_grad": weight.grad.clone(),
                            "logs": {name: value.detach() for name, value in logs.items()}})
        return results
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def forward_steps() -> dict[int, list[list[dict[str, Any]]]]:
    from megatron_mopd.testing import run_on_ranks

    # TP=1 in its own process too: Megatron's CPU mode is process-wide and other tests check it is off
    return {tp: run_on_ranks(forward_step_on_rank, tp, args=(tp,), timeout_s=300) for tp in (1, 2)}


@pytest.mark.parametrize("tp", [1, 2])
def test_the_fused_step_gives_the_unfused_loss_logs_and_gradients(forward_steps, tp) -> None:
    for rank in forward_steps[tp]:
        unfused, fused, validated = rank[:3]
        assert unfused["output_shape"] == (B, S, TinyGPT().padded_vocab_size(tp) // tp)  # the logits shard
        assert fused["output_shape"] == (B, S, TinyGPT().hidden_size)  # the hidden states
        assert fused["after_shape"] == unfused["after_shape"] == unfused["output_shape"]  # the layer is back
        for run in (fused, validated):
            assert dense.rel_err(run["loss"], unfused["loss"]) <= TOLERANCE
            for name, value in unfused["logs"].items():
                assert dense.rel_err(run["logs"][name], value) <= TOLERANCE, name
            for name, grad in unfused["grads"].items():
                assert dense.rel_err(run["grads"][name], grad) <= TOLERANCE, name
    single = forward_steps[1][0][1]["loss"]
    assert dense.rel_err(forward_steps[tp][0][1]["loss"], single) <= TOLERANCE  # the layouts agree


def test_the_fused_loss_on_sequence_parallel_hidden_states_equals_the_replicated_one(forward_steps) -> None:
    """Megatron's local layer spec refuses sequence parallel on the CPU, so the sequence-parallel layout
    is checked at the loss: each rank's slice of the sequence, all-gathered inside the loss."""
    for rank in forward_steps[2]:
        replicated, sequence_parallel = rank[1], rank[3]
        assert dense.rel_err(sequence_parallel["loss"], replicated["loss"]) <= TOLERANCE
        for name, value in replicated["logs"].items():
            assert dense.rel_err(sequence_parallel["logs"][name], value) <= TOLERANCE, name
        expected_slice = replicated["hidden_grad"][:, sequence_parallel["positions"]]
        assert dense.rel_err(sequence_parallel["hidden_grad"], expected_slice) <= TOLERANCE
        assert dense.rel_err(sequence_parallel["loss_weight_grad"], replicated["loss_weight_grad"]) <= TOLERANCE


@pytest.mark.parametrize("tp", [1, 2])
def test_the_fused_loss_makes_no_host_sync_with_validation_off(forward_steps, tp) -> None:
    for rank in forward_steps[tp]:
        fused, validated = rank[1], rank[2]
        assert fused["syncs"] == 0
        assert validated["syncs"] > 0
        if tp > 1:
            assert rank[3]["syncs"] == 0  # sequence parallel
