"""data.prepare: subsampling, derived variables, resume after interruption, idempotence, gs://,
uncompressed chunks."""

import json
import os

import numpy as np
import pytest
import xarray as xr

from data import examples, prepare, sources, windows
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


def _args(src, out, block_size=3, compression="default"):
    return ["--source", src, "--out", out, "--resolution", "20", "--levels", "13",
            "--start", "2021-03-01T06", "--end", "2021-03-03", "--block-size", str(block_size),
            "--compression", compression]


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


@pytest.mark.parametrize("compression", ["default", "none"])
def test_resume_after_interruption_gives_identical_bytes(tmp_path, source, monkeypatch,
                                                         compression):
    _, src = source
    full, resumed = str(tmp_path / "full.zarr"), str(tmp_path / "resumed.zarr")
    prepare.main(_args(src, full, compression=compression))

    real_write, calls = prepare._write_block, []

    def interrupted(out, output, block):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(block)
        real_write(out, output, block)

    monkeypatch.setattr(prepare, "_write_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare.main(_args(src, resumed, compression=compression))
    assert sorted(os.listdir(os.path.join(resumed, prepare.MARKER_DIR))) == [
        "block-000000", "block-000001", "initialised"]
    monkeypatch.setattr(prepare, "_write_block", real_write)
    prepare.main(_args(src, resumed, compression=compression))
    assert _files(full) == _files(resumed)

    # A complete output is left alone: nothing is written again.
    def fail(*args):
        raise AssertionError("a finished block was rewritten")

    monkeypatch.setattr(prepare, "_write_block", fail)
    prepare.main(_args(src, resumed, compression=compression))
    assert _files(full) == _files(resumed)


def test_other_arguments_refused(tmp_path, source):
    _, src = source
    out = str(tmp_path / "out.zarr")
    prepare.main(_args(src, out))
    with pytest.raises(prepare.PrepareError, match="prepared with other arguments"):
        prepare.main(_args(src, out, block_size=2))
    with pytest.raises(prepare.PrepareError, match="--compression 'default' -> 'none'"):
        prepare.main(_args(src, out, compression="none"))


def test_other_compression_refused_after_an_interruption(tmp_path, source, monkeypatch):
    """A run stopped before its first block, then rerun with other chunks, is refused too."""
    _, src = source
    out = str(tmp_path / "out.zarr")
    def stopped(self, ds, compression):   # the template is written, the marker is not
        ds.to_zarr(self.url, mode="w", compute=False, zarr_format=2)
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(prepare._Output, "initialise", stopped)
    with pytest.raises(KeyboardInterrupt):
        prepare.main(_args(src, out))
    monkeypatch.undo()
    with pytest.raises(prepare.PrepareError, match="--compression 'default' -> 'none'"):
        prepare.main(_args(src, out, compression="none"))


def test_config_recorded_before_compression_existed_still_matches():
    config = prepare.PrepareConfig("s.zarr", "o.zarr", 1.0, 13, "2020", "2021")
    legacy = json.loads(config.fingerprint())
    del legacy["compression"]
    assert prepare.changed_arguments(json.dumps(legacy), config.fingerprint()) == []
    none = prepare.PrepareConfig("s.zarr", "o.zarr", 1.0, 13, "2020", "2021", compression="none")
    assert prepare.changed_arguments(json.dumps(legacy), none.fingerprint()) == [
        "--compression 'default' -> 'none'"]
    with pytest.raises(prepare.PrepareError, match="--compression 'lz4'"):
        prepare.PrepareConfig("s.zarr", "o.zarr", 1.0, 13, "2020", "2021", compression="lz4")


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


def _prepared_pair(tmp_path, src):
    """The same source prepared with zarr's default compressor and uncompressed."""
    paths = {c: str(tmp_path / f"{c}.zarr") for c in prepare.COMPRESSIONS}
    for compression, path in paths.items():
        prepare.main(_args(src, path, compression=compression))
    return paths


def test_uncompressed_chunks_read_back_bit_identical(tmp_path, source):
    _, src = source
    paths = _prepared_pair(tmp_path, src)
    for name in ("temperature", "2m_temperature", "land_sea_mask"):
        with open(os.path.join(paths["none"], name, ".zarray")) as f:
            assert json.load(f)["compressor"] is None, name
        with open(os.path.join(paths["default"], name, ".zarray")) as f:
            assert json.load(f)["compressor"]["id"] == "blosc", name
    readers = {}
    for compression, path in paths.items():
        ds = sources.open_source(path, task_config=TASK_13, resolution=20.0, use_dask=False)
        readers[compression] = windows.FrameReader(ds, TASK_13, cache_bytes=0)
    stored = [n for n in readers["none"].dynamic if n not in sources.PROGRESS_VARS]
    assert sorted(readers["none"]._direct) == sorted(stored)  # pylint: disable=protected-access
    for t in readers["none"].times[1:-2]:
        a, b = readers["default"].read(t, 2), readers["none"].read(t, 2)
        for part in a:
            for name in a[part]:
                assert a[part][name].tobytes() == b[part][name].tobytes(), (part, name)


def _iterator(ds, **kw):
    args = dict(split=("2021-03-01", "2021-03-03"), seed=3, global_batch_size=2,
                max_num_steps=1, prefetch=0)
    args.update(kw)
    return examples.TrainIterator(ds, TASK_13, **args)


def _equal_batches(a, b):
    np.testing.assert_array_equal(a["init_time"], b["init_time"])
    for part in ("inputs", "targets", "forcings"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert a[part][name].tobytes() == b[part][name].tobytes(), (part, name)


def test_uncompressed_training_batches_same_bytes_order_and_resume(tmp_path, source):
    """The training iterator over an uncompressed copy, read by worker processes and restarted
    mid-epoch, gives the default copy's batches in the same order (~13 s: two spawned pools)."""
    _, src = source
    paths = _prepared_pair(tmp_path, src)
    opened = {c: sources.open_source(p, task_config=TASK_13, resolution=20.0, use_dask=False)
              for c, p in paths.items()}
    with _iterator(opened["default"]) as it:
        expected = [it.next() for _ in range(6)]    # 7 examples per epoch: crosses into epoch 1
    with _iterator(opened["none"], worker_processes=True, num_workers=2, prefetch=2) as first:
        got = [first.next() for _ in range(2)]
        saved = json.loads(json.dumps(first.state))
    with _iterator(opened["none"], state=saved, worker_processes=True, num_workers=1,
                   prefetch=1) as resumed:
        got += [resumed.next() for _ in range(4)]
    for a, b in zip(expected, got):
        _equal_batches(a, b)
