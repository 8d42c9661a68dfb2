"""data.sample: WeatherBench2 layout, determinism, physical coherence, CLI with statistics."""

import os

import numpy as np
import pytest
import xarray as xr

from data import sample
from graphcast import config

ALL_VARS = set(config.TARGET_SURFACE_VARS + config.TARGET_ATMOSPHERIC_VARS
               + config.EXTERNAL_FORCING_VARS + config.STATIC_VARS)


@pytest.fixture(scope="module")
def small():
    return sample.generate(seed=3, resolution=15.0, start="2020-03-01", days=3)


def test_weatherbench2_layout(small):
    assert set(small.data_vars) == ALL_VARS
    assert small["temperature"].dims == ("time", "level", "latitude", "longitude")
    assert small["2m_temperature"].dims == ("time", "latitude", "longitude")
    assert small["land_sea_mask"].dims == ("latitude", "longitude")
    lat = small["latitude"].values
    assert lat[0] == 90 and lat[-1] == -90 and np.all(np.diff(lat) < 0)
    assert small["longitude"].values[0] == 0 and small["longitude"].values[-1] == 345
    assert tuple(small["level"].values) == config.PRESSURE_LEVELS_WEATHERBENCH_13
    assert np.all(np.diff(small["time"].values) == np.timedelta64(6, "h"))
    assert small.sizes["time"] == 12
    assert all(v.dtype == np.float32 for v in small.data_vars.values())
    assert small.attrs["synthetic"] == "true" and "SYNTHETIC" in small.attrs["description"]


def test_deterministic_bitwise(small):
    again = sample.generate(seed=3, resolution=15.0, start="2020-03-01", days=3)
    for name in small.data_vars:
        assert small[name].values.tobytes() == again[name].values.tobytes(), name
    other = sample.generate(seed=4, resolution=15.0, start="2020-03-01", days=3)
    assert not np.array_equal(other["geopotential"].values, small["geopotential"].values)


def test_physically_coherent(small):
    z = small["geopotential"].values   # levels ascending in hPa: height decreases along axis 1
    assert np.all(np.diff(z, axis=1) < 0)
    t = small["temperature"].sel(level=1000).values
    assert 200 < t.min() and t.max() < 320
    assert 0 <= small["land_sea_mask"].values.min() and small["land_sea_mask"].values.max() <= 1
    precip = small["total_precipitation_6hr"].values
    assert precip.min() >= 0 and 0.2 < np.mean(precip == 0) < 0.9
    msl = small["mean_sea_level_pressure"].values
    assert 9.5e4 < msl.min() and msl.max() < 1.06e5
    q = small["specific_humidity"].values
    assert q.min() > 0 and q.max() < 0.03


def test_dynamics_beat_persistence():
    """Linear extrapolation from two frames beats persistence: the fields move coherently."""
    ds = sample.generate(seed=0, resolution=7.5, start="2020-01-01", days=4)
    for name in ("geopotential", "temperature", "u_component_of_wind"):
        x = ds[name].sel(level=500).values.astype(np.float64)
        persistence = np.mean((x[2:] - x[1:-1]) ** 2)
        extrapolation = np.mean((x[2:] - (2 * x[1:-1] - x[:-2])) ** 2)
        assert extrapolation < 0.5 * persistence, name


def test_cli_writes_zarr_and_stats(tmp_path):
    sample.main(["--out", str(tmp_path), "--resolution", "30", "--days", "2", "--seed", "1"])
    ds = xr.open_zarr(tmp_path / "era5_sample.zarr")
    assert ds.attrs["synthetic"] == "true"
    assert ds["temperature"].chunks[0] == (1,) * 8
    for name in ("mean", "stddev", "diffs_stddev"):
        assert os.path.exists(tmp_path / "stats" / f"{name}_by_level.nc")
    mean = xr.load_dataset(tmp_path / "stats" / "mean_by_level.nc")
    assert mean["temperature"].dims == ("level",) and mean["temperature"].dtype == np.float64
    assert "year_progress_sin" in mean and "land_sea_mask" in mean
