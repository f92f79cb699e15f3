"""``mopd demo``: the trainer on the embedded default configuration (``demo_cpu.yaml``), on the CPU.

    mopd demo                                        # one process, TP=1, about 40 s on 2 cores
    torchrun --nproc-per-node 2 -m megatron_mopd.demo parallel.tp=2

Every part is the real one: a byte-level BPE tokenizer trained on the spot; a small Llama-architecture
Hugging Face teacher served by the reference teacher server (started and stopped by the trainer); a
Llama-architecture student loaded into a Megatron-Core GPTModel and trained with Megatron's schedule,
DDP, optimizer and distributed checkpoints; teacher top-K scores requested before the student's
forward passes and awaited inside the loss (the vocab-parallel top-K JSD, per completion token).
The assets (``demo.assets``) are built on first use and cached. Outputs go to ``--output``:
config.yaml, metrics.jsonl, checkpoints/, hf/, report.json, curves.png. With a held-out evaluation
(``eval.path=...``) the run ends with a verdict: whether every teacher's held-out divergence fell by
at least half.
"""

from __future__ import annotations

import argparse
from typing import Any

HELP = "the CPU demo: the trainer on the embedded default configuration"
DESCRIPTION = __doc__
REQUIRED_DROP = 0.5  # each teacher's held-out divergence must fall by at least this fraction


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="runs/demo", metavar="DIR", help="output directory (default runs/demo)")
    parser.add_argument("--print-config", action="store_true", help="print the demo's configuration and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides of demo_cpu.yaml, e.g. train.steps=10 parallel.tp=2")
    parser.epilog = _defaults()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def run(args: argparse.Namespace) -> int:
    from megatron_mopd.demo.assets import DEMO_CONFIG
    from megatron_mopd.trainer.config import load_config
    from megatron_mopd.trainer.loop import train

    if args.print_config:
        print(DEMO_CONFIG.read_text(), end="")
        return 0
    config = load_config(DEMO_CONFIG, [f"output_dir={args.output}", "checkpoint.resume=none", *args.overrides])
    report = train(config, say=lambda line: print(line, flush=True))
    if report is not None:
        print(verdict(report), flush=True)
    return 0


def verdict(report: dict[str, Any]) -> str:
    """One line: whether every teacher's held-out divergence fell by at least ``REQUIRED_DROP``."""
    if "eval" not in report:
        return "verdict: no held-out evaluation (eval.path is unset), nothing to judge"
    parts, met = [], True
    for name, values in report["teachers"].items():
        start, end = values["divergence_start"], values["divergence_end"]
        drop = 1.0 - end / start if start > 0 else 0.0
        met &= drop >= REQUIRED_DROP
        parts.append(f"{name} {start:.3f} -> {end:.3f} ({-100 * drop:+.0f}%)")
    outcome = "met" if met else "NOT met"
    return (f"verdict: {outcome}: every teacher's held-out divergence must fall by at least "
            f"{100 * REQUIRED_DROP:.0f}%: " + ", ".join(parts))


def _defaults() -> str:
    """The configuration's main values (the schema's defaults where the file sets none), for ``--help``."""
    import yaml
    from omegaconf import OmegaConf

    from megatron_mopd.demo.assets import DEMO_CONFIG
    from megatron_mopd.trainer.config import MopdConfig

    raw = yaml.safe_load(DEMO_CONFIG.read_text())
    config = OmegaConf.merge(OmegaConf.structured(MopdConfig), {k: v for k, v in raw.items() if k != "teachers"})
    train, rollout = config.train, config.rollout
    lines = ["defaults (demo_cpu.yaml; --print-config shows it whole, key=value overrides any field):",
             f"  train.steps={train.steps} train.global_batch_size={train.global_batch_size} "
             f"train.micro_batch_size={train.micro_batch_size} train.lr={train.lr} "
             f"data.seq_length={config.data.seq_length} parallel.tp={config.parallel.tp}",
             f"  rollout.lmbda={rollout.lmbda} rollout.engine={rollout.engine} rollout.temperature="
             f"{rollout.temperature} rollout.max_new_tokens={rollout.max_new_tokens} eval.interval="
             f"{config.eval.interval}"]
    for index, teacher in enumerate(raw.get("teachers", [])):
        tokenizer = "another tokenizer" if teacher.get("tokenizer") else "the student's tokenizer"
        lines.append(f"  teachers.{index}: {teacher['name']} ({teacher.get('loss', 'topk_jsd')}, top-K "
                     f"{teacher.get('topk', 20)}, {tokenizer}, domains {teacher.get('domains', [])})")
    return "\n".join(lines)
