# Shell functions shared by student.sbatch, teachers.sbatch and hetjob.sbatch (sourced, never run).
#
# The teacher URL file: the teacher job writes it, the student reads it. It lives on a filesystem every
# node sees. Line 1 is a header naming how many servers the teacher job starts and their protocol; each
# further line is one server's URL, added once that server answers its health check:
#
#     # mopd teachers: 4 servers, protocol vllm, job 1234
#     http://gpu07:8000
#     http://gpu07:8010
#
# A hand-written file without the header is fine: it then lists every teacher it has.
#
# Bash 4.4 or newer (empty arrays under `set -u`).

set -euo pipefail  # every script that sources this runs strict, including each node's `bash -c`

# Polling: seconds between two health checks (fractions allowed), each check's own limit, and the path
# every supported server answers once its model is loaded (vLLM, SGLang and `mopd serve-teacher`).
: "${MOPD_POLL_INTERVAL_S:=5}"
: "${MOPD_CURL_TIMEOUT_S:=10}"
: "${MOPD_HEALTH_PATH:=/health}"
# Each further server on a node listens this many ports above the previous one, leaving room for the
# ports a server opens beside its own.
MOPD_PORT_STRIDE=10

mopd_log() {
    printf '[mopd %(%H:%M:%S)T] %s\n' -1 "$*" >&2
}

mopd_die() {
    mopd_log "error: $*"
    exit 1
}

# Now, in microseconds.
mopd_now_us() {
    date +%s%6N
}

