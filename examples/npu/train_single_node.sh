#!/usr/bin/env bash
# The trainer on one Ascend node: torchrun starts one rank per NPU (8 by default), the ranks talk over
# HCCL, and Megatron-Core runs through MindSpeed (docs/npu.md: install, what runs on NPU, troubleshooting).
#
#   CONFIG=run.yaml bash examples/npu/train_single_node.sh                  # from the checkout's root
#   CONFIG=run.yaml bash examples/npu/train_single_node.sh parallel.tp=4 train.precision=bf16
#   CONFIG=run.yaml NPUS_PER_NODE=4 ASCEND_RT_VISIBLE_DEVICES=4,5,6,7 bash examples/npu/train_single_node.sh
#
# Arguments are trainer overrides (key=value), applied after parallel.device=npu.
set -euo pipefail

# ---- Variables: edit here, or export them before running -------------------------------------------
# The CANN toolkit's environment (library paths, ASCEND_HOME_PATH, ...). Uncomment unless your shell or
# container already sources it; the path is a root install's default, the NNAL line is for MindSpeed's
# fused operators when that package is installed.
# source /usr/local/Ascend/ascend-toolkit/set_env.sh
# source /usr/local/Ascend/nnal/atb/set_env.sh
# The run's YAML configuration (examples/configs/ has starting points); required.
CONFIG=${CONFIG:?set CONFIG to the YAML configuration of the run, e.g. examples/configs/remote_vllm.yaml}
# Ranks on this node, one per visible NPU.
NPUS_PER_NODE=${NPUS_PER_NODE:-8}
# The NPUs this job may use (device ids as npu-smi lists them); rank i gets the i-th of them.
ASCEND_RT_VISIBLE_DEVICES=${ASCEND_RT_VISIBLE_DEVICES:-0,1,2,3,4,5,6,7}

# HCCL, torch_npu and CANN settings for every rank (each overridable by exporting it first).
source "$(dirname "${BASH_SOURCE[0]}")/npu_env.sh"

exec torchrun --standalone --nproc-per-node "$NPUS_PER_NODE" \
    -m megatron_mopd.train --config "$CONFIG" parallel.device=npu "$@"
