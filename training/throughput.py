"""Training throughput for the console and TensorBoard: examples per second (a moving average
over steps) and the fraction of each step spent waiting for data, both from the training
iterator's own timing (training.data_input.MonitoredTrainIterator.last_wait), so the data wait
is measured once, where the data-wait warning reads it too."""

from typing import Optional

import numpy as np


class Throughput:
    """Rates from the time between batches handed to the training loop (the first reports 0)."""

    def __init__(self, examples_per_step: int):
        self._examples = examples_per_step
        self._rate = None

    def step_done(self, data_wait_s: float, interval_s: Optional[float]) -> dict:
        """`examples_per_sec` and `data_wait_fraction` of a step whose batch took `data_wait_s`
        to arrive, `interval_s` after the previous batch (None for the first)."""
        if interval_s:
            rate = self._examples / interval_s
            self._rate = rate if self._rate is None else 0.9 * self._rate + 0.1 * rate
        return {"examples_per_sec": np.float32(self._rate or 0.0),
                "data_wait_fraction": np.float32(min(data_wait_s / interval_s, 1.0)
                                                 if interval_s else 0.0)}
