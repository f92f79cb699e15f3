#!/usr/bin/env bash
# The trainer on several Ascend nodes: run this script once on every node (by hand, with pdsh, or from
# your scheduler), each with its NODE_RANK; torchrun starts one rank per NPU there, the ranks talk over
# HCCL, and Megatron-Core runs through MindSpeed (docs/npu.md).
#
#   # on the first node (its address is MASTER_ADDR for all):
#   CONFIG=run.yaml NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash examples/npu/train_multi_node.sh
#   # on the second node:
#   CONFIG=run.yaml NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash examples/npu/train_multi_node.sh
#
# Every node runs the same checkout, configuration and arguments; OUTPUT_DIR (the configuration's
# output_dir) must be on a filesystem all nodes share. Arguments are trainer overrides (key=value),
# applied after parallel.device=npu.
set -euo pipefail

# ---- Variables: edit here, or export them before running -------------------------------------------
# The CANN toolkit's environment (library paths, ASCEND_HOME_PATH, ...). Uncomment unless your shell or
# container already sources it; the path is a root install's default, the NNAL line is for MindSpeed's
# fused operators when that package is installed.
# source /usr/local/Ascend/ascend-toolkit/set_env.sh
# source /usr/local/Ascend/nnal/atb/set_env.sh
# The run's YAML configuration; required, the same file on every node.
CONFIG=${CONFIG:?set CONFIG to the YAML configuration of the run, e.g. examples/configs/remote_vllm.yaml}
# Nodes in the job, and this node's place among them (0 .. NNODES-1).
NNODES=${NNODES:?set NNODES to the number of nodes}
NODE_RANK=${NODE_RANK:?set NODE_RANK to the index of this node, 0 on the node at MASTER_ADDR}
# Address and port of node 0, where torchrun's rendezvous and torch.distributed's store listen.
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the address of node 0, reachable from every node}
MASTER_PORT=${MASTER_PORT:-29500}
# Ranks per node, one per visible NPU.
NPUS_PER_NODE=${NPUS_PER_NODE:-8}
# The NPUs this job may use on each node (device ids as npu-smi lists them).
ASCEND_RT_VISIBLE_DEVICES=${ASCEND_RT_VISIBLE_DEVICES:-0,1,2,3,4,5,6,7}

# ---- HCCL and torch_npu, for every rank ------------------------------------------------------------
# The network interface of HCCL's host-side bootstrap (and of Megatron's gloo groups), e.g. eth0 or
# ^lo,docker0: set it when a node has interfaces the other nodes cannot reach. Empty: the defaults.
# HCCL_IF_IP instead names the address itself.
HCCL_SOCKET_IFNAME=${HCCL_SOCKET_IFNAME:-}
GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$HCCL_SOCKET_IFNAME}
HCCL_IF_IP=${HCCL_IF_IP:-}
# Seconds HCCL waits for every device to join while it sets up its links at start (CANN's default is
# 120 s): nodes that start minutes apart need more.
HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1800}
# Seconds a collective waits for the other devices before HCCL reports a timeout (CANN's default: 1836).
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
for name in HCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME HCCL_IF_IP; do  # exported only when set
    if [[ -n ${!name} ]]; then export "${name?}"; else unset "$name"; fi
done

exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPUS_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m megatron_mopd.train --config "$CONFIG" parallel.device=npu "$@"
