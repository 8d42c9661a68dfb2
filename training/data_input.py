"""The experiment's view of data/: open the source once, build train/eval iterators from config.

Also creates the synthetic sample data on first use for configs that name a sample directory.
"""

import collections
import os
import subprocess
import sys
import time
from typing import Iterator, Mapping, Optional

import jax
import numpy as np
from absl import logging

from data import examples
from data import gcs
from data import sources
from graphcast.config import PRESSURE_LEVELS


# benchmarks/data_throughput.py --strided on this project's shared 2-core machine (see README).
STRIDED_MEASUREMENT = ("Measured on a synthetic store (1-degree examples of 2 input frames + 1 "
                       "target): 0.17 examples/s from 0.25 degree on a local GCS emulator vs 1.8 "
                       "from a prepared 1-degree copy (local disk: 0.23 vs 4.0).")


def ensure_sample_data(data_cfg, climatology: str = "") -> None:
    """Runs `python -m data.sample --out DIR` when data.source is the sample in DIR (the config's
    generate_sample_dir) and it, or the statistics or climatology the config expects there, is
    missing. A source elsewhere (another folder, a gs:// copy) is never generated or looked for."""
    sample_dir = data_cfg.generate_sample_dir
    if not sample_dir or "://" in data_cfg.source or not _inside(data_cfg.source, sample_dir):
        return
    expected = [p for p in (data_cfg.source, data_cfg.stats_dir, climatology)
                if p and "://" not in p and _inside(p, sample_dir)]
    if all(os.path.exists(p) for p in expected):
        return
    if jax.process_index() == 0:
        logging.info("Generating the synthetic sample data in %s.", sample_dir)
        print(f"Generating synthetic sample data in {sample_dir} (python -m data.sample) ...",
              flush=True)
        subprocess.run([sys.executable, "-m", "data.sample", "--out", sample_dir], check=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        multihost_utils.sync_global_devices("sample data ready")
    missing = [p for p in expected if not os.path.exists(p)]
    if missing:
        raise sources.validate.SourceNotFoundError(
            f"{missing} do not exist after generating the sample into {sample_dir}.")


def _inside(path: str, folder: str) -> bool:
    folder = os.path.abspath(folder)
    return os.path.commonpath([folder, os.path.abspath(path)]) == folder


def storage_options(data_cfg, url: str) -> dict:
    """fsspec options for reading or writing `url` (data.storage_options for gs:// URLs)."""
    return gcs.options_for(url, dict(data_cfg.get("storage_options") or {}))


def slow_grid_advice(data_cfg, task_config, resolution: float, stride: int) -> str:
    """Why reading every k-th point of a finer store is slow, and the command for a copy."""
    levels = len(task_config.pressure_levels)
    levels = levels if levels in PRESSURE_LEVELS else max(PRESSURE_LEVELS)  # prepare's choices
    return (f"data.source {data_cfg.source} is {stride} times finer than the {resolution:g}-degree "
            f"model; every {stride}th point is taken, but each chunk is read whole ({stride ** 2}x "
            f"the bytes). {STRIDED_MEASUREMENT} For long runs write a prepared copy once and "
            f"train from it: python -m data.prepare --source {data_cfg.source} --out "
            f"gs://MY_BUCKET/era5_{resolution:g}deg_{levels}.zarr --resolution {resolution:g} "
            f"--levels {levels} --start {data_cfg.train_start} --end {data_cfg.eval_end}")


def input_summary(config) -> list:
    """Console lines saying what the run reads from where and where it writes."""
    exp = config.experiment_kwargs.config
    data = exp.data

    def where(url: str) -> str:
        if not url:
            return "(none)"
        if gcs.is_gcs(url):
            ep = gcs.endpoint(dict(data.get("storage_options") or {}))
            return (f"{url} ({'endpoint ' + ep if ep else 'Google Cloud Storage'}: the "
                    "environment's credentials if any, else anonymous, which public buckets allow)")
        return url
    return [f"Data: {where(data.source)}, {data.train_start}..{data.train_end} for training, "
            f"{data.eval_start}..{data.eval_end} for evaluation"
            + ("; a finer grid is read at every k-th point" if data.get("subsample_grid") else ""),
            f"Normalization statistics: {where(data.stats_dir)}",
            f"Fine-tuning checkpoint: {where(exp.training.init_checkpoint)}",
            f"Climatology (ACC): {where(exp.eval.climatology)}",
            f"Checkpoints: {config.checkpoint_dir}"]


class DataWaitMonitor:
    """Watches the fraction of wall time the training loop spends waiting for batches, over the
    last `window` steps, and says once when it stays above `threshold`, naming the knobs."""

    def __init__(self, data_cfg, *, threshold: float = 0.10, window: int = 50):
        self._cfg = data_cfg
        self.threshold, self.window = threshold, window
        self._steps = collections.deque(maxlen=window)   # (wait s, step interval s)
        self.warned = False

    def record(self, wait_s: float, interval_s: float) -> Optional[str]:
        """Adds one step; returns the warning the first time the window's fraction exceeds the
        threshold (and logs it), else None."""
        self._steps.append((wait_s, interval_s))
        if self.warned or len(self._steps) < self.window:
            return None
        fraction = sum(w for w, _ in self._steps) / max(sum(i for _, i in self._steps), 1e-9)
        if fraction <= self.threshold:
            return None
        self.warned = True
        cfg = self._cfg
        message = (
            f"Input data is the bottleneck: training waited for batches {100 * fraction:.0f}% of "
            f"the time over the last {self.window} steps (more than {100 * self.threshold:.0f}%). "
            f"Knobs: data.workers (now {cfg.workers}) with data.worker_processes=True (now "
            f"{cfg.get('worker_processes', False)}) to read on more cores, data.prefetch (now "
            f"{cfg.prefetch}) and data.prefetch_memory_gb (now "
            f"{cfg.get('prefetch_memory_gb', 1.0)}) to read further ahead, or a prepared copy "
            "of the data (python -m data.prepare: the task's levels and grid only, one time step "
            "per chunk) to move fewer bytes.")
        logging.warning("%s", message)
        return message


class MonitoredTrainIterator(examples.TrainIterator):
    """TrainIterator that times how long each next() blocks against the time between batches,
    feeding a DataWaitMonitor. This is the run's one measurement of the data wait: the
    experiment logs `last_wait` rather than timing the call itself."""

    def __init__(self, *args, monitor: DataWaitMonitor, **kwargs):
        super().__init__(*args, **kwargs)
        self.monitor = monitor
        self._returned = None   # when the previous batch was handed out
        self.last_wait = (0.0, None)   # (s next() blocked, s since the previous batch or None)

    def next(self, num_steps: Optional[int] = None) -> dict:
        began = time.perf_counter()
        batch = super().next(num_steps)
        now = time.perf_counter()
        interval = None if self._returned is None else now - self._returned
        self.last_wait = (now - began, interval)
        if interval is not None:
            self.monitor.record(now - began, interval)
        self._returned = now
        return batch


class Source:
    """The configured dataset (lazy, normalized layout) and iterators over its splits."""

    def __init__(self, data_cfg, task_config, resolution: Optional[float]):
        if not data_cfg.source:
            raise sources.validate.SourceNotFoundError(
                "config.experiment_kwargs.config.data.source is empty: set it to a zarr "
                "directory, gs:// zarr or netCDF file.")
        self.cfg = data_cfg
        self.task = task_config
        self.dataset = sources.open_source(
            data_cfg.source, task_config=task_config, resolution=resolution,
            storage_options=dict(data_cfg.get("storage_options") or {}) or None,
            check_nans=data_cfg.get("check_nans", True),
            subsample_grid=data_cfg.get("subsample_grid", False), use_dask=False)
        self.lat = np.asarray(self.dataset["lat"].values)
        self.lon = np.asarray(self.dataset["lon"].values)
        self.stride = int(self.dataset.attrs.get("subsample_stride", 1))
        if self.stride > 1 and jax.process_index() == 0:
            logging.warning(slow_grid_advice(data_cfg, task_config, resolution, self.stride))

    def _common(self) -> dict:
        return dict(prefetch=self.cfg.prefetch, num_workers=self.cfg.workers,
                    prefetch_memory_bytes=int(self.cfg.get("prefetch_memory_gb", 1.0) * 2 ** 30))

    def train_iterator(self, *, global_batch_size: int, num_steps: int, max_num_steps: int,
                       state: Optional[Mapping] = None, **overrides) -> examples.TrainIterator:
        """Shuffled epochs of the train split, continuing from `state` ({"epoch","position"});
        warns once when the loop waits for data too long (data.wait_warn_*). `overrides` are
        TrainIterator arguments.

        No frame cache: shuffled examples over years of data almost never share a frame while it
        would still be cached, and without the cache stored frames decode straight into the
        batch (one copy less per frame)."""
        monitor = DataWaitMonitor(self.cfg, threshold=self.cfg.get("wait_warn_fraction", 0.1),
                                  window=self.cfg.get("wait_warn_steps", 50))
        options = dict(self._common(), worker_processes=self.cfg.get("worker_processes", False),
                       pin_workers=self.cfg.get("pin_workers", True), cache_bytes=0)
        return MonitoredTrainIterator(
            self.dataset, self.task, num_steps=num_steps, max_num_steps=max_num_steps,
            split=(self.cfg.train_start, self.cfg.train_end), seed=self.cfg.seed,
            global_batch_size=global_batch_size, state=state, monitor=monitor,
            **{**options, **overrides})

    def example_batch(self) -> dict:
        """One 1-step example in host layout [1, ...] (shapes for parameter initialization)."""
        reader = examples.FrameReader(self.dataset, self.task, cache_bytes=0)
        init_times = examples.valid_init_times(reader.times, (None, None),
                                               self.task.num_input_frames, 1)
        example = reader.read(init_times[0], 1)
        return jax.tree.map(lambda x: np.asarray(x)[None], example)

    def eval_batches(self, *, batch_size: int, num_steps: int,
                     num_batches: int) -> Iterator[dict]:
        """Up to `num_batches` chronological batches of the eval split (evenly spread)."""
        probe = examples.valid_init_times(
            examples.FrameReader(self.dataset, self.task, cache_bytes=0).times,
            (self.cfg.eval_start, self.cfg.eval_end), self.task.num_input_frames, num_steps)
        every = max(int(probe.size // max(batch_size * num_batches, 1)), 1)
        with examples.EvalIterator(
                self.dataset, self.task, num_steps=num_steps, every=every,
                split=(self.cfg.eval_start, self.cfg.eval_end), global_batch_size=batch_size,
                **self._common()) as iterator:
            for _, batch in zip(range(num_batches), iterator):
                yield batch
