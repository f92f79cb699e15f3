"""Specification: the Megatron-native rollout engine samples from the live student at any layout.

The model is a tiny Hugging Face Llama (the demo's teacher asset: 2000-token byte-level vocabulary,
padded by Megatron to 2048; its sharp output layer gives greedy decoding clear winners), loaded into
Megatron-Core at TP=1 (two data-parallel replicas), TP=2 and PP=2 on two gloo ranks, DDP-wrapped as
in training. Prompts have different lengths (5, 2 and 9 tokens).

- The same seed gives the same completions (and log-probabilities within 1e-5) at every layout, and
  every rank of a replica returns the same list; the two data-parallel replicas, given the same
  prompts and seed, sample differently.
- The returned log-probabilities are those of a teacher-forced forward over prompt + completion
  (Megatron's forward-only schedule, no KV cache) at the sampling temperature, before top-k/top-p
  truncation, within 1e-5 (fp32), at temperature 1 and at 0.7 with top-k and top-p on.
- At a temperature of 1e-3 the completions are ``transformers``' greedy ``generate``.
- A stop token ends a completion right after its first occurrence (``"stop"``); otherwise a completion
  has ``max_new_tokens`` tokens (``"length"``), or as many as ``max_sequence_length`` leaves.
- Padded-vocabulary ids are never sampled, even when the model makes them the most probable.
- After one optimizer step the next call samples from the new weights.
- The model keeps its training mode and its sequence-parallel flags; sequence parallelism is off while
  it generates; virtual-pipeline model lists are refused.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch

from megatron_mopd.platform import destroy_parallel, initialize_parallel
from megatron_mopd.rollout import MegatronRolloutEngine, Rollout, SamplingParams
from megatron_mopd.testing import run_on_ranks

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU mode runs only on hosts without an accelerator"
)

SEED, PAD, TOLERANCE = 1234, 0, 1e-5
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
PROMPTS = ((72, 101, 108, 108, 111), (84, 104), (65, 32, 115, 104, 111, 114, 116, 32, 116))
MAX_SEQUENCE_LENGTH = 24
SAMPLING = {
    "plain": SamplingParams(temperature=1.0, max_new_tokens=12, seed=7),
    "truncated": SamplingParams(temperature=0.7, top_k=50, top_p=0.9, max_new_tokens=12, seed=8),
    "greedy": SamplingParams(temperature=1e-3, max_new_tokens=10, seed=9),
    "hot": SamplingParams(temperature=3.0, max_new_tokens=12, seed=10),
    "long": SamplingParams(temperature=1.0, max_new_tokens=100, seed=11),
}
STOP_AFTER = 4  # the stop token: the 5th token of the first "plain" completion


def model_dir() -> str:
    from megatron_mopd.demo.assets import demo_asset_path

    return str(demo_asset_path("teacher"))


def as_plain(rollouts: list[Rollout]) -> list[tuple[tuple[int, ...], tuple[int, ...], list[float], str]]:
    return [(r.prompt_ids, r.completion_ids, r.logprobs.tolist(), r.finish_reason) for r in rollouts]


# --- on the ranks ------------------------------------------------------------------------------


def _forward_only(ddp_model: Any, batch: dict[str, torch.Tensor], step: Callable, forward_only: bool) -> list:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([batch]), model=[ddp_model], num_microbatches=1,
        seq_length=batch["tokens"].shape[1], micro_batch_size=batch["tokens"].shape[0],
        forward_only=forward_only, collect_non_loss_data=forward_only,
    )


def _batch(rollouts: list[Rollout]) -> dict[str, torch.Tensor]:
    """prompt + completion of each rollout, right-padded; labels and a mask over the completions."""
    length = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    tokens = torch.full((len(rollouts), length + 1), PAD, dtype=torch.long)
    mask = torch.zeros(len(rollouts), length)
    for row, r in enumerate(rollouts):
        ids = r.prompt_ids + r.completion_ids
        tokens[row, : len(ids)] = torch.tensor(ids)
        mask[row, len(r.prompt_ids) - 1 : len(ids) - 1] = 1.0
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask,
            "position_ids": torch.arange(length).expand(len(rollouts), length)}


def rescore(ddp_model: Any, rollouts: list[Rollout], temperature: float, vocab_size: int) -> Optional[list]:
    """log softmax(logits / temperature) of each completion id, from one teacher-forced forward over
    prompt + completion without a KV cache (padded ids masked); on the last stage, else None."""
    from megatron.core import parallel_state

    def step(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
        batch = next(data_iterator)
        logits = model(batch["tokens"], batch["position_ids"], None, runtime_gather_output=True)
        return logits, lambda output, non_loss_data=False: output

    with torch.no_grad():
        outputs = _forward_only(ddp_model, _batch(rollouts), step, forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    logits = outputs[0].float()
    logits[..., vocab_size:] = float("-inf")
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    scores = []
    for row, r in enumerate(rollouts):
        start = len(r.prompt_ids) - 1
        positions = torch.arange(start, start + len(r.completion_ids))
        scores.append(logprobs[row, positions, torch.tensor(r.completion_ids, dtype=torch.long)].tolist())
    return scores


def train_one_step(ddp_model: Any, optimizer: Any, rollouts: list[Rollout]) -> None:
    """One Adam step of next-token cross-entropy on the completions."""

    def loss_func(mask: torch.Tensor, losses: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = (losses.float() * mask).sum() / mask.sum()
        return loss, {"lm loss": loss.detach().clone()}

    def step(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(loss_func, batch["loss_mask"])

    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    _forward_only(ddp_model, _batch(rollouts), step, forward_only=False)
    update_successful, _, _ = optimizer.step()
    assert update_successful


def push_padded_logits_up(output_layer: torch.nn.Module, vocab_size: int, padded_vocab_size: int) -> Any:
    """A hook making every padded id 100 nats more likely than any real id (gathered logits only)."""

    def hook(_module: Any, _inputs: Any, output: tuple[torch.Tensor, Any]) -> tuple[torch.Tensor, Any]:
        logits, bias = output
        assert logits.shape[-1] == padded_vocab_size
        logits = logits.clone()
        logits[..., vocab_size:] = logits[..., :vocab_size].max(dim=-1, keepdim=True).values + 100.0
        return logits, bias

    return output_layer.register_forward_hook(hook)


def refusal_of(action: Callable[[], Any]) -> str:
    try:
        action()
    except ValueError as error:
        return str(error)
    raise AssertionError("expected a ValueError")


def run_layout(tp: int, pp: int, path: str) -> dict[str, Any]:
    """Everything checked at one layout, from this rank's point of view."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_mopd.models import GPTArchitecture, load_hf_weights

    initialize_parallel(tp, pp, device="cpu", seed=SEED)
    try:
        arch = GPTArchitecture.from_hf_config(path, make_vocab_size_divisible_by=64)
        model = arch.build(tp, pp)
        load_hf_weights(model, path, arch)
        config = model.config
        ddp_model = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=3e-2, weight_decay=0.0, clip_grad=0.0), [ddp_model])
        config.grad_scale_func = optimizer.scale_loss
        config.finalize_model_grads_func = finalize_model_grads
        engine = MegatronRolloutEngine(ddp_model, vocab_size=arch.vocab_size, pad_token_id=PAD,
                                       max_sequence_length=MAX_SEQUENCE_LENGTH)
        ddp_model.train()
        out: dict[str, Any] = {"dp_rank": parallel_state.get_data_parallel_rank(), "rollouts": {}, "rescored": {}}
        modes_while_generating: list[bool] = []
        spy = model.register_forward_pre_hook(lambda module, _args: modes_while_generating.append(module.training))
        for name, sampling in SAMPLING.items():
            rollouts = engine.generate(PROMPTS, sampling)
            out["rollouts"][name] = as_plain(rollouts)
            out["rescored"][name] = rescore(ddp_model, rollouts, sampling.temperature, arch.vocab_size)
        spy.remove()
        out["modes_while_generating"] = modes_while_generating
        out["still_training"] = model.training

        plain = SAMPLING["plain"]
        stop_token = out["rollouts"]["plain"][0][1][STOP_AFTER]
        out["stop_token"] = stop_token
        stopping = SamplingParams(temperature=1.0, max_new_tokens=12, seed=7, stop_token_ids=(stop_token,))
        out["rollouts"]["stopped"] = as_plain(engine.generate(PROMPTS, stopping))

        hook = push_padded_logits_up(model.output_layer, arch.vocab_size, arch.padded_vocab_size(tp)) \
            if parallel_state.is_pipeline_last_stage() else None
        out["rollouts"]["padded_made_likely"] = as_plain(engine.generate(PROMPTS, SAMPLING["hot"]))
        if hook is not None:
            hook.remove()

        switched = [m for m in model.modules() if getattr(m, "sequence_parallel", None) is False]
        for module in switched:
            module.sequence_parallel = True
        config.sequence_parallel = True
        out["rollouts"]["sequence_parallel"] = as_plain(engine.generate(PROMPTS, plain))
        out["sequence_parallel_kept"] = config.sequence_parallel and all(m.sequence_parallel for m in switched)
        for module in switched:
            module.sequence_parallel = False
        config.sequence_parallel = False

        before_step = [Rollout(*r) for r in out["rollouts"]["plain"]]
        train_one_step(ddp_model, optimizer, before_step)
        after_step = engine.generate(PROMPTS, plain)
        out["rollouts"]["after_step"] = as_plain(after_step)
        out["rescored"]["after_step"] = rescore(ddp_model, after_step, 1.0, arch.vocab_size)
        out["rescored"]["before_step_with_new_weights"] = rescore(ddp_model, before_step, 1.0, arch.vocab_size)

        out["refusals"] = {
            "virtual pipeline": refusal_of(lambda: MegatronRolloutEngine(
                [model, model], vocab_size=arch.vocab_size, pad_token_id=PAD, max_sequence_length=32)),
            "prompt too long": refusal_of(lambda: engine.generate([tuple(range(1, 30))], plain)),
        }
        return out
    finally:
        destroy_parallel()


