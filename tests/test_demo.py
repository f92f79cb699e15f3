"""Specification of ``mopd demo``, the README's main job: a two-teacher on-policy distillation through
the trainer. A short run (a few steps) must already produce what the full one reports: both teachers
(one with the student's tokenizer, one with another), routed by domain, most steps on-policy, the
held-out divergences before and after, the examples the student sampled, the plot and a verdict line.
Whether the divergences halve over the full run is measured by running it (README), not here."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from megatron_mopd.demo.assets import DEMO_CONFIG


def test_the_demo_configuration_is_a_two_teacher_on_policy_run_over_two_domains() -> None:
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    teachers = {t["name"]: t for t in config["teachers"]}
    assert teachers["arith"].get("tokenizer") is None and teachers["prose"]["tokenizer"]  # another tokenizer
    assert teachers["prose"]["loss"] in ("gold", "ctkd") and teachers["prose"]["projection"]
    assert config["loss"]["routing"] == "domain" and config["rollout"]["lmbda"] > 0.5
    assert config["eval"]["path"] == "${demo:mopd_heldout}"
    assert "teacher" in config["teachers"][0]["model"]  # trained teachers, never the random ones


def test_a_short_demo_reports_both_teachers_on_held_out_prompts_and_a_verdict(tmp_path) -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "megatron_mopd.cli", "demo", "--output", str(tmp_path), "train.steps=4",
         "train.lr_warmup_steps=1", "eval.interval=2", "logging.progress=false", "checkpoint.export_hf=false"],
        capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["teachers"]) == {"arith", "prose"}
    for values in report["teachers"].values():
        assert values["divergence_start"] > 0 and values["divergence_end"] > 0
    assert report["rollouts"]["on_policy_steps"] + report["rollouts"]["off_policy_steps"] == 4
    assert report["eval"]["measured_before_steps"] == [0, 2, 4]
    assert {e["domain"] for e in report["eval"]["examples_after"]} == {"arithmetic", "text"}
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert finished.stdout.strip().splitlines()[-1].startswith("verdict: ")
