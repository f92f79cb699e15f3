#!/usr/bin/env python
"""Benchmark: one training step of the trainer, split by phase, against a plain fine-tuning step.

Runs the trainer (``megatron_mopd.trainer.loop.train``) in this process on a configuration (default:
``examples/configs/single_teacher_topk.yaml``, the former CPU demo) twice per repeat, side by side:

``distill``  the configuration as given: its teachers (the demo's: a reference server the trainer
             starts itself, top-K JSD) — rollout, teacher_submit, forward_backward, teacher_wait and
             optimizer phases;
``sft``      the same model, data, batch and optimizer with no teacher and ``loss.sft_alpha=1``: the
             cross-entropy fine-tuning step every distillation step is measured against.

Each run trains ``--steps`` steps; the first ``--warmup`` are dropped. The table gives the median
seconds per phase and per step, the step's ratio to the SFT step, and completion tokens per second.

    python tools/bench_step.py                               # the demo config, CPU
    python tools/bench_step.py --config run.yaml --steps 20  # under torchrun for a parallel layout

Writes ``bench_results/bench_step.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

SINGLE_TEACHER_CONFIG = Path(__file__).parents[1] / "examples" / "configs" / "single_teacher_topk.yaml"

PHASES = ("rollout", "teacher_submit", "forward_backward", "teacher_wait", "optimizer")


def run_variant(config_path: Path, name: str, steps: int, overrides: list[str]) -> list[dict[str, Any]]:
    """Train ``steps`` steps of one variant in a scratch directory; its per-step metric records."""
    from megatron_mopd.trainer.config import load_config
    from megatron_mopd.trainer.loop import train

    variant = ["teachers=[]", "loss.sft_alpha=1.0"] if name == "sft" else []
    with tempfile.TemporaryDirectory(prefix=f"bench_step_{name}_") as output:
        config = load_config(config_path, [
            f"output_dir={output}", f"train.steps={steps}", "checkpoint.resume=none", "checkpoint.interval=0",
            "checkpoint.save_at_end=false", "checkpoint.export_hf=false", "logging.progress=false",
            "logging.plot=false", "logging.tensorboard=false", f"logging.interval={steps}", *overrides, *variant,
        ])
        train(config, say=lambda line: None)
        lines = (Path(output) / "metrics.jsonl").read_text().splitlines() if _reporting() else []
    return [json.loads(line) for line in lines]


def _reporting() -> bool:
    return int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1


def summarize(records: list[dict[str, Any]], warmup: int) -> dict[str, float]:
    kept = records[warmup:]
    row = {phase: statistics.median(r.get(f"time/{phase}", 0.0) for r in kept) for phase in PHASES}
    row["step"] = statistics.median(sum(r.get(f"time/{p}", 0.0) for p in PHASES) for r in kept)
    row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in kept)
    return row


def main() -> int:

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=SINGLE_TEACHER_CONFIG,
                        help="trainer YAML (default: examples/configs/single_teacher_topk.yaml)")
    parser.add_argument("--steps", type=int, default=12, help="steps per run (default 12)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run not counted (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant, interleaved (default 2)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/bench_step.json"))
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the configuration")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")

    records: dict[str, list[dict[str, Any]]] = {"sft": [], "distill": []}
    for _ in range(args.repeats):
        for name in records:  # interleaved: both variants see the same machine state
            records[name] += run_variant(args.config, name, args.steps, args.overrides)[args.warmup:]
    if not _reporting():
        return 0
    rows = {name: summarize(recs, 0) for name, recs in records.items()}
    sft_step = rows["sft"]["step"]
    header = (f"{'variant':<9}" + "".join(f"{p + ' ms':>20}" for p in PHASES)
              + f"{'step ms':>10}{'x SFT':>7}{'tok/s':>8}")
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        print(f"{name:<9}" + "".join(f"{row[p] * 1e3:>20.1f}" for p in PHASES)
              + f"{row['step'] * 1e3:>10.1f}{row['step'] / sft_step:>7.2f}{row['tokens_per_s']:>8.0f}")
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    print(f"\nmachine: {machine}; {args.repeats} runs x {args.steps - args.warmup} counted steps per variant")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": str(args.config), "overrides": args.overrides, "machine": machine,
                                    "rows": rows, "ratio_to_sft": rows["distill"]["step"] / sft_step}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
