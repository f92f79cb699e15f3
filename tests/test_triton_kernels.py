"""The Triton kernels (megatron_mopd.kernels) against the PyTorch path, on CPU, by Triton's interpreter.

The checks live in tests/triton_kernel_cases.py and run once, in a subprocess started with
``TRITON_INTERPRET=1``: the interpreter is chosen when a kernel is defined, and another module of this
pytest process may already have imported Triton (and defined kernels) without it. Each case is one
test here; the subprocess takes about 30 s of CPU time (a minute of wall time on a busy 2-core machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import triton_kernel_cases

pytest.importorskip(
    "triton", reason="Triton is not installed: the CUDA kernels (extra `kernels`) are tested where it is"
)

CASES_SCRIPT = Path(triton_kernel_cases.__file__)


@pytest.fixture(scope="module")
def case_results() -> dict[str, str]:
    """``{case: "ok" | failure}`` from one interpreter run of every case."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(CASES_SCRIPT)], env=env, capture_output=True, text=True, timeout=850
    )
    assert proc.returncode == 0, f"the interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report["results"]


@pytest.mark.parametrize("case", list(triton_kernel_cases.CASES))
def test_kernel_matches_the_pytorch_path(case: str, case_results: dict[str, str]) -> None:
    assert case_results[case] == "ok", case_results[case]
