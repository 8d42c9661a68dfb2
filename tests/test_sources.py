"""data.sources, data.validate, data.gcs: layouts, GCS emulator, named errors, no early reads."""

import contextlib
import http.server
import os
import threading

import dask
import dask.callbacks
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conftest import FIXTURE_DIR, free_port
from data import gcs, sources, validate
from graphcast.config import TaskConfig

FIXTURE = os.path.join(FIXTURE_DIR, "example_batch.nc")
SURFACE = ("2m_temperature", "total_precipitation_6hr")
ATMOS = ("temperature", "geopotential")
FORCINGS = ("toa_incident_solar_radiation", "year_progress_sin", "year_progress_cos",
            "day_progress_sin", "day_progress_cos")
STATICS = ("geopotential_at_surface", "land_sea_mask")
# Levels deliberately not in the source's (ascending) order.
SMALL_TASK = TaskConfig(input_variables=SURFACE + ATMOS + FORCINGS + STATICS,
                        target_variables=SURFACE + ATMOS, forcing_variables=FORCINGS,
                        pressure_levels=(850, 500), input_duration="12h")


class _NoCompute(dask.callbacks.Callback):
    def _start(self, dsk):
        raise AssertionError("a dask graph was computed (data read) during validation")


def no_reads():
    """Context in which any dask computation fails the test."""
    return _NoCompute()


def _write_zarr(ds: xr.Dataset, path, zarr_format=2, consolidated=True):
    ds.chunk({"time": 1}).to_zarr(path, mode="w", zarr_format=zarr_format,
                                  consolidated=consolidated)
    return str(path)


def _deepmind_netcdf(wb2: xr.Dataset, path) -> str:
    """The DeepMind example-file layout of the same data: batch dim, lead-time `time`,
    absolute `datetime` (batch, time), lat ascending."""
    ds = wb2.rename(latitude="lat", longitude="lon").isel(lat=slice(None, None, -1))
    ds = ds.assign_coords(lat=ds.lat.astype(np.float32), lon=ds.lon.astype(np.float32),
                          level=ds.level.astype(np.int32))
    absolute = ds.time.values
    ds = ds.assign_coords(time=absolute - absolute[0])
    ds = ds.expand_dims("batch")
    for name in STATICS:
        ds[name] = ds[name].isel(batch=0)
    ds = ds.assign_coords(datetime=(("batch", "time"), absolute[None]))
    ds.to_netcdf(path)
    return str(path)


@pytest.fixture
def wb2(make_wb2):
    return make_wb2()


def _check_layout(ds: xr.Dataset):
    assert list(ds.level.values) == [850, 500] and ds.level.dtype == np.int32
    assert ds.lat.dtype == np.float32 and np.all(np.diff(ds.lat) > 0)
    assert ds.lon.dtype == np.float32 and ds.lon.min() >= 0 and ds.lon.max() < 360
    assert ds.time.dtype == "datetime64[ns]"
    assert ds["temperature"].dims == ("time", "level", "lat", "lon")
    assert ds["2m_temperature"].dims == ("time", "lat", "lon")
    assert ds["land_sea_mask"].dims == ("lat", "lon")
    assert ds["year_progress_sin"].dims == ("time",)
    assert ds["day_progress_cos"].dims == ("time", "lon")
    for name in ("temperature", "2m_temperature", "toa_incident_solar_radiation"):
        assert ds[name].chunks is not None, f"{name} is not lazy"


def test_local_zarr_layout_and_values(tmp_path, wb2):
    path = _write_zarr(wb2, tmp_path / "wb2.zarr")
    with no_reads():
        ds = sources.open_source(path, task_config=SMALL_TASK, resolution=5.625)
    _check_layout(ds)
    expected = wb2["temperature"].sel(level=[850, 500]).isel(latitude=slice(None, None, -1))
    np.testing.assert_array_equal(ds["temperature"].values, expected.values)
    np.testing.assert_array_equal(ds["land_sea_mask"].values,
                                  wb2["land_sea_mask"].values[::-1])
    assert float(ds["toa_incident_solar_radiation"].max()) > 1e6  # J/m^2 over one hour


