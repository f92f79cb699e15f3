"""The reference teacher server in a subprocess, as a user runs it: for the trainer's self-served
teachers (a teacher entry naming a model directory instead of URLs), tests and benchmarks.

    with teacher_server_process(model_dir, "--max-logprobs", "8") as server:
        RemoteTeacher(server.url, "vllm", topk=8).score(sequences)
    assert server.process.returncode == 0      # SIGTERM on exit ends it cleanly
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
from typing import Iterator, Optional, Union



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
    command = [sys.executable, "-m", "megatron_mopd.teachers.server", "--model", str(model_dir), "--port", str(port), *flags]
    with open(log_path or os.devnull, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(f"http://127.0.0.1:{port}", process, log_path)
    try:
        _wait_healthy(server, startup_timeout_s)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_healthy(server: ServerProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if server.process.poll() is not None or time.monotonic() > deadline:
            state = f"exited with {server.process.returncode}" if server.process.poll() is not None else "timed out"
            raise RuntimeError(f"the teacher server at {server.url} did not start ({state}):\n{server.log()[-4000:]}")
        time.sleep(0.1)