def run_layouts(path: str) -> dict[str, dict[str, Any]]:
    torch.set_num_threads(1)
    return {layout: run_layout(*LAYOUTS[layout], path) for layout in LAYOUTS}


# --- in the test process -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def per_rank() -> list[dict[str, dict[str, Any]]]:
    """Both ranks' results at every layout, from one launch of two ranks."""
    return run_on_ranks(run_layouts, 2, args=(model_dir(),), timeout_s=600)


def reporting(per_rank: list, layout: str) -> dict[str, Any]:
    """The results of data-parallel rank 0 on the last pipeline stage (the one with the re-scores)."""
    ranks = [r[layout] for r in per_rank if r[layout]["dp_rank"] == 0 and r[layout]["rescored"]["plain"] is not None]
    return ranks[0]


def completions(rollouts: list) -> list[tuple[int, ...]]:
    return [r[1] for r in rollouts]


@pytest.mark.parametrize("name", ["plain", "truncated", "greedy"])
def test_the_same_seed_gives_the_same_completions_at_tp1_tp2_and_pp2(per_rank: list, name: str) -> None:
    reference = reporting(per_rank, "tp1")["rollouts"][name]
    for layout in ("tp2", "pp2"):
        rollouts = reporting(per_rank, layout)["rollouts"][name]
        assert completions(rollouts) == completions(reference), layout
        assert [r[3] for r in rollouts] == [r[3] for r in reference], layout
        for got, expected in zip(rollouts, reference):
            np.testing.assert_allclose(got[2], expected[2], rtol=0, atol=TOLERANCE, err_msg=layout)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_every_rank_of_a_replica_returns_the_same_rollouts(per_rank: list, layout: str) -> None:
    first, second = (ranks[layout]["rollouts"] for ranks in per_rank)
    assert first == second


