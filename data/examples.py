"""Training/eval examples from an internal-layout dataset: splits, epochs, sharding, prefetch.

An example is the task's input window (num_input_frames frames, 6 h apart, the last one at the
"initial time") plus N target steps after it. Its arrays follow the host batch layout of the
project conventions (inputs/targets/forcings dicts, float32).

Training order: the stream of examples is epoch after epoch, each epoch a permutation of the
split's valid initial times that depends only on (seed, epoch). The iterator's state is
{"epoch": e, "position": p}: the next global example is number p of epoch e. Batches may span
an epoch boundary, so every valid time is visited exactly once per epoch. Each host reads only
its contiguous slice of every global batch. The set of valid times is computed for
`max_num_steps`, so changing the rollout length N never changes the order.

Reading: frames (all variables of one time) are cached by time in a bounded LRU cache, so
consecutive examples that overlap (eval order, curriculum with long rollouts) read each frame
once; a thread pool reads upcoming batches in the background (bounded depth and memory).

Timing: python -m data.examples --source DIR/era5_sample.zarr [--batches 10 --batch-size 8
        --step-seconds 0.5]
"""

import argparse
import collections
import concurrent.futures
import threading
import time as time_lib
from typing import Iterator, Mapping, Optional, Sequence

import dask
import numpy as np
import pandas as pd
import xarray as xr

from data import validate
from graphcast import config
from graphcast import data_utils

SIX_HOURS = np.timedelta64(6, "h")
DEFAULT_SPLITS = {
    "train": ("1979-01-01", "2015-12-31"),
    "eval": ("2016-01-01", "2017-12-31"),
    "test": ("2018-01-01", None),
}


def split_bounds(split: Sequence) -> tuple:
    """(start, stop) datetime64[ns] of a (start, end) pair; stop is exclusive. An end given as a
    string includes the whole period it names, as xarray's `sel(time=slice(start, end))` (used by
    data.stats and data.prepare) does: "2015" the year, "2015-12" the month, "2015-12-31" the day;
    None means unbounded."""
    start, end = split
    # None: the ends of the datetime64[ns] range.
    lo = np.datetime64(pd.Timestamp(start), "ns") if start is not None else np.datetime64(
        np.iinfo(np.int64).min + 1, "ns")
    if end is None:
        hi = np.datetime64(np.iinfo(np.int64).max, "ns")
    else:
        stop = (pd.Period(end.strip()) + 1).start_time if isinstance(end, str) else \
            pd.Timestamp(end) + pd.Timedelta(1, "ns")
        hi = stop.to_datetime64().astype("datetime64[ns]")
    if hi <= lo:
        raise ValueError(f"Split {split!r} is empty: its end is not after its start.")
    return lo, hi


def valid_init_times(times: np.ndarray, split: Sequence, num_input_frames: int,
                     num_steps: int) -> np.ndarray:
    """Initial times (last input frame) whose whole window lies in the split and in `times`.

    times: datetime64 [T] of the dataset, strictly increasing. Returns sorted datetime64[ns].
    """
    times = np.asarray(times).astype("datetime64[ns]")
    lo, hi = split_bounds(split)
    inside = times[(times >= lo) & (times < hi)]
    ok = np.ones(inside.shape, bool)
    for offset in range(-(num_input_frames - 1), num_steps + 1):
        ok &= np.isin(inside + offset * SIX_HOURS, inside)
    return inside[ok]


