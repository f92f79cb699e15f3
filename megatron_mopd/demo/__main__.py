"""``torchrun --nproc-per-node N -m megatron_mopd.demo [--output DIR] [key=value ...]``."""

import sys

if __name__ == "__main__":
    from megatron_mopd.cli import run_command

    sys.exit(run_command("demo", sys.argv[1:]))
