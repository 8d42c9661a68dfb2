"""Reading examples in worker processes, straight into batches in shared memory.

Each worker process holds its own `windows.FrameReader` over a pickled copy of the dataset (for a
lazily indexed zarr that is its metadata, not its data), so decoding, NaN checks and copies run on
as many cores as there are workers, free of the parent's GIL. A batch lives in one file under
/dev/shm mapped by the parent and the workers: a worker writes its example into its slot, and the
parent hands out numpy views of the mapping, with no copy and no pickling of arrays. The file is
unlinked at once (workers open it through the parent's descriptor); once the batch's reads are
done and its last view is gone, the file is reused for a later batch (BatchFiles) or closed.
A worker keeps its mapping of each file the parent still holds, so a reused file is written
through pages already mapped (mapping a file per read cost a page fault per 4 KiB written and an
unmap per read: about a fifth of a worker's time at 1 degree).

Each worker makes glibc's malloc reuse freed memory instead of paging in fresh blocks for every
decoded chunk, and by default (pin) runs on a core of its own with one decoding thread, so that
throughput grows by one worker's worth per worker.
"""

import collections
import concurrent.futures
import ctypes
import gc
import itertools
import mmap
import multiprocessing
import os
import pickle
import tempfile
import threading
import weakref
from typing import Mapping, NamedTuple, Optional

import numpy as np
import xarray as xr

from data import windows
from graphcast import config

_reader: Optional[windows.FrameReader] = None   # this worker process's reader
_mapped = {}   # this worker's mappings of batch files: key -> mmap
_keys = itertools.count()   # batch file keys, unique in the parent


def _start(dataset: bytes, task_config: config.TaskConfig, cache_bytes: int, started) -> None:
    """Worker start-up. `dataset` comes pickled, and is unpickled only after `_reuse_freed_memory`
    (unpickling a zarr-backed dataset starts zarr's threads, whose malloc arenas are fixed when
    they first allocate). `started` counts the pinned workers started so far (a shared
    multiprocessing Value), None when workers are not pinned."""
    global _reader
    _reuse_freed_memory()
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_platforms", "cpu")   # derived forcings must not claim accelerators
    if started is not None:
        with started.get_lock():
            number = started.value
            started.value += 1
        pin_to_core(number)
        windows.use_one_thread()
    _reader = windows.FrameReader(pickle.loads(dataset), task_config, cache_bytes=cache_bytes,
                                  dask_scheduler="synchronous")
    gc.freeze()   # what is loaded now lives as long as the worker: no collection walks it


# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def _reuse_freed_memory() -> None:
    """Makes glibc's malloc serve every block from one heap it never shrinks: no blocks of their
    own from the OS (mmap) for big allocations, no trimming of freed memory, one arena for all
    threads (another thread's arena would map big blocks anyway). A worker allocates and frees
    each chunk's bytes and its decoded copy (154 MB apiece for a 0.25-degree 37-level variable);
    fresh pages for them cost a page fault per 4 KiB and the kernel's zeroing: 1.85 faults per
    page delivered and 70% of a worker's CPU time at 0.25 degrees, and 2.8x fewer bytes per
    CPU-second than with this. The heap stays at its peak: about 1.5 examples (4.4 GB at 0.25
    degrees, 37 levels). Nothing where malloc is not glibc's."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)):
        libc.mallopt(param, value)   # -1: never trim


def local_rank() -> int:
    """This training process's number among those on its machine (SLURM_LOCALID, else
    LOCAL_RANK as launch/local_multiprocess.sh sets it; 0 when neither is set)."""
    for name in ("SLURM_LOCALID", "LOCAL_RANK"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def worker_core(number: int) -> Optional[int]:
    """The core worker `number` (0, 1, ...; the workers of local rank r are numbered from
    r x workers) runs on: the cores this process may use, counted from the last, round-robin, so
    that with fewer workers than cores the first cores stay free for the trainer's own threads.
    None where the OS has no CPU affinity (not Linux)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    return cores[-1 - number % len(cores)]


def pin_to_core(number: int) -> None:
    """Pins every thread this process has started so far to `worker_core(number)`; threads
    started later inherit it."""
    core = worker_core(number)
    if core is None:
        return
    for thread in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(thread), {core})
        except (ProcessLookupError, PermissionError):   # a thread that has just ended
            pass


def _read(path: str, key: int, live: frozenset, layout: dict, slot: int,
          init_time: np.datetime64, num_steps: int) -> None:
    arrays = views(_mapping(path, key, live), layout)
    _reader.read_into(init_time, num_steps, {part: {n: a[slot] for n, a in names.items()}
                                             for part, names in arrays.items()})


def _mapping(path: str, key: int, live: frozenset) -> mmap.mmap:
    """This worker's mapping of the batch file `key` at `path`, mapped on first use; mappings of
    files not in `live` (the keys of the files the parent held when it asked) are dropped, so a
    closed file's memory is not kept."""
    for old in [k for k in _mapped if k not in live and k != key]:
        _unmap(_mapped.pop(old))
    if key not in _mapped:
        with open(path, "r+b") as f:
            _mapped[key] = mmap.mmap(f.fileno(), 0)
    return _mapped[key]


