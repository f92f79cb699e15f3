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

# ---- HCCL and torch_npu, for every rank ------------------------------------------------------------
# Seconds HCCL waits for every device to join while it sets up its links at start (CANN's default is
# 120 s): slow starts (large checkpoints loaded before the first collective) need more.
HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
# Seconds a collective waits for the other devices before HCCL reports a timeout (CANN's default: 1836).
# A rank that saves a checkpoint or waits for a teacher server keeps the others waiting this long.
HCCL_EXEC_TIMEOUT=${HCCL_EXEC_TIMEOUT:-1836}
# torch_npu's caching allocator: expandable segments fragment less with varying sequence lengths.
PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}
# torch_npu's operator dispatch queue (0: off, 1 or 2: on, 2 also moves more work off the Python thread).
TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-1}
# Bind each rank's threads to the CPU cores near its NPU (torch_npu; 0: off).
CPU_AFFINITY_CONF=${CPU_AFFINITY_CONF:-1}
# CANN's log level (0 debug, 1 info, 2 warning, 3 error); 1 with ASCEND_SLOG_PRINT_TO_STDOUT=1 shows
# HCCL's link setup on stdout.
ASCEND_GLOBAL_LOG_LEVEL=${ASCEND_GLOBAL_LOG_LEVEL:-3}
ASCEND_SLOG_PRINT_TO_STDOUT=${ASCEND_SLOG_PRINT_TO_STDOUT:-0}
# Megatron-Core checks it for sequence parallelism; without effect on the NPU.
CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# -----------------------------------------------------------------------------------------------------

export ASCEND_RT_VISIBLE_DEVICES HCCL_CONNECT_TIMEOUT HCCL_EXEC_TIMEOUT PYTORCH_NPU_ALLOC_CONF TASK_QUEUE_ENABLE \
    CPU_AFFINITY_CONF ASCEND_GLOBAL_LOG_LEVEL ASCEND_SLOG_PRINT_TO_STDOUT CUDA_DEVICE_MAX_CONNECTIONS

exec torchrun --standalone --nproc-per-node "$NPUS_PER_NODE" \
    -m megatron_mopd.train --config "$CONFIG" parallel.device=npu "$@"
