"""Batches for jax.pmap from a stream of examples: the host's slice of each global batch, the
local-device axes, background prefetch under a memory cap.

Each example is read straight into its slot of the batch's arrays (no per-example arrays stacked
afterwards), by a pool of reader threads, or with `worker_processes` by worker processes that
write into the batch in shared memory (data.workers), so the per-example work spreads over cores.

`BatchStream` is the shared machinery; subclasses say which initial time the g-th global example
has (data.train_iterator: shuffled epochs; data.eval_iterator: one chronological pass).
"""

import collections
import concurrent.futures
from typing import Iterator, Optional

import numpy as np
import xarray as xr

from data import windows
from data import workers
from graphcast import config


class BatchStream:
    """Shared batching: host slice of each global batch, device axes, background prefetch.

    global_batch_size: examples per global batch, split evenly over processes x devices.
    process_index/process_count/local_device_count: default from jax.
    prefetch: batches read ahead in background threads (0 = read synchronously);
    num_workers: readers (threads, or processes with worker_processes); prefetch_memory_bytes
    caps the bytes of prefetched batches.
    worker_processes: read examples in num_workers spawned processes (data.workers) instead of
    threads: the same batches, with the per-example work on as many cores; pin_workers: each
    of them on one core, decoding in one thread (workers.ProcessReaders).
    cache_bytes: LRU cache of frames, so overlapping windows are read once.
    """

    def __init__(self, dataset: xr.Dataset, task_config: config.TaskConfig, *, num_steps: int,
                 global_batch_size: int, process_index: Optional[int] = None,
                 process_count: Optional[int] = None, local_device_count: Optional[int] = None,
                 prefetch: int = 2, num_workers: int = 4, prefetch_memory_bytes: int = 2 ** 30,
                 cache_bytes: int = 256 * 2 ** 20, dask_scheduler: str = "threads",
                 worker_processes: bool = False, pin_workers: bool = True):
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
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers} must be >= 1.")
        self.reader = windows.FrameReader(dataset, task_config, cache_bytes=cache_bytes,
                                          dask_scheduler=dask_scheduler)
        self.task = task_config
        self.global_batch_size = global_batch_size
        self.process_index, self.process_count = process_index, process_count
        self.local_device_count = local_device_count
        self.per_host = global_batch_size // process_count
        self._num_steps = num_steps
        self._prefetch = prefetch
        self._memory = prefetch_memory_bytes
        self._processes = (workers.ProcessReaders(dataset, task_config, num_workers=num_workers,
                                                  cache_bytes=cache_bytes, pin=pin_workers)
                           if worker_processes else None)
        self._files = workers.BatchFiles(keep=prefetch + 2) if worker_processes else None
        self._pool = (concurrent.futures.ThreadPoolExecutor(num_workers, "examples")
                      if prefetch > 0 and not worker_processes else None)
        self._queue = collections.deque()   # (first global index, num_steps, arrays, futures)
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
        per_batch = self.per_host * windows.example_bytes(self.reader, self._num_steps)
        return max(1, min(self._prefetch, self._memory // max(per_batch, 1)))

    def _start_batch(self, first: int) -> tuple:
        """Starts reading the host's examples of the global batch at `first` into new arrays
        [per_host, T, ...]: (arrays, futures, shared file or None)."""
        steps, times = self._num_steps, self._host_times(first)
        layout = self.reader.layout(steps)
        if self._processes is not None:
            shared = workers.SharedBatch(layout, self.per_host, self._files)
            futures = [self._processes.submit(shared, i, t, steps) for i, t in enumerate(times)]
            return shared.arrays, futures, shared
        arrays = {part: {n: np.empty((self.per_host,) + s, np.float32) for n, s in shapes.items()}
                  for part, shapes in layout.items()}

        def slot(i):
            return {part: {n: a[i] for n, a in names.items()} for part, names in arrays.items()}
        if self._pool is None:
            for i, t in enumerate(times):
                self.reader.read_into(t, steps, slot(i))
            return arrays, [], None
        return arrays, [self._pool.submit(self.reader.read_into, t, steps, slot(i))
                        for i, t in enumerate(times)], None

    def _fill(self) -> None:
        first = self._queue[-1][0] + self.global_batch_size if self._queue else self._next
        while len(self._queue) < self._depth() and not self._exhausted(first):
            self._queue.append((first, self._num_steps) + self._start_batch(first))
            first += self.global_batch_size

    def _drop_prefetched(self) -> None:
        while self._queue:
            _, _, _, futures, shared = self._queue.popleft()
            for f in futures:
                f.cancel()
            if shared is not None:
                shared.release_when_done(futures)

    def next(self, num_steps: Optional[int] = None) -> dict:
        """The next host batch; `num_steps` (if given) sets the rollout length first."""
        if num_steps is not None:
            self.set_num_steps(num_steps)
        if self._exhausted(self._next):
            raise StopIteration
        times = self._host_times(self._next)
        if self._pool is None and self._processes is None:
            arrays, futures, shared = self._start_batch(self._next)
            self._next += self.global_batch_size
        else:
            self._fill()
            first, steps, arrays, futures, shared = self._queue.popleft()
            assert first == self._next and steps == self._num_steps
            self._next += self.global_batch_size
            if self._prefetch:
                self._fill()   # queue the following batches before waiting on this one
        if shared is not None:
            shared.release_when_done(futures)
        for f in futures:
            f.result()
        leading = (self.local_device_count, self.per_host // self.local_device_count)
        batch = {part: {n: a.reshape(leading + a.shape[1:]) for n, a in names.items()}
                 for part, names in arrays.items()}
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
        if self._processes is not None:
            self._processes.shutdown()
            self._processes = None
            self._files.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
