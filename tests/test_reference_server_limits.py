"""Specification: the reference teacher server under load and at its limits.

- A burst of 200 concurrent connections is answered, none reset: the socket listens with a backlog of
  ``LISTEN_BACKLOG`` (as ``ss`` reports it), where socketserver's default of 5 reset part of every burst
  of 50 on a kernel that aborts on accept-queue overflow (here the kernel drops and the client retries
  instead, so the burst alone would pass either way).
- A top-K above the model's vocabulary (possible with a large ``--max-logprobs``) is the request's
  fault: 400 naming the vocabulary, in both protocols (it was a 500 that clients retry as a server fault).
- A response over ``--max-response-mb`` is refused with 400 and the fix: before the model runs when its
  log-probabilities alone would pass the cap, else once rendered.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import orjson
import pytest

from megatron_mopd.demo.models import tiny_causal_lm_dir
from megatron_mopd.teachers.server import LISTEN_BACKLOG, TeacherServer

VOCAB = 2000  # tiny_causal_lm_dir's vocabulary


@pytest.fixture(scope="module")
def model_dir():
    return tiny_causal_lm_dir()


@pytest.fixture(scope="module")
def server(model_dir) -> Iterator[TeacherServer]:
    with TeacherServer(model_dir, port=0, max_logprobs=5000, max_response_mb=0.04) as running:
        yield running


def post(url: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(url + path, data=orjson.dumps(body), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, orjson.loads(error.read())


def health(url: str) -> int:
    """One fresh connection (no keep-alive reuse): GET /health."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return int(connection.recv(64).split()[1])


def listen_backlog(port: int) -> int:
    """The backlog of the socket listening on ``port``: ``ss``'s Send-Q of a LISTEN socket."""
    listing = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return int(listing.split()[2])


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs iproute2's ss to read the listen backlog")
def test_a_burst_of_200_concurrent_connections_is_answered_none_reset(server) -> None:
    kernel_cap = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert listen_backlog(server.port) == min(LISTEN_BACKLOG, kernel_cap)
    with ThreadPoolExecutor(200) as pool:
        statuses = list(pool.map(lambda _: health(server.url), range(200)))
    assert statuses == [200] * 200


def test_a_top_k_above_the_vocabulary_is_a_400_naming_it(server) -> None:
    status, body = post(server.url, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 0,
                                                        "prompt_logprobs": VOCAB + 1})
    assert status == 400
    assert body["message"] == f"'prompt_logprobs' of {VOCAB + 1} is more than the model's vocabulary of {VOCAB} tokens"
    status, body = post(server.url, "/generate", {"input_ids": [1, 2, 3], "return_logprob": True,
                                                  "top_logprobs_num": VOCAB + 1,
                                                  "sampling_params": {"max_new_tokens": 0}})
    assert status == 400
    assert "'top_logprobs_num' of 2001 is more than the model's vocabulary of 2000 tokens" in body["error"]["message"]


def test_a_response_whose_log_probabilities_exceed_the_cap_is_refused_before_the_model_runs(server) -> None:
    prompt = list(range(1, 301))
    status, body = post(server.url, "/v1/completions", {"prompt": [prompt] * 2, "max_tokens": 0, "prompt_logprobs": 20})
    assert status == 400
    assert body["message"] == ("the response would hold 12558 log-probabilities (at least 0.48 MB), over this server's "
                               "--max-response-mb 0.04: send fewer or shorter sequences per request, or a smaller K")


def test_a_rendered_response_over_the_cap_is_refused(server) -> None:
    """Under the estimate (40 B per entry) but over the cap once rendered with the tokens' texts."""
    status, body = post(server.url, "/v1/completions", {"prompt": list(range(1, 201)), "max_tokens": 0,
                                                        "prompt_logprobs": 4})
    assert status == 400
    assert body["message"].startswith("the response is 0.0")
    assert body["message"].endswith("MB, over this server's --max-response-mb 0.04: send fewer or shorter sequences "
                                    "per request, or a smaller K")


def test_a_request_under_the_cap_is_answered(server) -> None:
    status, body = post(server.url, "/v1/completions", {"prompt": list(range(1, 21)), "max_tokens": 0,
                                                        "prompt_logprobs": 4})
    assert status == 200 and len(body["choices"][0]["prompt_logprobs"]) == 20
