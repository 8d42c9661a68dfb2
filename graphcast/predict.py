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
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from graphcast import checkpoint as checkpoint_lib
from graphcast import data_utils
from graphcast import exit_status
from graphcast import files
from graphcast import normalization
from graphcast import rollout
from graphcast.config import TIME_STEP, TIME_STEP_HOURS


class InputDataError(ValueError):
    """The example file is unreadable, or its inputs or forcings hold NaN/Inf."""


class OutputLocationError(OSError):
    """--output cannot be written (its directory does not exist or is not writable)."""


def check_finite_inputs(arrays: dict, times, what: str, path: str) -> None:
    """Raises InputDataError naming the variable and times of the first NaN/Inf in `arrays`
    ({var: [B, T, ...]}); a NaN would spread over most of the forecast."""
    for name, values in arrays.items():
        bad = ~np.isfinite(np.asarray(values))
        if bad.any():
            per_time = bad.reshape(bad.shape[0], bad.shape[1], -1).any(axis=(0, 2)) \
                if bad.ndim >= 4 else np.zeros(0, bool)
            where = [str(times[i]) for i in np.flatnonzero(per_time)] \
                if times is not None and len(times) == per_time.size else []
            raise InputDataError(f"{path}: {what} variable {name!r} holds NaN/Inf"
                                 f"{f' at {where}' if where else ''}; fill or drop those times.")


def check_output(path: str) -> None:
    """The output's directory exists and is writable, before any forecast is computed. A URL is
    tested by writing the (empty) output object, which the forecast then overwrites."""
    if files.is_url(path):
        try:
            files.write_bytes(path, b"")
        except Exception as e:  # noqa: BLE001 -- missing bucket, 403, unreachable: name the URL
            raise OutputLocationError(f"--output {path} cannot be written: {e}") from e
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise OutputLocationError(f"--output {path}: directory {directory} does not exist or is "
                                  "not writable; create it first.")


def predict_dataset(ckpt: checkpoint_lib.CheckPoint, dataset: xr.Dataset,
                    stats: normalization.Stats, steps: int, bf16: bool = False,
                    source: str = "dataset") -> xr.Dataset:
    """Predictions for `steps` time steps (TIME_STEP each) after the input window of `dataset`
    (read from `source`, named in errors)."""
    task = ckpt.task_config
    checkpoint_lib.check_grid(ckpt, dataset["lat"].values)
    inputs, targets, forcings = data_utils.extract_inputs_targets_forcings(
        dataset, target_lead_times=slice(TIME_STEP, steps * TIME_STEP), **task.official_fields())
    if targets.sizes.get("time", 0) != steps:
        raise ValueError(f"The dataset holds {targets.sizes.get('time', 0)} target times after "
                         f"its input window, but --steps={steps} were requested.")
    checkpoint_lib.check_finite(ckpt)
    input_arrays = data_utils.dataset_to_arrays(inputs, task.input_variables)
    forcing_arrays = data_utils.dataset_to_arrays(forcings, task.forcing_variables)
    # Absolute times of the input and target frames: the targets are the file's last `steps`.
    dates = np.asarray(dataset["datetime"].values) if "datetime" in dataset.coords else None
    dates = dates[0] if dates is not None and dates.ndim == 2 else dates
    n_in = inputs.sizes["time"]
    for what, arrays, times in (
            ("input", input_arrays, None if dates is None else dates[-steps - n_in:-steps]),
            ("forcing", forcing_arrays, None if dates is None else dates[-steps:])):
        check_finite_inputs(arrays, times, what, source)
    predictor = rollout.Predictor(ckpt.model_config, task, stats, dataset["lat"].values,
                                  dataset["lon"].values, bf16=bf16)
    params = jax.tree.map(jnp.asarray, ckpt.params)
    predictions = jax.jit(predictor.predict, static_argnums=3)(
        params, input_arrays, forcing_arrays, steps)
    return data_utils.arrays_to_dataset(jax.device_get(predictions), targets)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="official-format .npz checkpoint")
    parser.add_argument("--dataset", required=True, help="DeepMind-style example .nc")
    parser.add_argument("--stats-dir", required=True,
                        help=f"folder with {', '.join(normalization.STATS_FILES.values())}")
    parser.add_argument("--steps", type=int, required=True,
                        help=f"{TIME_STEP_HOURS}-hour steps to predict")
    parser.add_argument("--output", required=True, help="netCDF file to write")
    parser.add_argument("--bf16", action="store_true", help="run the network in bfloat16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    exit_status.run_reporting(lambda: _run(args), (
        (OutputLocationError, exit_status.LOCATION), (InputDataError, exit_status.DATA),
        (normalization.StatsError, exit_status.STATS),
        (checkpoint_lib.CheckpointError, exit_status.CHECKPOINT)))


def _run(args) -> None:
    check_output(args.output)
    ckpt = checkpoint_lib.load(args.checkpoint)
    checkpoint_lib.check_finite(ckpt, source=args.checkpoint)
    stats = normalization.load_stats(args.stats_dir, ckpt.task_config)
    try:
        dataset = xr.load_dataset(io.BytesIO(files.read_bytes(args.dataset))) \
            if files.is_url(args.dataset) else xr.load_dataset(args.dataset)
    except Exception as e:  # noqa: BLE001 -- empty, truncated or not netCDF: name the file
        raise InputDataError(f"--dataset {args.dataset} is not a readable netCDF file: {e}") from e
    start = time.time()
    predictions = predict_dataset(ckpt, dataset, stats, args.steps, bf16=args.bf16,
                                  source=args.dataset)
    if files.is_url(args.output):
        files.write_bytes(args.output, predictions.to_netcdf(engine="h5netcdf"))
    else:
        predictions.to_netcdf(args.output)
    logging.info("Wrote %d steps of %s to %s in %.1f s.", args.steps,
                 sorted(predictions.data_vars), args.output, time.time() - start)


if __name__ == "__main__":
    main()