def test_zarr_v3_unconsolidated_matches_v2(tmp_path, wb2):
    v2 = sources.open_source(_write_zarr(wb2, tmp_path / "v2.zarr"), task_config=SMALL_TASK)
    v3 = sources.open_source(_write_zarr(wb2, tmp_path / "v3.zarr", zarr_format=3,
                                         consolidated=False), task_config=SMALL_TASK)
    xr.testing.assert_identical(v2.drop_attrs().load(), v3.drop_attrs().load())


def test_emulator_zarr_matches_local(tmp_path, wb2, gcs_emulator):
    endpoint, bucket = gcs_emulator
    local = _write_zarr(wb2, tmp_path / "wb2.zarr")
    opts = {"token": "anon", "endpoint_url": endpoint}
    gcs.filesystem("gs://x", opts).put(local, f"{bucket}/era5/wb2.zarr", recursive=True)
    url = f"gs://{bucket}/era5/wb2.zarr"
    with no_reads():
        remote = sources.open_source(url, task_config=SMALL_TASK, storage_options=opts)
    _check_layout(remote)
    here = sources.open_source(local, task_config=SMALL_TASK)
    xr.testing.assert_identical(remote.drop_attrs().load(), here.drop_attrs().load())


def test_deepmind_netcdf_matches_zarr(tmp_path, wb2):
    from_nc = sources.open_source(_deepmind_netcdf(wb2, tmp_path / "dm.nc"),
                                  task_config=SMALL_TASK, resolution=5.625)
    _check_layout(from_nc)
    from_zarr = sources.open_source(_write_zarr(wb2, tmp_path / "wb2.zarr"),
                                    task_config=SMALL_TASK)
    xr.testing.assert_identical(from_nc.drop_attrs().load(), from_zarr.drop_attrs().load())


def test_reference_example_batch(tmp_path):
    task = TaskConfig(input_variables=SURFACE + ATMOS + FORCINGS + STATICS,
                      target_variables=SURFACE + ATMOS, forcing_variables=FORCINGS,
                      pressure_levels=(50, 250, 500, 850, 1000), input_duration="12h")
    ds = sources.open_source(FIXTURE, task_config=task, resolution=4.0).load()
    ref = xr.open_dataset(FIXTURE).isel(batch=0)
    np.testing.assert_array_equal(ds.lat.values, ref.lat.values)
    np.testing.assert_array_equal(ds.lon.values, ref.lon.values)
    assert list(ds.level.values) == list(ref.level.values)
    np.testing.assert_array_equal(ds.time.values, ref.datetime.values)
    for name in SURFACE + ATMOS + STATICS + ("toa_incident_solar_radiation",):
        np.testing.assert_array_equal(ds[name].values, ref[name].values, err_msg=name)
    # Progress features equal the reference extraction's (inputs.nc: the first two times).
    inputs = xr.open_dataset(FIXTURE.replace("example_batch", "inputs")).isel(batch=0)
    for name in ("year_progress_sin", "day_progress_cos"):
        np.testing.assert_array_equal(ds[name].values[:2], inputs[name].values, err_msg=name)
    # TOA recomputed when absent matches the file (computed by the reference).
    no_toa = tmp_path / "no_toa.nc"
    xr.open_dataset(FIXTURE).drop_vars("toa_incident_solar_radiation").to_netcdf(no_toa)
    derived = sources.open_source(str(no_toa), task_config=task)
    np.testing.assert_array_equal(derived["toa_incident_solar_radiation"].values,
                                  ref["toa_incident_solar_radiation"].values)


