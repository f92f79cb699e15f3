"""Specification: the README's main job — ``mopd demo`` — distills the reference teacher server into a
Megatron-Core student on CPU, and gives the same per-step losses at TP=2 and PP=2 (torchrun) as in
one process: the remote teacher, the placement of its scores and the vocab-parallel loss agree
across layouts.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

STEPS = 3


def run_demo(out: Path, *flags: str, nproc: int = 1) -> list[dict]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command = [*(launcher if nproc > 1 else [sys.executable]), "-m", "megatron_mopd.demo", "--steps", str(STEPS),
               "--out", str(out), *flags]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "jsd/token" in finished.stdout
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> list[dict]:
    return run_demo(tmp_path_factory.mktemp("demo") / "metrics.json")


def test_the_demo_trains_and_reports_every_step(one_process: list[dict]) -> None:
    assert [row["step"] for row in one_process] == list(range(STEPS))
    for row in one_process:
        assert math.isfinite(row["jsd_per_token"]) and row["jsd_per_token"] > 0
        assert row["tokens"] > 0


@pytest.mark.parametrize("layout", [("--tp", "2"), ("--pp", "2")])
def test_tensor_and_pipeline_parallel_runs_give_the_same_losses(one_process, layout, tmp_path) -> None:
    parallel = run_demo(tmp_path / "metrics.json", *layout, nproc=2)
    for single, row in zip(one_process, parallel):
        assert row["tokens"] == single["tokens"]
        assert row["jsd_per_token"] == pytest.approx(single["jsd_per_token"], rel=1e-4)
