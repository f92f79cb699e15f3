"""``mopd train --config FILE [key=value ...]``: the trainer from a YAML configuration.

In one process it runs with world size 1; under torchrun (``torchrun --nproc-per-node N -m
megatron_mopd.train --config FILE ...``) every rank runs it. ``--help-config`` prints every field.
"""

from __future__ import annotations

import argparse
import sys

HELP = "train a student: Megatron-Core distillation from a YAML config"
DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML configuration (see examples/configs/)")
    parser.add_argument("--resume", action="store_true", help="same as checkpoint.resume=auto")
    parser.add_argument("--help-config", action="store_true", help="print every configuration field and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.lr=1e-5 teachers.0.topk=64")


def run(args: argparse.Namespace) -> int:
    from megatron_mopd.trainer.config import config_reference, load_config

    if args.help_config:
        print(config_reference())
        return 0
    overrides = list(args.overrides) + (["checkpoint.resume=auto"] if args.resume else [])
    config = load_config(args.config, overrides)
    return train_and_report(config)


def train_and_report(config) -> int:
    """Run ``config`` on this rank; 0 when it finished."""
    from megatron_mopd.trainer.loop import train

    train(config, say=lambda line: print(line, file=sys.stdout, flush=True))
    return 0
