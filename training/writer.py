"""TensorBoard event files (tensorboardX, no TensorFlow) plus one readable console line per log.

Implements jaxline's `Writer` protocol (`write_scalars(step, scalars)`) and adds `write_images`.
The console line shows step, loss, steps/s, examples/s, ETA and the fraction of time spent
waiting for data, from the scalars the experiment's `step()` returns.
"""

import math
import sys
from typing import Mapping, Optional

import numpy as np
from tensorboardX import SummaryWriter


def _scalar(value) -> Optional[float]:
    try:
        return float(np.asarray(value).reshape(()))
    except (TypeError, ValueError):
        return None


def format_eta(seconds: float) -> str:
    """'1d02h03m', '2h03m04s', '3m04s' or '?'."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h{m:02d}m"
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    return f"{m}m{s:02d}s"


class Writer:
    """Writes scalars/images to `<logdir>/<prefix>` and prints a console summary of train scalars."""

    def __init__(self, logdir: str, *, prefix: str = "train", total_steps: Optional[int] = None,
                 console: bool = True, stream=None):
        self._prefix = prefix
        self._total = total_steps
        self._console = console
        self._stream = stream or sys.stdout
        self._tb = SummaryWriter(logdir=f"{logdir.rstrip('/')}/{prefix}")

    def write_scalars(self, global_step: int, scalars: Mapping[str, object]) -> None:
        values = {k: _scalar(v) for k, v in scalars.items()}
        values = {k: v for k, v in values.items() if v is not None}
        for name, value in sorted(values.items()):
            self._tb.add_scalar(name, value, global_step)
        self._tb.flush()
        if self._console:
            print(self.console_line(global_step, values), file=self._stream, flush=True)

    def write_images(self, global_step: int, images: Mapping[str, np.ndarray]) -> None:
        """Images as [H, W, 3|4] uint8 (or float in [0, 1])."""
        for name, image in images.items():
            self._tb.add_image(name, np.asarray(image), global_step, dataformats="HWC")
        self._tb.flush()

    def console_line(self, step: int, values: Mapping[str, float]) -> str:
        """One line summarising a log: training progress, or the headline metrics of an eval."""
        parts = [f"[{self._prefix}] step {step}"]
        if "loss" in values:
            parts.append(f"loss {values['loss']:.5g}")
        steps_per_sec = values.get("steps_per_sec")
        if steps_per_sec is not None and math.isfinite(steps_per_sec):
            parts.append(f"{steps_per_sec:.3g} steps/s")
        if "examples_per_sec" in values:
            parts.append(f"{values['examples_per_sec']:.3g} ex/s")
        if "data_wait_fraction" in values:
            parts.append(f"data-wait {100 * values['data_wait_fraction']:.1f}%")
        if "ar_steps" in values:
            parts.append(f"AR {int(values['ar_steps'])}")
        if "learning_rate" in values:
            parts.append(f"lr {values['learning_rate']:.3g}")
        if self._total and steps_per_sec and steps_per_sec > 0:
            parts.append(f"ETA {format_eta((self._total - step) / steps_per_sec)}")
        shown = {"loss", "steps_per_sec", "examples_per_sec", "data_wait_fraction", "ar_steps",
                 "learning_rate"}
        rest = [f"{k} {v:.4g}" for k, v in sorted(values.items())
                if k not in shown and ("/" not in k or k.startswith("headline/"))]
        return " | ".join(parts + rest[:12])

    def close(self) -> None:
        self._tb.close()


