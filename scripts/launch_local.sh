#!/usr/bin/env bash
# Try a multi-host run on one machine: N local processes of `meshlm train --distributed`, a
# loopback coordinator on a free port, and MESHLM_LOCAL_DEVICES fake CPU devices per process
# (default 4), e.g.
#     scripts/launch_local.sh 2 --config configs/default.yaml train.steps=20 mesh.fsdp=2
# Process I's output goes to the terminal with an "[I] " prefix. SIGTERM or Ctrl-C here sends
# SIGTERM to every process (JAX's preemption service stops them all after one step, with a
# checkpoint; a Ctrl-C straight to the processes would not); the exit status is the first
# non-zero one.
set -euo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 N [meshlm train arguments...]  (N: number of processes, >= 1)" >&2
    exit 2
fi
n=$1
shift
root=$(cd "$(dirname "$0")/.." && pwd)
python=${MESHLM_PYTHON:-$root/.venv/bin/python}
port=$("$python" -c 'import portpicker; print(portpicker.pick_unused_port())')
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${MESHLM_LOCAL_DEVICES:-4}"

pids=()
for ((i = 0; i < n; i++)); do
    setsid "$python" -u -m meshlm.cli train --distributed --coordinator-address "127.0.0.1:$port" \
        --num-processes "$n" --process-id "$i" "$@" \
        > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
    pids+=($!)
done
forward() { kill -s "$1" "${pids[@]}" 2>/dev/null || true; }
trap 'forward TERM' TERM INT

status=0
for pid in "${pids[@]}"; do
    code=0
    while true; do  # a trapped signal interrupts `wait`; wait again for the same process
        wait "$pid" && code=0 || code=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    if [[ $status -eq 0 && $code -ne 0 ]]; then
        status=$code
    fi
done
exit "$status"
