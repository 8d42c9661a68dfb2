"""Roll a checkpoint forward on a DeepMind-style example file and write the predictions.

    python -m graphcast.predict --checkpoint CKPT.npz --dataset DATA.nc --stats-dir DIR \
        --steps N --output OUT.nc [--bf16]

Every path may also be a URL (gs://bucket/name; spaces in names are fine).

The dataset has dims `batch, time, [level,] lat, lon` and a `datetime` coordinate. Inputs,
targets and forcings are extracted exactly as the reference does for target lead times
6 h .. 6N h (anchored on the end of the file); the predictions are written in the targets'
layout, with lead times as the `time` coordinate.
"""

import argparse
import io
import logging
import time

import jax
import jax.numpy as jnp
import xarray as xr

from graphcast import checkpoint as checkpoint_lib
from graphcast import data_utils
from graphcast import files
from graphcast import normalization
from graphcast import rollout


def predict_dataset(ckpt: checkpoint_lib.CheckPoint, dataset: xr.Dataset,
                    stats: normalization.Stats, steps: int, bf16: bool = False) -> xr.Dataset:
    """Predictions for `steps` 6-hourly steps after the input window of `dataset`."""
    task = ckpt.task_config
    checkpoint_lib.check_grid(ckpt, dataset["lat"].values)
    inputs, targets, forcings = data_utils.extract_inputs_targets_forcings(
        dataset, target_lead_times=slice("6h", f"{6 * steps}h"), **task.official_fields())
    if targets.sizes.get("time", 0) != steps:
        raise ValueError(f"The dataset holds {targets.sizes.get('time', 0)} target times after "
                         f"its input window, but --steps={steps} were requested.")
    predictor = rollout.Predictor(ckpt.model_config, task, stats, dataset["lat"].values,
                                  dataset["lon"].values, bf16=bf16)
    params = jax.tree.map(jnp.asarray, ckpt.params)
    predictions = jax.jit(predictor.predict, static_argnums=3)(
        params, data_utils.dataset_to_arrays(inputs, task.input_variables),
        data_utils.dataset_to_arrays(forcings, task.forcing_variables), steps)
    return data_utils.arrays_to_dataset(jax.device_get(predictions), targets)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="official-format .npz checkpoint")
    parser.add_argument("--dataset", required=True, help="DeepMind-style example .nc")
    parser.add_argument("--stats-dir", required=True,
                        help="folder with mean_by_level.nc, stddev_by_level.nc, "
                             "diffs_stddev_by_level.nc")
    parser.add_argument("--steps", type=int, required=True, help="6-hour steps to predict")
    parser.add_argument("--output", required=True, help="netCDF file to write")
    parser.add_argument("--bf16", action="store_true", help="run the network in bfloat16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    ckpt = checkpoint_lib.load(args.checkpoint)
    stats = normalization.load_stats(args.stats_dir, ckpt.task_config)
    dataset = xr.load_dataset(io.BytesIO(files.read_bytes(args.dataset))) \
        if files.is_url(args.dataset) else xr.load_dataset(args.dataset)
    start = time.time()
    predictions = predict_dataset(ckpt, dataset, stats, args.steps, bf16=args.bf16)
    if files.is_url(args.output):
        files.write_bytes(args.output, predictions.to_netcdf(engine="h5netcdf"))
    else:
        predictions.to_netcdf(args.output)
    logging.info("Wrote %d steps of %s to %s in %.1f s.", args.steps,
                 sorted(predictions.data_vars), args.output, time.time() - start)


if __name__ == "__main__":
    main()
