"""Reading examples in worker processes, straight into batches in shared memory.

Each worker process holds its own `windows.FrameReader` over a pickled copy of the dataset (for a
lazily indexed zarr that is its metadata, not its data), so decoding, NaN checks and copies run on
as many cores as there are workers, free of the parent's GIL. A batch lives in one file under
/dev/shm mapped by the parent and the workers: a worker writes its example into its slot, and the
parent hands out numpy views of the mapping, with no copy and no pickling of arrays. The file is
unlinked at once (workers open it through the parent's descriptor) and closed once the batch is
complete or dropped; the memory goes when the last view does.
"""

import concurrent.futures
import mmap
import multiprocessing
import os
import tempfile
import threading
from typing import Mapping, Optional

import numpy as np
import xarray as xr

from data import windows
from graphcast import config

_reader: Optional[windows.FrameReader] = None   # this worker process's reader


def _start(dataset: xr.Dataset, task_config: config.TaskConfig, cache_bytes: int) -> None:
    global _reader
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_platforms", "cpu")   # derived forcings must not claim accelerators
    _reader = windows.FrameReader(dataset, task_config, cache_bytes=cache_bytes,
                                  dask_scheduler="synchronous")


def _read(path: str, layout: dict, slot: int, init_time: np.datetime64, num_steps: int) -> None:
    with open(path, "r+b") as f:
        buffer = mmap.mmap(f.fileno(), 0)
    try:
        arrays = views(buffer, layout)
        _reader.read_into(init_time, num_steps, {part: {n: a[slot] for n, a in names.items()}
                                                 for part, names in arrays.items()})
        del arrays
    finally:
        try:
            buffer.close()
        except BufferError:   # an exception's traceback still holds a view: the GC unmaps it
            pass


def offsets(layout: Mapping, rows: int) -> tuple:
    """({part: {var: (offset, shape)}}, total bytes) of a batch of `rows` examples of `layout`
    (as windows.FrameReader.layout gives), float32, each array 64-byte aligned."""
    placed, offset = {}, 0
    for part, shapes in layout.items():
        placed[part] = {}
        for name, shape in shapes.items():
            full = (rows,) + tuple(shape)
            placed[part][name] = (offset, full)
            offset += -(-4 * int(np.prod(full)) // 64) * 64
    return placed, max(offset, 1)


def views(buffer, placed: Mapping) -> dict:
    """{part: {var: float32 array}} over `buffer` at the places `offsets` gave."""
    return {part: {n: np.ndarray(shape, np.float32, buffer, offset)
                   for n, (offset, shape) in names.items()} for part, names in placed.items()}


class SharedBatch:
    """One batch's arrays in a /dev/shm file that worker processes open by `path`.

    Where /proc exists the file is unlinked at once and workers open it through this process's
    descriptor (/proc/PID/fd/N), so nothing is left in /dev/shm even if the process is killed."""

    def __init__(self, layout: Mapping, rows: int):
        self.placed, size = offsets(layout, rows)
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        self._fd, self.path = tempfile.mkstemp(prefix="graphcast-batch-", dir=folder)
        os.ftruncate(self._fd, size)
        self._buffer = mmap.mmap(self._fd, size)
        by_descriptor = f"/proc/{os.getpid()}/fd/{self._fd}"
        if os.path.exists(by_descriptor):
            os.unlink(self.path)
            self.path = by_descriptor
        self.arrays = views(self._buffer, self.placed)

    def release_when_done(self, futures: list) -> None:
        """Closes the file (and removes it if still named) once every read into it has finished
        or been cancelled: a descriptor number closed earlier could be reused by another batch
        and opened by a late worker. The arrays stay valid while referenced."""
        pending = [len(futures)]
        lock = threading.Lock()

        def one_done(_):
            with lock:
                pending[0] -= 1
                last = pending[0] == 0
            if last:
                self._close()
        if not futures:
            self._close()
        for f in futures:
            f.add_done_callback(one_done)

    def _close(self) -> None:
        os.close(self._fd)
        if not self.path.startswith("/proc/"):
            os.unlink(self.path)


class ProcessReaders:
    """A pool of `num_workers` processes reading examples of `dataset` into SharedBatch slots."""

    def __init__(self, dataset: xr.Dataset, task_config: config.TaskConfig, *, num_workers: int,
                 cache_bytes: int):
        self._pool = concurrent.futures.ProcessPoolExecutor(
            num_workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start,
            initargs=(dataset, task_config, cache_bytes))

    def submit(self, batch: SharedBatch, slot: int, init_time: np.datetime64,
               num_steps: int) -> concurrent.futures.Future:
        return self._pool.submit(_read, batch.path, batch.placed, slot, init_time, num_steps)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