class FrameReader:
    """Reads examples of `dataset` as host-layout arrays [T, ...], caching frames by time.

    dataset: internal layout (dims time, [level,] lat, lon; dask- or numpy-backed).
    cache_bytes: bound of the LRU frame cache (0 disables it). Thread-safe.
    """

    def __init__(self, dataset: xr.Dataset, task_config: config.TaskConfig, *,
                 cache_bytes: int = 256 * 2 ** 20, dask_scheduler: str = "threads"):
        self.task = task_config
        if "level" in dataset.dims and task_config.pressure_levels:
            have = dataset["level"].values.tolist()
            missing = sorted(set(task_config.pressure_levels) - set(have))
            if missing:
                raise ValueError(f"Pressure levels {missing} of the task are not in the dataset "
                                 f"(levels {have}).")
            dataset = dataset.sel(level=list(task_config.pressure_levels))
        names = list(dict.fromkeys(task_config.input_variables + task_config.target_variables
                                   + task_config.forcing_variables))
        derived = [n for n in names if n in data_utils.PROGRESS_VARS]
        missing = [n for n in names if n not in dataset.data_vars and n not in derived]
        if missing:
            raise ValueError(f"Variables {missing} of the task are missing from the dataset "
                             f"(it has {sorted(map(str, dataset.data_vars))}).")
        self.times = dataset["time"].values.astype("datetime64[ns]")
        self._index = {t: i for i, t in enumerate(self.times.tolist())}
        self.lat = dataset["lat"].values
        self.lon = dataset["lon"].values
        self.dynamic = [n for n in names if n not in derived and "time" in dataset[n].dims]
        self.statics = {n: np.asarray(dataset[n].transpose("lat", "lon").values, np.float32)
                        for n in names if n not in derived and n not in self.dynamic}
        self._data = dataset[self.dynamic]
        self._source = dataset.attrs.get("normalized_from", "<dataset>")
        self._scheduler = dask_scheduler
        self._cache = collections.OrderedDict()   # time index -> {var: array}
        self._cache_bytes = cache_bytes
        self._cached = 0
        self._lock = threading.Lock()
        self.frames_read = 0

    def _frames(self, indices: list) -> list:
        """Frames (dicts var -> float32 [(L,) H, W]) at time indices, from cache or storage."""
        with self._lock:
            found = {i: self._cache[i] for i in indices if i in self._cache}
            for i in found:
                self._cache.move_to_end(i)
        missing = [i for i in indices if i not in found]
        if missing:
            block = self._data.isel(time=missing)
            try:
                with dask.config.set(scheduler=self._scheduler):
                    block = block.compute()
            except (validate.DataValidationError, ConnectionError, TimeoutError):
                raise
            except Exception as e:  # noqa: BLE001 -- a chunk that does not decode: name it
                raise self._unreadable(missing, e) from e
            arrays = {n: np.asarray(block[n].values, np.float32) for n in self.dynamic}
            fresh = {i: {n: arrays[n][k] for n in self.dynamic} for k, i in enumerate(missing)}
            self._store(fresh)
            found.update(fresh)
        return [found[i] for i in indices]

    def _unreadable(self, indices: list, error: Exception) -> validate.CorruptDataError:
        """Names the variable, time and source of a chunk that cannot be read or decoded, found
        by re-reading the failed frames one variable and time at a time."""
        for name in self.dynamic:
            for i in indices:
                try:
                    with dask.config.set(scheduler="synchronous"):
                        self._data[name].isel(time=i).compute()
                except Exception as e:  # noqa: BLE001 -- this is the one
                    return validate.CorruptDataError(
                        f"Cannot read variable {name!r} at time {self.times[i]} from "
                        f"{self._source} (corrupt or truncated chunk?): {type(e).__name__}: {e}")
        return validate.CorruptDataError(
            f"Cannot read times {[str(self.times[i]) for i in indices]} from {self._source}: "
            f"{type(error).__name__}: {error}")

    def _store(self, fresh: dict) -> None:
        with self._lock:
            self.frames_read += len(fresh)
            if not self._cache_bytes:
                return
            for i, frame in fresh.items():
                if i in self._cache:
                    continue
                self._cache[i] = frame
                self._cached += sum(a.nbytes for a in frame.values())
            while self._cached > self._cache_bytes and self._cache:
                _, old = self._cache.popitem(last=False)
                self._cached -= sum(a.nbytes for a in old.values())

    def _progress(self, times: np.ndarray) -> dict:
        """Progress features [T, H, W] (float32, broadcast over lat) at `times`."""
        seconds = data_utils.seconds_since_epoch(times)
        shape = (len(times), len(self.lat), len(self.lon))
        out = {}
        year = data_utils.year_progress(seconds)[:, None, None]   # [T, 1, 1]
        day = data_utils.day_progress(seconds, self.lon)[:, None]  # [T, 1, W]
        for base, progress in (("year_progress", year), ("day_progress", day)):
            sin, cos = data_utils.progress_sin_cos(progress)
            for name, value in ((base, progress), (base + "_sin", sin), (base + "_cos", cos)):
                out[name] = np.broadcast_to(value, shape)
        return out

    def read(self, init_time: np.datetime64, num_steps: int) -> dict:
        """One example: {"inputs", "targets", "forcings"} of float32 arrays with a leading T."""
        n_in = self.task.num_input_frames
        times = (np.datetime64(init_time, "ns")
                 + np.arange(-(n_in - 1), num_steps + 1) * SIX_HOURS)
        try:
            indices = [self._index[t] for t in times.tolist()]
        except KeyError as e:
            absent = np.datetime64(e.args[0], "ns")
            raise ValueError(f"Example at {init_time} with {num_steps} steps needs time "
                             f"{absent}, which is not in the dataset.") from e
        frames = self._frames(indices)
        progress = self._progress(times)

        def gather(names, part):
            out = {}
            for n in names:
                if n in self.statics:
                    out[n] = self.statics[n]
                elif n in progress:
                    out[n] = np.ascontiguousarray(progress[n][part], np.float32)
                else:
                    out[n] = np.stack([f[n] for f in frames[part]])
            return out

        inputs, later = slice(0, n_in), slice(n_in, None)
        return {"inputs": gather(self.task.input_variables, inputs),
                "targets": gather(self.task.target_variables, later),
                "forcings": gather(self.task.forcing_variables, later)}


