"""data.stats: streamed dask statistics against a direct numpy computation."""

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from data import sample, stats
from graphcast import data_utils, normalization

LEVELS = np.array([50, 500, 1000], np.int32)


def _dataset(times):
    """Internal-layout dataset with offsets that would ruin naive float32 sums."""
    rng = np.random.default_rng(0)
    n, h, w = len(times), 5, 8
    lat = np.linspace(-90, 90, h, dtype=np.float32)
    lon = np.arange(w, dtype=np.float32) * 45
    ds = xr.Dataset(
        {"geopotential": (("time", "level", "lat", "lon"),
                          (5e5 + 3e3 * rng.normal(size=(n, 3, h, w))).astype(np.float32)),
         "2m_temperature": (("time", "lat", "lon"),
                            (280 + 10 * rng.normal(size=(n, h, w))).astype(np.float32)),
         "toa_incident_solar_radiation": (("time", "lat", "lon"),
                                          (1e6 * rng.random((n, h, w))).astype(np.float32)),
         "land_sea_mask": (("lat", "lon"), rng.random((h, w)).astype(np.float32))},
        coords={"time": times, "level": LEVELS, "lat": lat, "lon": lon})
    return ds.chunk({"time": 1})


def _numpy_stats(ds):
    """Direct numpy reference: population mean/std; std of differences of 6 h pairs."""
    ds = data_utils.add_derived_vars(ds).compute()
    dt = np.diff(ds["time"].values)
    pairs = np.nonzero(dt == np.timedelta64(6, "h"))[0]
    out = {}
    for name, var in ds.data_vars.items():
        x = var.values.astype(np.float64)
        if "level" in var.dims:
            x = np.moveaxis(x, var.dims.index("level"), 0).reshape(len(LEVELS), -1)
            axis = 1
        else:
            x, axis = x.reshape(-1), 0
        out[name] = [x.mean(axis), x.std(axis)]
        if "time" in var.dims:
            v = var.values.astype(np.float64)
            t_ax = var.dims.index("time")
            d = np.take(v, pairs + 1, axis=t_ax) - np.take(v, pairs, axis=t_ax)
            dims = [dd for dd in var.dims]
            if "level" in dims:
                d = np.moveaxis(d, dims.index("level"), 0).reshape(len(LEVELS), -1)
                out[name].append(d.std(1))
            else:
                out[name].append(d.reshape(-1).std())
    return out


def _check(result, expected):
    mean, std, diffs = result
    for name, values in expected.items():
        for dataset, want in zip((mean, std, diffs), values):
            got = dataset[name].values
            assert dataset[name].dtype == np.float64
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12, err_msg=name)
    assert "land_sea_mask" not in diffs and "land_sea_mask" in std
    assert mean["geopotential"].dims == ("level",) and mean["2m_temperature"].dims == ()
    assert mean["level"].dtype == np.int32


def test_matches_numpy_with_blocks_and_gap():
    times = pd.date_range("2016-02-27", periods=30, freq="6h").values
    times = np.concatenate([times[:17], times[18:]])   # a gap: one 12 h step is not a pair
    ds = _dataset(times)
    expected = _numpy_stats(ds)
    for block_size in (4, 256):   # blocks overlap by one step: pairs across blocks are counted
        _check(stats.compute_stats(ds, block_size=block_size), expected)
    mean = stats.compute_stats(ds)[0]
    for name in data_utils.PROGRESS_VARS:
        assert mean[name].dims == ()


def test_cli_on_local_cluster_matches_threaded(tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    wb2 = sample.generate(seed=2, resolution=30.0, start="2020-01-01", days=2)
    path = str(tmp_path / "wb2.zarr")
    sample.write(wb2, path)
    local = stats.run(path, "2020-01-01", "2020-01-02", str(tmp_path / "threads"), block_size=3)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster:
        stats.main(["--source", path, "--start", "2020-01-01", "--end", "2020-01-02",
                    "--out", str(tmp_path / "cluster"), "--scheduler", cluster.scheduler_address])
    for i, name in enumerate(normalization.STATS_FILES.values()):
        got = xr.load_dataset(tmp_path / "cluster" / name)
        assert set(got.data_vars) == set(local[i].data_vars)
        for var in got.data_vars:
            np.testing.assert_allclose(got[var].values, local[i][var].values, rtol=1e-9, atol=1e-12)
    # The range holds 8 times (two days, whole last day included).
    direct = _numpy_stats_wb2(path)
    np.testing.assert_allclose(local[0]["temperature"].values, direct, rtol=1e-6)


def _numpy_stats_wb2(path):
    t = xr.open_zarr(path)["temperature"].values.astype(np.float64)
    assert t.shape[0] == 8
    return t.mean(axis=(0, 2, 3))
