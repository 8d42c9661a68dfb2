"""Reads without copies: zarr decoding straight into the destination gives the general path's
bytes (data.windows); batch files are reused only when free (data.workers)."""

import concurrent.futures
import dataclasses
import gc
import os

import numpy as np
import pytest

from data import examples, sample, sources, windows, workers
from graphcast import config

RUN = dataclasses.replace(config.TASK_13, pressure_levels=(500, 600, 700, 850))   # a run
SPREAD = dataclasses.replace(config.TASK_13, pressure_levels=(50, 500, 1000))     # not a run


def _store(tmp_path, name, *, ascending=False, poison=None):
    """The 30-degree sample as a WeatherBench2-layout zarr (all 13 levels), latitude stored
    north-to-south (flipped on reading) or south-to-north; `poison` = (variable, time, value)."""
    wb2 = sample.generate(seed=0, resolution=30.0, start="2015-12-29", days=3)
    if ascending:
        wb2 = wb2.isel(latitude=slice(None, None, -1))
    if poison:
        variable, t, value = poison
        at = (t, 8, 2, 3) if "level" in wb2[variable].dims else (t, 2, 3)   # level 600
        wb2[variable][at] = value
    path = str(tmp_path / name)
    wb2.chunk({"time": 1}).to_zarr(path, zarr_format=2, consolidated=True)
    return path


def _examples(reader, steps):
    return [reader.read(t, steps) for t in reader.times[1:-steps]]


@pytest.mark.parametrize("ascending", [False, True])
def test_direct_reads_equal_general_path_bit_for_bit(tmp_path, ascending):
    path = _store(tmp_path, "s.zarr", ascending=ascending)
    for task in (RUN, SPREAD):
        indexed = sources.open_source(path, task_config=task, use_dask=False)
        direct = windows.FrameReader(indexed, task, cache_bytes=0)
        general = windows.FrameReader(indexed, task, cache_bytes=2 ** 20)   # cache: general
        with_dask = windows.FrameReader(sources.open_source(path, task_config=task), task,
                                        cache_bytes=0)
        stored = [n for n in direct.dynamic if n not in config.PROGRESS_VARS]
        if task is RUN:   # every stored variable goes the direct way, flipped or not
            assert sorted(direct._direct) == sorted(stored)   # pylint: disable=protected-access
            flips = direct._direct["temperature"][3]   # pylint: disable=protected-access
            assert flips == (False, False, not ascending, False)   # time, level, lat, lon
        else:             # a level list: 3-D variables fall back to indexing and copying
            assert "temperature" not in direct._direct        # pylint: disable=protected-access
            assert "2m_temperature" in direct._direct          # pylint: disable=protected-access
        assert not general._direct and not with_dask._direct  # pylint: disable=protected-access
        for steps in (1, 2):
            for a, b, c in zip(_examples(direct, steps), _examples(general, steps),
                               _examples(with_dask, steps)):
                for part in a:
                    for name in a[part]:
                        assert a[part][name].tobytes() == b[part][name].tobytes(), name
                        assert a[part][name].tobytes() == c[part][name].tobytes(), name


@pytest.mark.parametrize("variable,value,kind", [("temperature", np.nan, "NaN"),
                                                 ("2m_temperature", np.inf, "Inf")])
def test_direct_reads_catch_nan_and_inf_naming_variable_and_time(tmp_path, variable, value,
                                                                  kind):
    path = _store(tmp_path, "bad.zarr", poison=(variable, 5, value))
    ds = sources.open_source(path, task_config=RUN, use_dask=False)
    reader = windows.FrameReader(ds, RUN, cache_bytes=0)
    assert variable in reader._direct   # pylint: disable=protected-access
    reader.read(reader.times[2], 1)     # times 1-3: clean
    with pytest.raises(sources.validate.NaNDataError,
                       match=rf"{kind} found in variable '{variable}' at time\(s\) "
                             r"2015-12-30 06:00:00"):
        reader.read(reader.times[4], 1)   # the target frame, time 5



