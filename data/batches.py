"""Batches for jax.pmap from a stream of examples: the host's slice of each global batch, the
local-device axes, background prefetch under a memory cap.

`BatchStream` is the shared machinery; subclasses say which initial time the g-th global example
has (data.train_iterator: shuffled epochs; data.eval_iterator: one chronological pass).
"""

import collections
import concurrent.futures
from typing import Iterator, Optional

import numpy as np

from data import windows


def stack_examples(examples: list, leading: tuple) -> dict:
    """Stacks examples into a batch with leading axes `leading` (e.g. (D, per_device))."""
    batch = {}
    for part in ("inputs", "targets", "forcings"):
        batch[part] = {n: np.stack([e[part][n] for e in examples]).reshape(
            leading + examples[0][part][n].shape) for n in examples[0][part]}
    return batch


class BatchStream:
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
        per_batch = self.per_host * windows.example_bytes(self.reader, self._num_steps)
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
