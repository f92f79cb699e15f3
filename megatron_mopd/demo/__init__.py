"""``mopd demo``: the trainer on the embedded default configuration (``demo_cpu.yaml``), on the CPU.

    mopd demo                                        # one process, TP=1, about 40 s on 2 cores
    torchrun --nproc-per-node 2 -m megatron_mopd.demo parallel.tp=2

Every part is the real one: a byte-level BPE tokenizer trained on the spot; a small Llama-architecture
Hugging Face teacher served by the reference teacher server (started and stopped by the trainer); a
Llama-architecture student loaded into a Megatron-Core GPTModel and trained with Megatron's schedule,
DDP, optimizer and distributed checkpoints; teacher top-K scores requested before the student's
forward passes and awaited inside the loss (the vocab-parallel top-K JSD, per completion token).
The assets (``demo.assets``) are built on first use and cached. Outputs go to ``--output``:
config.yaml, metrics.jsonl, checkpoints/, hf/, report.json, curves.png.
"""

from __future__ import annotations

import argparse

HELP = "the CPU demo: the trainer on the embedded default configuration"
DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="runs/demo", metavar="DIR", help="output directory (default runs/demo)")
    parser.add_argument("--print-config", action="store_true", help="print the demo's configuration and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides of demo_cpu.yaml, e.g. train.steps=10 parallel.tp=2")


def run(args: argparse.Namespace) -> int:
    from megatron_mopd.demo.assets import DEMO_CONFIG
    from megatron_mopd.trainer.command import train_and_report
    from megatron_mopd.trainer.config import load_config

    if args.print_config:
        print(DEMO_CONFIG.read_text(), end="")
        return 0
    config = load_config(DEMO_CONFIG, [f"output_dir={args.output}", "checkpoint.resume=none", *args.overrides])
    return train_and_report(config)