# SECONDS (a decimal such as 30 or 0.25) in microseconds.
mopd_to_us() {
    local value=$1 whole fraction=""
    [[ $value =~ ^[0-9]*(\.[0-9]*)?$ && $value =~ [0-9] ]] || mopd_die "'$value' is not a number of seconds"
    whole=${value%%.*}
    [[ $value != *.* ]] || fraction=${value#*.}
    fraction=${fraction}000000
    echo $(( 10#${whole:-0} * 1000000 + 10#${fraction:0:6} ))
}

# True while process PID runs, and always for an empty PID (nothing to watch).
mopd_running() {
    [[ -z $1 ]] || kill -0 "$1" 2>/dev/null
}

# Wait for background process PID and return its status. A trapped signal (USR1: requeue) interrupts
# `wait` while the process runs on, so wait again until it has really ended.
mopd_wait_step() {
    local pid=$1
    while kill -0 "$pid" 2>/dev/null; do
        wait "$pid" || true
    done
    wait "$pid"
}

# ---------------------------------------------------------------------------------------------------
# Health

# Poll URL's health path until it answers 200, for at most DEADLINE_S seconds. With PID (the process
# serving URL, or the part of the job that starts it), fail as soon as that process is gone instead
# of waiting out the deadline. Returns 1 with a message naming URL on failure.
mopd_wait_healthy() {
    local url=$1 deadline_s=$2 pid=${3:-} deadline error
    deadline=$(mopd_to_us "$deadline_s") || return 1
    deadline=$(( deadline + $(mopd_now_us) ))
    mopd_log "waiting up to $deadline_s s for $url$MOPD_HEALTH_PATH"
    while true; do
        if error=$(curl --silent --show-error --fail --max-time "$MOPD_CURL_TIMEOUT_S" --output /dev/null \
                        "$url$MOPD_HEALTH_PATH" 2>&1); then
            mopd_log "$url is healthy"
            return 0
        fi
        if ! mopd_running "$pid"; then
            mopd_log "error: $url: the process starting it (pid $pid) exited before $url$MOPD_HEALTH_PATH answered"
            return 1
        fi
        if (( $(mopd_now_us) >= deadline )); then
            mopd_log "error: teacher server $url did not answer $MOPD_HEALTH_PATH within $deadline_s s" \
                     "(last error: ${error:-none})"
            return 1
        fi
        sleep "$MOPD_POLL_INTERVAL_S"
    done
}

# ---------------------------------------------------------------------------------------------------
# The teacher URL file

# Replace FILE with CONTENT in one rename: a reader sees the old file or the new one, never a part.
mopd_write_atomically() {
    local file=$1 content=$2 temporary
    temporary="$file.tmp.$(hostname).$BASHPID"
    printf '%s' "$content" > "$temporary"
    mv -f "$temporary" "$file"
}

# Run a command holding FILE's lock (FILE.lock, flock): the servers of several nodes publish at once.
mopd_locked() {
    local file=$1
    shift
    {
        flock --wait 60 9 || mopd_die "no lock on $file.lock within 60 s (does this filesystem support flock?)"
        "$@"
    } 9>> "$file.lock"
}

# Start FILE afresh: the header only (SERVERS expected, PROTOCOL), no URL yet.
mopd_reset_url_file() {
    local file=$1 servers=$2 protocol=$3
    mkdir -p "$(dirname "$file")"
    mopd_locked "$file" mopd_write_atomically "$file" \
        "# mopd teachers: $servers servers, protocol $protocol, job ${SLURM_JOB_ID:-none}"$'\n'
}

# Add URL to FILE.
mopd_publish_url() {
    local file=$1 url=$2
    mopd_locked "$file" _mopd_append_url "$file" "$url"
    mopd_log "published $url in $file"
}

_mopd_append_url() {
    mopd_write_atomically "$1" "$(cat "$1")"$'\n'"$2"$'\n'
}

# The URLs a URL file (on stdin) lists, one per line (comments, blank lines and spaces dropped).
mopd_read_urls() {
    local line
    while IFS= read -r line || [[ -n $line ]]; do
        line=${line//[[:space:]]/}
        [[ -z $line || $line == \#* ]] || printf '%s\n' "$line"
    done
}

# Field NAME of the header of a URL file (on stdin): "servers" (how many URLs it will list) or
# "protocol"; empty without a header.
mopd_url_file_header() {
    local name=$1 header=""
    IFS= read -r header || true
    if [[ $header =~ ^#\ mopd\ teachers:\ ([0-9]+)\ servers,\ protocol\ ([a-z]+) ]]; then
        case $name in
            servers) echo "${BASH_REMATCH[1]}" ;;
            protocol) echo "${BASH_REMATCH[2]}" ;;
        esac
    fi
}

# Wait until FILE lists every server its header announces (at least one URL without a header), for at
# most DEADLINE_S seconds; with PID (the teacher part of this job), fail as soon as it is gone.
mopd_wait_for_url_file() {
    local file=$1 deadline_s=$2 pid=${3:-} deadline snapshot listed expected state
    deadline=$(mopd_to_us "$deadline_s") || return 1
    deadline=$(( deadline + $(mopd_now_us) ))
    mopd_log "waiting up to $deadline_s s for $file to list every teacher server"
    while true; do
        state="does not exist"
        # One read of the file: the teacher job replaces it (rename) or removes it at any time.
        if snapshot=$(cat "$file" 2>/dev/null); then
            listed=$(mopd_read_urls <<< "$snapshot" | wc -l)
            expected=$(mopd_url_file_header servers <<< "$snapshot")
            expected=${expected:-1}
            state="lists $listed of $expected teacher servers"
            if (( listed >= expected )); then
                mopd_log "$file lists $listed teacher servers"
                return 0
            fi
        fi
        if ! mopd_running "$pid"; then
            mopd_log "error: the teacher servers (pid $pid) exited; $file $state"
            return 1
        fi
        if (( $(mopd_now_us) >= deadline )); then
            mopd_log "error: after $deadline_s s, $file $state: is the teacher job running and healthy" \
                     "(its servers' logs say why one is not)?"
            return 1
        fi
        sleep "$MOPD_POLL_INTERVAL_S"
    done
}

# The trainer overrides for teacher INDEX from a URL file (on stdin; FILE names it in errors), one per
# line: teachers.INDEX.urls=["...",...], and teachers.INDEX.protocol=... when the header names it.
mopd_teacher_overrides() {
    local index=$1 file=$2 snapshot url list="" protocol
    snapshot=$(cat)
    while IFS= read -r url; do
        [[ $url =~ ^https?://[^\",]+$ ]] || mopd_die "$file: '$url' is not an http(s) URL"
        list+="${list:+,}\"$url\""
    done < <(mopd_read_urls <<< "$snapshot")
    [[ -n $list ]] || mopd_die "$file lists no URL"
    echo "teachers.$index.urls=[$list]"
    protocol=$(mopd_url_file_header protocol <<< "$snapshot")
    [[ -z $protocol ]] || echo "teachers.$index.protocol=$protocol"
}

# ---------------------------------------------------------------------------------------------------
# The job's nodes

# This script's part of the job: MOPD_NODES (its node names, first one first) and MOPD_SRUN (the srun
# options that place a step on it). In a heterogeneous job MOPD_HET_GROUP names the component.
mopd_component() {
    local suffix="" nodelist cpus
    MOPD_SRUN=()
    if [[ -n ${MOPD_HET_GROUP:-} ]]; then
        suffix=_HET_GROUP_$MOPD_HET_GROUP
        MOPD_SRUN+=(--het-group="$MOPD_HET_GROUP")
    fi
    nodelist=SLURM_JOB_NODELIST$suffix
    cpus=SLURM_CPUS_PER_TASK$suffix
    [[ -n ${!nodelist:-} ]] || mopd_die "$nodelist is not set: submit this script with sbatch"
    # Since Slurm 22.05 srun no longer inherits sbatch's --cpus-per-task: without it, the step's task
    # on each node (torchrun and all its ranks, or a node's servers) would be bound to one core.
    [[ -z ${!cpus:-} ]] || MOPD_SRUN+=(--cpus-per-task="${!cpus}")
    mapfile -t MOPD_NODES < <(scontrol show hostnames "${!nodelist}")
    (( ${#MOPD_NODES[@]} > 0 )) || mopd_die "scontrol show hostnames ${!nodelist} named no node"
}

# torchrun's command line for MOPD_NODES, NPROC processes per node: every node's agent meets the others
# at the c10d rendezvous store that the first node's agent hosts on PORT; the job id names the
# rendezvous. c10d numbers the nodes itself (--node-rank is for the static backend only), and torchrun
# gives every rank RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. A rank that fails ends
# the job (no restarts): a requeued job resumes from its last checkpoint instead.
mopd_torchrun() {
    local nproc=$1 port=$2
    MOPD_TORCHRUN=(torchrun --nnodes="${#MOPD_NODES[@]}" --nproc-per-node="$nproc"
                   --rdzv-backend=c10d --rdzv-endpoint="${MOPD_NODES[0]}:$port"
                   --rdzv-id="$SLURM_JOB_ID" --max-restarts=0)
}

# Export each named variable that has a value and unset each empty one: empty means "let NCCL (or
# PyTorch) decide", and a variable set to an empty string is not the same as an unset one to every
# library.
mopd_export_nonempty() {
    local name
    for name in "$@"; do
        if [[ -n ${!name:-} ]]; then
            export "${name?}"
        else
            unset "$name"
        fi
    done
}

# The USR1 trap: Slurm sends USR1 before the time limit (--signal=B:USR1@...); requeueing puts the job
# back in the queue under the same id, and its trainer, started with checkpoint.resume=auto, continues
# from the last checkpoint.
mopd_requeue() {
    mopd_log "USR1: requeueing job $SLURM_JOB_ID (it resumes from its last checkpoint)"
    scontrol requeue "$SLURM_JOB_ID" || mopd_log "error: scontrol requeue $SLURM_JOB_ID failed"
}

# ---------------------------------------------------------------------------------------------------
# Teacher servers

# How many servers each teacher node runs: one per TEACHER_TP GPUs.
mopd_servers_per_node() {
    (( TEACHER_TP > 0 && TEACHER_GPUS_PER_NODE % TEACHER_TP == 0 )) ||
        mopd_die "TEACHER_TP=$TEACHER_TP must divide TEACHER_GPUS_PER_NODE=$TEACHER_GPUS_PER_NODE"
    echo $(( TEACHER_GPUS_PER_NODE / TEACHER_TP ))
}

# The protocol the trainer speaks to TEACHER_SERVER (the reference server answers both).
mopd_server_protocol() {
    case $TEACHER_SERVER in
        vllm | reference) echo vllm ;;
        sglang) echo sglang ;;
        *) mopd_die "TEACHER_SERVER=$TEACHER_SERVER: expected vllm, sglang or reference" ;;
    esac
}

# MOPD_SERVER_COMMAND: the command line of one TEACHER_SERVER on PORT, listening on every interface
# (the student's nodes connect to it), tensor parallel over the TEACHER_TP GPUs it sees.
mopd_server_command() {
    local port=$1 extra
    read -ra extra <<< "$TEACHER_SERVER_ARGS"
    case $TEACHER_SERVER in
        vllm)
            MOPD_SERVER_COMMAND=("$TEACHER_PYTHON" -m vllm.entrypoints.openai.api_server
                                 --model "$TEACHER_MODEL" --host 0.0.0.0 --port "$port"
                                 --tensor-parallel-size "$TEACHER_TP" --max-logprobs "$TEACHER_MAX_LOGPROBS") ;;
        sglang)  # SGLang has no top-K limit to raise
            MOPD_SERVER_COMMAND=("$TEACHER_PYTHON" -m sglang.launch_server
                                 --model-path "$TEACHER_MODEL" --host 0.0.0.0 --port "$port"
                                 --tp-size "$TEACHER_TP") ;;
        reference)
            (( TEACHER_TP == 1 )) || mopd_die "TEACHER_SERVER=reference uses one GPU per server: set TEACHER_TP=1"
            MOPD_SERVER_COMMAND=("$TEACHER_PYTHON" -m megatron_mopd.teachers.server
                                 --model "$TEACHER_MODEL" --host 0.0.0.0 --port "$port"
                                 --max-logprobs "$TEACHER_MAX_LOGPROBS" --device cuda) ;;
        *) mopd_die "TEACHER_SERVER=$TEACHER_SERVER: expected vllm, sglang or reference" ;;
    esac
    MOPD_SERVER_COMMAND+=("${extra[@]}")
}

# One teacher node (run by srun on each): start its servers, each on its own TEACHER_TP GPUs and port,
# publish each URL once it answers its health check, then stay while the servers run.
mopd_serve_node() {
    local host servers gpus i port devices log pids=() urls=() logs=() status=0
    host=$(hostname)
    servers=$(mopd_servers_per_node)
    # Slurm may already restrict the node's GPUs (CUDA_VISIBLE_DEVICES): split what it gives.
    IFS=, read -ra gpus <<< "${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $(( TEACHER_GPUS_PER_NODE - 1 )))}"
    (( ${#gpus[@]} >= TEACHER_GPUS_PER_NODE )) ||
        mopd_die "$host sees ${#gpus[@]} GPUs (${gpus[*]}), TEACHER_GPUS_PER_NODE=$TEACHER_GPUS_PER_NODE"
    mkdir -p "$TEACHER_LOG_DIR"
    for (( i = 0; i < servers; i++ )); do
        port=$(( TEACHER_PORT + i * MOPD_PORT_STRIDE ))
        devices=$(IFS=,; echo "${gpus[*]:i * TEACHER_TP:TEACHER_TP}")
        log="$TEACHER_LOG_DIR/teacher-$host-$port.log"
        mopd_server_command "$port"
        mopd_log "starting ${MOPD_SERVER_COMMAND[*]} on GPUs $devices (log: $log)"
        CUDA_VISIBLE_DEVICES=$devices "${MOPD_SERVER_COMMAND[@]}" >> "$log" 2>&1 &
        pids+=("$!") urls+=("http://$host:$port") logs+=("$log")
    done
    for i in "${!urls[@]}"; do
        mopd_wait_healthy "${urls[i]}" "$TEACHER_START_S" "${pids[i]}" ||
            mopd_die "${urls[i]} did not start; the end of ${logs[i]}:"$'\n'"$(tail -n 20 "${logs[i]}")"
        mopd_publish_url "$TEACHER_URL_FILE" "${urls[i]}"
    done
    for i in "${!pids[@]}"; do
        wait "${pids[i]}" || status=$?
    done
    mopd_log "the teacher servers on $host exited (status $status)"
    return "$status"
}