def _unmap(buffer: mmap.mmap) -> None:
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
    descriptor (/proc/PID/fd/N), so nothing is left in /dev/shm even if the process is killed.
    From a `BatchFiles` pool, the file is reused by a later batch once it is free (see there)."""

    def __init__(self, layout: Mapping, rows: int, files: Optional["BatchFiles"] = None):
        self.placed, size = offsets(layout, rows)
        self._files = files
        self.file = files.take(size) if files is not None else _new_file(size)
        self.path = self.file.path
        base = np.frombuffer(self.file.buffer, np.uint8)
        self.arrays = views(base, self.placed)
        self._pending = 2   # reads not finished, arrays still viewed
        self._lock = threading.Lock()
        weakref.finalize(base, self._one_released)

    def release_when_done(self, futures: list) -> None:
        """Closes the file (and removes it if still named), or returns it to its pool, once
        every read into it has finished or been cancelled and no view of its arrays is left: a
        descriptor number closed earlier could be reused by another batch and opened by a late
        worker, and a reused file must not change under a batch still in use. The arrays stay
        valid while referenced."""
        self.arrays = None   # only the caller's views keep the memory now
        pending = [len(futures)]
        lock = threading.Lock()

        def one_done(_):
            with lock:
                pending[0] -= 1
                last = pending[0] == 0
            if last:
                self._one_released()
        if not futures:
            self._one_released()
        for f in futures:
            f.add_done_callback(one_done)

    def _one_released(self) -> None:
        with self._lock:
            self._pending -= 1
            if self._pending:
                return
        if self._files is not None:
            self._files.give(self.file)
        else:
            _close(self.file)

    @property
    def live(self) -> frozenset:
        """Keys of the batch files still open (workers keep their mappings of these)."""
        return self._files.live() if self._files is not None else frozenset([self.file.key])


class _File(NamedTuple):
    fd: int
    path: str
    buffer: mmap.mmap
    key: int


def _new_file(size: int) -> _File:
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    fd, path = tempfile.mkstemp(prefix="graphcast-batch-", dir=folder)
    os.ftruncate(fd, size)
    buffer = mmap.mmap(fd, size)
    by_descriptor = f"/proc/{os.getpid()}/fd/{fd}"
    if os.path.exists(by_descriptor):
        os.unlink(path)
        path = by_descriptor
    return _File(fd, path, buffer, next(_keys))


def _close(file: _File) -> None:
    _unmap(file.buffer)   # a view still existing somewhere: the GC unmaps it with the last one
    os.close(file.fd)
    if not file.path.startswith("/proc/"):
        os.unlink(file.path)


class BatchFiles:
    """Batch files for reuse, by size: a batch written into a file whose pages are already in
    memory (here and in the workers) costs no page faults and no zeroing of fresh pages. At most
    `keep` free files are kept; one of another size (a rollout length no longer used) makes way
    for a new one."""

    def __init__(self, keep: int):
        self._free = collections.OrderedDict()   # key -> _File, oldest first
        self._open = set()                       # keys of the files not closed
        self._keep = keep
        self._lock = threading.Lock()
        self._closed = False

    def take(self, size: int) -> _File:
        """A free file of `size` bytes, else a new one."""
        with self._lock:
            key = next((k for k, f in reversed(self._free.items())   # the last freed
                        if len(f.buffer) == size), None)
            if key is not None:
                return self._free.pop(key)
            file = _new_file(size)
            self._open.add(file.key)
            return file

    def give(self, file: _File) -> None:
        """Keeps a free file for reuse, or closes it (closed pool, or full of files this size)."""
        closing = [file]
        with self._lock:
            if not self._closed:
                if len(self._free) >= self._keep:
                    other = next((k for k, f in self._free.items()
                                  if len(f.buffer) != len(file.buffer)), None)
                    if other is not None:
                        closing = [self._free.pop(other), file]
                if len(self._free) < self._keep:
                    self._free[file.key] = file
                    closing.remove(file)
            for f in closing:
                self._open.discard(f.key)
        for f in closing:
            _close(f)

    def live(self) -> frozenset:
        """Keys of the files not closed."""
        with self._lock:
            return frozenset(self._open)

    def close(self) -> None:
        """Closes the free files; files in use are closed when given back."""
        with self._lock:
            self._closed = True
            free = list(self._free.values())
            self._free.clear()
            self._open.difference_update(f.key for f in free)
        for f in free:
            _close(f)


class ProcessReaders:
    """A pool of `num_workers` processes reading examples of `dataset` into SharedBatch slots.

    pin: each worker runs on one core (`worker_core`) and decodes in one thread
    (`windows.use_one_thread`): throughput then grows by one worker's worth per worker, and a
    core does more per second than under the default threads, which take turns on the cores
    with the other workers'."""

    def __init__(self, dataset: xr.Dataset, task_config: config.TaskConfig, *, num_workers: int,
                 cache_bytes: int, pin: bool = True):
        context = multiprocessing.get_context("spawn")
        started = (context.Value("i", local_rank() * num_workers)
                   if pin and hasattr(os, "sched_setaffinity") else None)
        self._pool = concurrent.futures.ProcessPoolExecutor(
            num_workers, mp_context=context, initializer=_start,
            initargs=(pickle.dumps(dataset), task_config, cache_bytes, started))

    def submit(self, batch: SharedBatch, slot: int, init_time: np.datetime64,
               num_steps: int) -> concurrent.futures.Future:
        return self._pool.submit(_read, batch.path, batch.file.key, batch.live, batch.placed,
                                 slot, init_time, num_steps)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
