#!/usr/bin/env bash
# The trainer on the GPUs of one machine: torchrun starts one process per GPU (a local rendezvous on a
# free port, --standalone) and gives each RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
#
#   CONFIG=run.yaml examples/torchrun/single_node_gpu.sh [key=value ...]
#   CONFIG=run.yaml LAYOUT="parallel.tp=4 parallel.pp=2" examples/torchrun/single_node_gpu.sh train.lr=1e-5
#
# Arguments are trainer overrides, applied after LAYOUT. docs/cluster.md has more.
set -euo pipefail

# The run's YAML configuration; required.
CONFIG=${CONFIG:?set CONFIG to the YAML configuration of the run, e.g. examples/configs/remote_vllm.yaml}
# Processes, one per GPU.
GPUS=${GPUS:-8}
# The parallel layout. tp x pp x cp must divide GPUS; what remains is data parallel, and
# train.global_batch_size must be a multiple of train.micro_batch_size x that data-parallel size.
LAYOUT=${LAYOUT:-parallel.tp=8}
# Other layouts for 8 GPUs (tp should divide the model's attention and key/value heads):
#   LAYOUT="parallel.tp=4 parallel.pp=2"
#       pp must divide the model's layers
#   LAYOUT="parallel.tp=2 parallel.cp=2"
#       context parallel, 2-way data parallel: needs Transformer Engine (CUDA), data.seq_length divisible
#       by 2 x cp, and remote teachers with the student's tokenizer (no colocated or cross-tokenizer one)
#   LAYOUT="parallel.tp=4 parallel.sequence_parallel=true"
#       2-way data parallel; the activations outside attention and MLP are split over tp as well
#   LAYOUT="parallel.tp=1"
#       8-way data parallel: a student that fits on one GPU

read -ra layout <<< "$LAYOUT"
exec torchrun --standalone --nproc-per-node="$GPUS" -m megatron_mopd.train --config "$CONFIG" "${layout[@]}" "$@"
