"""Specification: training checkpoints save atomically, resume exactly and load at another layout.

A tiny GPTModel (testing.gpt) is trained with the real Megatron stack on CPU — DDP, Megatron's Adam
(fp32, ``clip_grad=0``) and an ``OptimizerParamScheduler`` with warm-up and cosine decay — at TP=2 on
two ranks. Each step's batch is drawn from the default torch generator, and every step also draws
from python's, numpy's and Megatron's tensor-parallel generators, so a resume is exact only if the
random-number generators come back too. After ``STEPS_BEFORE`` steps the run saves a checkpoint and
trains ``STEPS_AFTER`` more steps.

- Resumed in fresh processes at the same layout (TP=2), the checkpoint continues with the same
  losses and ends with the same parameters, bit for bit.
- Loaded at PP=2 (two ranks) and at TP=1 (one rank), the parameters and Adam's moments and step —
  reassembled into full tensors by their layout-independent names — are those saved, bit for bit;
  the scheduler and the trainer state round-trip; the generators are left alone, with a warning.
- A single-rank lifecycle: ``keep_last=2`` keeps the two newest checkpoints; a save killed before
  publishing (a partial ``step_XXXXXXX.tmp``) leaves ``latest`` on the previous checkpoint, and the
  next save removes the leftover; a missing or corrupt ``latest`` falls back, with a warning, to the
  newest complete checkpoint; a checkpoint saved before the first optimizer step loads and trains like
  a fresh optimizer.

Megatron's checkpoint writer starts worker processes, which ``run_on_ranks``' daemonic ranks may not
do, so ranks here run in a (non-daemonic) process pool.
"""

from __future__ import annotations

import logging
import random
import shutil
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pytest
import torch

from megatron_mopd.platform import destroy_parallel, initialize_parallel
from megatron_mopd.testing import run_on_ranks
from megatron_mopd.testing.gpt import TinyGPT
from megatron_mopd.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU mode runs only on hosts without an accelerator"
)

SEED = 1234
TINY_GPT = TinyGPT()
SEQ_LEN, MICRO_BATCH, NUM_MICROBATCHES, LR = 16, 2, 2, 1e-2
STEPS_BEFORE, STEPS_AFTER = 3, 2
CHECKPOINT_LOGGER = "megatron_mopd.trainer.checkpoint"
RNG_NOT_RESTORED = "random-number generators are not restored"
RUN_TIMEOUT_S = 300

Record = dict[str, Any]  # what a rank function returns
SavedRun = tuple[str, list[Record]]  # the output directory and the per-rank records


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """``fn(*args)`` on ``world_size`` fresh gloo ranks that may start processes (the save does)."""
    return run_on_ranks(fn, world_size, args, timeout_s=RUN_TIMEOUT_S, daemon=False)


# ---------------------------------------------------------------------------------------------------
# Training on a rank
# ---------------------------------------------------------------------------------------------------


def draw_global_batch() -> list[dict[str, torch.Tensor]]:
    """The step's micro-batches, drawn from the default torch generator (the same on every rank)."""
    permutation = torch.randperm(TINY_GPT.vocab_size, generator=torch.Generator().manual_seed(SEED))
    tokens = [torch.randint(TINY_GPT.vocab_size, (NUM_MICROBATCHES * MICRO_BATCH,))]
    for _ in range(SEQ_LEN):
        tokens.append(permutation[tokens[-1]])
    sequences = torch.stack(tokens, dim=1)
    position_ids = torch.arange(SEQ_LEN).expand(MICRO_BATCH, SEQ_LEN)
    return [
        {"tokens": chunk[:, :-1], "labels": chunk[:, 1:], "position_ids": position_ids}
        for chunk in sequences.split(MICRO_BATCH)
    ]


def loss_func(output_tensor: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = output_tensor.float().mean()
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(
    data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module
) -> tuple[torch.Tensor, Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]]:
    batch = next(data_iterator)
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]), loss_func