def test_batch_file_is_reused_only_once_reads_are_done_and_views_gone():
    """A batch file goes back to the pool when its reads are done and its last view is gone, not
    before (a reused file still holds the old bytes; a fresh one is zeros)."""
    layout = {"inputs": {"x": (2, 3)}}
    files = workers.BatchFiles(keep=2)
    first = workers.SharedBatch(layout, 4, files)
    view = first.arrays["inputs"]["x"]
    view[...] = 7.0
    reading = concurrent.futures.Future()
    first.release_when_done([reading])
    del first

    def fresh():
        batch = workers.SharedBatch(layout, 4, files)
        values = batch.arrays["inputs"]["x"].copy()
        batch.release_when_done([])
        return values
    assert not fresh().any()       # a read into the first batch is still pending
    reading.set_result(None)
    assert not fresh().any()       # the first batch is still viewed
    np.testing.assert_array_equal(view, 7.0)
    del view
    gc.collect()
    np.testing.assert_array_equal(fresh(), 7.0)   # now its file is reused
    files.close()


def test_batch_files_of_an_unused_size_make_way():
    """After a rollout-length change, free files of the old size give way to the new size's
    (else every new batch would be a fresh file)."""
    files = workers.BatchFiles(keep=2)
    old = [workers.SharedBatch({"inputs": {"x": (2, 3)}}, 4, files) for _ in range(2)]
    for batch in old:
        batch.release_when_done([])
    del old, batch
    gc.collect()
    assert len(files.live()) == 2
    new = workers.SharedBatch({"inputs": {"x": (5, 3)}}, 4, files)
    key = new.file.key
    new.release_when_done([])
    del new
    gc.collect()
    assert key in files.live() and len(files.live()) == 2   # one old file closed
    again = workers.SharedBatch({"inputs": {"x": (5, 3)}}, 4, files)
    assert again.file.key == key
    again.release_when_done([])
    del again
    files.close()
    assert not files.live()


def test_worker_keeps_its_mapping_of_a_live_batch_file():
    """A worker maps a batch file once while the parent holds it (no page faults per read), and
    lets go of the mappings of files the parent has closed."""
    mapping, worker_maps = workers._mapping, workers._mapped   # pylint: disable=protected-access
    files = workers.BatchFiles(keep=2)
    first = workers.SharedBatch({"inputs": {"x": (2, 3)}}, 1, files)
    mapped = mapping(first.path, first.file.key, first.live)
    assert mapping(first.path, first.file.key, first.live) is mapped
    np.ndarray((6,), np.float32, mapped)[:] = 3.0
    np.testing.assert_array_equal(first.arrays["inputs"]["x"], 3.0)   # the same memory
    second = workers.SharedBatch({"inputs": {"x": (2, 3)}}, 1, files)
    mapping(second.path, second.file.key, frozenset([second.file.key]))
    assert mapped.closed and first.file.key not in worker_maps
    for batch in (first, second):
        batch.release_when_done([])
    worker_maps.pop(second.file.key).close()
    files.close()


