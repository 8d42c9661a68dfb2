"""Training throughput for the console and TensorBoard: examples per second (a moving average
over steps) and the fraction of each step spent waiting for data."""

import time

import numpy as np


class Throughput:
    """Measures from the end of one step to the end of the next (the first step reports 0)."""

    def __init__(self, examples_per_step: int):
        self._examples = examples_per_step
        self._last_end = None
        self._rate = None

    def step_done(self, data_wait_s: float) -> dict:
        """`examples_per_sec` and `data_wait_fraction` after a step that waited `data_wait_s`."""
        now = time.perf_counter()
        interval = now - self._last_end if self._last_end else None
        self._last_end = now
        if interval:
            rate = self._examples / interval
            self._rate = rate if self._rate is None else 0.9 * self._rate + 0.1 * rate
        return {"examples_per_sec": np.float32(self._rate or 0.0),
                "data_wait_fraction": np.float32(min(data_wait_s / interval, 1.0)
                                                 if interval else 0.0)}
