"""Inference servers in a subprocess, as a user runs them: the reference teacher server (for the
trainer's self-served teachers and rollout servers, tests and benchmarks) and a real vLLM server.

    with teacher_server_process(model_dir, "--max-logprobs", "8") as server:
        RemoteTeacher(server.url, "vllm", topk=8).score(sequences)
    assert server.process.returncode == 0      # SIGTERM on exit ends it cleanly

    with vllm_server_process(model_dir, "--max-model-len", "512", log_path=log) as server:
        ...                                    # vLLM's OpenAI server, development endpoints on
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

PROGRESS_EVERY_S = 30.0  # a line saying how long a server has been starting, this often


def free_loopback_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class ServerProcess:
    url: str
    process: subprocess.Popen
    log_path: Optional[Path]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""


@contextlib.contextmanager
def teacher_server_process(
    model_dir: Union[str, Path], *flags: str, log_path: Optional[Path] = None, startup_timeout_s: float = 120.0
) -> Iterator[ServerProcess]:
    """Start ``python -m megatron_mopd.teachers.server --model DIR --port P *flags`` on a free loopback
    port, wait until ``/health`` answers 200, yield it, and stop it with SIGTERM on exit.

    Raises RuntimeError (with the server's log when ``log_path`` is given) if it exits or does not
    become healthy within ``startup_timeout_s``.
    """
    port = free_loopback_port()
    command = [sys.executable, "-m", "megatron_mopd.teachers.server", "--model", str(model_dir), "--port", str(port),
               *flags]
    with _serving(command, port, "the teacher server", log_path, startup_timeout_s) as server:
        yield server


@contextlib.contextmanager
def vllm_server_process(
    model_dir: Union[str, Path], *flags: str, log_path: Optional[Path] = None, startup_timeout_s: float = 900.0,
    python: str = sys.executable, env: Optional[Mapping[str, str]] = None, say: Callable[[str], None] = print,
) -> Iterator[ServerProcess]:
    """Start ``python -m vllm.entrypoints.openai.api_server --model DIR --dtype float32 --host 127.0.0.1
    --port P *flags`` with ``VLLM_SERVER_DEV_MODE=1`` (its weight-reload and cache endpoints) and ``env``,
    wait until ``/health`` answers 200 (``say`` reports the wait every ``PROGRESS_EVERY_S``: vLLM
    takes minutes to start on a CPU), yield it, and stop it with SIGTERM on exit.

    ``python`` is the interpreter that has vLLM (its own virtual environment, when vLLM's pins do not fit
    the trainer's). Raises RuntimeError with the end of the server's log (when ``log_path`` is given)
    if it exits or is not healthy within ``startup_timeout_s``.
    """
    port = free_loopback_port()
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--dtype", "float32",
               "--host", "127.0.0.1", "--port", str(port), *flags]
    environment = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", **(env or {})}
    with _serving(command, port, "the vLLM server", log_path, startup_timeout_s, environment, say) as server:
        yield server


@contextlib.contextmanager
def _serving(command: Sequence[str], port: int, name: str, log_path: Optional[Path], startup_timeout_s: float,
             env: Optional[Mapping[str, str]] = None, say: Optional[Callable[[str], None]] = None
             ) -> Iterator[ServerProcess]:
    """Run ``command`` (a server on ``port``), wait until it is healthy, yield it, SIGTERM it on exit."""
    with open(log_path or os.devnull, "wb") as log:
        process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(f"http://127.0.0.1:{port}", process, log_path)
    try:
        _wait_healthy(server, name, startup_timeout_s, say)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_healthy(server: ServerProcess, name: str, timeout_s: float, say: Optional[Callable[[str], None]]) -> None:
    began = time.monotonic()
    reported = began
    while True:
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        now = time.monotonic()
        if server.process.poll() is not None or now - began > timeout_s:
            state = (f"exited with {server.process.returncode}" if server.process.poll() is not None
                     else f"not healthy within {timeout_s:.0f} s")
            raise RuntimeError(f"{name} at {server.url} did not start ({state}):\n{server.log()[-4000:]}")
        if say is not None and now - reported >= PROGRESS_EVERY_S:
            reported = now
            say(f"waiting for {name} at {server.url} to start ({now - began:.0f} s of {timeout_s:.0f} s)")
        time.sleep(0.1)
