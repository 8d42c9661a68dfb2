"""Counting skipped updates: the update leaves parameters and optimizer state unchanged when a
step's loss or gradient is NaN/Inf; this counts those steps, logs each with its batch's dates,
and stops the run after `training.max_consecutive_nonfinite` in a row."""

from typing import Mapping, Optional

import numpy as np
from absl import logging

from training import compat


class NonFiniteError(FloatingPointError):
    """Too many consecutive training steps had a NaN/Inf loss or gradient."""


class Guard:
    """The skipped-update counters (saved with checkpoints) and the stop rule.

    A step's flag stays on device and is read one step late, so the host never waits for the
    device in the middle of training."""

    def __init__(self, limit: int, counters: Optional[Mapping[str, int]] = None):
        self.limit = limit
        self.counters = dict(counters or {"nonfinite_skipped": 0, "consecutive_nonfinite": 0})
        self._bad_steps = []   # steps of the current run of skipped updates (this process)
        self._pending = None   # (step, skipped flag on device, init times) of the last step

    def record(self, step: int, skipped, init_times: np.ndarray) -> None:
        """Counts the previous step, then keeps this step's flag [local_devices] for later."""
        self.resolve()
        self._pending = (step, skipped, np.asarray(init_times).ravel()[:4])

    def resolve(self) -> None:
        """Counts the pending step's skipped update; NonFiniteError past the limit."""
        if self._pending is None:
            return
        step, skipped, init_times = self._pending
        self._pending = None
        if not int(compat.first_local(skipped)):
            self.counters["consecutive_nonfinite"] = 0
            self._bad_steps = []
            return
        self.counters["nonfinite_skipped"] += 1
        self.counters["consecutive_nonfinite"] += 1
        self._bad_steps.append(step)
        logging.warning("Step %d: non-finite loss or gradient; update skipped (batch init times %s).",
                        step, init_times)
        if self.limit and self.counters["consecutive_nonfinite"] >= self.limit:
            raise NonFiniteError(
                f"{self.counters['consecutive_nonfinite']} consecutive steps (steps "
                f"{self._bad_steps}) had a non-finite loss or gradient (last batch init times "
                f"{init_times}); stopping (training.max_consecutive_nonfinite={self.limit}). "
                "Check the data for NaNs or lower the learning rate.")
