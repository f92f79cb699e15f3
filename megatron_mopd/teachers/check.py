"""``mopd check-teacher``: are these teacher servers fit to train with? (docs/teachers.md)

    mopd check-teacher http://10.0.0.5:8000 http://10.0.0.6:8000 --topk 64

Each server is probed through a ``RemoteTeacher`` of its own (the trainer's client, so the same
checks: ``/health``, the model name from ``/v1/models`` for vLLM unless ``--model`` names it, and a
top-K probe that the server must accept and answer with K entries), then:

- latency: the median time of scoring one short test sequence (``--latency-repeats`` requests);
- throughput: one batch of ``--batch-sequences`` sequences of ``--sequence-tokens`` tokens, in one
  request, as sequences and tokens per second;
- agreement: the test sequence's scores are compared across the servers that claim the same model
  name (SGLang without ``--model``: all of them), each against the first of them that answered: the
  largest absolute difference of the top-K log-probabilities and of the actual tokens' ones.

The token ids of the test sequences are drawn (fixed seed) below ``--max-token-id``, which every
served vocabulary must exceed. A server is unfit when it is unreachable or unhealthy, refuses or
under-serves top-K (its ``max logprobs`` column then shows the limit the server stated), fails a
request, or disagrees with its reference beyond ``--tolerance``. The command prints one table row per
server, then one ``unfit: URL: reason`` line per unfit server; it exits 0 when all are fit, else 1.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from megatron_mopd.teachers.protocols import ProtocolName, TeacherConfigError, TeacherError
from megatron_mopd.teachers.remote import RemoteTeacher
from megatron_mopd.teachers.types import TeacherLogprobs

HELP = "probe teacher servers: health, model, top-K, latency, throughput, agreement"
DESCRIPTION = ("Probe vLLM/SGLang teacher servers (or `mopd serve-teacher`) as the trainer would: health, the served "
               "model, whether top-K log-probabilities are allowed, the latency of a small request, the throughput "
               "of a batch, and whether servers claiming the same model score a test sequence alike. Prints a table; "
               "exits 1, naming each unfit server and why, unless every server is fit.")

_MAX_ALLOWED = re.compile(r"max(?:imum)?[ _]?(?:allowed|logprobs)\D{0,20}?(\d+)", re.IGNORECASE)
_SEED = 20240611


@dataclass
class ServerReport:
    """What ``check_servers`` found about one server. ``problem`` is None for a fit server, else why not.

    ``max_logprobs``: ``">= K"`` when top-K was served, the limit the server stated when it refused, else
    ``"< K"`` or ``"?"`` (not probed). ``max_abs_diff``: the test sequence's largest log-probability
    difference from ``compared_with`` (the first server answering for the same model; None for that one).
    """

    url: str
    model: Optional[str] = None
    max_logprobs: str = "?"
    latency_s: Optional[float] = None
    sequences_per_s: Optional[float] = None
    tokens_per_s: Optional[float] = None
    compared_with: Optional[str] = None
    max_abs_diff: Optional[float] = None
    problem: Optional[str] = None
    scores: Optional[TeacherLogprobs] = field(default=None, repr=False)

    @property
    def fit(self) -> bool:
        return self.problem is None


def check_servers(
    urls: Sequence[str], topk: int, protocol: ProtocolName = "vllm", model: Optional[str] = None, *,
    tolerance: float = 1e-2, batch_sequences: int = 32, sequence_tokens: int = 128, max_token_id: int = 255,
    latency_repeats: int = 3, timeout_s: float = 60.0,
) -> list[ServerReport]:
    """Probe every server in turn (module doc) and compare the ones claiming the same model; one report
    per URL, in order. Never raises for a server's fault: that becomes its report's ``problem``."""
    if tolerance < 0 or min(batch_sequences, latency_repeats, max_token_id) < 1 or sequence_tokens < 2:
        raise ValueError("need tolerance >= 0, batch_sequences, latency_repeats, max_token_id >= 1 and "
                         "sequence_tokens >= 2")
    rng = np.random.default_rng(_SEED)
    test_sequence = rng.integers(0, max_token_id + 1, 16).tolist()
    batch = rng.integers(0, max_token_id + 1, (batch_sequences, sequence_tokens)).tolist()
    reports = []
    for url in urls:
        report = ServerReport(url, model=model)
        try:
            teacher = RemoteTeacher(url, protocol, topk, model=model, timeout_s=timeout_s, retries=0,
                                    max_sequences_per_request=batch_sequences,
                                    max_tokens_per_request=max(batch_sequences * sequence_tokens, 16))
        except (TeacherError, ValueError) as error:
            _explain_refusal(report, error, topk)
        else:
            with teacher:
                report.model, report.max_logprobs = teacher.model or model, f">= {topk}"
                _measure(report, teacher, test_sequence, batch, latency_repeats)
        reports.append(report)
    _compare(reports, tolerance)
    return reports


def _explain_refusal(report: ServerReport, error: Exception, topk: int) -> None:
    """Set ``report.problem`` (and what is known of the server's limit) from the client's start-up error."""
    message = str(error)
    if isinstance(error, TeacherConfigError) and f"top-{topk}" in message:
        limit = _MAX_ALLOWED.search(message)
        report.max_logprobs = limit.group(1) if limit else f"< {topk}"
        report.problem = (f"K={topk} is above its max logprobs ({report.max_logprobs}): {message}" if limit
                          else f"does not serve top-{topk}: {message}")
    elif isinstance(error, TeacherError) and message.startswith("no teacher server is healthy"):
        report.problem = f"unreachable or unhealthy: {message}"
    else:
        report.problem = f"failed the start-up checks: {message}"


def _measure(report: ServerReport, teacher: RemoteTeacher, test_sequence: list[int], batch: list[list[int]],
             repeats: int) -> None:
    """Latency (and the test sequence's scores), then throughput; a failed request is the report's problem."""
    try:
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            report.scores = teacher.score([test_sequence])
            times.append(time.perf_counter() - began)
        report.latency_s = statistics.median(times)
        began = time.perf_counter()
        teacher.score(batch)
        elapsed = max(time.perf_counter() - began, 1e-9)
    except TeacherError as error:
        report.problem = f"a scoring request failed: {error}"
        return
    report.sequences_per_s = len(batch) / elapsed
    report.tokens_per_s = sum(map(len, batch)) / elapsed


def _compare(reports: list[ServerReport], tolerance: float) -> None:
    """Compare each scored server with the first scored one claiming the same model."""
    references: dict[Optional[str], ServerReport] = {}
    for report in reports:
        if report.scores is None:
            continue
        reference = references.setdefault(report.model, report)
        if reference is report:
            continue
        report.compared_with = reference.url
        report.max_abs_diff = max_abs_difference(reference.scores, report.scores)  # type: ignore[arg-type]
        if report.problem is None and not report.max_abs_diff <= tolerance:
            report.problem = (f"its scores disagree with {reference.url} (both claim model {report.model!r}): "
                              f"max |Δ logprob| {report.max_abs_diff:.3g} > tolerance {tolerance:g}")


def max_abs_difference(a: TeacherLogprobs, b: TeacherLogprobs) -> float:
    """The largest absolute difference between two scorings of the same sequences, over the valid rows'
    top-K log-probabilities (rank by rank) and actual-token log-probabilities; equal −inf entries differ
    by 0, a −inf against a finite one by inf."""
    valid = a.valid.numpy() & b.valid.numpy()
    worst = 0.0
    for x, y in ((a.topk_logprobs.numpy()[valid], b.topk_logprobs.numpy()[valid]),
                 (a.token_logprobs.numpy()[valid], b.token_logprobs.numpy()[valid])):
        if x.shape != y.shape:
            return float("inf")
        with np.errstate(invalid="ignore"):
            difference = np.where(x == y, 0.0, np.abs(x.astype(np.float64) - y.astype(np.float64)))
        worst = max(worst, float(difference.max(initial=0.0)))
    return worst


def format_table(reports: Sequence[ServerReport]) -> str:
    """One aligned row per server: URL, fit, model, max logprobs, latency, throughput, agreement."""
    header = ("server", "fit", "model", "max logprobs", "latency ms", "seq/s", "tok/s", "max |Δ| vs first")
    rows = [header] + [(
        r.url, "yes" if r.fit else "NO", "?" if r.model is None else r.model, r.max_logprobs,
        _number(r.latency_s, 1000.0, ".1f"), _number(r.sequences_per_s, 1.0, ".1f"),
        _number(r.tokens_per_s, 1.0, ".0f"),
        "(first)" if r.scores is not None and r.compared_with is None else _number(r.max_abs_diff, 1.0, ".3g"),
    ) for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _number(value: Optional[float], scale: float, spec: str) -> str:
    return "-" if value is None else format(value * scale, spec)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("urls", nargs="+", metavar="URL", help="base URL of a server (http://host:port)")
    parser.add_argument("--topk", type=int, required=True, metavar="K", help="the K training will ask for")
    parser.add_argument("--protocol", choices=("vllm", "sglang"), default="vllm", help="(default vllm)")
    parser.add_argument("--model", metavar="NAME",
                        help="the served model name (default: each vLLM server's /v1/models)")
    parser.add_argument("--tolerance", type=float, default=1e-2,
                        help="largest log-probability difference allowed between servers of one model "
                             "(default 0.01)")
    parser.add_argument("--batch-sequences", type=int, default=32, metavar="N",
                        help="sequences in the throughput batch (default 32)")
    parser.add_argument("--sequence-tokens", type=int, default=128, metavar="T",
                        help="tokens per sequence of the throughput batch (default 128)")
    parser.add_argument("--max-token-id", type=int, default=255, metavar="ID",
                        help="largest token id in the test sequences (default 255)")
    parser.add_argument("--latency-repeats", type=int, default=3, metavar="R",
                        help="small requests whose median time is the latency (default 3)")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="socket timeout per request (default 60)")


def run(args: argparse.Namespace) -> int:
    reports = check_servers(
        args.urls, args.topk, args.protocol, args.model, tolerance=args.tolerance,
        batch_sequences=args.batch_sequences, sequence_tokens=args.sequence_tokens,
        max_token_id=args.max_token_id, latency_repeats=args.latency_repeats, timeout_s=args.timeout_s,
    )
    print(format_table(reports))
    unfit = [report for report in reports if not report.fit]
    for report in unfit:
        print(f"unfit: {report.url}: {report.problem}")
    if not unfit:
        print(f"all {len(reports)} server(s) fit for top-{args.topk}")
    return 1 if unfit else 0
