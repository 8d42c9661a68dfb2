"""training.data_input: the data-wait warning (once, naming the knobs) and its iterator hook, the
one measurement the experiment's logged figures read too."""

import dataclasses
import time

import numpy as np
from absl import logging as absl_logging

from configs import base
from data import sample
from graphcast import config
from training import data_input
from training import throughput

TASK = dataclasses.replace(config.TASK_13, pressure_levels=(50, 500, 1000))


def _data_cfg(**kw):
    cfg = base.get_base_config(TASK).experiment_kwargs.config.data
    cfg.update(kw)
    return cfg


def test_monitor_warns_once_after_a_window_above_threshold():
    monitor = data_input.DataWaitMonitor(_data_cfg(workers=3, prefetch=2), threshold=0.1,
                                         window=4)
    assert all(monitor.record(0.05, 1.0) is None for _ in range(10))   # 5%: quiet
    messages = [monitor.record(0.15, 1.0) for _ in range(3)]
    assert messages[:2] == [None, None]      # the window's mean: 7.5%, 8.75%, then 11.25%
    warning = messages[2]
    for knob in ("data.workers (now 3)", "data.worker_processes", "data.prefetch (now 2)",
                 "data.prefetch_memory_gb (now 1.0)", "python -m data.prepare"):
        assert knob in warning
    assert all(monitor.record(0.9, 1.0) is None for _ in range(10))   # said once


def test_train_iterator_feeds_the_monitor(tmp_path, monkeypatch):
    path = str(tmp_path / "era5.zarr")
    sample.generate(seed=0, resolution=30.0, start="2015-12-29", days=3).chunk(
        {"time": 1}).to_zarr(path, zarr_format=2, consolidated=True)
    warnings = []
    monkeypatch.setattr(absl_logging, "warning", lambda msg, *a: warnings.append(msg % a))
    cfg = _data_cfg(source=path, train_start="2015", train_end="2016", prefetch=0, workers=1,
                    wait_warn_steps=3)
    source = data_input.Source(cfg, TASK, None)
    assert source.dataset["temperature"].chunks is None   # lazily indexed, no dask
    with source.train_iterator(global_batch_size=1, num_steps=1, max_num_steps=1) as it:
        for _ in range(3):        # a loop that does nothing but wait for data: 100%
            it.next()
        assert not warnings
        it.next()
        assert len(warnings) == 1 and "data.workers (now 1)" in warnings[0]
        it.monitor = data_input.DataWaitMonitor(cfg, window=3)
        for _ in range(4):        # 1 s steps, reads of a few ms (on a loaded machine tens): < 10%
            time.sleep(1.0)
            it.next()
        assert len(warnings) == 1, warnings


def test_prefetch_memory_caps_the_batches_in_flight(tmp_path):
    """data.prefetch_memory_gb bounds the bytes of the batches read ahead (data.prefetch of
    them at most, one at least): a 0.25-degree host batch is 23 GB, so the cap decides how many
    workers read at once."""
    path = str(tmp_path / "era5.zarr")
    sample.generate(seed=0, resolution=30.0, start="2015-12-29", days=3).chunk(
        {"time": 1}).to_zarr(path, zarr_format=2, consolidated=True)
    depths = []
    for gib in (1e-6, 1.0):
        cfg = _data_cfg(source=path, train_start="2015", train_end="2016", prefetch=2, workers=2,
                        prefetch_memory_gb=gib)
        with data_input.Source(cfg, TASK, None).train_iterator(
                global_batch_size=2, num_steps=1, max_num_steps=1) as it:
            it.next()
            depths.append(it._depth())   # pylint: disable=protected-access
    assert depths == [1, 2]


def test_logged_figures_are_the_iterators_measurement(tmp_path):
    """The experiment's examples/s and data-wait fraction come from the iterator's own timing
    (one measurement, the one the warning reads), not from a second timer."""
    path = str(tmp_path / "era5.zarr")
    sample.generate(seed=0, resolution=30.0, start="2015-12-29", days=3).chunk(
        {"time": 1}).to_zarr(path, zarr_format=2, consolidated=True)
    cfg = _data_cfg(source=path, train_start="2015", train_end="2016", prefetch=0, workers=1)
    source = data_input.Source(cfg, TASK, None)
    rates = throughput.Throughput(examples_per_step=4)
    with source.train_iterator(global_batch_size=1, num_steps=1, max_num_steps=1) as it:
        it.next()
        assert it.last_wait[1] is None
        assert rates.step_done(*it.last_wait) == {"examples_per_sec": 0.0,
                                                  "data_wait_fraction": 0.0}
        time.sleep(0.3)
        it.next()
        wait, interval = it.last_wait
        assert 0 < wait < interval and interval >= 0.3
        assert list(it.monitor._steps) == [(wait, interval)]   # pylint: disable=protected-access
        figures = rates.step_done(*it.last_wait)
        assert np.isclose(figures["data_wait_fraction"], wait / interval)
        assert np.isclose(figures["examples_per_sec"], 4 / interval)
