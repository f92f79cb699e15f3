"""Specification of the cluster templates: the Slurm jobs in ``examples/slurm`` and the torchrun scripts in
``examples/torchrun``.

No Slurm here: each template runs under bash in a temporary directory whose ``PATH`` starts with stub
executables (``srun``, ``scontrol``, ``torchrun``, ``python``, ``curl``, ``hostname``). Every stub records
its arguments and the relevant environment as one JSON line; ``srun`` runs its command once per simulated
node, concurrently, with ``SLURM_NODEID`` / ``SLURMD_NODENAME`` set and its ``--output`` pattern expanded
per node; ``scontrol show hostnames`` expands the simulated node list; ``curl`` answers, or fails a given
number of times, or always for a given server. The tests then check the commands the job would run.
Polling intervals are a hundredth of a second and deadlines fractions of one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "examples" / "slurm"
TORCHRUN = REPO / "examples" / "torchrun"
JOB_ID = "4242"

# The stubs. Each records its call as one JSON line in $STUB_LOG: {"cmd", "argv", "env"} (env: SLURM*,
# NCCL_*, TORCH_NCCL_*, CUDA_*). Bash for the ones a job calls often (cheap to start); srun in Python.
STUB_SH = r"""#!/usr/bin/env bash
set -euo pipefail
name=${0##*/}

json() {  # json VAR TEXT: VAR = TEXT as a JSON string
    local text=$2
    text=${text//\\/\\\\} text=${text//\"/\\\"} text=${text//$'\n'/\\n} text=${text//$'\t'/\\t}
    printf -v "$1" '"%s"' "$text"
}

record() {
    local line quoted sep="" argument variable
    json quoted "$name"
    line="{\"cmd\": $quoted, \"argv\": ["
    for argument in "$@"; do json quoted "$argument"; line+="$sep$quoted"; sep=", "; done
    line+="], \"env\": {"; sep=""
    for variable in $(compgen -e); do
        [[ $variable =~ ^(SLURM|NCCL_|TORCH_NCCL_|CUDA_) ]] || continue
        json quoted "$variable"; line+="$sep$quoted: "; json quoted "${!variable}"; line+="$quoted"; sep=", "
    done
    printf '%s}}\n' "$line" >> "$STUB_LOG"
}

hostnames() {  # Slurm's compressed node lists: gpu[01-03,07],login1
    local list=$1 prefix ranges item first last n
    while [[ $list =~ ^([^,\[]+)(\[([^]]*)\])?,?(.*)$ ]]; do
        prefix=${BASH_REMATCH[1]} ranges=${BASH_REMATCH[3]} list=${BASH_REMATCH[4]}
        if [[ -z ${BASH_REMATCH[2]} ]]; then echo "$prefix"; continue; fi
        IFS=, read -ra items <<< "$ranges"
        for item in "${items[@]}"; do
            first=${item%-*} last=${item#*-}
            for (( n = 10#$first; n <= 10#$last; n++ )); do printf '%s%0*d\n' "$prefix" "${#first}" "$n"; done
        done
    done
}

fails() {  # true for the first STUB_CURL_FAILURES calls (counted across processes), or always for STUB_CURL_DOWN
    [[ -n ${STUB_CURL_DOWN:-} && $1 == *"$STUB_CURL_DOWN"* ]] && return 0
    local calls
    exec 8>> "$STUB_LOG.curl"
    flock 8
    calls=$(stat -c %s "$STUB_LOG.curl")
    printf . >&8
    (( calls < ${STUB_CURL_FAILURES:-0} ))
}

case $name in
    hostname) echo "${SLURMD_NODENAME:-batchhost}" ;;
    scontrol)
        if [[ $1 == show && $2 == hostnames ]]; then hostnames "$3"; exit 0; fi
        record "$@" ;;
    curl)
        record "$@"
        url=${*: -1}
        if fails "$url"; then echo "curl: (7) Failed to connect to $url: Connection refused" >&2; exit 7; fi ;;
    torchrun)
        record "$@"
        echo "torchrun on ${SLURMD_NODENAME:-localhost}: $*"
        exit "${STUB_TORCHRUN_EXIT:-0}" ;;
    python)  # a teacher server
        record "$@"
        echo "$* serving on GPUs ${CUDA_VISIBLE_DEVICES:-}"
        if [[ -n ${STUB_SERVER_HOLD:-} ]]; then  # until stopped; the cap keeps a forgotten one from lingering
            trap 'echo "stopped by SIGTERM"; exit 0' TERM
            sleep 30 &
            wait $!
        fi
        exit "${STUB_SERVER_EXIT:-0}" ;;