def stack_examples(examples: list, leading: tuple) -> dict:
    """Stacks examples into a batch with leading axes `leading` (e.g. (D, per_device))."""
    batch = {}
    for part in ("inputs", "targets", "forcings"):
        batch[part] = {n: np.stack([e[part][n] for e in examples]).reshape(
            leading + examples[0][part][n].shape) for n in examples[0][part]}
    return batch


def _example_bytes(reader: FrameReader, num_steps: int) -> int:
    """Bytes of one example's arrays (float32)."""
    h, w = len(reader.lat), len(reader.lon)
    levels = len(reader.task.pressure_levels)

    def per_time(names):
        return sum(levels if n in config.ALL_ATMOSPHERIC_VARS else 1
                   for n in names if n not in reader.statics)

    n_in = reader.task.num_input_frames
    values = (per_time(reader.task.input_variables) * n_in
              + per_time(reader.task.target_variables + reader.task.forcing_variables) * num_steps
              + len(reader.statics))
    return 4 * values * h * w


class _BatchStream:
    """Shared batching: host slice of each global batch, device axes, background prefetch."""

    def __init__(self, dataset, task_config, *, num_steps, global_batch_size, process_index,
                 process_count, local_device_count, prefetch, num_workers, prefetch_memory_bytes,
                 cache_bytes, dask_scheduler):
        if process_index is None or process_count is None or local_device_count is None:
            import jax  # only for the defaults: tests and tools pass explicit values
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
            local_device_count = (jax.local_device_count() if local_device_count is None
                                  else local_device_count)
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
        shards = process_count * local_device_count
        if global_batch_size <= 0 or global_batch_size % shards:
            raise ValueError(
                f"global_batch_size={global_batch_size} does not divide evenly over "
                f"{process_count} processes x {local_device_count} local devices = {shards} "
                f"devices; use a multiple of {shards}.")
        self.reader = FrameReader(dataset, task_config, cache_bytes=cache_bytes,
                                  dask_scheduler=dask_scheduler)
        self.task = task_config
        self.global_batch_size = global_batch_size
        self.process_index, self.process_count = process_index, process_count
        self.local_device_count = local_device_count
        self.per_host = global_batch_size // process_count
        self._num_steps = num_steps
        self._prefetch = prefetch
        self._memory = prefetch_memory_bytes
        self._pool = (concurrent.futures.ThreadPoolExecutor(num_workers, "examples")
                      if prefetch > 0 else None)
        self._queue = collections.deque()   # (first global index, num_steps, [futures])
        self._next = 0                       # first global index of the next batch to return

    # Subclasses define which initial time the g-th global example has.
    def _init_time(self, g: int) -> np.datetime64:
        raise NotImplementedError

    def _exhausted(self, g: int) -> bool:
        return False

    def _check_steps(self, num_steps: int) -> None:
        raise NotImplementedError

    @property
    def num_steps(self) -> int:
        return self._num_steps

    def set_num_steps(self, num_steps: int) -> None:
        """Changes the rollout length of the following batches; the order is unaffected."""
        self._check_steps(num_steps)
        if num_steps != self._num_steps:
            self._drop_prefetched()
        self._num_steps = num_steps

    def _host_times(self, first: int) -> list:
        start = first + self.process_index * self.per_host
        return [self._init_time(g) for g in range(start, start + self.per_host)]

    def _depth(self) -> int:
        per_batch = self.per_host * _example_bytes(self.reader, self._num_steps)
        return max(1, min(self._prefetch, self._memory // max(per_batch, 1)))

    def _fill(self) -> None:
        first = self._queue[-1][0] + self.global_batch_size if self._queue else self._next
        while len(self._queue) < self._depth() and not self._exhausted(first):
            steps = self._num_steps
            futures = [self._pool.submit(self.reader.read, t, steps)
                       for t in self._host_times(first)]
            self._queue.append((first, steps, futures))
            first += self.global_batch_size

    def _drop_prefetched(self) -> None:
        while self._queue:
            for f in self._queue.popleft()[2]:
                f.cancel()

    def next(self, num_steps: Optional[int] = None) -> dict:
        """The next host batch; `num_steps` (if given) sets the rollout length first."""
        if num_steps is not None:
            self.set_num_steps(num_steps)
        if self._exhausted(self._next):
            raise StopIteration
        times = self._host_times(self._next)
        if self._pool is None:
            examples = [self.reader.read(t, self._num_steps) for t in times]
            self._next += self.global_batch_size
        else:
            self._fill()
            first, steps, futures = self._queue.popleft()
            assert first == self._next and steps == self._num_steps
            self._next += self.global_batch_size
            self._fill()   # queue the following batches before waiting on this one
            examples = [f.result() for f in futures]
        leading = (self.local_device_count, self.per_host // self.local_device_count)
        batch = stack_examples(examples, leading)
        batch["init_time"] = np.array(times, "datetime64[s]").reshape(leading)
        return batch

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        return self.next()

    def close(self) -> None:
        """Stops background reading (pending reads are cancelled)."""
        self._drop_prefetched()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TrainIterator(_BatchStream):
    """Endless shuffled training batches with a restorable {"epoch", "position"} state.

    dataset: internal layout. split: (start, end) dates (end date inclusive).
    num_steps: rollout steps N of the next batches (changeable: set_num_steps / next(n)).
    max_num_steps: largest N that will be asked for; the valid initial times (hence the order)
        are those whose window with max_num_steps fits (default num_steps).
    global_batch_size: examples per global batch, split evenly over processes x devices.
    process_index/process_count/local_device_count: default from jax.
    state: a value from .state to continue from (default epoch 0, position 0).
    prefetch: batches read ahead in background threads (0 = read synchronously);
    num_workers: reader threads; prefetch_memory_bytes caps the bytes of prefetched batches.
    cache_bytes: LRU cache of frames, so overlapping windows are read once.
    Batches: {"inputs", "targets", "forcings": {var: float32 [D, per_device, T, ...]},
              "init_time": datetime64[s] [D, per_device]}.
    """

    def __init__(self, dataset: xr.Dataset, task_config: config.TaskConfig, *,
                 num_steps: int = 1, max_num_steps: Optional[int] = None,
                 split: Sequence = DEFAULT_SPLITS["train"], seed: int = 0,
                 global_batch_size: int = 32, state: Optional[Mapping] = None,
                 process_index: Optional[int] = None, process_count: Optional[int] = None,
                 local_device_count: Optional[int] = None, prefetch: int = 2,
                 num_workers: int = 4, prefetch_memory_bytes: int = 2 ** 30,
                 cache_bytes: int = 256 * 2 ** 20, dask_scheduler: str = "threads"):
        self.max_num_steps = num_steps if max_num_steps is None else max_num_steps
        if not 1 <= num_steps <= self.max_num_steps:
            raise ValueError(f"num_steps={num_steps} must be in [1, max_num_steps="
                             f"{self.max_num_steps}].")
        super().__init__(dataset, task_config, num_steps=num_steps,
                         global_batch_size=global_batch_size, process_index=process_index,
                         process_count=process_count, local_device_count=local_device_count,
                         prefetch=prefetch, num_workers=num_workers,
                         prefetch_memory_bytes=prefetch_memory_bytes, cache_bytes=cache_bytes,
                         dask_scheduler=dask_scheduler)
        self.seed = seed
        self.split = tuple(split)
        self.init_times = valid_init_times(self.reader.times, split, task_config.num_input_frames,
                                           self.max_num_steps)
        if self.init_times.size == 0:
            raise ValueError(
                f"No training example fits: {task_config.num_input_frames} input frames + "
                f"max_num_steps={self.max_num_steps} rollout steps exceed the available times in "
                f"split {self.split} (dataset times {self.reader.times[0]} .. "
                f"{self.reader.times[-1]}, {len(self.reader.times)} steps).")
        self._perms = {}
        if state is not None:
            self.restore(state)

    @property
    def examples_per_epoch(self) -> int:
        return int(self.init_times.size)

    def _permutation(self, epoch: int) -> np.ndarray:
        """Visiting order of `epoch` (indices into init_times): a pure function of (seed, epoch)."""
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # stay small
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(
                self.examples_per_epoch)
        return self._perms[epoch]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Initial times of `epoch` in visiting order."""
        return self.init_times[self._permutation(epoch)]

    def _init_time(self, g: int) -> np.datetime64:
        epoch, position = divmod(g, self.examples_per_epoch)
        return self.init_times[self._permutation(epoch)[position]]

    def _check_steps(self, num_steps: int) -> None:
        if not 1 <= num_steps <= self.max_num_steps:
            raise ValueError(
                f"num_steps={num_steps} rollout steps exceed the available times: the iterator "
                f"was built for at most max_num_steps={self.max_num_steps} (raise it to use "
                "longer rollouts).")

    @property
    def state(self) -> dict:
        """{"epoch": e, "position": p} of the next batch's first global example (JSON-able)."""
        epoch, position = divmod(self._next, self.examples_per_epoch)
        return {"epoch": int(epoch), "position": int(position)}

    def restore(self, state: Mapping) -> None:
        """Continues from a saved state: the next batch starts at that example."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.examples_per_epoch:
            raise ValueError(f"Iterator state {dict(state)} is out of range: position must be in "
                             f"[0, {self.examples_per_epoch}) for this split and max_num_steps.")
        self._drop_prefetched()
        self._next = epoch * self.examples_per_epoch + position


class EvalIterator(_BatchStream):
    """One pass over a split in chronological order (every `every`-th valid initial time).

    Same batch layout as TrainIterator; a final incomplete global batch is dropped
    (see num_batches). Defaults: eval split, global batch = all local devices of all processes.
    """

    def __init__(self, dataset: xr.Dataset, task_config: config.TaskConfig, *,
                 num_steps: int = 1, split: Sequence = DEFAULT_SPLITS["eval"], every: int = 1,
                 global_batch_size: Optional[int] = None, process_index: Optional[int] = None,
                 process_count: Optional[int] = None, local_device_count: Optional[int] = None,
                 prefetch: int = 2, num_workers: int = 4, prefetch_memory_bytes: int = 2 ** 30,
                 cache_bytes: int = 256 * 2 ** 20, dask_scheduler: str = "threads"):
        if every < 1:
            raise ValueError(f"every={every} must be >= 1.")
        if global_batch_size is None:
            import jax
            pc = jax.process_count() if process_count is None else process_count
            global_batch_size = pc * (jax.local_device_count() if local_device_count is None
                                      else local_device_count)
        super().__init__(dataset, task_config, num_steps=num_steps,
                         global_batch_size=global_batch_size, process_index=process_index,
                         process_count=process_count, local_device_count=local_device_count,
                         prefetch=prefetch, num_workers=num_workers,
                         prefetch_memory_bytes=prefetch_memory_bytes, cache_bytes=cache_bytes,
                         dask_scheduler=dask_scheduler)
        self.split = tuple(split)
        self.init_times = valid_init_times(self.reader.times, split, task_config.num_input_frames,
                                           num_steps)[::every]
        if self.init_times.size == 0:
            raise ValueError(
                f"No eval example fits: {task_config.num_input_frames} input frames + "
                f"num_steps={num_steps} rollout steps exceed the available times in split "
                f"{self.split} (dataset times {self.reader.times[0]} .. "
                f"{self.reader.times[-1]}).")
        self._fixed_steps = num_steps

    @property
    def num_batches(self) -> int:
        return int(self.init_times.size // self.global_batch_size)

    def _init_time(self, g: int) -> np.datetime64:
        return self.init_times[g]

    def _exhausted(self, g: int) -> bool:
        return g + self.global_batch_size > self.init_times.size

    def _check_steps(self, num_steps: int) -> None:
        if num_steps != self._fixed_steps:
            raise ValueError(f"EvalIterator was built for num_steps={self._fixed_steps}; "
                             "build another one for a different rollout length.")


def main(argv=None) -> None:
    """Prints examples/s through TrainIterator with and without prefetch."""
    parser = argparse.ArgumentParser(description="Example throughput (printed, not asserted).")
    parser.add_argument("--source", required=True, help="zarr / netCDF readable by data.sources")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-steps", type=int, default=1)
    parser.add_argument("--levels", type=int, default=13)
    parser.add_argument("--step-seconds", type=float, default=0.0,
                        help="simulated training step per batch (shows the overlap)")
    args = parser.parse_args(argv)
    import dataclasses
    from data import sources
    task = dataclasses.replace(config.TASK, pressure_levels=config.PRESSURE_LEVELS[args.levels])
    ds = sources.open_source(args.source, task_config=task)
    for prefetch in (0, 2):
        with TrainIterator(ds, task, num_steps=args.num_steps, split=(None, None),
                           global_batch_size=args.batch_size, process_index=0, process_count=1,
                           local_device_count=1, prefetch=prefetch, cache_bytes=0) as it:
            it.next()   # warm-up (opens chunks, starts threads)
            began = time_lib.perf_counter()
            for _ in range(args.batches):
                it.next()
                time_lib.sleep(args.step_seconds)
            rate = args.batches * args.batch_size / (time_lib.perf_counter() - began)
        print(f"prefetch={prefetch}: {rate:.1f} examples/s ({args.batch_size} per batch, "
              f"{args.num_steps} steps, {args.step_seconds} s simulated step)")


if __name__ == "__main__":
    main()
