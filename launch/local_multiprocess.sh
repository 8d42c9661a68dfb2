#!/usr/bin/env bash
# Simulates an N-host run on one machine (CPU devices, loopback coordinator): a smoke test of the
# multi-host code path before spending cluster time. LOCAL_RANK keeps the processes' pinned
# data workers (data.pin_workers) on different cores.
#   launch/local_multiprocess.sh 2 configs/sample.py --config.checkpoint_dir=runs/mp
set -euo pipefail
n="${1:?usage: launch/local_multiprocess.sh NUM_PROCESSES CONFIG [flags...]}"
config="${2:?config}"
shift 2
cd "$(dirname "$0")/.."
port="${PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
pids=()
for ((i = 0; i < n; i++)); do
  LOCAL_RANK="${i}" JAX_PLATFORMS=cpu python experiment.py --config="${config}" --cpu_devices=1 \
    --coordinator_address="127.0.0.1:${port}" --coordinator_bind_address="127.0.0.1:${port}" \
    --num_processes="${n}" --process_id="${i}" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "${pid}" || status=$?; done
exit "${status}"