esac
"""

STUB_SRUN = r"""
import json, os, re, signal, subprocess, sys

argv = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as log:
    env = {k: v for k, v in os.environ.items() if re.match(r"SLURM|NCCL_|TORCH_NCCL_|CUDA_", k)}
    log.write(json.dumps({"cmd": "srun", "argv": argv, "env": env}) + "\n")
options, command = {}, list(argv)
while command and command[0].startswith("--"):
    key, _, value = command.pop(0)[2:].partition("=")
    options[key] = value
group = options.get("het-group")
nodelist = os.environ["SLURM_JOB_NODELIST" + (f"_HET_GROUP_{group}" if group else "")]
nodes = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                       check=True).stdout.split()[: int(options.get("nodes", "1"))]
if os.environ.get("STUB_SRUN_SIGNAL") and os.path.basename(command[0]) == os.environ["STUB_SRUN_SIGNAL_ON"]:
    os.kill(os.getsid(0), getattr(signal, "SIG" + os.environ["STUB_SRUN_SIGNAL"]))  # to the batch script
children = []
for node_id, node in enumerate(nodes):  # every node's task at once, as srun starts them
    env = {**os.environ, "SLURM_NODEID": str(node_id), "SLURMD_NODENAME": node, "SLURM_PROCID": str(node_id),
           "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": str(len(nodes))}
    output = None
    if "output" in options:
        path = options["output"]
        for key, value in {"%x": os.environ.get("SLURM_JOB_NAME", ""), "%j": os.environ["SLURM_JOB_ID"],
                           "%N": node, "%t": str(node_id), "%n": str(node_id)}.items():
            path = path.replace(key, value)
        output = open(path, "a" if options.get("open-mode") == "append" else "w")
    children.append(subprocess.Popen(command, env=env, stdout=output, stderr=output, start_new_session=True))