class Trainer:
    """This rank's model chunk, optimizer and scheduler at (tp, pp), with layout-independent weights."""

    def __init__(self, tp: int, pp: int) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.tp, self.pp = tp, pp
        model = TINY_GPT.build(tp, pp)
        TINY_GPT.load_layout_independent_weights(model, tp, pp)
        config = model.config
        self.model = [DistributedDataParallel(config, DistributedDataParallelConfig(), model)]
        self.optimizer = get_megatron_optimizer(
            # The scheduler reads min_lr from the parameter groups, which take it from this config.
            OptimizerConfig(optimizer="adam", lr=LR, min_lr=LR / 10, weight_decay=0.0, clip_grad=0.0),
            self.model,
        )
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=LR,
            min_lr=LR / 10,
            lr_warmup_steps=2,
            lr_decay_steps=10,
            lr_decay_style="cosine",
            start_wd=0.0,
            end_wd=0.0,
            wd_incr_steps=10,
            wd_incr_style="constant",
        )
        config.grad_scale_func = self.optimizer.scale_loss
        config.finalize_model_grads_func = finalize_model_grads
        self.next_step = 0

    def train(self, steps: int) -> list[float]:
        """Train ``steps`` steps; the per-step mean loss on the last stage, [] elsewhere."""
        from megatron.core import parallel_state, tensor_parallel
        from megatron.core.pipeline_parallel import get_forward_backward_func

        forward_backward = get_forward_backward_func()
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        losses = []
        for _ in range(steps):
            microbatches = draw_global_batch()[dp_rank::dp_size]
            # Stand-ins for sampling that a resume must reproduce.
            random.random()
            np.random.rand()
            with tensor_parallel.get_cuda_rng_tracker().fork():
                torch.rand(1)
            for chunk in self.model:
                chunk.zero_grad_buffer()
            self.optimizer.zero_grad()
            reduced = forward_backward(
                forward_step_func=forward_step,
                data_iterator=iter(microbatches),
                model=self.model,
                num_microbatches=len(microbatches),
                seq_length=SEQ_LEN,
                micro_batch_size=MICRO_BATCH,
            )
            update_successful, _, _ = self.optimizer.step()
            assert update_successful
            self.scheduler.step(increment=1)
            self.next_step += 1
            if reduced:
                losses.append(torch.stack([r["lm loss"] for r in reduced]).mean().item())
        return losses

    def trainer_state(self) -> dict[str, Any]:
        return {
            "data_cursor": {"next_step": self.next_step},
            "consumed_tokens": self.next_step * NUM_MICROBATCHES * MICRO_BATCH * SEQ_LEN,
            "config": {"lr": LR, "seq_len": SEQ_LEN},
        }

    def record(self) -> dict[str, Any]:
        """Parameters and Adam state by global name, the scheduler, the learning rates, the RNGs."""
        from megatron.core import parallel_state

        return {
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "pieces": local_pieces(self.model[0], self.optimizer, self.pp),
            "scheduler": self.scheduler.state_dict(),
            "lrs": [group["lr"] for group in self.optimizer.param_groups],
            "rng": rng_snapshot(),
        }


def global_name(name: str, layer_offset: int) -> str:
    """The parameter's name at TP=1, PP=1 (the tied output layer is the word embedding)."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(int(parts[2]) + layer_offset)
    return ".".join(parts).replace("output_layer.weight", "embedding.word_embeddings.weight")


def local_pieces(ddp_model: torch.nn.Module, optimizer: Any, pp: int) -> dict[str, list[dict[str, Any]]]:
    """This rank's slice of every parameter and of its Adam state, by global name."""
    from megatron.core import parallel_state

    adam_state: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}
    for sub_optimizer in optimizer.chained_optimizers:
        adam_state.update(sub_optimizer.optimizer.state)
    layer_offset = parallel_state.get_pipeline_model_parallel_rank() * TINY_GPT.num_layers // pp
    pieces: dict[str, list[dict[str, Any]]] = {}
    for name, param in ddp_model.module.named_parameters():
        state = adam_state[param]
        sharded = getattr(param, "tensor_model_parallel", False)
        pieces.setdefault(global_name(name, layer_offset), []).append(
            {
                "tensors": {
                    "param": param.detach().clone(),
                    "exp_avg": state["exp_avg"].clone(),
                    "exp_avg_sq": state["exp_avg_sq"].clone(),
                },
                "step": state["step"].item(),
                "partition_dim": param.partition_dim if sharded else None,
                "stride": param.partition_stride if sharded else 1,
            }
        )
    return pieces


