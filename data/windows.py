"""Example windows read from an internal-layout dataset as host-layout float32 arrays.

`FrameReader.read(init_time, num_steps)` returns one example: {"inputs", "targets", "forcings"}
dicts of float32 arrays with a leading time axis, in the host batch layout of the model. Frames
(all variables of one time) are cached by time in a bounded LRU cache, so consecutive examples
that overlap (eval order, curriculum with long rollouts) read each frame once.
"""

import collections
import threading

import dask
import numpy as np
import xarray as xr

from data import validate
from data.splits import SIX_HOURS
from graphcast import config
from graphcast import data_utils


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


def example_bytes(reader: FrameReader, num_steps: int) -> int:
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
