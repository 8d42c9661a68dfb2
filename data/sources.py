"""Open ERA5-like sources lazily in the normalized layout used by the rest of `data/`.

Accepted inputs: zarr (local or gs://; v2 or v3; consolidated or not) in the WeatherBench2 ERA5
layout (time, level, latitude, longitude; latitude descending; 6-hourly) or the ARCO-ERA5 layout
(hourly, 37 levels, statics stored per time), and DeepMind-style netCDF (batch, time, [level,] lat,
lon plus a `datetime` coordinate). Output: dims time, level, lat, lon; lat ascending float32; lon in
[0, 360) float32; level int32 in task order; time absolute and 6-hourly; only the task's variables
plus the six progress features (`year_progress*` dims (time,), `day_progress*` dims (time, lon),
as the reference extraction makes them). Every step is lazy (dask); all checks in
`data.validate` run on metadata and coordinates before any data is read.
"""

import os
import warnings
from typing import Mapping, Optional, Sequence

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from data import gcs, validate
from graphcast import data_utils, solar_radiation
from graphcast.config import (ALL_ATMOSPHERIC_VARS, PROGRESS_VARS, STATIC_VARS, TIME_STEP, TISR,
                              TaskConfig)

TP6 = "total_precipitation_6hr"
TP_HOURLY = "total_precipitation"
RENAMES = {"latitude": "lat", "longitude": "lon", "pressure_level": "level"}
_NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf", ".h5", ".hdf5")


def task_variables(task_config: TaskConfig) -> list:
    """Input, target and forcing variable names of the task, without repeats, in that order."""
    names = task_config.input_variables + task_config.target_variables + \
        task_config.forcing_variables
    return list(dict.fromkeys(names))


def open_source(url: str, *, task_config: TaskConfig, resolution: Optional[float] = None,
                storage_options: Optional[dict] = None, chunks: Optional[Mapping] = None,
                allow_lon_shift: bool = True, strict_dims: bool = False,
                check_nans: bool = True, derive_forcings: bool = True,
                subsample_grid: bool = False, use_dask: bool = True) -> xr.Dataset:
    """Opens `url` (zarr dir, gs:// zarr, or netCDF file) lazily in the normalized layout.

    resolution: the model's grid spacing in degrees; the grid is checked against it if given.
    subsample_grid: a source grid k times finer than `resolution` is read at every k-th point
      (as DeepMind made its 1-degree data from 0.25-degree ERA5); every chunk is still read whole.
    chunks: dask chunks for opening (default: the on-disk chunks).
    allow_lon_shift: convert [-180, 180) longitudes to [0, 360) (else raise).
    strict_dims: raise on a variable whose dims are right but in another order (else transpose).
    check_nans: computing a chunk that holds a NaN raises NaNDataError (variable and time named).
    derive_forcings: add absent TOA radiation and progress features (else leave them out, e.g.
      to compute them after subsampling the grid).
    use_dask: False opens the stored variables as xarray's lazily indexed arrays: indexing one
      time reads just its chunks, with none of dask's per-task cost (what data.windows reads
      examples from). Only derived variables are dask-backed then, and the NaN check is left to
      the reader (attrs["check_nans"]); never call .values on a whole stored variable of it.
    """
    raw = open_raw(url, storage_options=storage_options, chunks=chunks, use_dask=use_dask)
    return normalize(raw, task_config=task_config, resolution=resolution, source=url,
                     allow_lon_shift=allow_lon_shift, strict_dims=strict_dims,
                     check_nans=check_nans, derive_forcings=derive_forcings,
                     subsample_grid=subsample_grid)


def is_netcdf(url: str) -> bool:
    if url.lower().endswith(_NETCDF_SUFFIXES):
        return True
    return not gcs.is_gcs(url) and os.path.isfile(url)