def rng_snapshot() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]),
        "torch": torch.get_rng_state().tolist(),
        "tracker": {k: v.tolist() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def train_save_and_continue(output_dir: str, tp: int, pp: int) -> dict[str, Any]:
    """Train STEPS_BEFORE steps, save, train STEPS_AFTER more; what each phase left behind."""
    initialize_parallel(tp, pp, device="cpu", seed=SEED)
    try:
        trainer = Trainer(tp, pp)
        fresh_rng = rng_snapshot()
        losses_before = trainer.train(STEPS_BEFORE)
        at_save = trainer.record()
        state = trainer.trainer_state()
        path = save_checkpoint(
            output_dir, STEPS_BEFORE, trainer.model, trainer.optimizer, trainer.scheduler, state, keep_last=3
        )
        losses_after = trainer.train(STEPS_AFTER)
        return {
            "path": str(path),
            "fresh_rng": fresh_rng,
            "losses_before": losses_before,
            "at_save": at_save,
            "trainer_state": state,
            "losses_after": losses_after,
            "at_end": trainer.record(),
        }
    finally:
        destroy_parallel()


def load_and_continue(output_dir: str, tp: int, pp: int, steps: int) -> dict[str, Any]:
    """Fresh model at (tp, pp): load the latest checkpoint, then train ``steps`` steps."""
    messages = _Messages()
    logging.getLogger(CHECKPOINT_LOGGER).addHandler(messages)
    initialize_parallel(tp, pp, device="cpu", seed=SEED)
    try:
        trainer = Trainer(tp, pp)
        path = latest_checkpoint(output_dir)
        step, state = load_checkpoint(path, trainer.model, trainer.optimizer, trainer.scheduler)
        trainer.next_step = state["data_cursor"]["next_step"]
        after_load = trainer.record()
        losses = trainer.train(steps)
        return {
            "step": step,
            "trainer_state": state,
            "after_load": after_load,
            "warnings": list(messages.messages),
            "losses": losses,
            "at_end": trainer.record(),
        }
    finally:
        destroy_parallel()
        logging.getLogger(CHECKPOINT_LOGGER).removeHandler(messages)


def lifecycle(output_dir: str, step0_dir: str) -> dict[str, Any]:
    """One rank: a checkpoint before any step, keep_last, a killed save, the save after it."""
    root = Path(output_dir) / "checkpoints"

    def listing() -> list[str]:
        return sorted(p.name for p in root.iterdir())

    initialize_parallel(1, 1, device="cpu", seed=SEED)
    try:
        seen: dict[str, Any] = {}
        trainer = Trainer(1, 1)
        save_checkpoint(step0_dir, 0, trainer.model, trainer.optimizer, trainer.scheduler, {}, keep_last=1)
        loaded, fresh = Trainer(1, 1), Trainer(1, 1)  # the same weights; `fresh` is never checkpointed
        seen["step0_step"], _ = load_checkpoint(
            latest_checkpoint(step0_dir), loaded.model, loaded.optimizer, loaded.scheduler
        )
        rng = torch.get_rng_state()  # every trainer below trains on the same batch
        for name, run in (("fresh", fresh), ("loaded", loaded), ("saved", trainer)):
            torch.set_rng_state(rng)
            seen[f"step0_{name}_losses"] = run.train(1)
            seen[f"step0_{name}_pieces"] = run.record()["pieces"]

        save = partial(
            save_checkpoint, output_dir, model=trainer.model, optimizer=trainer.optimizer,
            scheduler=trainer.scheduler, keep_last=2,
        )
        for step in (1, 2, 3):
            if step > 1:
                trainer.train(1)
            save(step, state=trainer.trainer_state())
            seen[f"after_step{step}"] = listing()
        # A save of step 4 killed before it was published: a partial staging directory.
        staging = root / "step_0000004.tmp"
        staging.mkdir()
        shutil.copy(root / "step_0000003" / "common.pt", staging / "common.pt")
        (staging / "__0_0.distcp").write_bytes(b"partial")
        seen["after_crash"] = listing()
        seen["latest_after_crash"] = latest_checkpoint(output_dir).name
        trainer.train(1)
        save(4, state=trainer.trainer_state())
        seen["after_resave"] = listing()
        seen["latest_after_resave"] = latest_checkpoint(output_dir).name
        seen["latest_file"] = (root / "latest").read_text()
        return seen
    finally:
        destroy_parallel()


# ---------------------------------------------------------------------------------------------------
# Reassembling full tensors
# ---------------------------------------------------------------------------------------------------


def full_state(records: Sequence[dict[str, Any]], tp: int) -> dict[str, dict[str, Any]]:
    """Full tensors by global name from every rank's pieces (replicas and tied copies must agree)."""
    by_name: dict[str, dict[int, dict[str, Any]]] = {}
    for record in records:
        for name, pieces in record["pieces"].items():
            for piece in pieces:
                by_tp_rank = by_name.setdefault(name, {})
                tp_rank = record["tp_rank"] if piece["partition_dim"] is not None else 0
                if tp_rank in by_tp_rank:  # a data-parallel replica or the tied output layer
                    other = by_tp_rank[tp_rank]
                    assert other["step"] == piece["step"], name
                    for key, tensor in piece["tensors"].items():
                        assert torch.equal(other["tensors"][key], tensor), (name, key)
                else:
                    by_tp_rank[tp_rank] = piece
    full = {}
    for name, by_tp_rank in by_name.items():
        first = by_tp_rank[0]
        entry: dict[str, Any] = {"step": {piece["step"] for piece in by_tp_rank.values()}}
        for key in first["tensors"]:
            if first["partition_dim"] is None:
                entry[key] = first["tensors"][key]
                continue
            dim, stride = first["partition_dim"], first["stride"]
            chunks = [by_tp_rank[r]["tensors"][key].chunk(stride, dim=dim) for r in range(tp)]
            # Megatron's strided split: full chunk j * tp + r lives on TP rank r as its chunk j.
            entry[key] = torch.cat([chunks[r][j] for j in range(stride) for r in range(tp)], dim=dim)
        full[name] = entry
    return full


def assert_same_full_state(actual: dict[str, dict[str, Any]], expected: dict[str, dict[str, Any]]) -> None:
    assert actual.keys() == expected.keys()
    for name, entry in expected.items():
        assert actual[name]["step"] == entry["step"], name
        for key in ("param", "exp_avg", "exp_avg_sq"):
            assert torch.equal(actual[name][key], entry[key]), (name, key)


# ---------------------------------------------------------------------------------------------------
# Fixtures: one launch each
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict[str, Any]]]:
    output_dir = str(tmp_path_factory.mktemp("tp2-run"))
    return output_dir, run_ranks(train_save_and_continue, 2, output_dir, 2, 1)


