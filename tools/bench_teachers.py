#!/usr/bin/env python
"""Benchmark: remote-teacher client throughput, end to end, and overlap with the student.

(a) parse       protocol parsing (orjson + vectorized numpy, single thread) of vLLM and SGLang response
                bodies in the real formats (``megatron_mopd.testing.canned_server`` generators) for a
                batch of ``--tokens`` tokens at K = ``--k``: (id, logprob) entries/s and ms per batch.
                ``client`` is the same body through ``RemoteTeacher.score`` from a local canned server
                (HTTP transfer + parse + fill of the [B, T-1, K] arrays).
(b) end_to_end  scored tokens/s of ``RemoteTeacher`` against the reference server subprocess
                (``python -m megatron_mopd.teachers.server``, the tiny HF model of
                ``megatron_mopd.demo.models``) with 1 and 4 requests in flight per server.
(c) overlap     a teacher faster than the student: the reference server with ``--delay-ms`` =
                ``--latency-ms`` (``teacher_ms``: one micro-batch scored alone) and a student step of
                ~``--student-ms`` real CPU work per micro-batch; the fraction of the step spent waiting
                for the teacher when blocking per micro-batch vs submitting every micro-batch first and
                waiting late (``canned_server.simulated_training_loop``).

    python tools/bench_teachers.py                     # all three; JSON to bench_results/bench_teachers.json
    python tools/bench_teachers.py --skip-e2e --skip-overlap --repeats 3    # (a) only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import orjson
import torch
from tqdm import tqdm

from megatron_mopd.demo.models import tiny_causal_lm_dir
from megatron_mopd.teachers import RemoteTeacher
from megatron_mopd.teachers.protocols import get_protocol
from megatron_mopd.teachers.server_process import teacher_server_process
from megatron_mopd.testing.canned_server import (
    BigramModel,
    CannedServer,
    sglang_generate_body,
    simulated_training_loop,
    vllm_completion_body,
)

PROTOCOLS = ("vllm", "sglang")


def median_seconds(fn: Callable[[], object], repeats: int, desc: str) -> float:
    times = []
    for _ in tqdm(range(repeats), desc=desc, leave=False, disable=None):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def bench_parse(args: argparse.Namespace) -> list[dict]:
    model = BigramModel(args.parse_vocab, seed=0)
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, args.parse_vocab - 4, args.seq_len).tolist()
                 for _ in range(args.tokens // args.seq_len)]
    rows = []
    for protocol in PROTOCOLS:
        body = orjson.dumps(vllm_completion_body(model, sequences, args.k) if protocol == "vllm"
                            else sglang_generate_body(model, sequences, args.k))
        parser = get_protocol(protocol)
        entries = _entries(body, protocol)
        parse_s = median_seconds(lambda: parser.parse(body, sequences, args.k), args.repeats, f"parse {protocol}")
        with CannedServer(max_logprobs=args.k) as server, RemoteTeacher(
                server.url, protocol, topk=args.k, max_tokens_per_request=args.tokens) as teacher:

            def replayed() -> None:
                server.replay(body)
                teacher.score(sequences)

            client_s = median_seconds(replayed, args.repeats, f"client {protocol}")
        rows.append({"protocol": protocol, "tokens": len(sequences) * args.seq_len, "k": args.k,
                     "entries": entries, "body_mb": len(body) / 1e6,
                     "parse_ms": 1e3 * parse_s, "parse_entries_per_s": entries / parse_s,
                     "client_ms": 1e3 * client_s, "client_entries_per_s": entries / client_s})
    return rows


def _entries(body: bytes, protocol: str) -> int:
    """(id, logprob) entries in a body: top-K (+ the actual token) per position."""
    doc = orjson.loads(body)
    if protocol == "vllm":
        return sum(len(p) for c in doc["choices"] for p in c["prompt_logprobs"][1:])
    return sum(len(p) + 1 for r in doc for p in r["meta_info"]["input_top_logprobs"][1:])


@contextlib.contextmanager
def reference_server(k: int, delay_ms: float = 0.0) -> Iterator[str]:
    """The reference teacher server (tiny model) in a subprocess; yields its URL."""
    flags = ("--max-logprobs", str(k), "--delay-ms", str(delay_ms))
    with teacher_server_process(tiny_causal_lm_dir(), *flags) as server:
        yield server.url


def bench_end_to_end(args: argparse.Namespace) -> list[dict]:
    rng = np.random.default_rng(1)
    sequences = [rng.integers(1, 2000, args.e2e_seq_len).tolist() for _ in range(args.e2e_tokens // args.e2e_seq_len)]
    tokens = len(sequences) * args.e2e_seq_len
    rows = []
    with reference_server(args.k) as url:
        for protocol in PROTOCOLS:
            for in_flight in (1, 4):
                with RemoteTeacher(url, protocol, topk=args.k, max_in_flight_per_server=in_flight,
                                   max_sequences_per_request=args.e2e_sequences_per_request,
                                   wait_for_servers_s=120) as teacher:
                    teacher.score(sequences[:2])  # warm-up
                    seconds = median_seconds(lambda: teacher.score(sequences), args.repeats,
                                             f"e2e {protocol} x{in_flight}")
                rows.append({"protocol": protocol, "in_flight": in_flight, "k": args.k, "tokens": tokens,
                             "seconds": seconds, "tokens_per_s": tokens / seconds})
    return rows


def bench_overlap(args: argparse.Namespace) -> list[dict]:
    weights = torch.randn(256, 256)

    def work(iterations: int) -> None:
        x = torch.randn(256, 256)
        for _ in range(iterations):
            x = torch.tanh(x @ weights)

    iterations = max(1, round(20 * args.student_ms / 1e3 / median_seconds(lambda: work(20), 5, "calibrate")))
    student_ms = 1e3 * median_seconds(lambda: work(iterations), 5, "student step")
    rng = np.random.default_rng(2)
    micro_batches = [[rng.integers(1, 2000, args.overlap_seq_len).tolist() for _ in range(4)]
                     for _ in range(args.micro_batches)]
    rows = []
    with reference_server(args.k, args.latency_ms) as url, RemoteTeacher(
            url, "vllm", topk=args.k, max_in_flight_per_server=args.micro_batches, wait_for_servers_s=120) as teacher:
        teacher_ms = 1e3 * median_seconds(lambda: teacher.score(micro_batches[0]), 5, "teacher alone")
        for submit_early in (False, True):
            runs = [simulated_training_loop(teacher, micro_batches, lambda: work(iterations), submit_early)
                    for _ in tqdm(range(args.repeats), desc=f"overlap early={submit_early}", leave=False,
                                  disable=None)]
            rows.append({"mode": "submit-early" if submit_early else "blocking",
                         "micro_batches": args.micro_batches, "teacher_ms": teacher_ms, "student_ms": student_ms,
                         "step_ms": 1e3 * statistics.median(r.total_s for r in runs),
                         "waited_ms": 1e3 * statistics.median(r.waited_s for r in runs),
                         "waiting_fraction": statistics.median(r.waiting_fraction for r in runs)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of the parsed batch (a)")
    parser.add_argument("--seq-len", type=int, default=1024, help="sequence length of the parsed batch (a)")
    parser.add_argument("--parse-vocab", type=int, default=4096, help="vocabulary of the generated bodies (a)")
    parser.add_argument("--e2e-tokens", type=int, default=4096, help="tokens scored per batch (b)")
    parser.add_argument("--e2e-seq-len", type=int, default=128)
    parser.add_argument("--e2e-sequences-per-request", type=int, default=4)
    parser.add_argument("--latency-ms", type=float, default=20.0, help="added server delay per request (c)")
    parser.add_argument("--student-ms", type=float, default=100.0, help="student step per micro-batch (c)")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--overlap-seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-parse", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--skip-overlap", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench_results/bench_teachers.json"))
    args = parser.parse_args()

    report: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                               f"Python {platform.python_version()}, orjson {orjson.__version__}"}
    if not args.skip_parse:
        report["parse"] = bench_parse(args)
        _table("(a) parse: single thread; client = HTTP from a local server + parse + fill", report["parse"],
               ["protocol", "tokens", "k", "entries", "body_mb", "parse_ms", "parse_entries_per_s", "client_ms",
                "client_entries_per_s"])
    if not args.skip_e2e:
        report["end_to_end"] = bench_end_to_end(args)
        _table("(b) end to end against the reference server (tiny model, CPU)", report["end_to_end"],
               ["protocol", "in_flight", "k", "tokens", "seconds", "tokens_per_s"])
    if not args.skip_overlap:
        report["overlap"] = bench_overlap(args)
        _table("(c) overlap: fraction of the step spent waiting for the teacher", report["overlap"],
               ["mode", "micro_batches", "teacher_ms", "student_ms", "step_ms", "waited_ms", "waiting_fraction"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


def _table(title: str, rows: list[dict], columns: list[str]) -> None:
    def cell(column: str, value: object) -> str:
        if "fraction" in column:
            return f"{value:.0%}"
        if isinstance(value, float):
            return f"{value:,.1f}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    cells = [[cell(c, row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))


if __name__ == "__main__":
    main()