def cancel(signum, frame):  # srun stops its step: every task's process group
    for child in children:
        try:
            os.killpg(child.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    sys.exit(143)


signal.signal(signal.SIGTERM, cancel)
sys.exit(max([0] + [abs(child.wait()) for child in children]))
"""

@dataclass
class Call:
    """One recorded stub call."""

    cmd: str
    argv: list[str]
    env: dict[str, str]

    def option(self, name: str) -> Optional[str]:
        """The value of ``--name=value`` in argv (None when absent)."""
        prefix = f"--{name}="
        return next((a[len(prefix):] for a in self.argv if a.startswith(prefix)), None)

    def after(self, word: str) -> list[str]:
        """The arguments after the first ``word``."""
        return self.argv[self.argv.index(word) + 1:]


@dataclass
class Run:
    """A finished (or stopped) template run."""

    returncode: int
    stdout: str
    stderr: str
    calls: list[Call]

    def of(self, cmd: str) -> list[Call]:
        """The calls of stub ``cmd``, in the order they were recorded."""
        return [c for c in self.calls if c.cmd == cmd]


class Sandbox:
    """A temporary directory with the stubs first on PATH and a simulated Slurm job's environment."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir()
        shell = self.bin / "stub.sh"
        shell.write_text(STUB_SH)
        for name in ("scontrol", "torchrun", "python", "curl", "hostname"):
            (self.bin / name).symlink_to(shell)
        (self.bin / "srun").write_text(f"#!{sys.executable} -S\n{STUB_SRUN}")
        for program in (shell, self.bin / "srun"):
            program.chmod(0o755)
        self.log = root / "calls.jsonl"
        self.env: dict[str, str] = {
            "PATH": f"{self.bin}:{os.environ['PATH']}",
            "HOME": str(root),
            "LANG": "C.UTF-8",
            "STUB_LOG": str(self.log),
            "MOPD_DIR": str(REPO),
            "SLURM_SUBMIT_DIR": str(REPO),
            "SLURM_JOB_ID": JOB_ID,
            "MOPD_POLL_INTERVAL_S": "0.01",
        }

    def start(self, script: Path, *args: str, **env: str) -> subprocess.Popen:
        """Start ``bash script args`` as its own session (a batch script: srun's stub signals it)."""
        return subprocess.Popen(["bash", str(script), *args], cwd=self.root, env={**self.env, **env},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def finish(self, process: subprocess.Popen) -> Run:
        """Wait for a started run to end; one still running after 60 s (a hang guard, not a measurement)
        is stopped."""
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            stop(process)
            raise
        return Run(process.returncode, stdout, stderr, self.calls())

    def run(self, script: Path, *args: str, **env: str) -> Run:
        """Run ``bash script args`` to its end."""
        return self.finish(self.start(script, *args, **env))

    def calls(self) -> list[Call]:
        """Every stub call recorded so far."""
        if not self.log.exists():
            return []
        return [Call(e["cmd"], e["argv"], e["env"]) for e in map(json.loads, self.log.read_text().splitlines())]


def stop(process: subprocess.Popen) -> None:
    """End a hung job: TERM to its session (the srun stub then stops its node tasks, which run in sessions
    of their own, as srun would), KILL if it is still there after 5 s."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()


def eventually(condition: Callable[[], bool], process: Optional[subprocess.Popen] = None) -> None:
    """Poll ``condition`` (while ``process`` runs, when given); a hang guard of 30 s, not a measurement."""
    for _ in range(3000):
        if condition():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the job ended first: {process.communicate()}")
        time.sleep(0.01)
    if process is not None:
        stop(process)
    raise AssertionError("the condition never held")


def url_file(path: Path, urls: list[str], *, servers: Optional[int] = None, protocol: str = "vllm") -> Path:
    """Write a URL file: with a header when ``servers`` is given, else as a person would."""
    header = [f"# mopd teachers: {servers} servers, protocol {protocol}, job 1"] if servers is not None else []
    path.write_text("\n".join(header + urls) + "\n")
    return path


def sbatch_options(script: Path) -> list[str]:
    """The ``#SBATCH`` lines of ``script``, comments after the option dropped."""
    return [line.split()[1] for line in script.read_text().splitlines() if line.startswith("#SBATCH ")]


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    """A fresh sandbox in the test's temporary directory."""
    return Sandbox(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# student.sbatch


def student_env(sandbox: Sandbox, **extra: str) -> dict[str, str]:
    """A two-node student job (nodes given compressed, as Slurm does) against one teacher URL file."""
    urls = url_file(sandbox.root / "student_urls.txt", ["http://tch01:8000", "http://tch01:8010"], servers=2)
    return {"SLURM_JOB_NAME": "mopd-student", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_CPUS_PER_TASK": "64",
            "CONFIG": str(REPO / "examples" / "configs" / "remote_vllm.yaml"),
            "OUTPUT_DIR": str(sandbox.root / "out"), "TEACHER_URL_FILES": str(urls), **extra}


def trainer_arguments(call: Call) -> list[str]:
    """The trainer's arguments in a torchrun call."""
    return call.after("megatron_mopd.train")


def test_student_starts_one_torchrun_per_node_meeting_at_a_c10d_rendezvous_on_the_first_node(sandbox: Sandbox) -> None:
    """One srun task per node runs torchrun; all meet at the first node's c10d store, named by the job id."""
    run = sandbox.run(SLURM / "student.sbatch", **student_env(sandbox))
    assert run.returncode == 0, run.stderr
    [srun] = run.of("srun")
    assert srun.option("nodes") == "2" and srun.option("ntasks") == "2" and srun.option("ntasks-per-node") == "1"
    assert srun.option("cpus-per-task") == "64"  # srun does not inherit it from sbatch any more
    assert "--kill-on-bad-exit=1" in srun.argv
    torchruns = sorted(run.of("torchrun"), key=lambda c: c.env["SLURM_NODEID"])
    assert [(c.env["SLURM_NODEID"], c.env["SLURMD_NODENAME"]) for c in torchruns] == [("0", "gpu01"), ("1", "gpu02")]
    for call in torchruns:
        assert call.argv[:call.argv.index("-m")] == [
            "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu01:29400",
            f"--rdzv-id={JOB_ID}", "--max-restarts=0"]
        assert call.after("-m")[0] == "megatron_mopd.train"
    assert torchruns[0].argv == torchruns[1].argv  # c10d numbers the nodes: no per-node argument


def test_student_trainer_resumes_automatically_and_takes_the_teachers_from_the_url_file(sandbox: Sandbox) -> None:
    """The trainer gets checkpoint.resume=auto last and the URL file's teachers, in overrides its own parser
    accepts; they win over the arguments given to sbatch."""
    from megatron_mopd.trainer.config import load_config

    run = sandbox.run(SLURM / "student.sbatch", "model.path=/models/student", "data.path=/data/train.jsonl",
                      "checkpoint.resume=none", "teachers.0.urls=[http://stale:1]", **student_env(sandbox))
    assert run.returncode == 0, run.stderr
    arguments = trainer_arguments(run.of("torchrun")[0])
    assert arguments[:2] == ["--config", str(REPO / "examples" / "configs" / "remote_vllm.yaml")]
    assert arguments[-1] == "checkpoint.resume=auto"  # last: no argument or configuration turns it off
    assert 'teachers.0.urls=["http://tch01:8000","http://tch01:8010"]' in arguments
    config = load_config(arguments[1], arguments[2:])  # the trainer's own parser accepts every override
    assert config.checkpoint.resume == "auto"
    assert config.output_dir == str(sandbox.root / "out")
    assert config.teachers[0].urls == ["http://tch01:8000", "http://tch01:8010"]
    assert config.teachers[0].protocol == "vllm"


def test_each_url_file_gives_one_teacher_its_urls_and_protocol(sandbox: Sandbox) -> None:
    """The i-th URL file gives teachers.i its URLs, and its protocol when the file's header names one."""
    from megatron_mopd.trainer.config import load_config

    math = url_file(sandbox.root / "math.txt", ["http://a:8000"], servers=1, protocol="sglang")
    code = url_file(sandbox.root / "code.txt", ["http://b:8000", "  http://c:8000  ", ""])  # hand-written
    config_file = sandbox.root / "two.yaml"
    config_file.write_text("model: {path: /m}\ndata: {path: /d}\nteachers:\n  - {name: math}\n  - {name: code}\n")
    run = sandbox.run(SLURM / "student.sbatch", **student_env(sandbox, CONFIG=str(config_file),
                                                              TEACHER_URL_FILES=f"{math} {code}"))
    assert run.returncode == 0, run.stderr
    arguments = trainer_arguments(run.of("torchrun")[0])
    config = load_config(arguments[1], arguments[2:])
    assert (config.teachers[0].urls, config.teachers[0].protocol) == (["http://a:8000"], "sglang")
    assert (config.teachers[1].urls, config.teachers[1].protocol) == (["http://b:8000", "http://c:8000"], "vllm")


def test_student_writes_one_log_file_per_node_and_appends_after_a_requeue(sandbox: Sandbox) -> None:
    """srun writes each node's output to LOG_DIR/<job name>-<job id>-<node>.log; a requeued start appends."""
    env = student_env(sandbox)
    for _ in range(2):  # the first start, then the requeued one (same job id)
        assert sandbox.run(SLURM / "student.sbatch", **env).returncode == 0
    srun = next(c for c in sandbox.calls() if c.cmd == "srun")
    assert srun.option("output") == str(sandbox.root / "out" / "slurm" / "%x-%j-%N.log")
    assert srun.option("open-mode") == "append"
    logs = sandbox.root / "out" / "slurm"
    for node in ("gpu01", "gpu02"):
        lines = (logs / f"mopd-student-{JOB_ID}-{node}.log").read_text().splitlines()
        assert len(lines) == 2 and all(line.startswith(f"torchrun on {node}: ") for line in lines)


def test_student_exports_the_nccl_settings_and_leaves_empty_ones_to_nccl(sandbox: Sandbox) -> None:
    """Every rank sees the NCCL / PyTorch settings; an empty one is not exported at all."""
    run = sandbox.run(SLURM / "student.sbatch", **student_env(sandbox, NCCL_IB_HCA="mlx5_0,mlx5_1",
                                                              NCCL_SOCKET_IFNAME=""))
    assert run.returncode == 0, run.stderr
    for call in run.of("torchrun"):
        assert call.env["NCCL_IB_HCA"] == "mlx5_0,mlx5_1"
        assert "NCCL_SOCKET_IFNAME" not in call.env and "NCCL_IB_GID_INDEX" not in call.env
        assert call.env["NCCL_DEBUG"] == "WARN"
        assert call.env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        assert call.env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
        assert call.env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == str(sandbox.root / "out" / "slurm" / "nccl_trace_rank_")
        assert call.env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"


def test_student_asks_slurm_to_requeue_it_and_to_warn_it_before_the_time_limit() -> None:
    """The header makes the job requeueable and asks for USR1 to the batch script before the time limit."""
    options = sbatch_options(SLURM / "student.sbatch")
    assert "--requeue" in options
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", option) for option in options)


def test_usr1_before_the_time_limit_requeues_the_student_job(sandbox: Sandbox) -> None:
    """USR1 while training runs requeues the job once (scontrol requeue <job id>), then the script waits on."""
    run = sandbox.run(SLURM / "student.sbatch", **student_env(sandbox), STUB_SRUN_SIGNAL="USR1",
                      STUB_SRUN_SIGNAL_ON="torchrun")
    assert run.returncode == 0, run.stderr  # the trap ran, and the script waited for its step to end
    assert [c.argv for c in run.of("scontrol")] == [["requeue", JOB_ID]]
    assert f"USR1: requeueing job {JOB_ID}" in run.stderr
    assert len(run.of("torchrun")) == 2


def test_student_waits_for_teachers_that_are_still_starting(sandbox: Sandbox) -> None:
    """A teacher that fails its first health checks is polled again until it answers; then training starts."""
    run = sandbox.run(SLURM / "student.sbatch", **student_env(sandbox, STUB_CURL_FAILURES="3"))
    assert run.returncode == 0, run.stderr
    checked = [c.argv[-1] for c in run.of("curl")]
    assert checked == ["http://tch01:8000/health"] * 4 + ["http://tch01:8010/health"]
    assert len(run.of("torchrun")) == 2


def test_a_teacher_that_never_becomes_healthy_fails_the_student_naming_it(sandbox: Sandbox) -> None:
    """A teacher that never answers fails the job at the deadline, naming its URL and curl's reason."""
    run = sandbox.run(SLURM / "student.sbatch", **student_env(sandbox, STUB_CURL_DOWN="tch01:8010",
                                                              TEACHER_WAIT_S="0.2"))
    assert run.returncode == 1
    assert "error: teacher server http://tch01:8010 did not answer /health within 0.2 s" in run.stderr
    assert "Connection refused" in run.stderr  # curl's own reason
    assert len([c for c in run.of("curl") if "tch01:8010" in c.argv[-1]]) > 1  # polled until the deadline
    assert run.of("srun") == []  # no GPU time spent


@pytest.mark.parametrize("urls, state", [(None, "does not exist"),
                                         (["http://tch01:8000"], "lists 1 of 2 teacher servers")])
def test_a_url_file_that_never_lists_every_teacher_fails_the_student_naming_it(
        sandbox: Sandbox, urls: Optional[list[str]], state: str) -> None:
    """A URL file that is missing, or lists fewer servers than its header announces, fails the job at the
    deadline, naming the file and what it lists."""
    path = sandbox.root / "urls.txt"
    env = student_env(sandbox, TEACHER_WAIT_S="0.1", TEACHER_URL_FILES=str(path))
    if urls is not None:
        url_file(path, urls, servers=2)
    run = sandbox.run(SLURM / "student.sbatch", **env)
    assert run.returncode == 1
    assert f"error: after 0.1 s, {path} {state}: is the teacher job running" in run.stderr
    assert run.of("srun") == []


def test_a_url_file_line_that_is_not_a_url_is_refused(sandbox: Sandbox) -> None:
    """A line of the URL file that is not an http(s) URL is refused, naming the file, before any check."""
    path = url_file(sandbox.root / "urls.txt", ["tch01:8000"])
    run = sandbox.run(SLURM / "student.sbatch", **student_env(sandbox, TEACHER_URL_FILES=str(path)))
    assert run.returncode == 1
    assert f"{path}: 'tch01:8000' is not an http(s) URL" in run.stderr
    assert run.of("curl") == [] and run.of("srun") == []


def test_student_without_url_files_keeps_the_configured_teachers(sandbox: Sandbox) -> None:
    """TEACHER_URL_FILES exported empty: no teacher override, no health check; the configuration decides."""
    run = sandbox.run(SLURM / "student.sbatch", **student_env(sandbox, TEACHER_URL_FILES=""))
    assert run.returncode == 0, run.stderr
    assert not any(a.startswith("teachers.") for a in trainer_arguments(run.of("torchrun")[0]))
    assert run.of("curl") == []


# ---------------------------------------------------------------------------------------------------------
# teachers.sbatch


def teacher_env(sandbox: Sandbox, **extra: str) -> dict[str, str]:
    """A two-node teacher job; its servers run until the job is stopped."""
    return {"SLURM_JOB_NAME": "mopd-teachers", "SLURM_JOB_NODELIST": "tch[01-02]", "TEACHER_MODEL": "/models/teacher",
            "TEACHER_URL_FILE": str(sandbox.root / "urls.txt"), "TEACHER_LOG_DIR": str(sandbox.root / "logs"),
            "STUB_SERVER_HOLD": "1", **extra}


def serve_until_listed(sandbox: Sandbox, servers: int, **env: str) -> tuple[str, Run]:
    """Start the teacher job, read its URL file once every server is listed, then scancel it (TERM)."""
    job = sandbox.start(SLURM / "teachers.sbatch", **teacher_env(sandbox, **env))
    path = sandbox.root / "urls.txt"
    eventually(lambda: path.exists() and path.read_text().count("http://") == servers, job)
    listed = path.read_text()
    assert job.poll() is None  # the job stays while its servers run
    job.send_signal(signal.SIGTERM)
    return listed, sandbox.finish(job)


def test_vllm_teachers_run_one_server_per_gpu_group_and_list_each_url_once_healthy(sandbox: Sandbox) -> None:
    """vLLM: one server per TEACHER_TP GPUs of each node, each on its own port and GPUs; the URL file gets
    its header and every URL once healthy, while the job stays up."""
    listed, run = serve_until_listed(sandbox, 4, TEACHER_TP="4", TEACHER_SERVER_ARGS="--dtype bfloat16")
    lines = listed.splitlines()
    assert lines[0] == f"# mopd teachers: 4 servers, protocol vllm, job {JOB_ID}"
    assert sorted(lines[1:]) == ["http://tch01:8000", "http://tch01:8010", "http://tch02:8000", "http://tch02:8010"]
    servers = run.of("python")
    assert sorted((c.env["SLURMD_NODENAME"], c.after("--port")[0], c.env["CUDA_VISIBLE_DEVICES"])
                  for c in servers) == [("tch01", "8000", "0,1,2,3"), ("tch01", "8010", "4,5,6,7"),
                                        ("tch02", "8000", "0,1,2,3"), ("tch02", "8010", "4,5,6,7")]
    for call in servers:
        port = call.after("--port")[0]
        assert call.argv == ["-m", "vllm.entrypoints.openai.api_server", "--model", "/models/teacher",
                             "--host", "0.0.0.0", "--port", port, "--tensor-parallel-size", "4",
                             "--max-logprobs", "64", "--dtype", "bfloat16"]
    checked = {c.argv[-1] for c in run.of("curl")}
    assert checked == {f"{url}/health" for url in lines[1:]}  # each server checked at its listed address
    [srun] = run.of("srun")
    assert srun.option("nodes") == "2" and srun.option("ntasks-per-node") == "1"
    assert srun.option("output") == str(sandbox.root / "logs" / "%x-%j-%N.log")
    assert (sandbox.root / "logs" / "teacher-tch02-8010.log").read_text().startswith("-m vllm.")


def test_sglang_teachers_run_sglang_launch_server_over_all_the_node_gpus(sandbox: Sandbox) -> None:
    """SGLang: sglang.launch_server over the node's GPUs; the URL file's header says protocol sglang."""
    listed, run = serve_until_listed(sandbox, 2, TEACHER_SERVER="sglang", TEACHER_PYTHON="python")
    assert listed.splitlines()[0] == f"# mopd teachers: 2 servers, protocol sglang, job {JOB_ID}"
    assert sorted(listed.splitlines()[1:]) == ["http://tch01:8000", "http://tch02:8000"]
    for call in run.of("python"):
        assert call.argv == ["-m", "sglang.launch_server", "--model-path", "/models/teacher", "--host", "0.0.0.0",
                             "--port", "8000", "--tp-size", "8"]
        assert call.env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"


def test_the_reference_server_runs_one_server_per_gpu(sandbox: Sandbox) -> None:
    """The reference server (mopd serve-teacher): one per GPU, speaking vLLM's protocol."""
    listed, run = serve_until_listed(sandbox, 4, SLURM_JOB_NODELIST="tch01", TEACHER_GPUS_PER_NODE="4",
                                     TEACHER_SERVER="reference", TEACHER_TP="1")
    assert "protocol vllm" in listed.splitlines()[0]  # the reference server speaks vLLM's protocol too
    ports = sorted(int(c.after("--port")[0]) for c in run.of("python"))
    assert ports == [8000, 8010, 8020, 8030]
    assert sorted(c.env["CUDA_VISIBLE_DEVICES"] for c in run.of("python")) == ["0", "1", "2", "3"]
    assert all(c.argv[:2] == ["-m", "megatron_mopd.teachers.server"] and c.after("--device") == ["cuda"]
               for c in run.of("python"))


def test_ending_the_teacher_job_stops_its_servers_and_removes_the_url_file(sandbox: Sandbox) -> None:
    """TERM to the teacher job (scancel, time limit) stops every server and removes the URL file."""
    _, run = serve_until_listed(sandbox, 2)
    assert run.returncode == 143  # TERM, as scancel and the time limit send
    assert not (sandbox.root / "urls.txt").exists()
    logs = [sandbox.root / "logs" / f"teacher-{node}-8000.log" for node in ("tch01", "tch02")]
    eventually(lambda: all(log.read_text().endswith("stopped by SIGTERM\n") for log in logs))


def test_a_teacher_server_that_exits_before_it_is_healthy_fails_the_job_with_its_log(sandbox: Sandbox) -> None:
    """A server that exits while starting fails the job at once, with the end of its log."""
    run = sandbox.run(SLURM / "teachers.sbatch", **teacher_env(sandbox, SLURM_JOB_NODELIST="tch01",
                                                               STUB_SERVER_HOLD="", STUB_SERVER_EXIT="1",
                                                               STUB_CURL_DOWN="tch01"))
    assert run.returncode == 1
    node_log = (sandbox.root / "logs" / f"mopd-teachers-{JOB_ID}-tch01.log").read_text()
    assert "http://tch01:8000: the process starting it" in node_log and "exited before" in node_log
    assert "the end of " + str(sandbox.root / "logs" / "teacher-tch01-8000.log") in node_log
    assert "-m vllm.entrypoints.openai.api_server" in node_log  # the server log's last lines
    assert not (sandbox.root / "urls.txt").exists()


@pytest.mark.parametrize("setting, message", [
    ({"TEACHER_SERVER": "tgi"}, "TEACHER_SERVER=tgi: expected vllm, sglang or reference"),
    ({"TEACHER_TP": "3"}, "TEACHER_TP=3 must divide TEACHER_GPUS_PER_NODE=8"),
])
def test_a_teacher_setting_that_cannot_work_is_refused_before_anything_starts(
        sandbox: Sandbox, setting: dict[str, str], message: str) -> None:
    """An unknown server or a TEACHER_TP that does not divide the node's GPUs fails before srun."""
    run = sandbox.run(SLURM / "teachers.sbatch", **teacher_env(sandbox, **setting))
    assert run.returncode == 1
    assert f"error: {message}" in run.stderr
    assert run.of("srun") == [] and not (sandbox.root / "urls.txt").exists()


def test_servers_publishing_at_once_keep_every_url(sandbox: Sandbox) -> None:
    """Servers of several nodes publishing at the same moment all end up in the file, and no temporary
    file is left behind."""
    path = sandbox.root / "urls.txt"
    script = (f'source {SLURM / "common.sh"}; mopd_reset_url_file {path} 8 vllm; '
              f'for i in $(seq 8); do mopd_publish_url {path} http://n$i:8000 & done; wait')
    finished = subprocess.run(["bash", "-c", script], env=sandbox.env, capture_output=True, text=True, timeout=60,
                              check=False)
    assert finished.returncode == 0, finished.stderr
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# mopd teachers: 8 servers, protocol vllm")
    assert sorted(lines[1:]) == sorted(f"http://n{i}:8000" for i in range(1, 9))
    assert sorted(p.name for p in sandbox.root.iterdir() if p.name.startswith("urls")) == ["urls.txt", "urls.txt.lock"]


# ---------------------------------------------------------------------------------------------------------
# hetjob.sbatch


def hetjob_env(sandbox: Sandbox, **extra: str) -> dict[str, str]:
    """Component 0: one teacher node (two servers of 4 GPUs); component 1: two student nodes. A URL file
    that a killed previous start of the job left behind, complete, must not be read."""
    env = {**teacher_env(sandbox), **student_env(sandbox), "SLURM_JOB_NAME": "mopd-hetjob",
           "SLURM_JOB_NODELIST": "tch01", "SLURM_JOB_NODELIST_HET_GROUP_0": "tch01",
           "SLURM_JOB_NODELIST_HET_GROUP_1": "stu[01-02]", "SLURM_CPUS_PER_TASK_HET_GROUP_1": "64",
           "TEACHER_TP": "4", **extra}
    del env["TEACHER_URL_FILES"], env["SLURM_CPUS_PER_TASK"]  # the job's URL file is its own
    url_file(sandbox.root / "urls.txt", ["http://stale:8000", "http://stale:8010"], servers=2)
    return env


def test_hetjob_has_a_teacher_component_and_a_student_component() -> None:
    """The header has two components (teachers, then student), and job-wide requeue / USR1 options."""
    options = sbatch_options(SLURM / "hetjob.sbatch")
    assert options.count("hetjob") == 1
    teachers, student = " ".join(options).split(" hetjob ")
    for component in (teachers, student):
        assert re.search(r"--nodes=\d+", component) and re.search(r"--gpus-per-node=\d+", component)
    assert "--requeue" in teachers and re.search(r"--signal=B:USR1@\d+", teachers)


def test_hetjob_starts_the_student_on_component_1_once_component_0_lists_every_teacher(sandbox: Sandbox) -> None:
    """Teachers on component 0, student on component 1, trained against every teacher of this start (not a
    previous start's URLs); the servers stop when the student is done."""
    from megatron_mopd.trainer.config import load_config

    run = sandbox.run(SLURM / "hetjob.sbatch", "model.path=/m", "data.path=/d", **hetjob_env(sandbox),
                      STUB_CURL_FAILURES="2")
    assert run.returncode == 0, run.stderr
    teachers, student = sorted(run.of("srun"), key=lambda c: c.option("het-group"))
    assert teachers.option("het-group") == "0" and teachers.option("nodes") == "1"
    assert student.option("het-group") == "1" and student.option("nodes") == "2"
    assert student.option("cpus-per-task") == "64"
    assert sorted(c.env["SLURMD_NODENAME"] for c in run.of("python")) == ["tch01", "tch01"]
    torchruns = run.of("torchrun")
    assert sorted(c.env["SLURMD_NODENAME"] for c in torchruns) == ["stu01", "stu02"]
    assert all("--rdzv-endpoint=stu01:29400" in c.argv and "--nnodes=2" in c.argv for c in torchruns)
    arguments = trainer_arguments(torchruns[0])
    config = load_config(arguments[1], arguments[2:])
    assert sorted(config.teachers[0].urls) == ["http://tch01:8000", "http://tch01:8010"]  # every teacher
    assert config.checkpoint.resume == "auto"
    assert "stopping the teacher servers" in run.stderr
    assert not (sandbox.root / "urls.txt").exists()  # the teacher part ended with the job


def test_hetjob_student_fails_at_once_when_the_teacher_part_dies(sandbox: Sandbox) -> None:
    """If the teacher part ends before its servers are listed, the student fails then, not at its deadline."""
    run = sandbox.run(SLURM / "hetjob.sbatch", **hetjob_env(sandbox, STUB_SERVER_HOLD="", STUB_SERVER_EXIT="1",
                                                           STUB_CURL_DOWN="tch01", TEACHER_WAIT_S="600"))
    assert run.returncode == 1
    assert re.search(r"error: the teacher servers \(pid \d+\) exited; \S*urls.txt "
                     r"(does not exist|lists 0 of 2 teacher servers)", run.stderr)
    assert run.of("torchrun") == []


def test_usr1_requeues_the_whole_hetjob(sandbox: Sandbox) -> None:
    """USR1 to the heterogeneous job's batch script requeues the job."""
    run = sandbox.run(SLURM / "hetjob.sbatch", **hetjob_env(sandbox), STUB_SRUN_SIGNAL="USR1",
                      STUB_SRUN_SIGNAL_ON="torchrun")
    assert run.returncode == 0, run.stderr
    assert [c.argv for c in run.of("scontrol")] == [["requeue", JOB_ID]]


# ---------------------------------------------------------------------------------------------------------
# examples/torchrun


def test_single_node_gpu_script_runs_the_trainer_on_8_gpus(sandbox: Sandbox) -> None:
    """torchrun --standalone with 8 processes, the layout, then the arguments."""
    run = sandbox.run(TORCHRUN / "single_node_gpu.sh", "train.lr=1e-5", CONFIG="run.yaml")
    assert run.returncode == 0, run.stderr
    [call] = run.of("torchrun")
    assert call.argv == ["--standalone", "--nproc-per-node=8", "-m", "megatron_mopd.train", "--config", "run.yaml",
                         "parallel.tp=8", "train.lr=1e-5"]


def test_single_node_gpu_layout_variants_parse_and_fit_8_gpus() -> None:
    """Every LAYOUT the script offers (its default and the commented variants) is valid for the trainer."""
    from megatron_mopd.trainer.config import load_config

    text = (TORCHRUN / "single_node_gpu.sh").read_text()
    layouts = re.findall(r"^LAYOUT=\$\{LAYOUT:-(.+)\}$", text, flags=re.MULTILINE)
    layouts += re.findall(r'^#\s+LAYOUT="(.+)"$', text, flags=re.MULTILINE)
    assert len(layouts) >= 4 and any("parallel.cp=2" in layout for layout in layouts)
    for layout in layouts:
        config = load_config(REPO / "examples" / "configs" / "remote_vllm.yaml",
                             ["model.path=/m", "data.path=/d", *layout.split()])
        model_parallel = config.parallel.tp * config.parallel.pp * config.parallel.cp
        assert 8 % model_parallel == 0, layout


def test_cpu_demo_script_runs_the_demo_on_two_gloo_processes(sandbox: Sandbox) -> None:
    """The demo under torchrun: 2 CPU (gloo) processes at tensor parallel 2."""
    run = sandbox.run(TORCHRUN / "cpu_demo.sh", "train.steps=10")
    assert run.returncode == 0, run.stderr
    [call] = run.of("torchrun")
    assert call.argv == ["--standalone", "--nproc-per-node=2", "-m", "megatron_mopd.demo", "--output",
                         "runs/demo_torchrun", "parallel.device=cpu", "parallel.tp=2", "parallel.pp=1",
                         "train.steps=10"]