def test_hourly_arco_layout_to_six_hourly(tmp_path, make_wb2):
    hourly = make_wb2(periods=30, freq="1h", start="2020-01-01T00", hourly_precip=True,
                      levels=(300, 500, 700, 850, 1000))
    # ARCO-ERA5 stores statics per time step.
    for name in STATICS:
        hourly[name] = hourly[name].expand_dims(time=hourly.time)
    ds = sources.open_source(_write_zarr(hourly, tmp_path / "arco.zarr"), task_config=SMALL_TASK)
    # 00:00 lacks a full window (needs 19:00 the day before): first step is 06:00.
    assert list(pd.DatetimeIndex(ds.time.values).hour) == [6, 12, 18, 0]
    tp = hourly["total_precipitation"].isel(latitude=slice(None, None, -1))
    for i, t in enumerate(ds.time.values):
        window = tp.sel(time=slice(t - np.timedelta64(5, "h"), t))
        assert window.sizes["time"] == 6
        np.testing.assert_allclose(ds["total_precipitation_6hr"].values[i],
                                   window.sum("time").values, rtol=1e-6)
    np.testing.assert_array_equal(ds["temperature"].sel(time="2020-01-01T12").values,
                                  hourly["temperature"].sel(time="2020-01-01T12", level=[850, 500])
                                  .values[:, ::-1])
    assert ds["land_sea_mask"].dims == ("lat", "lon")


def test_lon_minus180_converted(wb2):
    shifted = wb2.assign_coords(longitude=((wb2.longitude + 180) % 360) - 180).sortby("longitude")
    ds = sources.normalize(shifted.chunk(), task_config=SMALL_TASK, resolution=5.625)
    xr.testing.assert_identical(
        ds.drop_attrs().load(),
        sources.normalize(wb2.chunk(), task_config=SMALL_TASK).drop_attrs().load())


# --- bad inputs: each raises its named error before any data is read -------------------------

def _drop(ds, *names):
    return ds.drop_vars(list(names))


def _times(ds, times):
    return ds.assign_coords(time=pd.DatetimeIndex(times))


def _regular(n, freq):
    return pd.date_range("2020-01-01", periods=n, freq=freq)