def open_raw(url: str, *, storage_options: Optional[dict] = None,
             chunks: Optional[Mapping] = None, use_dask: bool = True) -> xr.Dataset:
    """Opens the store as it is on disk (dask-backed unless `use_dask` is False), with errors
    that name `url`."""
    chunks = ({} if chunks is None else dict(chunks)) if use_dask else None
    if gcs.is_gcs(url):
        gcs.check_exists(url, storage_options)
    elif not os.path.exists(url):
        raise validate.SourceNotFoundError(f"{url} does not exist.")
    if is_netcdf(url):
        if gcs.is_gcs(url):
            fs = gcs.filesystem(url, storage_options)
            handle = gcs.with_retries(lambda: fs.open(url.split("://", 1)[1], "rb"), url=url)
            return xr.open_dataset(handle, engine="h5netcdf", chunks=chunks, cache=False)
        try:
            return xr.open_dataset(url, chunks=chunks, cache=False)
        except Exception as e:  # noqa: BLE001 -- empty, truncated or not netCDF: name the file
            raise validate.CorruptDataError(f"{url} is not a readable netCDF file (empty, "
                                            f"truncated or another format?): {e}") from e
    opts = gcs.gcs_storage_options(storage_options) if gcs.is_gcs(url) else storage_options
    with warnings.catch_warnings():
        # Non-consolidated stores are fine; xarray warns before falling back to listing.
        warnings.filterwarnings("ignore", message=".*consolidated metadata.*")
        if not use_dask:
            return gcs.with_retries(
                lambda: xr.open_dataset(url, engine="zarr", chunks=None, cache=False,
                                        storage_options=opts, consolidated=None), url=url)
        return gcs.with_retries(
            lambda: xr.open_zarr(url, chunks=chunks, storage_options=opts, consolidated=None),
            url=url)


def _squeeze_batch(ds: xr.Dataset, source: Optional[str]) -> xr.Dataset:
    """DeepMind layout: drop the size-1 batch dim and use `datetime` as the time coordinate."""
    if "batch" in ds.dims:
        if ds.sizes["batch"] != 1:
            raise validate.DimensionError(
                f"{source}: `batch` has size {ds.sizes['batch']}; only single-batch files (size 1) "
                "can be read as a time series.")
        ds = ds.isel(batch=0, drop=True)
    if "datetime" in ds.coords:
        absolute = ds["datetime"].values
        ds = ds.drop_vars("datetime").assign_coords(time=("time", absolute))
    elif "time" in ds.coords and np.issubdtype(ds["time"].dtype, np.timedelta64):
        raise validate.TimeSpacingError(f"{source}: `time` holds lead times (timedelta) and there "
                                        "is no `datetime` coordinate giving absolute times.")
    return ds


def _derivable(ds: xr.Dataset, step: pd.Timedelta) -> set:
    names = set(PROGRESS_VARS) | {TISR}
    if TP_HOURLY in ds.data_vars and step < TIME_STEP:
        names.add(TP6)
    return names


