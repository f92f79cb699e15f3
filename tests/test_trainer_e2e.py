"""Specification: the trainer end to end on CPU/gloo, as users run it (``python -m megatron_mopd.train``
under torchrun), on examples/configs' single-teacher and cross-tokenizer configurations with shared
reference teacher servers:

- TP=2, PP=2, TP=2 x PP=2, DP=2 and TP=2 with the fused output layer (``loss.fused_output_layer``: the
  losses computed without the student's logits) give the per-step losses of TP=1 (relative 1e-4: float32 sums in
  another order over four Adam steps), for a teacher with the student's tokenizer (top-K JSD) and one
  with another tokenizer (GOLD through the projection); a colocated full-vocabulary JSD teacher gives
  the same losses at TP=2 and PP=2; the global batch is the same at every layout;
- a run killed after its step-2 checkpoint and resumed with ``checkpoint.resume=auto`` reproduces the
  uninterrupted run's losses (relative 1e-6), and ``metrics.jsonl`` describes one history;
- a checkpoint saved at TP=2 continues at PP=2 with the uninterrupted run's losses;
- an on-policy run (``rollout.lmbda=1``) trains on the student's own samples, and samples and trains
  alike at TP=2 (also with the fused output layer, which the sampling never sees), with a teacher of the
  student's tokenizer and with one of another tokenizer (which scores the text the sampled ids spell);
- with ``rollout.engine=server`` the student is served by the reference server the trainer starts, its
  weights pushed before each step's sampling, and trains alike at TP=2;
- with ``rollout.seq_kd`` a teacher generates the completions the student learns on (one with the
  student's tokenizer, and one with another tokenizer whose text the student's tokenizer reads), the
  same at TP=2;
- a held-out evaluation (``eval.path``) measures each teacher's divergence on the student's samples of
  the held-out prompts before the first step, every ``eval.interval`` steps and after the last, the
  same at TP=2, and report.json's divergences are its first and last;
- the outputs: config.yaml (resolved), metrics.jsonl, report.json, curves.png, checkpoints, and an
  exported Hugging Face student that ``transformers`` loads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mopd.demo.assets import demo_asset_path

CONFIGS = Path(__file__).parents[1] / "examples" / "configs"
SINGLE_CONFIG = CONFIGS / "single_teacher_topk.yaml"
CROSS_CONFIG = CONFIGS / "cross_tokenizer_gold.yaml"
COLOCATED_CONFIG = CONFIGS / "colocated_jsd.yaml"
STEPS = 4
FUSED = "loss.fused_output_layer=true"
LAYOUTS = {"tp2": (2, ["parallel.tp=2"]), "pp2": (2, ["parallel.pp=2"]), "dp2": (2, []),
           "tp2pp2": (4, ["parallel.tp=2", "parallel.pp=2"])}
TOP_K_LAYOUTS = {**LAYOUTS, "tp2_fused_output_layer": (2, ["parallel.tp=2", FUSED])}  # GOLD needs the logits


def command(output: Path, url: str, *overrides: str, nproc: int = 1, config: Path = SINGLE_CONFIG) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*(launcher if nproc > 1 else [sys.executable]), "-m", "megatron_mopd.train", "--config", str(config),
            f"output_dir={output}", f"teachers.0.urls=[{url}]", "teachers.0.model=null", f"train.steps={STEPS}",
            "train.lr_decay_style=constant", "train.lr_warmup_steps=0", "checkpoint.interval=0",
            "checkpoint.export_hf=false", "logging.progress=false", "logging.plot=false", *overrides]


def run(output: Path, url: str, *overrides: str, nproc: int = 1, config: Path = SINGLE_CONFIG) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command(output, url, *overrides, nproc=nproc, config=config), capture_output=True,
                              text=True, timeout=900, env=env)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-5000:]
    return metrics(output)


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def baseline(demo_teacher_url, tmp_path_factory) -> tuple[Path, list[dict]]:
    output = tmp_path_factory.mktemp("tp1")
    return output, run(output, demo_teacher_url, "checkpoint.export_hf=true", "logging.plot=true")


def test_a_run_writes_its_config_metrics_report_plot_checkpoint_and_hf_student(baseline) -> None:
    output, records = baseline
    assert [r["step"] for r in records] == list(range(STEPS))
    for record in records:
        for key in ("loss", "lr", "tokens", "divergence/reference", "time/forward_backward", "time/teacher_wait"):
            assert record[key] is not None, key
        assert record["tokens"] > 0 and record["loss"] > 0
    assert "path: " in (output / "config.yaml").read_text() and "${demo:" not in (output / "config.yaml").read_text()
    report = json.loads((output / "report.json").read_text())
    assert report["teachers"]["reference"]["divergence_start"] == records[0]["divergence/reference"]
    assert (output / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (output / "checkpoints" / "latest").read_text().strip() == str(STEPS)
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(output / "hf")
    assert student.config.num_hidden_layers == 2


@pytest.mark.parametrize("layout", sorted(TOP_K_LAYOUTS))
def test_every_parallel_layout_gives_the_single_process_losses(baseline, demo_teacher_url, tmp_path, layout) -> None:
    nproc, overrides = TOP_K_LAYOUTS[layout]
    records = run(tmp_path, demo_teacher_url, *overrides, nproc=nproc)
    assert [r["tokens"] for r in records] == [r["tokens"] for r in baseline[1]]
    assert losses(records) == pytest.approx(losses(baseline[1]), rel=1e-4)


@pytest.fixture(scope="module")
def cross_baseline(sp_teacher_url, tmp_path_factory) -> list[dict]:
    return run(tmp_path_factory.mktemp("cross_tp1"), sp_teacher_url, config=CROSS_CONFIG)


def test_a_teacher_with_another_tokenizer_trains_on_aligned_chunks(cross_baseline) -> None:
    for record in cross_baseline:
        assert record["divergence/sp_teacher"] > 0
        assert record["loss"] <= record["divergence/sp_teacher"]  # positions outside every chunk add nothing


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_parallel_layout_gives_the_single_process_losses_across_tokenizers(
    cross_baseline, sp_teacher_url, tmp_path, layout
) -> None:
    nproc, overrides = LAYOUTS[layout]
    records = run(tmp_path, sp_teacher_url, *overrides, nproc=nproc, config=CROSS_CONFIG)
    assert losses(records) == pytest.approx(losses(cross_baseline), rel=1e-4)


COLOCATED = ("teachers.0.urls=[]", f"teachers.0.model={demo_asset_path('teacher')}")


@pytest.fixture(scope="module")
def colocated_baseline(tmp_path_factory) -> list[dict]:
    return run(tmp_path_factory.mktemp("colocated_tp1"), "unused", *COLOCATED, config=COLOCATED_CONFIG)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_a_colocated_full_vocabulary_teacher_gives_the_single_process_losses(colocated_baseline, tmp_path,
                                                                              layout) -> None:
    nproc, overrides = LAYOUTS[layout]
    records = run(tmp_path, "unused", *COLOCATED, *overrides, nproc=nproc, config=COLOCATED_CONFIG)
    assert losses(records) == pytest.approx(losses(colocated_baseline), rel=1e-4)


ON_POLICY = ("rollout.lmbda=1.0", "rollout.max_new_tokens=24", "rollout.temperature=1.0")


@pytest.fixture(scope="module")
def on_policy_baseline(demo_teacher_url, tmp_path_factory) -> tuple[Path, list[dict]]:
    output = tmp_path_factory.mktemp("on_policy_tp1")
    return output, run(output, demo_teacher_url, *ON_POLICY)


def test_an_on_policy_run_trains_on_the_students_samples(on_policy_baseline, baseline) -> None:
    output, records = on_policy_baseline
    assert all(r["on_policy"] for r in records)
    assert [r["tokens"] for r in records] != [r["tokens"] for r in baseline[1]]  # sampled, not the dataset's
    report = json.loads((output / "report.json").read_text())
    assert report["rollouts"] == {"on_policy_steps": STEPS, "off_policy_steps": 0, "teacher_generated_steps": 0}


@pytest.mark.parametrize("output_layer", [(), (FUSED,)], ids=["logits", "fused_output_layer"])
def test_an_on_policy_run_samples_and_trains_alike_at_tp2(on_policy_baseline, demo_teacher_url, tmp_path,
                                                          output_layer) -> None:
    records = run(tmp_path, demo_teacher_url, *ON_POLICY, "parallel.tp=2", *output_layer, nproc=2)
    assert [r["tokens"] for r in records] == [r["tokens"] for r in on_policy_baseline[1]]
    assert losses(records) == pytest.approx(losses(on_policy_baseline[1]), rel=1e-4)


HELD_OUT = ("eval.path=${demo:data}", "eval.interval=2", "eval.max_new_tokens=12")
# Adam turns float-noise-sized gradients (~1e-10, plenty across a projection) into full-size updates
# whose sign is noise; with that noise in the weights, sampled tokens differ across layouts after a few
# steps. A larger ε keeps those updates as small as their gradients.
SAMPLES_ALIKE = ("train.adam_eps=1e-4",)


@pytest.fixture(scope="module")
def cross_on_policy_baseline(sp_teacher_url, tmp_path_factory) -> tuple[Path, list[dict]]:
    output = tmp_path_factory.mktemp("cross_on_policy_tp1")
    return output, run(output, sp_teacher_url, *ON_POLICY, *HELD_OUT, *SAMPLES_ALIKE, config=CROSS_CONFIG)


def held_out(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "eval.jsonl").read_text().splitlines()]


def test_a_teacher_with_another_tokenizer_scores_the_students_samples(cross_on_policy_baseline) -> None:
    _, records = cross_on_policy_baseline
    assert all(r["on_policy"] for r in records)
    assert all(r["divergence/sp_teacher"] > 0 for r in records)


def test_held_out_evaluation_measures_each_teacher_on_the_students_samples(cross_on_policy_baseline) -> None:
    output, _ = cross_on_policy_baseline
    evaluations = held_out(output)
    assert [e["step"] for e in evaluations] == [0, 2, STEPS]  # before the first step, every 2, after the last
    assert all(e["eval/divergence/sp_teacher"] > 0 for e in evaluations)
    report = json.loads((output / "report.json").read_text())
    assert report["teachers"]["sp_teacher"]["divergence_start"] == evaluations[0]["eval/divergence/sp_teacher"]
    assert report["teachers"]["sp_teacher"]["divergence_end"] == evaluations[-1]["eval/divergence/sp_teacher"]
    before, after = report["eval"]["examples_before"], report["eval"]["examples_after"]
    assert len(before) == len(after) == 2 and [e["prompt"] for e in before] == [e["prompt"] for e in after]
    assert all(isinstance(e["completion"], str) for e in before + after)


def test_on_policy_across_tokenizers_samples_evaluates_and_trains_alike_at_tp2(cross_on_policy_baseline,
                                                                              sp_teacher_url, tmp_path) -> None:
    output, records = cross_on_policy_baseline
    tp2 = run(tmp_path, sp_teacher_url, *ON_POLICY, *HELD_OUT, *SAMPLES_ALIKE, "parallel.tp=2", nproc=2,
              config=CROSS_CONFIG)
    assert [r["tokens"] for r in tp2] == [r["tokens"] for r in records]
    assert losses(tp2) == pytest.approx(losses(records), rel=1e-4)
    divergences = [e["eval/divergence/sp_teacher"] for e in held_out(tmp_path)]
    single = [e["eval/divergence/sp_teacher"] for e in held_out(output)]
    assert divergences[0] == pytest.approx(single[0], rel=1e-5)  # the same weights sample the same tokens
    # After updates, float noise in the weights may flip a sampled token among the ~3000 held-out ones.
    assert divergences[1:] == pytest.approx(single[1:], rel=1e-2)


def test_the_server_engine_samples_the_pushed_student_and_trains_alike_at_tp2(demo_teacher_url, tmp_path) -> None:
    served = ("rollout.engine=server", *ON_POLICY)
    records = run(tmp_path / "tp1", demo_teacher_url, *served)
    assert all(r["on_policy"] for r in records)
    log = next((tmp_path / "tp1" / "logs").glob("rollout-reference-*.log")).read_text()
    assert log.count("POST /collective_rpc 200 reloaded") == STEPS  # vLLM's reload_weights, before each sampling
    tp2 = run(tmp_path / "tp2", demo_teacher_url, *served, "parallel.tp=2", nproc=2)
    assert [r["tokens"] for r in tp2] == [r["tokens"] for r in records]
    assert losses(tp2) == pytest.approx(losses(records), rel=1e-4)


SEQ_KD = ("rollout.seq_kd=true", "rollout.max_new_tokens=16")


@pytest.mark.parametrize("config, url", [(SINGLE_CONFIG, "demo_teacher_url"), (CROSS_CONFIG, "sp_teacher_url")],
                         ids=["same_tokenizer", "another_tokenizer"])
def test_with_seq_kd_the_student_learns_on_the_teachers_completions_alike_at_tp2(baseline, config, url, tmp_path,
                                                                                request) -> None:
    url = request.getfixturevalue(url)
    records = run(tmp_path / "tp1", url, *SEQ_KD, config=config)
    assert all(r["completions"] == "teacher" and not r["on_policy"] for r in records)
    assert [r["tokens"] for r in records] != [r["tokens"] for r in baseline[1]]  # generated, not the dataset's
    report = json.loads((tmp_path / "tp1" / "report.json").read_text())
    assert report["rollouts"]["teacher_generated_steps"] == STEPS
    tp2 = run(tmp_path / "tp2", url, *SEQ_KD, "parallel.tp=2", nproc=2, config=config)
    assert [r["tokens"] for r in tp2] == [r["tokens"] for r in records]
    assert losses(tp2) == pytest.approx(losses(records), rel=1e-4)


def test_a_killed_run_resumes_exactly(baseline, demo_teacher_url, tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command(tmp_path, demo_teacher_url, "checkpoint.interval=2"), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)
    for line in process.stdout:
        if "saved checkpoint" in line and "(step 2)" in line:
            process.send_signal(signal.SIGKILL)  # a crash, wherever step 2 is
            break
    process.wait(timeout=300)
    assert process.returncode == -signal.SIGKILL, "the run ended before its step-2 checkpoint"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "2"
    resumed = run(tmp_path, demo_teacher_url, "checkpoint.resume=auto")
    assert [r["step"] for r in resumed] == list(range(STEPS))
    assert losses(resumed) == pytest.approx(losses(baseline[1]), rel=1e-6)


def test_a_checkpoint_saved_at_tp2_continues_at_pp2(baseline, demo_teacher_url, tmp_path) -> None:
    run(tmp_path, demo_teacher_url, "parallel.tp=2", "train.steps=2", nproc=2)
    continued = run(tmp_path, demo_teacher_url, "parallel.pp=2", "checkpoint.resume=auto", nproc=2)
    assert [r["step"] for r in continued] == list(range(STEPS))
    assert losses(continued)[2:] == pytest.approx(losses(baseline[1])[2:], rel=1e-4)
