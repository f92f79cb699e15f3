"""Specification: ``mopd check-teacher`` tells fit teacher servers from unfit ones, naming each unfit
server and why (docs/teachers.md).

Servers: the reference server (``TeacherServer``, in-process) on the tiny demo model, twice, both named
"tiny"; the same server on another tiny model (seed 1) that claims the same name; a canned server whose
max logprobs is below K; and a loopback port nobody listens on.

- Servers of one model are fit: healthy, named, top-K served, latency and throughput measured, and
  their scores of the test sequence identical.
- A server whose max logprobs is below K is unfit, with the limit it stated.
- A server that claims the model but scores otherwise is unfit: its scores disagree with the first.
- An unreachable URL is unfit ("unreachable").
- The command prints a row per server and exits 0 when all are fit, else 1 with one line per unfit
  server naming it and the reason.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest

from megatron_mopd.cli import main
from megatron_mopd.demo.models import tiny_causal_lm_dir
from megatron_mopd.teachers.check import ServerReport, check_servers
from megatron_mopd.teachers.server import TeacherServer
from megatron_mopd.teachers.server_process import free_loopback_port
from megatron_mopd.testing.canned_server import CannedServer

K = 8
SMALL = dict(batch_sequences=4, sequence_tokens=16, latency_repeats=2, timeout_s=30.0)
SMALL_FLAGS = ["--batch-sequences", "4", "--sequence-tokens", "16", "--latency-repeats", "2"]


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, str]]:
    """URLs: "a" and "b" serve the tiny model as "tiny"; "other" serves another model as "tiny" too."""
    with contextlib.ExitStack() as stack:
        urls = {}
        for name, seed in (("a", 0), ("b", 0), ("other", 1)):
            server = TeacherServer(tiny_causal_lm_dir(seed=seed), port=0, max_logprobs=K, served_model_name="tiny")
            urls[name] = stack.enter_context(server).url
        yield urls


def unreachable_url() -> str:
    return f"http://127.0.0.1:{free_loopback_port()}"


def by_url(reports: list[ServerReport]) -> dict[str, ServerReport]:
    return {report.url: report for report in reports}


@pytest.mark.parametrize("protocol", ["vllm", "sglang"])
def test_servers_of_one_model_are_fit_and_agree_exactly(servers: dict[str, str], protocol: str) -> None:
    first, second = check_servers([servers["a"], servers["b"]], K, protocol, **SMALL)
    for report in (first, second):
        assert report.fit, report.problem
        assert report.max_logprobs == f">= {K}"
        assert report.model == ("tiny" if protocol == "vllm" else None)  # SGLang: no model name to read
        assert report.latency_s > 0 and report.sequences_per_s > 0
        assert report.tokens_per_s == pytest.approx(16 * report.sequences_per_s)
    assert first.compared_with is None and first.max_abs_diff is None
    assert second.compared_with == servers["a"] and second.max_abs_diff == 0.0


def test_a_server_whose_max_logprobs_is_below_k_is_unfit_with_its_limit(servers: dict[str, str]) -> None:
    with CannedServer(max_logprobs=4) as canned:
        reports = by_url(check_servers([servers["a"], canned.url], K, **SMALL))
    assert reports[servers["a"]].fit
    limited = reports[canned.url]
    assert not limited.fit and limited.max_logprobs == "4"
    assert limited.problem.startswith(f"K={K} is above its max logprobs (4)")


def test_a_server_scoring_otherwise_under_the_same_name_disagrees(servers: dict[str, str]) -> None:
    reference, other = check_servers([servers["a"], servers["other"]], K, **SMALL)
    assert reference.fit
    assert not other.fit and other.compared_with == servers["a"] and other.max_abs_diff > 1e-2
    assert other.problem.startswith(f"its scores disagree with {servers['a']} (both claim model 'tiny')")


def test_an_unreachable_server_is_unfit(servers: dict[str, str]) -> None:
    url = unreachable_url()
    reports = by_url(check_servers([servers["a"], url], K, **SMALL))
    assert reports[servers["a"]].fit
    assert not reports[url].fit and reports[url].problem.startswith("unreachable or unhealthy: ")
    assert reports[url].latency_s is None and reports[url].max_logprobs == "?"


def test_the_command_prints_a_row_per_server_and_exits_0_when_all_are_fit(servers: dict[str, str], capsys) -> None:
    assert main(["check-teacher", servers["a"], servers["b"], "--topk", str(K), *SMALL_FLAGS]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["server", "fit"]
    assert [line.split()[:4] for line in lines[1:3]] == [[servers[n], "yes", "tiny", ">="] for n in ("a", "b")]
    assert lines[3] == f"all 2 server(s) fit for top-{K}"


def test_the_command_names_each_unfit_server_and_why_and_exits_1(servers: dict[str, str], capsys) -> None:
    url = unreachable_url()
    argv = ["check-teacher", servers["a"], servers["other"], url, "--topk", str(K), "--tolerance", "0.001",
            *SMALL_FLAGS]
    assert main(argv) == 1
    out = capsys.readouterr().out
    unfit = [line for line in out.splitlines() if line.startswith("unfit: ")]
    assert [line.split(": ")[1] for line in unfit] == [servers["other"], url]
    assert "scores disagree" in unfit[0] and "tolerance 0.001" in unfit[0]
    assert f"unfit: {url}: unreachable or unhealthy: " in unfit[1]
