"""The experiment's view of data/: open the source once, build train/eval iterators from config.

Also creates the synthetic sample data on first use for configs that name a sample directory.
"""

import os
import subprocess
import sys
from typing import Iterator, Mapping, Optional

import jax
import numpy as np
from absl import logging

from data import examples
from data import sources


def ensure_sample_data(data_cfg) -> None:
    """Runs `python -m data.sample --out DIR` when the config's sample source is missing."""
    if not data_cfg.generate_sample_dir or os.path.exists(data_cfg.source):
        return
    if jax.process_index() == 0:
        logging.info("Generating the synthetic sample data in %s.", data_cfg.generate_sample_dir)
        print(f"Generating synthetic sample data in {data_cfg.generate_sample_dir} "
              "(python -m data.sample) ...", flush=True)
        subprocess.run([sys.executable, "-m", "data.sample", "--out", data_cfg.generate_sample_dir],
                       check=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        multihost_utils.sync_global_devices("sample data ready")
    if not os.path.exists(data_cfg.source):
        raise FileNotFoundError(f"data.source {data_cfg.source} does not exist after generating the "
                                f"sample into {data_cfg.generate_sample_dir}.")


class Source:
    """The configured dataset (lazy, normalized layout) and iterators over its splits."""

    def __init__(self, data_cfg, task_config, resolution: Optional[float]):
        if not data_cfg.source:
            raise ValueError("config.experiment_kwargs.config.data.source is empty: set it to a "
                             "zarr directory, gs:// zarr or netCDF file.")
        self.cfg = data_cfg
        self.task = task_config
        self.dataset = sources.open_source(
            data_cfg.source, task_config=task_config, resolution=resolution,
            storage_options=dict(data_cfg.get("storage_options") or {}) or None,
            check_nans=data_cfg.get("check_nans", True))
        self.lat = np.asarray(self.dataset["lat"].values)
        self.lon = np.asarray(self.dataset["lon"].values)

    def _common(self) -> dict:
        return dict(prefetch=self.cfg.prefetch, num_workers=self.cfg.workers)

    def train_iterator(self, *, global_batch_size: int, num_steps: int, max_num_steps: int,
                       state: Optional[Mapping] = None) -> examples.TrainIterator:
        """Shuffled epochs of the train split, continuing from `state` ({"epoch","position"})."""
        return examples.TrainIterator(
            self.dataset, self.task, num_steps=num_steps, max_num_steps=max_num_steps,
            split=(self.cfg.train_start, self.cfg.train_end), seed=self.cfg.seed,
            global_batch_size=global_batch_size, state=state, **self._common())

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
