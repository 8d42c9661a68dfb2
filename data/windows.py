"""Example windows read from an internal-layout dataset as host-layout float32 arrays.

`FrameReader.read(init_time, num_steps)` returns one example: {"inputs", "targets", "forcings"}
dicts of float32 arrays with a leading time axis, in the host batch layout of the model;
`read_into` writes it into given arrays (a slot of a batch).

Speed: with the frame cache off, a stored float32 zarr variable seen through plain slices (what
`sources.open_source(..., use_dask=False)` gives for a local or gs:// zarr, latitude flip and a run
of levels included) is decoded by zarr straight into its place in the destination, then checked
for NaN/Inf there while it is still in cache: no intermediate array, no copy. Other variables
(dask-backed or derived ones, a level list that is not a run, a subsampled grid, another backend)
are read one frame at a time by indexing and copied into place. With the cache on, frames (all
variables of one time) are kept by time in a bounded LRU cache, so consecutive examples that
overlap (eval order, curriculum with long rollouts) read each frame once.
"""

import asyncio
import collections
import concurrent.futures
import threading
from typing import Mapping

import dask
import numpy as np
import xarray as xr
import zarr
from xarray.core import indexing
from zarr.core import sync as zarr_sync
from zarr.core.buffer import cpu as zarr_cpu

from data import sources, validate
from data.splits import SIX_HOURS
from graphcast import config
from graphcast import data_utils


