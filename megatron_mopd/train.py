"""``torchrun --nproc-per-node N -m megatron_mopd.train --config run.yaml [key=value ...]``: the trainer
on every rank of a torchrun (or Slurm ``srun``) job; ``mopd train`` runs the same in one process.

The ``if __name__ == "__main__"`` guard matters: Megatron's checkpoint save starts a spawn-context
process that re-imports the main module.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from megatron_mopd.cli import run_command

    sys.exit(run_command("train", sys.argv[1:]))
