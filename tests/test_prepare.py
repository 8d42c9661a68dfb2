"""data.prepare: subsampling, derived variables, resume after interruption, idempotence, gs://."""

import os

import numpy as np
import pytest
import xarray as xr

from data import prepare, sources
from graphcast.config import PRESSURE_LEVELS, TASK

LEVELS_13 = PRESSURE_LEVELS[13]
TASK_13 = TASK.__class__(**{**TASK.official_fields(), "pressure_levels": LEVELS_13})


@pytest.fixture
def source(tmp_path, make_wb2):
    """5-degree WeatherBench2-layout source without TOA radiation, 10 times 6-hourly."""
    ds = make_wb2(resolution=5.0, levels=LEVELS_13, periods=10, start="2021-03-01")
    path = str(tmp_path / "source.zarr")
    ds.chunk({"time": 1}).to_zarr(path, zarr_format=2, consolidated=True)
    return ds, path


def _args(src, out, block_size=3):
    return ["--source", src, "--out", out, "--resolution", "20", "--levels", "13",
            "--start", "2021-03-01T06", "--end", "2021-03-03", "--block-size", str(block_size)]


def _files(root: str) -> dict:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


def test_subsample_variables_and_read_back(tmp_path, source):
    src_ds, src = source
    out = str(tmp_path / "out.zarr")
    prepare.main(_args(src, out))
    raw = xr.open_zarr(out)
    assert raw.sizes["time"] == 9 and raw.sizes["latitude"] == 10 and raw.sizes["longitude"] == 18
    assert raw.latitude.values[0] == 90 and raw.latitude.values[-1] == -90
    assert raw["temperature"].encoding["chunks"] == (1, 13, 10, 18)
    expected_vars = set(sources.task_variables(TASK_13)) - set(sources.PROGRESS_VARS)
    assert set(raw.data_vars) == expected_vars
    ds = sources.open_source(out, task_config=TASK_13, resolution=20.0).load()
    src_sub = src_ds.sel(time=slice("2021-03-01T06", "2021-03-03")).isel(
        latitude=slice(None, None, -4), longitude=slice(None, None, 4))
    for name in ("temperature", "2m_temperature", "total_precipitation_6hr", "land_sea_mask"):
        np.testing.assert_array_equal(ds[name].values, src_sub[name].values, err_msg=name)
    np.testing.assert_array_equal(ds.lat.values, np.arange(-90, 91, 20, dtype=np.float32))
    toa = sources.toa_radiation(ds).values
    np.testing.assert_array_equal(ds["toa_incident_solar_radiation"].values, toa)
    assert "year_progress_sin" in ds and "day_progress_cos" in ds


def test_resume_after_interruption_gives_identical_bytes(tmp_path, source, monkeypatch):
    _, src = source
    full, resumed = str(tmp_path / "full.zarr"), str(tmp_path / "resumed.zarr")
    prepare.main(_args(src, full))

    real_write, calls = prepare._write_block, []

    def interrupted(out, output, block):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(block)
        real_write(out, output, block)

    monkeypatch.setattr(prepare, "_write_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare.main(_args(src, resumed))
    assert sorted(os.listdir(os.path.join(resumed, prepare.MARKER_DIR))) == [
        "block-000000", "block-000001", "initialised"]
    monkeypatch.setattr(prepare, "_write_block", real_write)
    prepare.main(_args(src, resumed))
    assert _files(full) == _files(resumed)

    # A complete output is left alone: nothing is written again.
    def fail(*args):
        raise AssertionError("a finished block was rewritten")

    monkeypatch.setattr(prepare, "_write_block", fail)
    prepare.main(_args(src, resumed))
    assert _files(full) == _files(resumed)


def test_other_arguments_refused(tmp_path, source):
    _, src = source
    out = str(tmp_path / "out.zarr")
    prepare.main(_args(src, out))
    with pytest.raises(prepare.PrepareError, match="prepared with other arguments"):
        prepare.main(_args(src, out, block_size=2))


def test_resolution_not_a_multiple(tmp_path, source):
    _, src = source
    args = _args(src, str(tmp_path / "o.zarr"))
    args[args.index("--resolution") + 1] = "7.5"
    with pytest.raises(sources.validate.GridMismatchError, match="whole multiple"):
        prepare.main(args)


def test_output_to_emulator(tmp_path, source, gcs_emulator):
    endpoint, bucket = gcs_emulator
    _, src = source
    local = str(tmp_path / "local.zarr")
    prepare.main(_args(src, local))
    url = f"gs://{bucket}/prepared/out.zarr"
    opts = {"token": "anon", "endpoint_url": endpoint}
    prepare.prepare(prepare.PrepareConfig(src, url, 20.0, 13, "2021-03-01T06", "2021-03-03", 3),
                    out_storage_options=opts)
    remote = sources.open_source(url, task_config=TASK_13, storage_options=opts)
    here = sources.open_source(local, task_config=TASK_13)
    xr.testing.assert_identical(remote.drop_attrs().load(), here.drop_attrs().load())


def test_foreign_zarr_not_overwritten(tmp_path, source):
    src_ds, src = source
    out = str(tmp_path / "someone_elses.zarr")
    src_ds.isel(time=[0]).to_zarr(out, zarr_format=2)
    with pytest.raises(prepare.PrepareError, match="not written by an interrupted"):
        prepare.main(_args(src, out))
    assert xr.open_zarr(out).sizes["time"] == 1