def test_data_parallel_replicas_sample_differently_from_the_same_seed(per_rank: list) -> None:
    first, second = (ranks["tp1"]["rollouts"]["plain"] for ranks in per_rank)
    assert {ranks["tp1"]["dp_rank"] for ranks in per_rank} == {0, 1}
    assert completions(first) != completions(second)


@pytest.mark.parametrize("name", ["plain", "truncated", "after_step"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_logprobs_equal_a_teacher_forced_rescore_at_the_sampling_temperature(
    per_rank: list, layout: str, name: str
) -> None:
    """``truncated``: temperature 0.7, top-k 50, top-p 0.9; log-probs are those before truncation."""
    results = reporting(per_rank, layout)
    for rollout, rescored in zip(results["rollouts"][name], results["rescored"][name]):
        assert len(rollout[1]) > 0
        np.testing.assert_allclose(rollout[2], rescored, rtol=0, atol=TOLERANCE)


def test_prompts_of_different_lengths_keep_their_own_tokens(per_rank: list) -> None:
    for rollout, prompt in zip(reporting(per_rank, "tp1")["rollouts"]["plain"], PROMPTS):
        assert rollout[0] == prompt


def test_a_tiny_temperature_decodes_greedily_like_transformers(per_rank: list) -> None:
    from transformers import AutoModelForCausalLM, GenerationConfig

    hf_model = AutoModelForCausalLM.from_pretrained(model_dir(), attn_implementation="eager").eval()
    greedy = GenerationConfig(do_sample=False, max_new_tokens=SAMPLING["greedy"].max_new_tokens,
                              eos_token_id=None, pad_token_id=PAD)
    rollouts = reporting(per_rank, "tp1")["rollouts"]["greedy"]
    for rollout, prompt in zip(rollouts, PROMPTS):
        with torch.no_grad():
            expected = hf_model.generate(torch.tensor([prompt]), generation_config=greedy)[0, len(prompt):]
        assert rollout[1] == tuple(expected.tolist())
        assert rollout[3] == "length"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_stop_token_ends_the_completion_right_after_its_first_occurrence(per_rank: list, layout: str) -> None:
    results = reporting(per_rank, layout)
    stop_token = results["stop_token"]
    for unstopped, stopped in zip(results["rollouts"]["plain"], results["rollouts"]["stopped"]):
        if stop_token in unstopped[1]:
            end = unstopped[1].index(stop_token) + 1
            assert stopped[1] == unstopped[1][:end] and stopped[3] == "stop"
            np.testing.assert_array_equal(stopped[2], unstopped[2][:end])
        else:
            assert stopped[1] == unstopped[1] and stopped[3] == "length"
    assert results["rollouts"]["stopped"][0][3] == "stop"
    assert len(results["rollouts"]["stopped"][0][1]) <= STOP_AFTER + 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_without_a_stop_token_completions_have_max_new_tokens(per_rank: list, layout: str) -> None:
    for rollout in reporting(per_rank, layout)["rollouts"]["plain"]:
        assert len(rollout[1]) == SAMPLING["plain"].max_new_tokens and rollout[3] == "length"


def test_completions_end_at_max_sequence_length(per_rank: list) -> None:
    for rollout in reporting(per_rank, "pp2")["rollouts"]["long"]:
        assert len(rollout[0]) + len(rollout[1]) == MAX_SEQUENCE_LENGTH and rollout[3] == "length"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_padded_vocabulary_ids_are_never_sampled_even_when_most_likely(per_rank: list, layout: str) -> None:
    vocab_size = 2000
    for name, rollouts in reporting(per_rank, layout)["rollouts"].items():
        for rollout in rollouts:
            assert max(rollout[1]) < vocab_size, name
            assert np.isfinite(rollout[2]).all(), name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_generation_after_an_optimizer_step_uses_the_new_weights(per_rank: list, layout: str) -> None:
    results = reporting(per_rank, layout)
    # The step changed the model: the earlier completions now score differently ...
    old_logprobs = np.concatenate([r[2] for r in results["rollouts"]["plain"]])
    assert np.abs(np.concatenate(results["rescored"]["before_step_with_new_weights"]) - old_logprobs).max() > 1e-2
    # ... and the new completions' log-probabilities are the new weights' (re-scored after the step).
    for rollout, rescored in zip(results["rollouts"]["after_step"], results["rescored"]["after_step"]):
        np.testing.assert_allclose(rollout[2], rescored, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_model_generates_in_eval_mode_and_keeps_training_mode_after(per_rank: list, layout: str) -> None:
    """The re-scores run the training-mode model: half of the forwards seen are in training mode."""
    for ranks in per_rank:
        modes = ranks[layout]["modes_while_generating"]
        generation_forwards = len(modes) - len(SAMPLING)  # one re-score forward per sampling
        assert modes.count(False) == generation_forwards > len(SAMPLING)
        assert ranks[layout]["still_training"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sequence_parallelism_is_off_while_generating_and_restored_after(per_rank: list, layout: str) -> None:
    for ranks in per_rank:
        results = ranks[layout]
        assert results["sequence_parallel_kept"]
        assert completions(results["rollouts"]["sequence_parallel"]) == completions(results["rollouts"]["plain"])


def test_virtual_pipeline_model_lists_and_overlong_prompts_are_refused(per_rank: list) -> None:
    refusals = reporting(per_rank, "tp1")["refusals"]
    assert "list of 2 virtual-pipeline chunks" in refusals["virtual pipeline"]
    assert "max_sequence_length=24 leaves no room" in refusals["prompt too long"]


def test_sampling_params_refuse_impossible_values() -> None:
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
