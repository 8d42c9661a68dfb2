"""Normalization statistics (mean, stddev, stddev of 6 h differences) streamed with dask.

Output is the official layout (spec section 9): `mean_by_level.nc`, `stddev_by_level.nc`,
`diffs_stddev_by_level.nc`; one float64 variable per name; atmospheric variables have dim
`level` (int32 hPa), everything else is a 0-d scalar. Statistics are unweighted over time,
lat and lon (what the normalization expects), population std (ddof 0). Static variables get
mean/stddev only; progress features and TOA radiation are included as the inputs carry them.

Streaming: the time axis is processed in blocks; per block, dask reduces shifted sums and
sums of squares in float64 chunk by chunk (never the whole array in memory); blocks are added
in numpy. A distributed cluster is used when `--scheduler ADDRESS` is given.

Usage: python -m data.stats --source URL --start DATE --end DATE --out DIR
           [--scheduler ADDRESS] [--levels 13|37] [--block-size N]
"""

import argparse
import dataclasses
import os
from typing import Optional

import dask
import dask.array as da
import numpy as np
import xarray as xr

from graphcast import config
from graphcast import data_utils
from graphcast import files
from graphcast.config import TIME_STEP, TISR
from graphcast.normalization import STATS_FILES


@dataclasses.dataclass
class _Sums:
    """Running float64 sums of (x - shift) and (x - shift)^2, per level or scalar."""
    shift: np.ndarray
    count: int = 0
    total: np.ndarray = 0.0
    squares: np.ndarray = 0.0

    def add(self, count: int, total: np.ndarray, squares: np.ndarray) -> None:
        self.count += count
        self.total = self.total + total
        self.squares = self.squares + squares

    def mean_std(self) -> tuple:
        if self.count == 0:
            raise ValueError("No values to compute statistics from.")
        mean = self.total / self.count
        var = np.maximum(self.squares / self.count - mean ** 2, 0.0)
        return self.shift + mean, np.sqrt(var)


def _level_first(var: xr.DataArray) -> tuple:
    """(float64 dask array with `level` first if present, reduction axes, has_level, dims)."""
    has_level = "level" in var.dims
    if has_level:
        var = var.transpose("level", *[d for d in var.dims if d != "level"])
    data = da.asarray(var.data).astype(np.float64)
    axes = tuple(range(1 if has_level else 0, data.ndim))
    return data, axes, has_level, var.dims


def _shifted_sums(data: da.Array, axes: tuple, shift: np.ndarray) -> tuple:
    """Lazy (count, sum, sum of squares) of data - shift over axes."""
    shape = shift.shape + (1,) * (data.ndim - shift.ndim)
    centred = data - shift.reshape(shape)
    count = int(np.prod([data.shape[a] for a in axes]))
    return count, centred.sum(axis=axes), (centred ** 2).sum(axis=axes)


def _first_values(data: da.Array, axes: tuple, time_axis: int) -> da.Array:
    """Mean of the first time frame (lazy); used as the shift that keeps sums well conditioned."""
    first = da.take(data, [0], axis=time_axis)
    return first.mean(axis=axes)


def _pair_indices(times: np.ndarray) -> np.ndarray:
    """Indices i such that times[i + 1] - times[i] == TIME_STEP (pairs across a gap are
    skipped)."""
    return np.nonzero(np.diff(times) == TIME_STEP.to_timedelta64())[0]


def with_forcings(ds: xr.Dataset) -> xr.Dataset:
    """Adds the progress features (graphcast.data_utils) and lazy TOA radiation if absent."""
    if TISR not in ds.data_vars:
        from data import sources
        ds = ds.assign({TISR: sources.toa_radiation(ds)})
    return data_utils.add_derived_vars(ds)


def compute_stats(ds: xr.Dataset, *, block_size: int = 256) -> tuple:
    """(mean, stddev, diffs_stddev) Datasets of an internal-layout dataset, float64.

    ds: dims time, [level,] lat, lon (dask- or numpy-backed); every data variable is used,
        plus TOA radiation and progress features (added if absent); variables without `time`
        are static (mean/stddev only). The time axis is processed in
        blocks of `block_size` steps (each block overlaps the previous one by one step so that
        every 6 h pair is counted once). Runs on the current dask scheduler / client.
    """
    if "time" not in ds.dims or ds.sizes["time"] < 2:
        raise ValueError(f"Statistics need at least 2 times; dataset has dims {dict(ds.sizes)}.")
    ds = with_forcings(ds)
    times = ds["time"].values.astype("datetime64[ns]")
    names = list(ds.data_vars)
    dynamic = [n for n in names if "time" in ds[n].dims]
    static = [n for n in names if n not in dynamic]
    prepared = {n: _level_first(ds[n]) for n in names}
    time_axis = {n: prepared[n][3].index("time") for n in dynamic}
    sums, diffs = {}, {}
    # Shifts: mean of the first frame for values, of the first difference for diffs.
    pair0 = _pair_indices(times[:2])
    lazy = {}
    for n in dynamic:
        data, axes = prepared[n][:2]
        lazy[n] = _first_values(data, axes, time_axis[n])
        if pair0.size:
            first_diff = (da.take(data, [1], axis=time_axis[n])
                          - da.take(data, [0], axis=time_axis[n]))
            lazy[n + "/diff"] = first_diff.mean(axis=axes)
    for n in static:
        data, axes = prepared[n][:2]
        lazy[n] = data.mean(axis=axes)
    (shifts,) = dask.compute(lazy)
    for n in names:
        sums[n] = _Sums(shift=np.asarray(shifts[n], np.float64))
    for n in dynamic:
        diffs[n] = _Sums(shift=np.asarray(shifts.get(n + "/diff", 0.0), np.float64))
    # Statics: one pass.
    results = dask.compute({n: _shifted_sums(*prepared[n][:2], sums[n].shift) for n in static})[0]
    for n, parts in results.items():
        sums[n].add(*parts)
    # Time-dependent variables: blocks of time.
    for start in range(0, len(times), block_size):
        stop = min(start + block_size, len(times))
        lo = max(start - 1, 0)                          # one step of overlap for the pairs
        pairs = _pair_indices(times[lo:stop])           # relative to lo
        lazy = {}
        for n in dynamic:
            data, axes = prepared[n][:2]
            ax = time_axis[n]
            block = data[(slice(None),) * ax + (slice(lo, stop),)]
            own = block[(slice(None),) * ax + (slice(start - lo, None),)]
            lazy[n] = _shifted_sums(own, axes, sums[n].shift)
            if pairs.size:
                later = da.take(block, pairs + 1, axis=ax)
                earlier = da.take(block, pairs, axis=ax)
                lazy[n + "/diff"] = _shifted_sums(later - earlier, axes, diffs[n].shift)
        (results,) = dask.compute(lazy)
        for key, parts in results.items():
            (diffs if key.endswith("/diff") else sums)[key.split("/")[0]].add(*parts)
    return _to_datasets(ds, sums, diffs, prepared)


