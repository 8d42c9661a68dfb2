"""Evaluation order: one chronological pass over a split, every `every`-th valid initial time."""

from typing import Optional, Sequence

import numpy as np
import xarray as xr

from data import batches
from data.splits import DEFAULT_SPLITS, valid_init_times
from graphcast import config


class EvalIterator(batches.BatchStream):
    """One pass over a split in chronological order (every `every`-th valid initial time).

    Same batch layout as TrainIterator; a final incomplete global batch is dropped
    (see num_batches). Defaults: eval split, global batch = all local devices of all processes.
    stream_options: batching, prefetch and reader options of batches.BatchStream.
    """

    def __init__(self, dataset: xr.Dataset, task_config: config.TaskConfig, *,
                 num_steps: int = 1, split: Sequence = DEFAULT_SPLITS["eval"], every: int = 1,
                 global_batch_size: Optional[int] = None, **stream_options):
        if every < 1:
            raise ValueError(f"every={every} must be >= 1.")
        if global_batch_size is None:
            import jax
            process_count = stream_options.get("process_count")
            local_device_count = stream_options.get("local_device_count")
            global_batch_size = (
                (jax.process_count() if process_count is None else process_count)
                * (jax.local_device_count() if local_device_count is None else local_device_count))
        super().__init__(dataset, task_config, num_steps=num_steps,
                         global_batch_size=global_batch_size, **stream_options)
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