BAD_INPUTS = {
    "missing_vars": (lambda ds: _drop(ds, "2m_temperature", "land_sea_mask"),
                     validate.MissingVariablesError, ["2m_temperature", "land_sea_mask"]),
    "missing_levels": (lambda ds: ds.sel(level=[700]), validate.MissingLevelsError,
                       ["850", "500", "available levels: [700]"]),
    "irregular_time": (lambda ds: _times(ds, list(_regular(11, "6h")) +
                                         [pd.Timestamp("2020-01-03T20")]),
                       validate.TimeSpacingError, ["Irregular", "2020-01-03 12:00:00 -> "
                                                   "2020-01-03 20:00:00"]),
    "four_hourly": (lambda ds: _times(ds, _regular(12, "4h")), validate.TimeSpacingError,
                    ["0 days 04:00:00", "does not divide 6h"]),
    "duplicate_time": (lambda ds: _times(ds, list(_regular(11, "6h")) +
                                         [pd.Timestamp("2020-01-03T12")]),
                       validate.DuplicateTimesError, ["Duplicate", "2020-01-03 12:00:00"]),
    "grid_mismatch": (lambda ds: ds, validate.GridMismatchError,
                      ["expected 4.0 deg (90 longitudes)", "5.625"]),
    "lat_not_uniform": (lambda ds: ds.assign_coords(
        latitude=np.r_[ds.latitude.values[:-1], -89.0]), validate.LatitudeError,
        ["not uniformly spaced"]),
    "wrong_dims": (lambda ds: ds.assign(land_sea_mask=ds["2m_temperature"].isel(
        latitude=0, drop=True)), validate.DimensionError, ["'land_sea_mask'", "('lat', 'lon')"]),
    "dim_order": (lambda ds: ds.assign(temperature=ds.temperature.transpose(
        "time", "latitude", "longitude", "level")), validate.DimensionError,
        ["'temperature'", "('time', 'level', 'lat', 'lon')"]),
    "lon_convention": (lambda ds: ds.assign_coords(longitude=ds.longitude - 180),
                       validate.LongitudeConventionError, ["[-180, 180)", "allow_lon_shift"]),
    "lon_out_of_range": (lambda ds: ds.assign_coords(longitude=ds.longitude + 400),
                         validate.LongitudeConventionError, ["expected [0, 360)"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_named_error_without_reading(case, wb2):
    mutate, error, phrases = BAD_INPUTS[case]
    bad = mutate(wb2).chunk()
    with no_reads(), pytest.raises(error) as info:
        sources.normalize(bad, task_config=SMALL_TASK, source="gs://b/bad.zarr",
                          resolution=4.0 if case == "grid_mismatch" else 5.625,
                          allow_lon_shift=False, strict_dims=True)
    assert isinstance(info.value, ValueError)
    for phrase in phrases + ["gs://b/bad.zarr"]:
        assert phrase in str(info.value), (phrase, str(info.value))


def test_bad_zarr_on_disk_fails_before_reading(tmp_path, wb2):
    path = _write_zarr(_drop(wb2, "temperature", "2m_temperature"), tmp_path / "bad.zarr")
    with no_reads(), pytest.raises(validate.MissingVariablesError,
                                   match=r"\['2m_temperature', 'temperature'\]"):
        sources.open_source(path, task_config=SMALL_TASK)


def test_nan_named_when_read(wb2):
    wb2["2m_temperature"][5, 3, 4] = np.nan
    ds = sources.normalize(wb2.chunk({"time": 1}), task_config=SMALL_TASK)
    ds["temperature"].load()  # other variables read fine
    with pytest.raises(validate.NaNDataError, match=r"'2m_temperature' at time\(s\) "
                                                    r"2020-01-02 06:00:00"):
        ds["2m_temperature"].load()


# --- storage errors name the URL ------------------------------------------------------------

def test_missing_bucket_and_object_name_url(gcs_emulator, tmp_path):
    endpoint, bucket = gcs_emulator
    opts = {"token": "anon", "endpoint_url": endpoint}
    with pytest.raises(validate.SourceNotFoundError, match="gs://no-such-bucket"):
        sources.open_source("gs://no-such-bucket/era5.zarr", task_config=SMALL_TASK,
                            storage_options=opts)
    with pytest.raises(validate.SourceNotFoundError, match=f"gs://{bucket}/missing.zarr"):
        sources.open_source(f"gs://{bucket}/missing.zarr", task_config=SMALL_TASK,
                            storage_options=opts)
    with pytest.raises(validate.SourceNotFoundError, match="nothing.zarr"):
        sources.open_source(str(tmp_path / "nothing.zarr"), task_config=SMALL_TASK)


class _Forbidden(http.server.BaseHTTPRequestHandler):
    def _deny(self):
        body = b'{"error": {"code": 403, "message": "caller does not have storage.objects.get"}}'
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_HEAD = _deny

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _forbidding_server():
    server = http.server.HTTPServer(("127.0.0.1", free_port()), _Forbidden)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_forbidden_names_url():
    with _forbidding_server() as endpoint, pytest.raises(
            validate.SourceAccessError, match="gs://private-bucket/era5.zarr"):
        sources.open_source("gs://private-bucket/era5.zarr", task_config=SMALL_TASK,
                            storage_options={"token": "anon", "endpoint_url": endpoint})


def test_unreachable_names_url():
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(validate.SourceUnreachableError, match="gs://some-bucket/era5.zarr"):
        sources.open_source("gs://some-bucket/era5.zarr", task_config=SMALL_TASK,
                            storage_options={"token": "anon", "endpoint_url": endpoint})


def test_retries_transient_then_succeeds():
    import gcsfs.retry
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise gcsfs.retry.HttpError({"code": 503, "message": "backend unavailable"})
        return "ok"

    assert gcs.with_retries(flaky, url="gs://b/x", base_delay=0.001) == "ok"
    assert len(calls) == 3
