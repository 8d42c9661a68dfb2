#!/usr/bin/env bash
# Single node, all local GPUs (one process; jax.pmap spans every visible device).
#   launch/single_node.sh CONFIG [extra flags...]
#   e.g. launch/single_node.sh configs/era5_1deg.py \
#          --config.experiment_kwargs.config.data.source=/data/era5_1deg.zarr \
#          --config.experiment_kwargs.config.data.stats_dir=/data/stats_1deg \
#          --config.checkpoint_dir=/runs/era5_1deg
# Restrict GPUs with CUDA_VISIBLE_DEVICES; the global batch must divide by the device count.
# Start a separate evaluation job on another GPU with --jaxline_mode=eval (same config and
# checkpoint_dir); it evaluates every new checkpoint and keeps the best in <checkpoint_dir>/best.
set -euo pipefail
config="${1:?usage: launch/single_node.sh CONFIG [flags...]}"
shift
cd "$(dirname "$0")/.."
exec python experiment.py --config="${config}" --jaxline_mode="${JAXLINE_MODE:-train}" "$@"
