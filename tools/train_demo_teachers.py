#!/usr/bin/env python
"""Build the two-domain demo's teachers (``megatron_mopd.demo.teacher_training``) and measure them.

Each teacher is trained on first use and cached; ``--force`` retrains both. Then, on the held-out
split of its domain (``mopd_heldout``, none of it trained on), side by side:

``nll_teacher``     the trained teacher's negative log-likelihood (nats) per completion token of the
                    reference completions (completion and EOS);
``nll_untrained``   the same for the student's architecture, untrained, over the teacher's tokenizer
                    (for ``arith`` that is the demo's student itself);
``exact_*``         ``arith`` only: the fraction of problems whose greedy completion is exactly the
                    sum, then EOS;
``train_seconds``   the training time recorded when the teacher was built (``training.json``).

    python tools/train_demo_teachers.py           # writes bench_results/demo_teachers.json
    python tools/train_demo_teachers.py --force   # retrains the teachers first
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_mopd.demo.domains import DEMO_VOCAB_SIZE, domain_data_path
from megatron_mopd.demo.teacher_training import (
    TEACHERS,
    completion_nll,
    greedy_exact_match,
    trained_teacher_dir,
    untrained_model,
)
from megatron_mopd.demo.tokenizers import tokenizer_dir
from megatron_mopd.trainer.data import load_samples


def measure(name: str, force: bool) -> dict:
    recipe = TEACHERS[name]
    directory = trained_teacher_dir(name, rebuild=force)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    teacher = AutoModelForCausalLM.from_pretrained(directory)
    untrained = untrained_model(tokenizer_dir(recipe.tokenizer, DEMO_VOCAB_SIZE))
    heldout = [s for s in load_samples(domain_data_path("heldout")) if s.domain == recipe.domain]
    training = json.loads((directory / "training.json").read_text())
    row = {"teacher": name, "domain": recipe.domain, "tokenizer": recipe.tokenizer, "heldout": len(heldout),
           "nll_teacher": completion_nll(teacher, tokenizer, heldout),
           "nll_untrained": completion_nll(untrained, tokenizer, heldout)}
    row["nll_ratio"] = row["nll_teacher"] / row["nll_untrained"]
    if recipe.domain == "arithmetic":
        row["exact_teacher"] = greedy_exact_match(teacher, tokenizer, heldout)
        row["exact_untrained"] = greedy_exact_match(untrained, tokenizer, heldout)
    return {**row, "train_seconds": training["seconds"], "train_samples": training["samples"],
            "last_loss": training["last_loss"], "directory": directory.name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="retrain the teachers even if cached")
    parser.add_argument("--out", type=Path, default=Path("bench_results/demo_teachers.json"))
    args = parser.parse_args()

    rows = [measure(name, args.force) for name in TEACHERS]
    columns = ["teacher", "domain", "heldout", "nll_teacher", "nll_untrained", "nll_ratio", "exact_teacher",
               "exact_untrained", "train_seconds"]
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    for line in [columns, *cells]:
        print("  ".join(text.rjust(width) for text, width in zip(line, widths)))
    report = {"rows": rows, "recipes": {name: asdict(recipe) for name, recipe in TEACHERS.items()},
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


def _cell(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