def _to_datasets(ds: xr.Dataset, sums: dict, diffs: dict, prepared: dict) -> tuple:
    level = ds["level"].values.astype(np.int32) if "level" in ds.coords else None
    mean, std, diff_std = {}, {}, {}

    def as_var(values, has_level):
        return (("level",), values) if has_level else ((), float(values))

    for n, acc in sums.items():
        m, s = acc.mean_std()
        mean[n], std[n] = as_var(m, prepared[n][2]), as_var(s, prepared[n][2])
    for n, acc in diffs.items():
        if acc.count:
            diff_std[n] = as_var(acc.mean_std()[1], prepared[n][2])
    coords = {"level": level} if level is not None else {}
    attrs = {"source": ds.attrs.get("normalized_from", ""),
             "time_range": f"{ds['time'].values[0]} .. {ds['time'].values[-1]}",
             "method": "unweighted over time, lat, lon; population std; diffs of 6 h pairs"}
    return tuple(xr.Dataset(v, coords=coords, attrs=attrs).astype(np.float64)
                 for v in (mean, std, diff_std))


def write_stats(stats: tuple, out_dir: str, storage_options: Optional[dict] = None) -> None:
    """Writes (mean, stddev, diffs_stddev) as the three official netCDF files into out_dir, a
    folder or a URL prefix (gs://bucket/stats)."""
    if not files.is_url(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    for name, dataset in zip(STATS_FILES.values(), stats):
        files.write_bytes(files.join(out_dir, name), dataset.to_netcdf(engine="h5netcdf"),
                          storage_options)


def _time_chunk(ds: xr.Dataset, chunk_bytes: int, block_size: int) -> int:
    """Time steps per dask chunk so that one variable's chunk holds about chunk_bytes."""
    largest = max(4 * int(np.prod([n for d, n in v.sizes.items() if d != "time"]))
                  for v in ds.data_vars.values() if "time" in v.dims)
    return int(max(1, min(block_size, chunk_bytes // largest)))


def run(source: str, start: str, end: str, out_dir: str, *, scheduler: Optional[str] = None,
        num_levels: int = 13, block_size: int = 256, chunk_bytes: int = 64 * 2 ** 20) -> tuple:
    """Opens `source` (data.sources), selects [start, end] (dates inclusive), computes and writes
    the statistics; on the dask.distributed cluster at `scheduler` if given. Time steps are
    grouped into dask chunks of about `chunk_bytes` per variable."""
    from data import sources
    task = config.task_on_levels(num_levels)
    ds = sources.open_source(source, task_config=task)
    steps = _time_chunk(ds, chunk_bytes, block_size)
    if steps > 1:   # fewer, larger dask tasks: several times faster on small grids
        ds = sources.open_source(source, task_config=task, chunks={"time": steps})
    ds = ds.sel(time=slice(start, end))
    if ds.sizes["time"] < 2:
        raise ValueError(f"{source} has {ds.sizes['time']} times between {start} and {end}; "
                         "statistics need at least 2.")
    client = None
    if scheduler:
        from dask import distributed
        client = distributed.Client(scheduler)
    try:
        stats = compute_stats(ds, block_size=block_size)
    finally:
        if client is not None:
            client.close()
    write_stats(stats, out_dir)
    return stats


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, help="zarr dir, gs:// zarr or netCDF file")
    parser.add_argument("--start", required=True, help="first date (inclusive)")
    parser.add_argument("--end", required=True, help="last date (inclusive)")
    parser.add_argument("--out", required=True, help="output folder or URL (gs://bucket/stats)")
    parser.add_argument("--scheduler", default=None, help="dask.distributed scheduler address")
    parser.add_argument("--levels", type=int, default=13, help="13 or 37 pressure levels")
    parser.add_argument("--block-size", type=int, default=256, help="time steps per dask pass")
    args = parser.parse_args(argv)
    run(args.source, args.start, args.end, args.out, scheduler=args.scheduler,
        num_levels=args.levels, block_size=args.block_size)
    print(f"wrote {', '.join(STATS_FILES.values())} to {args.out}")


if __name__ == "__main__":
    main()
