"""Specification of the ``mopd`` command as a user meets it: every project error is one line on stderr and
a non-zero exit (never a traceback), it says what it waits for, and Megatron's import-time warnings
stay out of the console."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from megatron_mopd.demo.assets import DEMO_CONFIG


def mopd(*args: str, timeout: float = 300, cwd: Optional[Path] = None,
         env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run ``mopd ARGS`` (in ``cwd``, with ``env`` added to the environment)."""
    return subprocess.run([sys.executable, "-m", "megatron_mopd.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=None if env is None else {**os.environ, **env})


def assert_one_line_error(finished: subprocess.CompletedProcess, command: str, pattern: str) -> None:
    import re

    assert finished.returncode == 1, finished.stdout + finished.stderr
    assert "Traceback" not in finished.stderr, finished.stderr
    errors = [line for line in finished.stderr.splitlines() if line.startswith(f"mopd {command}: error: ")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), finished.stderr


def test_help_lists_the_commands_and_demo_help_shows_its_defaults() -> None:
    top = mopd("--help")
    for command in ("train", "demo", "build-projection", "serve-teacher", "check-teacher"):
        assert command in top.stdout
    demo = mopd("demo", "--help")
    assert demo.returncode == 0 and "runs/demo" in demo.stdout


def test_a_bad_override_is_one_line() -> None:
    assert_one_line_error(mopd("train", "--config", str(DEMO_CONFIG), "train.foo=1"), "train",
                          r"Key 'foo' not in 'TrainConfig' \(at train.foo\)")
    assert_one_line_error(mopd("demo", "train.steps=0"), "demo", "train.steps must be >= 1")


def test_a_layout_for_more_ranks_than_the_job_has_is_one_line() -> None:
    finished = mopd("demo", "parallel.tp=2")
    assert_one_line_error(finished, "demo", "world size 1 is not divisible")
    assert "Transformer Engine and Apex are not installed" not in finished.stderr


def test_an_unreachable_teacher_is_one_line_after_saying_what_it_waits_for(tmp_path) -> None:
    finished = mopd("demo", "--output", str(tmp_path), "teachers.0.model=null", "teachers.0.urls=[http://127.0.0.1:1]",
                    "teachers.0.wait_for_servers_s=2")
    assert "teacher arith: waiting up to 2 s for ['http://127.0.0.1:1']" in finished.stdout
    assert_one_line_error(finished, "demo", "127.0.0.1:1")


def test_a_top_k_above_what_the_server_allows_is_one_line_naming_the_fix(demo_teacher_url, tmp_path) -> None:
    from conftest import DEMO_TEACHER_MAX_LOGPROBS

    finished = mopd("demo", "--output", str(tmp_path), "teachers.0.model=null", f"teachers.0.urls=[{demo_teacher_url}]",
                    f"teachers.0.topk={DEMO_TEACHER_MAX_LOGPROBS * 2}")
    assert_one_line_error(finished, "demo", "--max-logprobs")


EXAMPLES = Path(__file__).parents[1] / "examples" / "configs"


@pytest.mark.parametrize("config, overrides, pattern", [
    ("cross_tokenizer_gold.yaml", ["teachers.0.tokenizer=${demo:tokenizer}"],
     "teacher 'sp_teacher': projection .* (fingerprint|mopd build-projection)"),
    ("colocated_jsd.yaml", ["teachers.0.model=${demo:sp_teacher}"],
     "teacher 'colocated': .* has another tokenizer than the student; a colocated teacher must share"),
    ("single_teacher_topk.yaml", ["teachers.0.model=${demo:sp_teacher}"],
     "teacher 'reference': .* has another tokenizer than the student; set teachers.N.tokenizer and a projection"),
])
def test_a_teacher_whose_vocabulary_does_not_fit_is_refused_before_training(config, overrides, pattern,
                                                                             tmp_path) -> None:
    finished = mopd("train", "--config", str(EXAMPLES / config), f"output_dir={tmp_path}", *overrides)
    assert_one_line_error(finished, "train", pattern)


@pytest.mark.parametrize("args, pattern", [
    (["build-projection", "--student", "/nonexistent/a", "--teacher", "/nonexistent/b", "-o", "/tmp/x"], "nonexistent"),
])
def test_other_commands_report_bad_paths_in_one_line(args, pattern) -> None:
    assert_one_line_error(mopd(*args), args[0], pattern)


@pytest.mark.parametrize("args, pattern", [
    (["build-projection", "--student", "mytok", "--teacher", "mytok", "-o", "w.safetensors"],
     r"--student mytok: no such file or directory; --student must name a local directory that holds a tokenizer; "
     r"download one from the Hugging Face Hub first: hf download NAME --local-dir DIR"),
    (["train", "--config", str(DEMO_CONFIG), "model.path=mystudent"],
     r"model.path mystudent: no such file or directory; model.path must name a local directory"),
    (["train", "--config", str(EXAMPLES / "cross_tokenizer_gold.yaml"), "teachers.0.tokenizer=sp_tok"],
     r"teacher 'sp_teacher': .*teachers.N.tokenizer sp_tok: no such file or directory"),
], ids=["build-projection --student", "train model.path", "train teachers.N.tokenizer"])
def test_a_mistyped_tokenizer_directory_is_one_line_naming_it_not_a_hub_lookup(args, pattern, tmp_path) -> None:
    """A relative path that does not exist is refused as a path, not looked up on the Hugging Face Hub
    (the Hub is off for the run: a lookup would fail with another message)."""
    finished = mopd(*args, *(["output_dir=run"] if args[0] == "train" else []), cwd=tmp_path,
                    env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(finished, args[0], pattern)


def test_the_demo_verdict_requires_every_teachers_held_out_divergence_to_halve() -> None:
    from megatron_mopd.demo import verdict

    def report(**ends: float) -> dict:
        return {"eval": {}, "teachers": {name: {"divergence_start": 1.0, "divergence_end": end}
                                         for name, end in ends.items()}}

    assert verdict(report(arith=0.4, prose=0.5)).startswith("verdict: met")
    assert verdict(report(arith=0.4, prose=0.6)).startswith("verdict: NOT met")
    assert "prose 1.000 -> 0.600 (-40%)" in verdict(report(arith=0.4, prose=0.6))
    assert "nothing to judge" in verdict({"teachers": {}})
