"""``torchrun --nproc-per-node N -m megatron_mopd.train --config run.yaml [key=value ...]``: the trainer
on every rank of a torchrun (or Slurm ``srun``) job; ``mopd train`` runs the same in one process.

``main`` first settles the platform from the command line's configuration (``parallel.device``, else
``MOPD_DEVICE``, else the best available device) and, on Ascend NPU, imports MindSpeed's Megatron adaptor
before anything imports Megatron (docs/npu.md); only then does it import and run the trainer.

The ``if __name__ == "__main__"`` guard matters: Megatron's checkpoint save starts a spawn-context
process that re-imports the main module.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence


def configured_device(argv: Sequence[str]) -> Optional[str]:
    """``parallel.device`` of the configuration that ``mopd train argv`` runs; None when it is unset, and
    when the command line or the configuration is invalid (the trainer reports that itself)."""
    import argparse

    from megatron_mopd.trainer.command import add_arguments
    from megatron_mopd.trainer.config import load_config

    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    add_arguments(parser)
    try:
        args, _ = parser.parse_known_args(list(argv))
        return load_config(args.config, args.overrides).parallel.device
    except (argparse.ArgumentError, ValueError, OSError):
        return None


def main(argv: Sequence[str]) -> int:
    """Prepare the platform of ``mopd train argv`` (``prepare_platform``), then run it; the exit status.

    A platform that cannot be prepared (an unknown ``MOPD_DEVICE``, MindSpeed missing on NPU, Megatron
    imported before MindSpeed) ends the command with one line on stderr and status 1 (``MOPD_DEBUG=1``:
    the traceback).
    """
    from megatron_mopd.platform import prepare_platform

    try:
        prepare_platform(configured_device(argv))
    except (ValueError, RuntimeError) as error:
        if os.environ.get("MOPD_DEBUG"):
            raise
        print(f"mopd train: error: {error}", file=sys.stderr)
        return 1
    from megatron_mopd.cli import run_command

    return run_command("train", argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