@pytest.fixture(scope="module")
def resumed_run(saved_run: SavedRun) -> list[dict[str, Any]]:
    output_dir, _ = saved_run
    return run_ranks(load_and_continue, 2, output_dir, 2, 1, STEPS_AFTER)


RESHARDED = {"pp2": (1, 2, 2), "tp1": (1, 1, 1)}  # tp, pp, ranks


@pytest.fixture(scope="module", params=list(RESHARDED))
def resharded(request: pytest.FixtureRequest, saved_run: SavedRun) -> tuple[int, list[Record]]:
    output_dir, _ = saved_run
    tp, pp, ranks = RESHARDED[request.param]
    return tp, run_ranks(load_and_continue, ranks, output_dir, tp, pp, 0)


@pytest.fixture(scope="module")
def lifecycle_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    output_dir, step0_dir = tmp_path_factory.mktemp("lifecycle"), tmp_path_factory.mktemp("step0")
    return output_dir, run_ranks(lifecycle, 1, str(output_dir), str(step0_dir))[0]


# ---------------------------------------------------------------------------------------------------
# Resuming exactly
# ---------------------------------------------------------------------------------------------------


def test_the_saved_checkpoint_is_the_latest_and_named_by_its_step(saved_run: SavedRun) -> None:
    output_dir, ranks = saved_run
    expected = Path(output_dir) / "checkpoints" / f"step_{STEPS_BEFORE:07d}"
    assert [Path(r["path"]) for r in ranks] == [expected, expected]
    assert latest_checkpoint(output_dir) == expected
    assert sorted(p.name for p in (expected / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]


def test_a_resumed_run_continues_with_the_same_losses(
    saved_run: SavedRun, resumed_run: list[Record]
) -> None:
    _, uninterrupted = saved_run
    assert len(uninterrupted[0]["losses_after"]) == STEPS_AFTER
    for before, after in zip(uninterrupted, resumed_run):
        assert after["step"] == STEPS_BEFORE
        assert after["losses"] == before["losses_after"]  # bit-exact on CPU


def test_a_resumed_run_ends_with_the_same_parameters_and_optimizer_state(
    saved_run: SavedRun, resumed_run: list[Record]
) -> None:
    _, uninterrupted = saved_run
    assert_same_full_state(
        full_state([r["at_end"] for r in resumed_run], tp=2),
        full_state([r["at_end"] for r in uninterrupted], tp=2),
    )
    for before, after in zip(uninterrupted, resumed_run):
        assert after["at_end"]["scheduler"] == before["at_end"]["scheduler"]
        assert after["at_end"]["lrs"] == before["at_end"]["lrs"]


def test_a_resume_at_the_same_layout_restores_every_random_number_generator(
    saved_run: SavedRun, resumed_run: list[Record]
) -> None:
    _, uninterrupted = saved_run
    for before, after in zip(uninterrupted, resumed_run):
        assert before["at_save"]["rng"] != before["fresh_rng"]  # the streams had moved
        assert after["after_load"]["rng"] == before["at_save"]["rng"]
        assert not any(RNG_NOT_RESTORED in message for message in after["warnings"])


# ---------------------------------------------------------------------------------------------------
# Loading at another layout
# ---------------------------------------------------------------------------------------------------


def test_a_checkpoint_loads_bit_exactly_at_another_layout(
    saved_run: SavedRun, resharded: tuple[int, list[Record]]
) -> None:
    _, saved = saved_run
    tp, loaded = resharded
    expected = full_state([r["at_save"] for r in saved], tp=2)
    assert all(entry["step"] == {float(STEPS_BEFORE)} for entry in expected.values())
    assert_same_full_state(full_state([r["after_load"] for r in loaded], tp=tp), expected)


def test_the_scheduler_and_the_trainer_state_round_trip_at_another_layout(
    saved_run: SavedRun, resharded: tuple[int, list[Record]]
) -> None:
    _, saved = saved_run
    _, loaded = resharded
    for rank in loaded:
        assert rank["step"] == STEPS_BEFORE
        assert rank["trainer_state"] == saved[0]["trainer_state"]
        assert rank["after_load"]["scheduler"] == saved[0]["at_save"]["scheduler"]
        assert rank["after_load"]["lrs"] == saved[0]["at_save"]["lrs"]


def test_random_number_generators_restart_with_a_warning_at_another_layout(
    resharded: tuple[int, list[Record]],
) -> None:
    _, loaded = resharded
    assert any(RNG_NOT_RESTORED in message for message in loaded[0]["warnings"])


# ---------------------------------------------------------------------------------------------------
# Atomicity, retention, errors
# ---------------------------------------------------------------------------------------------------


def test_keep_last_keeps_only_the_newest_checkpoints(lifecycle_run: tuple[Path, Record]) -> None:
    _, seen = lifecycle_run
    assert seen["after_step1"] == ["latest", "step_0000001"]
    assert seen["after_step2"] == ["latest", "step_0000001", "step_0000002"]
    assert seen["after_step3"] == ["latest", "step_0000002", "step_0000003"]


def test_a_killed_save_leaves_latest_on_the_previous_complete_checkpoint(
    lifecycle_run: tuple[Path, Record],
) -> None:
    _, seen = lifecycle_run
    assert "step_0000004.tmp" in seen["after_crash"]
    assert seen["latest_after_crash"] == "step_0000003"


def test_the_next_save_removes_the_leftover_staging_directory(lifecycle_run: tuple[Path, Record]) -> None:
    _, seen = lifecycle_run
    assert seen["after_resave"] == ["latest", "step_0000003", "step_0000004"]
    assert seen["latest_after_resave"] == "step_0000004"
    assert seen["latest_file"] == "4\n"


@pytest.mark.parametrize(
    "damage",
    [
        lambda latest: latest.write_text("not a step\n"),
        lambda latest: latest.unlink(),
        lambda latest: latest.write_text("99\n"),
    ],
    ids=["corrupt", "missing", "names-a-deleted-checkpoint"],
)
def test_a_damaged_latest_file_falls_back_to_the_newest_complete_checkpoint_with_a_warning(
    lifecycle_run: tuple[Path, Record],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[Path], None],
) -> None:
    source, _ = lifecycle_run
    output_dir = tmp_path / "run"
    shutil.copytree(source, output_dir)
    root = output_dir / "checkpoints"
    (root / "step_0000005.tmp").mkdir()  # a killed save is never a fallback
    damage(root / "latest")
    with caplog.at_level(logging.WARNING, logger=CHECKPOINT_LOGGER):
        assert latest_checkpoint(output_dir) == root / "step_0000004"
    assert "newest complete checkpoint" in caplog.text