def test_direct_reads_name_a_chunk_that_does_not_decode(tmp_path):
    path = _store(tmp_path, "cut.zarr")
    chunk = os.path.join(path, "2m_temperature", "4.0.0")   # time 4: 2015-12-30 00:00
    with open(chunk, "r+b") as f:
        f.truncate(os.path.getsize(chunk) // 3)
    reader = windows.FrameReader(sources.open_source(path, task_config=RUN, use_dask=False), RUN,
                                 cache_bytes=0)
    assert "2m_temperature" in reader._direct   # pylint: disable=protected-access
    with pytest.raises(sources.validate.CorruptDataError,
                       match=r"variable '2m_temperature' at time 2015-12-30T00:00"):
        reader.read(reader.times[3], 1)


def _placement():
    """(pid, cores of each of its threads, zarr's decode threads, checks in the event loop, page
    faults of the last of five 64 MiB buffers filled and freed in a new thread) of the worker
    process this runs in; sleeps so that two of them land in two workers."""
    import resource   # pylint: disable=import-outside-toplevel
    import threading  # pylint: disable=import-outside-toplevel
    import time       # pylint: disable=import-outside-toplevel
    import zarr       # pylint: disable=import-outside-toplevel
    time.sleep(1.0)
    threads = [frozenset(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")]
    np.core.multiarray._set_madvise_hugepage(False)   # pylint: disable=protected-access
    faults = []

    def churn():
        for _ in range(5):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            np.empty(64 * 2 ** 20, np.uint8).fill(1)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    thread = threading.Thread(target=churn)
    thread.start()
    thread.join()
    return (os.getpid(), set(threads), zarr.config.get("threading.max_workers"),
            windows._CHECKS is None, faults[-1])   # pylint: disable=protected-access


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")
def test_pinned_workers_each_run_on_one_core_in_one_thread(tmp_path):
    """data.pin_workers: every thread of worker k runs on workers.worker_core(k) (two workers on
    two cores where there are two), decoding with one zarr thread and checking in the event
    loop; unpinned workers keep the parent's cores and threads. Either way a worker reuses
    freed memory for big blocks (a 64 MiB buffer costs no page faults the fifth time; 16384
    each time without) (~20 s: four spawned workers)."""
    ds = sources.open_source(_store(tmp_path, "s.zarr"), task_config=RUN, use_dask=False)
    allowed = frozenset(os.sched_getaffinity(0))
    for pin in (True, False):
        readers = workers.ProcessReaders(ds, RUN, num_workers=2, cache_bytes=0, pin=pin)
        pool = readers._pool   # pylint: disable=protected-access
        try:
            placed = [f.result(timeout=120) for f in [pool.submit(_placement) for _ in range(2)]]
        finally:
            readers.shutdown()
        assert len({pid for pid, *_ in placed}) == 2, placed
        cores = [threads for _, threads, *_ in placed]
        if pin:
            assert sorted(cores, key=min) == sorted(
                [{frozenset([workers.worker_core(k)])} for k in (0, 1)], key=min), cores
            assert all(threads == 1 and inline for *_, threads, inline, _ in placed), placed
            assert len(allowed) < 2 or cores[0] != cores[1]
        else:
            assert all(c == {allowed} for c in cores), cores
            assert all(threads is None and not inline for *_, threads, inline, _ in placed), \
                placed
        assert all(faults < 100 for *_, faults in placed), placed


@pytest.mark.slow
def test_pinned_workers_name_nan_variable_and_time(tmp_path):
    """A NaN met by a worker process checking in its event loop still stops the batch, naming
    the variable and the time."""
    path = _store(tmp_path, "bad.zarr", poison=("temperature", 5, np.nan))
    ds = sources.open_source(path, task_config=RUN, use_dask=False)
    with examples.EvalIterator(ds, RUN, num_steps=1, split=(None, None), global_batch_size=2,
                               process_index=0, process_count=1, local_device_count=1,
                               prefetch=1, num_workers=1, worker_processes=True,
                               pin_workers=True) as iterator:
        with pytest.raises(sources.validate.NaNDataError,
                           match=r"NaN found in variable 'temperature' at time\(s\) "
                                 r"2015-12-30 06:00:00"):
            list(iterator)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")
def test_pinned_workers_of_processes_on_one_machine_take_different_cores(monkeypatch):
    """Worker k of local rank r is worker number r x workers + k: counted from the last core the
    process may use, so the processes of one machine (SLURM_LOCALID, else LOCAL_RANK) do not all
    pile onto the same cores."""
    cores = sorted(os.sched_getaffinity(0))
    assert [workers.worker_core(k) for k in range(len(cores) + 1)] == \
        cores[::-1] + [cores[-1]]
    monkeypatch.delenv("SLURM_LOCALID", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert workers.local_rank() == 0
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert workers.local_rank() == 3
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert workers.local_rank() == 1
