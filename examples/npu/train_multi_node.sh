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

# ---- The network between the nodes ------------------------------------------------------------------
# The network interface of HCCL's host-side bootstrap (and of Megatron's gloo groups), e.g. eth0 or
# ^lo,docker0: set it when a node has interfaces the other nodes cannot reach. Empty: the defaults.
# HCCL_IF_IP instead names the address itself.
HCCL_SOCKET_IFNAME=${HCCL_SOCKET_IFNAME:-}
GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$HCCL_SOCKET_IFNAME}
HCCL_IF_IP=${HCCL_IF_IP:-}
# -----------------------------------------------------------------------------------------------------

# HCCL, torch_npu and CANN settings for every rank (each overridable by exporting it first).
source "$(dirname "${BASH_SOURCE[0]}")/npu_env.sh"
for name in HCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME HCCL_IF_IP; do  # exported only when set
    if [[ -n ${!name} ]]; then export "${name?}"; else unset "$name"; fi
done

exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPUS_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m megatron_mopd.train --config "$CONFIG" parallel.device=npu "$@"