def test_there_is_no_latest_checkpoint_before_the_first_save(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None


def test_a_checkpoint_saved_before_the_first_optimizer_step_loads_and_trains_like_a_fresh_optimizer(
    lifecycle_run: tuple[Path, Record],
) -> None:
    _, seen = lifecycle_run
    assert seen["step0_step"] == 0
    for name in ("loaded", "saved"):  # saving did not change how the saving run trains either
        assert seen[f"step0_{name}_losses"] == seen["step0_fresh_losses"], name
        assert_same_full_state(
            full_state([{"pieces": seen[f"step0_{name}_pieces"], "tp_rank": 0}], tp=1),
            full_state([{"pieces": seen["step0_fresh_pieces"], "tp_rank": 0}], tp=1),
        )


def test_keep_last_below_one_is_rejected_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_last=0"):
        save_checkpoint(tmp_path, 1, model=[], optimizer=None, scheduler=None, state={}, keep_last=0)
    assert not (tmp_path / "checkpoints").exists()


def test_loading_a_path_that_is_not_a_checkpoint_names_it(tmp_path: Path) -> None:
    not_a_checkpoint = tmp_path / "step_0000007"
    not_a_checkpoint.mkdir()
    with pytest.raises(ValueError, match=str(not_a_checkpoint)):
        load_checkpoint(not_a_checkpoint, model=[], optimizer=None, scheduler=None)