def _six_hourly(ds: xr.Dataset, step: pd.Timedelta, derive_tp6: bool) -> xr.Dataset:
    """Keeps 00/06/12/18 UTC times of a sub-6-hourly series; `total_precipitation_6hr` at t is
    the sum of the accumulations over the steps ending at t-6h+step .. t (six for hourly data)."""
    k = int(TIME_STEP // step)
    t = pd.DatetimeIndex(ds["time"].values)
    idx = np.nonzero(((t - t.normalize()) % TIME_STEP) == pd.Timedelta(0))[0]
    if derive_tp6:
        idx = idx[idx >= k - 1]  # only times whose whole 6 h window is in the data
    out = ds.drop_vars(TP_HOURLY, errors="ignore").isel(time=idx)
    if derive_tp6:
        tp = ds[TP_HOURLY]
        if tp.chunks is None:   # lazily indexed: a sum over all times must not load them
            tp = tp.chunk({"time": 1})
        total = sum(tp.isel(time=idx - j).data for j in range(k))  # (time, lat, lon)
        out[TP6] = (tp.dims, total, {**tp.attrs, "long_name": "6-hour accumulated precipitation",
                                     "derived_from": f"sum of {k} {TP_HOURLY} steps ending at t"})
    return out


def normalize(ds: xr.Dataset, *, task_config: TaskConfig, resolution: Optional[float] = None,
              source: Optional[str] = None, allow_lon_shift: bool = True,
              strict_dims: bool = False, check_nans: bool = True,
              derive_forcings: bool = True, subsample_grid: bool = False) -> xr.Dataset:
    """Validates metadata, then lazily reshapes `ds` into the normalized layout."""
    ds = _squeeze_batch(ds, source)
    ds = ds.rename({k: v for k, v in RENAMES.items() if k in ds.variables or k in ds.dims})
    for coord in ("time", "lat", "lon"):
        if coord not in ds.coords:
            raise validate.DimensionError(f"No `{coord}` coordinate in {source}; found coordinates "
                                          f"{sorted(ds.coords)}.")
    # --- metadata and coordinate checks: nothing below reads data until they all pass ---
    step = validate.check_time(ds["time"].values, source)
    wanted = task_variables(task_config)
    validate.check_variables(ds, wanted, source, derivable=_derivable(ds, step))
    atmospheric = [v for v in wanted if v in ALL_ATMOSPHERIC_VARS]
    levels = list(task_config.pressure_levels)
    if atmospheric:
        validate.check_levels(ds, levels, source)
    lat_step = validate.check_latitude(ds["lat"].values, source)
    shift_lon = validate.check_longitude(ds["lon"].values, source, allow_lon_shift)
    stride = grid_stride(ds["lat"].values, resolution) if subsample_grid and resolution else 1
    if resolution is not None and stride == 1:
        validate.check_grid(ds["lat"].values, ds["lon"].values, resolution, source)
    present = [v for v in wanted if v in ds.data_vars]
    reordered = validate.check_dims(ds, present, source, strict_order=strict_dims)
    derive_tp6 = TP6 in wanted and TP6 not in ds.data_vars
    # --- lazy reshaping ---
    keep = present + ([TP_HOURLY] if derive_tp6 else [])
    ds = ds[keep]
    for name in present:
        if name in STATIC_VARS and "time" in ds[name].dims:
            ds[name] = ds[name].isel(time=0, drop=True)
        if name in reordered:
            ds[name] = ds[name].transpose(*validate.expected_dims(name))
    if atmospheric:
        ds = ds.isel(level=level_indexer(ds["level"].values, levels))
        ds = ds.assign_coords(level=ds["level"].values.astype(np.int32))
    elif "level" in ds.dims or "level" in ds.coords:
        ds = ds.drop_dims("level", errors="ignore").drop_vars("level", errors="ignore")
    if step < TIME_STEP:
        ds = _six_hourly(ds, step, derive_tp6)
    if lat_step < 0:
        ds = ds.isel(lat=slice(None, None, -1))
    if shift_lon or np.any(np.diff(ds["lon"].values) < 0):
        ds = ds.assign_coords(lon=ds["lon"].values % 360).sortby("lon")
    ds = ds.assign_coords(time=ds["time"].values.astype("datetime64[ns]"),
                          lat=ds["lat"].values.astype(np.float32),
                          lon=ds["lon"].values.astype(np.float32))
    if stride > 1:
        ds = subsample(ds, resolution, source)
    if derive_forcings:
        ds = add_derived_forcings(ds, wanted)
    ds = ds[[v for v in wanted if v in ds.data_vars] +
            [v for v in PROGRESS_VARS if v in ds.data_vars and v not in wanted]]
    ds.attrs = {**ds.attrs, "normalized_from": source or "<dataset>", "subsample_stride": stride,
                "check_nans": int(check_nans)}
    return validate.nan_checked(ds) if check_nans else ds


def level_indexer(have: np.ndarray, levels: Sequence[int]):
    """Positions of `levels` in the stored `have`, as a slice when they are a run (the usual
    case: the store holds just the task's levels), so that reading one time stays a plain chunk
    read instead of an element-wise (orthogonal) selection."""
    positions = [int(np.nonzero(np.asarray(have) == lev)[0][0]) for lev in levels]
    step = positions[1] - positions[0] if len(positions) > 1 else 1
    if step in (1, -1) and positions == list(range(positions[0], positions[-1] + step, step)):
        stop = positions[-1] + step
        return slice(positions[0], None if stop < 0 else stop, step)
    return positions


def grid_stride(lat: np.ndarray, resolution: float) -> int:
    """k when `resolution` is k times the latitude spacing (k >= 1 whole), else 1."""
    ratio = resolution / abs(float(lat[1] - lat[0]))
    return int(round(ratio)) if ratio > 1 - 1e-6 and np.isclose(ratio, round(ratio), atol=1e-4) \
        else 1


def subsample(ds: xr.Dataset, resolution: float, source: str = "") -> xr.Dataset:
    """Every k-th lat/lon point of a dataset with `lat`/`lon` dims (lat ascending, poles included
    when subsampling), k = resolution / its spacing; the result must be the `resolution` grid."""
    found = float(abs(ds["lat"].values[1] - ds["lat"].values[0]))
    stride = resolution / found
    if stride < 1 - 1e-6 or not np.isclose(stride, round(stride), atol=1e-4):
        raise validate.GridMismatchError(
            f"Cannot subsample {source} from {found:g} deg to {resolution:g} deg: the target "
            "resolution must be a whole multiple of the source's.")
    k = int(round(stride))
    if (ds.sizes["lat"] - 1) % k:
        raise validate.GridMismatchError(
            f"{source}: {ds.sizes['lat']} latitudes cannot be subsampled by {k} keeping both "
            "poles (need (n_lat - 1) divisible by the stride).")
    out = ds.isel(lat=slice(None, None, k), lon=slice(None, None, k))
    validate.check_grid(out["lat"].values, out["lon"].values, resolution, source)
    return out


def _time_chunks(ds: xr.Dataset) -> tuple:
    for var in ds.data_vars.values():
        if "time" in var.dims and var.chunks is not None:
            return var.chunks[var.dims.index("time")]
    return (1,) * ds.sizes["time"]   # no dask variable: one task per time


def _toa_block(nanoseconds: np.ndarray, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    # One call per timestamp: batched calls can differ by an ulp with the batch size, and the
    # value must not depend on how the data happens to be chunked.
    times = nanoseconds.astype("datetime64[ns]")
    return np.concatenate([solar_radiation.toa_incident_solar_radiation(times[i:i + 1], lat, lon)
                           for i in range(len(times))])  # (time, lat, lon) float32


def toa_radiation(ds: xr.Dataset) -> xr.DataArray:
    """Lazy TOA incident solar radiation (J/m^2, hour ending at t) on the grid of `ds`, one dask
    task per time chunk of the data."""
    lat, lon = ds["lat"].values, ds["lon"].values
    nanoseconds = da.from_array(ds["time"].values.astype("datetime64[ns]").astype(np.int64),
                                chunks=(_time_chunks(ds),))
    data = da.map_blocks(_toa_block, nanoseconds, lat=lat, lon=lon, dtype=np.float32,
                         new_axis=[1, 2], meta=np.array((), np.float32),
                         chunks=(nanoseconds.chunks[0], (len(lat),), (len(lon),)))
    return xr.DataArray(data, dims=("time", "lat", "lon"),
                        coords={"time": ds["time"], "lat": ds["lat"], "lon": ds["lon"]},
                        attrs={"units": "J m**-2", "derived_from": "graphcast.solar_radiation"})


def add_derived_forcings(ds: xr.Dataset, wanted: Sequence[str]) -> xr.Dataset:
    """Adds TOA radiation (lazy) if wanted and absent, and the progress features if any is
    wanted."""
    if TISR in wanted and TISR not in ds.data_vars:
        ds[TISR] = toa_radiation(ds)
    if any(v in PROGRESS_VARS for v in wanted):
        ds = data_utils.add_derived_vars(ds)  # year_* (time,), day_* (time, lon); numpy
    return ds
