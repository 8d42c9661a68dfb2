"""data.examples: epochs, sharding over simulated hosts/devices, restarts, prefetch, eval order."""

import dataclasses
import json

import numpy as np
import pytest

from data import examples, sample, sources
from graphcast import config, data_utils

TASK = dataclasses.replace(config.TASK_13, pressure_levels=(50, 500, 1000))
SPLIT = ("2015-12-29", "2016-01-03")


@pytest.fixture(scope="module")
def dataset():
    wb2 = sample.generate(seed=0, resolution=30.0, start="2015-12-29", days=6)   # 24 times
    return sources.normalize(wb2.chunk({"time": 1}), task_config=TASK, check_nans=False)


def _train(ds, **kw):
    args = dict(split=SPLIT, seed=7, global_batch_size=4, process_count=2, local_device_count=2,
                prefetch=0)
    args.update(kw)
    return examples.TrainIterator(ds, TASK, **args)


def _equal(a, b):
    assert a.keys() == b.keys()
    np.testing.assert_array_equal(a["init_time"], b["init_time"])
    for part in ("inputs", "targets", "forcings"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            np.testing.assert_array_equal(a[part][name], b[part][name], err_msg=name)


def test_valid_init_times_respect_split_and_window(dataset):
    times = dataset["time"].values
    valid = examples.valid_init_times(times, ("2015-12-30", "2015-12-31"), 2, 3)
    # Whole window (t - 6 h .. t + 18 h) inside 2015-12-30T00 .. 2015-12-31T18.
    assert valid[0] == np.datetime64("2015-12-30T06") and valid[-1] == np.datetime64("2015-12-31")
    assert len(valid) == 4
    assert len(examples.valid_init_times(times, (None, None), 2, 1)) == len(times) - 2


def test_two_hosts_two_devices_cover_epoch_exactly_once(dataset):
    hosts = [_train(dataset, process_index=p) for p in range(2)]
    n = hosts[0].examples_per_epoch
    assert n == len(examples.valid_init_times(dataset["time"].values, SPLIT, 2, 1)) == 22
    stream = []
    for _ in range(-(-n // 4)):
        parts = [h.next()["init_time"].reshape(-1) for h in hosts]
        assert not set(parts[0].tolist()) & set(parts[1].tolist())
        stream.extend(np.concatenate(parts))
    epoch = np.array(stream[:n], "datetime64[ns]")
    assert len(set(epoch.tolist())) == n
    np.testing.assert_array_equal(np.sort(epoch), hosts[0].init_times)
    np.testing.assert_array_equal(epoch, hosts[0].epoch_order(0))
    # The 6th batch spans into epoch 1, whose order differs from epoch 0.
    assert hosts[0].state == {"epoch": 1, "position": 2}
    assert not np.array_equal(hosts[0].epoch_order(1), hosts[0].epoch_order(0))


def test_restart_from_state_continues_sequence(dataset):
    first = _train(dataset, process_index=1)
    for _ in range(3):
        first.next()
    saved = json.loads(json.dumps(first.state))
    expected = [first.next() for _ in range(4)]       # crosses the epoch boundary
    resumed = _train(dataset, process_index=1, state=saved)
    for batch in expected:
        _equal(resumed.next(), batch)


def test_batch_matches_reference_extraction(dataset):
    it = _train(dataset, process_index=0, num_steps=3, max_num_steps=3)
    batch = it.next()
    d, b = 1, 0
    init = batch["init_time"][d, b]
    i = int(np.nonzero(dataset["time"].values == init)[0][0])
    window = dataset.isel(time=slice(i - 1, i + 4)).compute()
    inputs, targets, forcings = data_utils.extract_inputs_targets_forcings(
        window, target_lead_times=slice("6h", "18h"), **dataclasses.asdict(TASK))
    for part, ds, names in (("inputs", inputs, TASK.input_variables),
                            ("targets", targets, TASK.target_variables),
                            ("forcings", forcings, TASK.forcing_variables)):
        reference = data_utils.dataset_to_arrays(ds, names)
        assert list(batch[part]) == list(names)
        for name in names:
            np.testing.assert_array_equal(batch[part][name][d, b], reference[name][0],
                                          err_msg=f"{part}/{name}")


def test_shapes_and_dtypes(dataset):
    batch = _train(dataset, process_index=0, num_steps=2, max_num_steps=2).next()
    h, w = dataset.sizes["lat"], dataset.sizes["lon"]
    assert batch["inputs"]["temperature"].shape == (2, 1, 2, 3, h, w)
    assert batch["inputs"]["2m_temperature"].shape == (2, 1, 2, h, w)
    assert batch["inputs"]["land_sea_mask"].shape == (2, 1, h, w)
    assert batch["inputs"]["day_progress_sin"].shape == (2, 1, 2, h, w)
    assert batch["targets"]["geopotential"].shape == (2, 1, 2, 3, h, w)
    assert batch["forcings"]["toa_incident_solar_radiation"].shape == (2, 1, 2, h, w)
    assert batch["init_time"].shape == (2, 1) and batch["init_time"].dtype == "datetime64[s]"
    for part in ("inputs", "targets", "forcings"):
        assert all(a.dtype == np.float32 for a in batch[part].values())


def test_errors(dataset):
    with pytest.raises(ValueError, match=r"global_batch_size=6 .* 2 processes x 2 local devices"):
        _train(dataset, process_index=0, global_batch_size=6)
    with pytest.raises(ValueError, match="exceed the available times"):
        _train(dataset, process_index=0, num_steps=40)
    it = _train(dataset, process_index=0, num_steps=1, max_num_steps=2)
    with pytest.raises(ValueError, match="exceed the available times"):
        it.next(num_steps=3)
    with pytest.raises(ValueError, match="out of range"):
        _train(dataset, process_index=0, state={"epoch": 0, "position": 10 ** 6})


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetch_identical_and_steps_change_keeps_order(dataset, depth):
    plain = _train(dataset, process_index=1, max_num_steps=2)
    with _train(dataset, process_index=1, max_num_steps=2, prefetch=depth, num_workers=2,
                cache_bytes=0) as fetched:
        for steps in (1, 1, 2, 2, 1):
            a, b = plain.next(num_steps=steps), fetched.next(num_steps=steps)
            _equal(a, b)
            assert a["targets"]["temperature"].shape[2] == steps
    fixed = _train(dataset, process_index=1, max_num_steps=2)
    order = [fixed.next()["init_time"] for _ in range(5)]
    replay = _train(dataset, process_index=1, max_num_steps=2)
    for steps, times in zip((1, 1, 2, 2, 1), order):
        np.testing.assert_array_equal(replay.next(num_steps=steps)["init_time"], times)


def test_eval_iterator_fixed_order_every_and_frame_reuse(dataset):
    it = examples.EvalIterator(dataset, TASK, num_steps=2, split=SPLIT, every=2,
                               global_batch_size=2, process_index=0, process_count=1,
                               local_device_count=2, prefetch=2)
    valid = examples.valid_init_times(dataset["time"].values, SPLIT, 2, 2)[::2]
    seen = np.concatenate([b["init_time"].reshape(-1) for b in it])
    assert it.num_batches == len(valid) // 2
    np.testing.assert_array_equal(seen, valid[:2 * it.num_batches].astype("datetime64[s]"))
    # Consecutive windows overlap: with the cache, each frame is read once.
    every = examples.EvalIterator(dataset, TASK, num_steps=2, split=SPLIT, global_batch_size=1,
                                  process_index=0, process_count=1, local_device_count=1,
                                  prefetch=0)
    batches = list(every)
    assert len(batches) == 21   # 24 times, windows of 4 frames
    assert every.reader.frames_read == 24


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """The module's sample as a WeatherBench2-layout zarr, opened both ways open_source can."""
    path = str(tmp_path_factory.mktemp("stored") / "era5.zarr")
    wb2 = sample.generate(seed=0, resolution=30.0, start="2015-12-29", days=6)
    wb2.chunk({"time": 1}).to_zarr(path, zarr_format=2, consolidated=True)
    return (sources.open_source(path, task_config=TASK),
            sources.open_source(path, task_config=TASK, use_dask=False))


def test_indexed_source_gives_the_same_batches_and_order(stored):
    with_dask, indexed = stored
    assert indexed["temperature"].chunks is None and with_dask["temperature"].chunks
    for a, b in zip(_batches(with_dask, 6), _batches(indexed, 6)):
        _equal(a, b)


def _batches(ds, n, **kw):
    with _train(ds, process_index=1, max_num_steps=2, **kw) as it:
        return [it.next(num_steps=s) for s in (1, 2, 2, 1, 1, 2)[:n]]


@pytest.mark.slow
def test_worker_processes_same_bytes_order_and_resume(stored):
    """Batches read by worker processes into shared memory equal the threads' ones, in order and
    across a mid-epoch restart (~20 s: two spawned pools import JAX and xarray)."""
    _, indexed = stored
    expected = _batches(indexed, 6)
    got = _batches(indexed, 6, worker_processes=True, num_workers=2, prefetch=2)
    for a, b in zip(expected, got):
        _equal(a, b)
    with _train(indexed, process_index=1, worker_processes=True, num_workers=2,
                pin_workers=False) as first:   # unpinned workers, then pinned ones (default)
        for _ in range(3):
            first.next()
        saved = json.loads(json.dumps(first.state))
        after = [first.next() for _ in range(3)]      # crosses the epoch boundary
    with _train(indexed, process_index=1, state=saved, worker_processes=True,
                num_workers=1, prefetch=1) as resumed:
        for batch in after:
            _equal(resumed.next(), batch)


def test_nan_in_an_indexed_store_names_variable_and_time(tmp_path):
    path = str(tmp_path / "nan.zarr")
    wb2 = sample.generate(seed=0, resolution=30.0, start="2015-12-29", days=2)
    wb2["2m_temperature"][3, 2, 2] = np.nan
    wb2.chunk({"time": 1}).to_zarr(path, zarr_format=2, consolidated=True)
    ds = sources.open_source(path, task_config=TASK, use_dask=False)
    it = examples.EvalIterator(ds, TASK, num_steps=1, split=(None, None), global_batch_size=1,
                               process_index=0, process_count=1, local_device_count=1,
                               prefetch=0)
    with pytest.raises(sources.validate.NaNDataError,
                       match=r"NaN found in variable '2m_temperature' at time\(s\) "
                             r"2015-12-29 18:00:00"):
        list(it)


def test_level_indexer_is_a_slice_for_a_run():
    assert sources.level_indexer(np.array([50, 500, 1000]), [50, 500, 1000]) == slice(0, 3, 1)
    assert sources.level_indexer(np.array([1000, 500, 50]), [50, 500, 1000]) == \
        slice(2, None, -1)
    assert sources.level_indexer(np.array([50, 100, 500, 1000]), [50, 500]) == [0, 2]
