"""Derived forcings, input/target/forcing extraction, and dataset <-> array conversion.

Works on two dataset layouts with one code path:
  * DeepMind files: dims (batch, time, [level,] lat, lon), `time` holds lead timedeltas and a
    `datetime` coordinate (batch, time) holds the absolute timestamps;
  * the internal normalized layout: dims (time, [level,] lat, lon) with `time` itself datetime64.
"""

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from graphcast import solar_radiation
from graphcast.config import (DAY_PROGRESS, PROGRESS_VARS, TISR, YEAR_PROGRESS,
                              check_pressure_levels)

SECONDS_PER_DAY = 86400
AVG_DAYS_PER_YEAR = 365.24219

# Dimension order of every variable in the host batch layout (missing ones are skipped).
_CANONICAL_DIMS = ("batch", "time", "level", "lat", "lon")


# ----------------------------------------------------------------------------- progress


def seconds_since_epoch(timestamps: np.ndarray) -> np.ndarray:
    """Whole seconds since 1970-01-01T00:00 (sub-second parts truncated), int64, same shape."""
    return np.asarray(timestamps).astype("datetime64[s]").astype(np.int64)


def year_progress(seconds: np.ndarray) -> np.ndarray:
    """Fraction of a 365.24219-day year elapsed since the Unix epoch, float32 in [0, 1)."""
    years = seconds / SECONDS_PER_DAY / np.float64(AVG_DAYS_PER_YEAR)  # float64
    return np.mod(years, 1.0).astype(np.float32)


def day_progress(seconds: np.ndarray, lon_deg: np.ndarray) -> np.ndarray:
    """Local-solar-time proxy: fraction of the UTC day plus lon/360, float32 [..., W]."""
    utc_fraction = np.mod(seconds, SECONDS_PER_DAY) / SECONDS_PER_DAY  # float64
    lon_fraction = np.deg2rad(lon_deg) / (2 * np.pi)  # keeps lon's dtype (float32 in data)
    return np.mod(utc_fraction[..., np.newaxis] + lon_fraction, 1.0).astype(np.float32)


