"""Training order: endless shuffled epochs with a restorable {"epoch", "position"} state.

The stream of examples is epoch after epoch, each epoch a permutation of the split's valid initial
times that depends only on (seed, epoch). The iterator's state is {"epoch": e, "position": p}: the
next global example is number p of epoch e. Batches may span an epoch boundary, so every valid time
is visited exactly once per epoch. The set of valid times is computed for `max_num_steps`, so
changing the rollout length N never changes the order.
"""

from typing import Mapping, Optional, Sequence

import numpy as np
import xarray as xr

from data import batches
from data.splits import DEFAULT_SPLITS, valid_init_times
from graphcast import config


class TrainIterator(batches.BatchStream):
    """Endless shuffled training batches with a restorable {"epoch", "position"} state.

    dataset: internal layout. split: (start, end) dates (end date inclusive).
    num_steps: rollout steps N of the next batches (changeable: set_num_steps / next(n)).
    max_num_steps: largest N that will be asked for; the valid initial times (hence the order)
        are those whose window with max_num_steps fits (default num_steps).
    state: a value from .state to continue from (default epoch 0, position 0).
    stream_options: batching, prefetch and reader options of batches.BatchStream.
    Batches: {"inputs", "targets", "forcings": {var: float32 [D, per_device, T, ...]},
              "init_time": datetime64[s] [D, per_device]}.
    """

    def __init__(self, dataset: xr.Dataset, task_config: config.TaskConfig, *,
                 num_steps: int = 1, max_num_steps: Optional[int] = None,
                 split: Sequence = DEFAULT_SPLITS["train"], seed: int = 0,
                 global_batch_size: int = 32, state: Optional[Mapping] = None,
                 **stream_options):
        self.max_num_steps = num_steps if max_num_steps is None else max_num_steps
        if not 1 <= num_steps <= self.max_num_steps:
            raise ValueError(f"num_steps={num_steps} must be in [1, max_num_steps="
                             f"{self.max_num_steps}].")
        super().__init__(dataset, task_config, num_steps=num_steps,
                         global_batch_size=global_batch_size, **stream_options)
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
