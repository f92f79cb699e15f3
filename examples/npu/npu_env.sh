# The environment of every Ascend rank: HCCL, torch_npu and CANN settings, each overridable by exporting it
# first. Sourced by train_single_node.sh and train_multi_node.sh.

# Seconds HCCL waits for every device to join while it sets up its links at start (CANN's default is
# 120 s): slow starts (large checkpoints loaded before the first collective, nodes that start minutes
# apart) need more.
HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1800}
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

export ASCEND_RT_VISIBLE_DEVICES HCCL_CONNECT_TIMEOUT HCCL_EXEC_TIMEOUT PYTORCH_NPU_ALLOC_CONF TASK_QUEUE_ENABLE \
    CPU_AFFINITY_CONF ASCEND_GLOBAL_LOG_LEVEL ASCEND_SLOG_PRINT_TO_STDOUT CUDA_DEVICE_MAX_CONNECTIONS