def progress_sin_cos(progress: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos of 2*pi*progress, evaluated in the progress dtype (float32)."""
    phase = progress * (2 * np.pi)
    return np.sin(phase), np.cos(phase)


def add_derived_vars(ds: xr.Dataset) -> xr.Dataset:
    """Returns `ds` plus year_progress(_sin/_cos) with the timestamps' dims (e.g. (batch, time))
    and day_progress(_sin/_cos) with dims (..., lon). A base variable already present is kept
    with its sin/cos. Needs a `datetime` (or datetime64 `time`) and a `lon` coordinate."""
    if "lon" not in ds.coords:
        raise ValueError("Progress features need a 'lon' coordinate; the dataset has "
                         f"{sorted(map(str, ds.coords))}.")
    times = solar_radiation.find_timestamps(ds)
    seconds = seconds_since_epoch(times.values)
    lon = ds.coords["lon"]
    new = {}
    for name, dims, compute in (
            (YEAR_PROGRESS, times.dims, lambda: year_progress(seconds)),
            (DAY_PROGRESS, times.dims + lon.dims, lambda: day_progress(seconds, lon.values))):
        if name in ds.data_vars:
            continue
        progress = compute()
        sin, cos = progress_sin_cos(progress)
        new.update({name: (dims, progress), f"{name}_sin": (dims, sin),
                    f"{name}_cos": (dims, cos)})
    return ds.assign(new)


def add_tisr_var(ds: xr.Dataset, *, tsi: solar_radiation.TsiTable | None = None) -> xr.Dataset:
    """Returns `ds` with toa_incident_solar_radiation (float32, timestamps' dims + (lat, lon))
    computed as in ERA5, unless it is already there. Any batch size works: each timestamp of
    the `datetime` coordinate is evaluated."""
    if TISR in ds.data_vars:
        return ds
    tisr = solar_radiation.toa_incident_solar_radiation_for_dataset(ds, tsi=tsi)
    return ds.assign({TISR: tisr.variable})


# ----------------------------------------------------------------------------- extraction


def _normalize_lead_times(target_lead_times: Any) -> tuple[Any, pd.Timedelta]:
    """(selector for `time`, target duration); lists are sorted Timedeltas, slices kept."""
    if isinstance(target_lead_times, slice):
        if target_lead_times.stop is None:
            raise ValueError("target_lead_times slice needs a stop (the last lead time), got "
                             f"{target_lead_times}.")
        start = target_lead_times.start
        if start is None:  # first lead time after the last input
            start = pd.Timedelta(1, "ns")
        return (slice(start, target_lead_times.stop, target_lead_times.step),
                pd.Timedelta(target_lead_times.stop))
    if not isinstance(target_lead_times, (list, tuple, set)):
        target_lead_times = [target_lead_times]
    lead_times = sorted(pd.Timedelta(t) for t in target_lead_times)
    if not lead_times:
        raise ValueError("target_lead_times is empty.")
    return lead_times, lead_times[-1]


def _as_lead_time_dataset(ds: xr.Dataset) -> xr.Dataset:
    """Internal layout -> DeepMind's: datetime64 `time` becomes a `datetime` coordinate and
    `time` becomes offsets from the first time (re-anchored later anyway)."""
    if "time" not in ds.coords:
        raise ValueError("The dataset has no 'time' coordinate; dims are "
                         f"{dict(ds.sizes)}.")
    time = ds.coords["time"]
    if np.issubdtype(time.dtype, np.datetime64):
        if "datetime" in ds.coords:
            raise ValueError("The dataset has both a datetime64 'time' and a 'datetime' "
                             "coordinate; keep only one source of absolute timestamps.")
        return ds.assign_coords(datetime=time.variable, time=(time - time[0]).variable)
    return ds


def _select_levels(ds: xr.Dataset, pressure_levels: Sequence[int]) -> xr.Dataset:
    """Levels by value in task order; a MissingLevelsError (a KeyError) naming the absent
    levels and those available."""
    if "level" not in ds.coords:
        return ds  # surface-only data: nothing to select, missing variables are reported later
    check_pressure_levels(ds.coords["level"].values, pressure_levels, "the dataset's 'level'")
    return ds.sel(level=list(pressure_levels))


def _split_times(ds: xr.Dataset, input_duration: Any, target_lead_times: Any
                 ) -> tuple[xr.Dataset, xr.Dataset]:
    """End-anchored split: the last time becomes the last target lead time, inputs are the
    times in (-input_duration, 0], targets the requested lead times."""
    selector, duration = _normalize_lead_times(target_lead_times)
    time = ds.coords["time"]
    ds = ds.assign_coords(time=time + duration - time[-1])
    lead = pd.TimedeltaIndex(ds.coords["time"].values)
    span = f"{len(lead)} times from {lead[0]} to {lead[-1]} relative to the last input"

    if isinstance(selector, slice):
        targets = ds.sel(time=selector)
        if targets.sizes["time"] == 0:
            raise ValueError(f"target_lead_times {selector} selects no time; the data has {span}.")
    else:
        absent = [str(t) for t in selector if t not in lead]
        if absent:
            raise ValueError(f"Target lead time(s) {absent} are not times of the data, which has "
                             f"{span}.")
        targets = ds.sel(time=selector)

    input_duration = pd.Timedelta(input_duration)
    step = lead[1] - lead[0] if len(lead) > 1 else input_duration
    if lead[0] > -input_duration + step:
        raise ValueError(
            f"The data is too short for input_duration={input_duration} and target lead times up "
            f"to {duration}: inputs need times from {-input_duration + step} to 0 but the data "
            f"has {span}. Provide more times or shorten the lead times.")
    if pd.Timedelta(0) not in lead:
        raise ValueError(f"No data time falls at lead time 0 (the last input): the data has "
                         f"{span}; target lead times must be multiples of the data time step.")
    inputs = ds.sel(time=slice(-input_duration + pd.Timedelta(1, "ns"), pd.Timedelta(0)))
    return inputs, targets


def extract_inputs_targets_forcings(
        dataset: xr.Dataset, *, input_variables: Sequence[str], target_variables: Sequence[str],
        forcing_variables: Sequence[str], pressure_levels: Sequence[int], input_duration: Any,
        target_lead_times: Any, **unused_task_fields: Any
) -> tuple[xr.Dataset, xr.Dataset, xr.Dataset]:
    """Splits an example into (inputs, targets, forcings) as the reference does.

    Levels are selected by value in `pressure_levels` order; progress features and TISR are
    derived when they are forcings and absent; `datetime` is dropped; `time` becomes lead time
    relative to the last input, anchored on the END of the dataset. Forcings are taken at the
    target times. Variables come in the order of the given lists. Extra keyword arguments
    (e.g. TaskConfig.loss_weights from dataclasses.asdict) are ignored.
    """
    overlap = [v for v in forcing_variables if v in set(target_variables)]
    if overlap:
        raise ValueError(f"{overlap} are both forcing_variables and target_variables; a variable "
                         "is either predicted or supplied.")
    ds = _as_lead_time_dataset(dataset)
    ds = _select_levels(ds, pressure_levels)
    if set(forcing_variables) & set(PROGRESS_VARS):
        ds = add_derived_vars(ds)
    if TISR in forcing_variables:
        ds = add_tisr_var(ds)
    requested = list(dict.fromkeys([*input_variables, *target_variables, *forcing_variables]))
    missing = [v for v in requested if v not in ds.data_vars]
    if missing:
        raise ValueError(f"Variable(s) {missing} requested by the task are missing from the "
                         f"dataset, which has {sorted(map(str, ds.data_vars))}.")
    ds = ds.drop_vars("datetime", errors="ignore")
    inputs, targets = _split_times(ds, input_duration, target_lead_times)
    return (inputs[list(input_variables)], targets[list(target_variables)],
            targets[list(forcing_variables)])


# ----------------------------------------------------------------------------- arrays


def dataset_to_arrays(ds: xr.Dataset, variables: Sequence[str]) -> dict[str, np.ndarray]:
    """Host batch layout (float32, C-contiguous) of `variables` of an extraction output.

    Dims order becomes (batch, time, [level,] lat, lon); missing batch/lat/lon axes are
    broadcast: statics (lat, lon) -> [B, H, W], year progress (batch, time) -> [B, T, H, W],
    day progress (batch, time, lon) -> [B, T, H, W]. B = the dataset's batch size (1 if it has
    no batch dim).
    """
    for dim in ("lat", "lon"):
        if dim not in ds.sizes:
            raise ValueError(f"dataset_to_arrays needs a '{dim}' dimension; dims are "
                             f"{dict(ds.sizes)}.")
    batch = ds.sizes.get("batch", 1)
    out = {}
    for name in variables:
        if name not in ds.data_vars:
            raise ValueError(f"Variable {name!r} is not in the dataset "
                             f"(has {sorted(map(str, ds.data_vars))}).")
        da = ds[name]
        unexpected = [d for d in da.dims if d not in _CANONICAL_DIMS]
        if unexpected:
            raise ValueError(f"Variable {name!r} has unexpected dim(s) {unexpected} (dims "
                             f"{da.dims}); expected a subset of {_CANONICAL_DIMS}.")
        present = [d for d in _CANONICAL_DIMS if d in da.dims]
        values = np.asarray(da.transpose(*present).values, dtype=np.float32)
        target_dims = ["batch"] + [d for d in ("time", "level") if d in da.dims] + ["lat", "lon"]
        # Insert size-1 axes for absent target dims, then broadcast them.
        shape = [da.sizes[d] if d in da.dims else 1 for d in target_dims]
        full = [batch if d == "batch" else ds.sizes[d] for d in target_dims]
        out[name] = np.ascontiguousarray(np.broadcast_to(values.reshape(shape), full))
    return out


def arrays_to_dataset(arrays: Mapping[str, np.ndarray], template: xr.Dataset) -> xr.Dataset:
    """Inverse of dataset_to_arrays for predictions: {var: [B, T, (L), H, W]} -> Dataset.

    Each array is labelled with its template variable's dims in the order
    (batch, time, [level,] lat, lon) and gets the template's coordinates.
    """
    data_vars = {}
    for name, array in arrays.items():
        if name not in template.data_vars:
            raise ValueError(f"Array {name!r} has no variable of that name in the template "
                             f"(has {sorted(map(str, template.data_vars))}).")
        dims = tuple(d for d in _CANONICAL_DIMS if d in template[name].dims)
        extra = [d for d in template[name].dims if d not in _CANONICAL_DIMS]
        if extra or "batch" not in dims:
            raise ValueError(f"Template variable {name!r} has dims {template[name].dims}; "
                             "expected batch, [time,] [level,] lat, lon.")
        expected = tuple(template.sizes[d] for d in dims)
        if tuple(np.shape(array)) != expected:
            raise ValueError(f"Array {name!r} has shape {tuple(np.shape(array))}, expected "
                             f"{expected} for dims {dims}.")
        data_vars[name] = (dims, np.asarray(array))
    coords = {k: c for k, c in template.coords.items()}
    return xr.Dataset(data_vars, coords=coords)