class FrameReader:
    """Reads examples of `dataset` as host-layout float32 arrays [T, ...], caching frames by time.

    dataset: internal layout (dims time, [level,] lat, lon; dask-backed, lazily indexed or
      numpy). Its variables that are not dask-backed are checked for NaN/Inf here when
      attrs["check_nans"] says so (open_source sets it); dask-backed ones carry their own check.
    cache_bytes: bound of the LRU frame cache (0 disables it). Thread-safe.
    """

    def __init__(self, dataset: xr.Dataset, task_config: config.TaskConfig, *,
                 cache_bytes: int = 256 * 2 ** 20, dask_scheduler: str = "threads"):
        self.task = task_config
        if "level" in dataset.dims and task_config.pressure_levels:
            have = dataset["level"].values.tolist()
            config.check_pressure_levels(have, task_config.pressure_levels, "dataset",
                                         validate.MissingLevelsError)
            if have != list(task_config.pressure_levels):
                dataset = dataset.isel(level=sources.level_indexer(
                    have, list(task_config.pressure_levels)))
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
        self._direct = {} if cache_bytes else {
            n: d for n in self.dynamic if (d := _direct_source(self._data[n].variable))}
        self._framed = [n for n in self.dynamic if n not in self._direct]
        self._check = bool(dataset.attrs.get("check_nans", 0))
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
        missing = [i for i in dict.fromkeys(indices) if i not in found]
        if missing:
            fresh = self._read_frames(missing)
            self._store(fresh)
            found.update(fresh)
        return [found[i] for i in indices]

    def _read_frames(self, indices: list) -> dict:
        """{time index: {var: float32 [(L,) H, W]}}: each variable's consecutive times in one
        slice read (a plain chunk read, whose chunks the store fetches and decodes
        concurrently; a list of times would be an element-wise selection)."""
        frames = {i: {} for i in indices}
        runs = _runs(sorted(indices))
        for name in self._framed:
            var = self._data[name]
            for first, last in runs:
                try:
                    with dask.config.set(scheduler=self._scheduler):
                        block = var.variable.isel(time=slice(first, last + 1)).values
                except (validate.DataValidationError, ConnectionError, TimeoutError):
                    raise
                except Exception as e:  # noqa: BLE001 -- a chunk that does not decode: name it
                    raise self._unreadable(name, list(range(first, last + 1)), e) from e
                block = np.asarray(block, np.float32)
                for k, i in enumerate(range(first, last + 1)):
                    if self._check and var.chunks is None:
                        validate.check_finite(block[k], variable=name, time=self.times[i])
                    frames[i][name] = block[k]
        return frames

    def _unreadable(self, name: str, indices: list, error: Exception) -> validate.CorruptDataError:
        """Names the time of a chunk of `name` that cannot be read or decoded, found by reading
        the failed times one at a time."""
        for i in indices:
            try:
                with dask.config.set(scheduler="synchronous"):
                    self._data[name].variable.isel(time=i).values
            except Exception as e:  # noqa: BLE001 -- this is the one
                return validate.CorruptDataError(
                    f"Cannot read variable {name!r} at time {self.times[i]} from "
                    f"{self._source} (corrupt or truncated chunk?): {type(e).__name__}: {e}")
        return validate.CorruptDataError(
            f"Cannot read variable {name!r} at times {[str(self.times[i]) for i in indices]} "
            f"from {self._source}: {type(error).__name__}: {error}")

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
        """Progress features [T, H, W] (broadcast over lat) at `times`."""
        seconds = data_utils.seconds_since_epoch(times)
        shape = (len(times), len(self.lat), len(self.lon))
        out = {}
        year = data_utils.year_progress(seconds)[:, None, None]   # [T, 1, 1]
        day = data_utils.day_progress(seconds, self.lon)[:, None]  # [T, 1, W]
        for base, progress in ((config.YEAR_PROGRESS, year), (config.DAY_PROGRESS, day)):
            sin, cos = data_utils.progress_sin_cos(progress)
            for name, value in ((base, progress), (base + "_sin", sin), (base + "_cos", cos)):
                out[name] = np.broadcast_to(value, shape)
        return out

    def layout(self, num_steps: int) -> dict:
        """Shapes of one example's arrays: {part: {var: shape}}, in the task's variable order."""
        n_in = self.task.num_input_frames
        h, w = len(self.lat), len(self.lon)

        def shape(name, steps):
            if name in self.statics:
                return self.statics[name].shape
            if name in self.dynamic:
                return (steps,) + self._data[name].shape[1:]
            return (steps, h, w)   # progress features

        return {"inputs": {n: shape(n, n_in) for n in self.task.input_variables},
                "targets": {n: shape(n, num_steps) for n in self.task.target_variables},
                "forcings": {n: shape(n, num_steps) for n in self.task.forcing_variables}}

    def read(self, init_time: np.datetime64, num_steps: int) -> dict:
        """One example: {"inputs", "targets", "forcings"} of float32 arrays with a leading T."""
        out = {part: {n: np.empty(s, np.float32) for n, s in shapes.items()}
               for part, shapes in self.layout(num_steps).items()}
        self.read_into(init_time, num_steps, out)
        return out

    def read_into(self, init_time: np.datetime64, num_steps: int,
                  out: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Writes the example at `init_time` into `out` ({part: {var: float32 array}} shaped as
        `layout(num_steps)`, e.g. views of one slot of a batch)."""
        n_in = self.task.num_input_frames
        times = (np.datetime64(init_time, "ns")
                 + np.arange(-(n_in - 1), num_steps + 1) * SIX_HOURS)
        try:
            indices = [self._index[t] for t in times.tolist()]
        except KeyError as e:
            absent = np.datetime64(e.args[0], "ns")
            raise ValueError(f"Example at {init_time} with {num_steps} steps needs time "
                             f"{absent}, which is not in the dataset.") from e
        frames = self._frames(indices) if self._framed else [{}] * len(indices)
        progress = self._progress(times)
        direct = []
        for part, rows in (("inputs", slice(0, n_in)), ("targets", slice(n_in, None)),
                           ("forcings", slice(n_in, None))):
            for name, dest in out[part].items():
                if name in self.statics:
                    dest[...] = self.statics[name]
                elif name in progress:
                    dest[...] = progress[name][rows]
                elif name in self._direct:
                    direct.append((name, indices[rows], dest))
                else:
                    for k, frame in enumerate(frames[rows]):
                        dest[k] = frame[name]
        if direct:
            self._read_direct(direct)

    def _read_direct(self, jobs: list) -> None:
        """Decodes each (variable, time indices, dest [T, ...]) of `jobs` straight into dest: one
        read per run of consecutive times, all in flight together in zarr's event loop (so the
        chunks of every variable are fetched and decoded concurrently), each checked for NaN/Inf
        as soon as it has landed."""
        reads = []
        for name, indices, dest in jobs:
            array, time_start, rest, flips = self._direct[name]
            k = 0
            for first, last in _runs(indices):   # in the order of `indices`
                block = dest[k:k + last - first + 1]
                target = block[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
                selection = (slice(time_start + first, time_start + last + 1),) + rest
                reads.append((name, first, last, array, selection, block, target))
                k += last - first + 1

        async def read(name, first, last, array, selection, block, target):
            await array.async_array.get_orthogonal_selection(
                selection, out=zarr_cpu.NDBuffer.from_numpy_array(target))
            if self._check and _CHECKS is None:
                self._check_block(name, first, block)
            elif self._check:   # off the event loop, which meanwhile copies other decoded chunks
                await asyncio.get_running_loop().run_in_executor(
                    _CHECKS, self._check_block, name, first, block)

        async def read_all():
            return await asyncio.gather(*(read(*r) for r in reads), return_exceptions=True)
        for (name, first, last, *_), result in zip(reads, zarr_sync.sync(read_all())):
            if isinstance(result, (validate.DataValidationError, ConnectionError, TimeoutError)):
                raise result
            if isinstance(result, BaseException):   # a chunk that does not decode: name it
                raise self._unreadable(name, list(range(first, last + 1)), result) from result

    def _check_block(self, name: str, first: int, block: np.ndarray) -> None:
        """NaN/Inf check of `block`, frames of `name` from time index `first` on: one sum (numpy
        releases the GIL), then frame by frame only when it is not finite, to name the time."""
        if not np.isfinite(np.sum(block)):
            for j in range(len(block)):
                validate.check_finite(block[j], variable=name, time=self.times[first + j])


_CHECKS = concurrent.futures.ThreadPoolExecutor(2, "nan-checks")   # threads start when needed


def use_one_thread() -> None:
    """Decodes with one zarr thread and checks for NaN/Inf in zarr's event loop: for a process
    pinned to one core, where more threads would only take turns on it (at 1 degree, a worker
    pinned to one core delivered 1.16x more examples with one thread than with zarr's default
    pool)."""
    global _CHECKS
    zarr.config.set({"threading.max_workers": 1})   # zarr's next read installs the 1-thread pool
    _CHECKS = None


def _direct_source(var: xr.Variable):
    """(zarr array, first stored time, stored selection of the other axes, which of all axes
    are reversed) when `var` is a float32 zarr array seen only through slices of step 1 or -1
    in its stored axis order, so that zarr can decode it straight into a destination; else
    None."""
    data = var._data   # pylint: disable=protected-access -- xarray's lazy indexing chain
    if not isinstance(data, indexing.CopyOnWriteArray):
        return None
    lazy = data.array
    if type(lazy) is not indexing.LazilyIndexedArray or \
            not isinstance(lazy.key, indexing.BasicIndexer) or \
            not hasattr(lazy.array, "get_array"):
        return None
    array = lazy.array.get_array()
    key = lazy.key.tuple
    if not isinstance(array, zarr.Array) or array.dtype != np.float32 or \
            var.dtype != np.float32 or var.dims[0] != "time" or len(key) != array.ndim or \
            not all(isinstance(k, slice) for k in key):
        return None
    plain, flips = [], []
    for k, size in zip(key, array.shape):
        start, stop, step = k.indices(size)
        if step == 1:
            plain.append(slice(start, max(start, stop)))
        elif step == -1:
            plain.append(slice(stop + 1, max(stop + 1, start + 1)))
        else:
            return None
        flips.append(step == -1)
    if flips[0]:
        return None
    return array, plain[0].start, tuple(plain[1:]), tuple(flips)


def _runs(indices: list) -> list:
    """[(first, last)] of the runs of consecutive integers in sorted `indices`."""
    runs = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return [tuple(r) for r in runs]


def example_bytes(reader: FrameReader, num_steps: int) -> int:
    """Bytes of one example's arrays (float32)."""
    return 4 * sum(int(np.prod(s)) for shapes in reader.layout(num_steps).values()
                   for s in shapes.values())
