"""Normalization of inputs and forcings, and residual targets.

Inputs and forcings are normalized with `(x - mean) / stddev`. A target that is
also an input is predicted as a residual of its last input frame, scaled by the
standard deviation of 6-hour differences (no mean); a target that is not an input
is predicted directly with the input statistics. Everything runs in float32.
"""

import dataclasses
import io
from typing import Mapping, Optional

import jax
import numpy as np
import xarray as xr

from graphcast import config as config_lib
from graphcast import files

STATS_FILES = {"mean": "mean_by_level.nc", "stddev": "stddev_by_level.nc",
               "diffs_stddev": "diffs_stddev_by_level.nc"}


class StatsError(ValueError):
    """Normalization statistics that do not cover the task."""


class MissingStatsLevelsError(StatsError, config_lib.MissingLevelsError):
    """A statistics file lacks pressure levels of the task."""


@dataclasses.dataclass(frozen=True)
class Stats:
    """Per-variable statistics as float32 arrays: scalars, or `[L]` in task level order."""
    mean: Mapping[str, np.ndarray]
    stddev: Mapping[str, np.ndarray]
    diffs_stddev: Mapping[str, np.ndarray]


def required_statistics(task_config: config_lib.TaskConfig) -> dict:
    """Which variables each statistics file must provide for this task."""
    inputs = set(task_config.input_variables)
    direct_targets = set(task_config.target_variables) - inputs
    return {
        "mean": sorted(inputs | set(task_config.forcing_variables) | direct_targets),
        "stddev": sorted(inputs | set(task_config.forcing_variables) | direct_targets),
        "diffs_stddev": sorted(set(task_config.target_variables) & inputs),
    }


def stats_from_datasets(datasets: Mapping[str, xr.Dataset], task_config: config_lib.TaskConfig,
                        source: str = "statistics") -> Stats:
    """Selects the task's variables and levels (by value, in task order) from the three datasets."""
    levels = list(task_config.pressure_levels)
    selected = {}
    for kind, names in required_statistics(task_config).items():
        ds = datasets[kind]
        where = f"{source}/{STATS_FILES[kind]}"
        missing = [v for v in names if v not in ds.data_vars]
        if missing:
            raise StatsError(f"{where} has no statistics for {missing}; recompute the statistics "
                             "(python -m data.stats) for this task's variables.")
        values = {}
        for v in names:
            da = ds[v]
            if "level" in da.dims:
                config_lib.check_pressure_levels(da["level"].values, levels,
                                                 f"{where}: variable {v!r}",
                                                 MissingStatsLevelsError)
                da = da.sel(level=levels)
            values[v] = np.asarray(da.values, dtype=np.float32)
        selected[kind] = values
    stats = Stats(**selected)
    check_values(stats, task_config, source)
    return stats


def check_values(stats: Stats, task_config: config_lib.TaskConfig,
                 source: str = "statistics") -> None:
    """Every statistic is finite and every spread positive (training divides by them)."""
    for kind in STATS_FILES:
        for v, values in getattr(stats, kind).items():
            values = np.atleast_1d(values)
            bad = ~np.isfinite(values) | ((values <= 0) if kind != "mean" else False)
            if bad.any():
                where = [int(task_config.pressure_levels[i]) for i in np.flatnonzero(bad)] \
                    if values.size > 1 else None
                raise StatsError(
                    f"{source}/{STATS_FILES[kind]}: {v!r} has {values[bad].tolist()}"
                    f"{f' at levels {where}' if where else ''}; a {kind} must be finite"
                    f"{' and positive' if kind != 'mean' else ''}. Recompute the statistics "
                    "(python -m data.stats) from finite data.")


def load_stats(stats_dir: str, task_config: config_lib.TaskConfig,
               storage_options: Optional[dict] = None) -> Stats:
    """Reads `mean_by_level.nc`, `stddev_by_level.nc`, `diffs_stddev_by_level.nc` from a folder
    or URL prefix (e.g. gs://dm_graphcast/stats)."""
    datasets = {}
    for kind, filename in STATS_FILES.items():
        path = files.join(stats_dir, filename)
        try:
            data = files.read_bytes(path, storage_options)
        except FileNotFoundError as e:
            raise StatsError(f"Normalization statistics file {path} does not exist; expected "
                             f"{sorted(STATS_FILES.values())} in {stats_dir}.") from e
        except PermissionError as e:
            raise StatsError(f"Reading normalization statistics: {e}") from e
        datasets[kind] = xr.load_dataset(io.BytesIO(data))
    return stats_from_datasets(datasets, task_config, source=stats_dir)


def _broadcastable(stat: np.ndarray, x: jax.Array) -> np.ndarray:
    """A `[L]` statistic against `[..., L, H, W]` data; scalars as they are."""
    return stat.reshape(stat.shape + (1, 1)) if stat.ndim == 1 else stat


def normalize(arrays: Mapping[str, jax.Array], stats: Stats) -> dict:
    """`(x - mean) / stddev` for every variable (inputs and forcings)."""
    return {v: (x - _broadcastable(stats.mean[v], x)) / _broadcastable(stats.stddev[v], x)
            for v, x in arrays.items()}


def normalize_targets(targets: Mapping[str, jax.Array], inputs: Mapping[str, jax.Array],
                      stats: Stats) -> dict:
    """Targets in the network's output space: residuals of the last input frame where possible."""
    result = {}
    for v, t in targets.items():
        if v in inputs:
            last = inputs[v][:, -1:]
            result[v] = (t - last) / _broadcastable(stats.diffs_stddev[v], t)
        else:
            result[v] = (t - _broadcastable(stats.mean[v], t)) / _broadcastable(stats.stddev[v], t)
    return result


def denormalize_outputs(outputs: Mapping[str, jax.Array], inputs: Mapping[str, jax.Array],
                        stats: Stats) -> dict:
    """Network outputs -> physical predictions (inverse of `normalize_targets`)."""
    result = {}
    for v, y in outputs.items():
        if v in inputs:
            result[v] = y * _broadcastable(stats.diffs_stddev[v], y) + inputs[v][:, -1:]
        else:
            result[v] = y * _broadcastable(stats.stddev[v], y) + _broadcastable(stats.mean[v], y)
    return result
