#!/usr/bin/env bash
# The CPU demo (`mopd demo`) under torchrun: two processes on this machine talking over gloo, the
# student split in two by tensor parallelism. Same run as `mopd demo`, same verdict line at the end.
#
#   examples/torchrun/cpu_demo.sh                                   # TP=2
#   TP=1 PP=2 examples/torchrun/cpu_demo.sh                         # two pipeline stages
#   TP=1 examples/torchrun/cpu_demo.sh train.steps=50               # data parallel, shorter
#
# Arguments are demo overrides (key=value).
set -euo pipefail

# Where config.yaml, metrics.jsonl, checkpoints/, hf/, report.json and curves.png go.
OUTPUT=${OUTPUT:-runs/demo_torchrun}
# Processes, and the layout they form: TP x PP must divide NPROC; the rest is data parallel.
NPROC=${NPROC:-2}
TP=${TP:-2}
PP=${PP:-1}

# parallel.device=cpu: gloo even on a machine that has a GPU. torchrun gives each process one thread
# (OMP_NUM_THREADS=1) unless you set OMP_NUM_THREADS; the demo's teacher servers inherit it.
exec torchrun --standalone --nproc-per-node="$NPROC" -m megatron_mopd.demo --output "$OUTPUT" \
    parallel.device=cpu parallel.tp="$TP" parallel.pp="$PP" "$@"
