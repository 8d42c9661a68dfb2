"""Date splits of a dataset and the initial times whose whole example window lies inside one.

An example is the task's input window (num_input_frames frames, 6 h apart, the last one at the
"initial time") plus N target steps after it; an initial time is valid for a split when every one
of those frames is a time of the dataset inside the split.
"""

from typing import Sequence

import numpy as np
import pandas as pd

from graphcast.config import TIME_STEP

SIX_HOURS = TIME_STEP.to_timedelta64()   # TIME_STEP as numpy arithmetic needs it
DEFAULT_SPLITS = {
    "train": ("1979-01-01", "2015-12-31"),
    "eval": ("2016-01-01", "2017-12-31"),
    "test": ("2018-01-01", None),
}


def split_bounds(split: Sequence) -> tuple:
    """(start, stop) datetime64[ns] of a (start, end) pair; stop is exclusive. An end given as a
    string includes the whole period it names, as xarray's `sel(time=slice(start, end))` (used by
    data.stats and data.prepare) does: "2015" the year, "2015-12" the month, "2015-12-31" the day;
    None means unbounded."""
    start, end = split
    # None: the ends of the datetime64[ns] range.
    lo = np.datetime64(pd.Timestamp(start), "ns") if start is not None else np.datetime64(
        np.iinfo(np.int64).min + 1, "ns")
    if end is None:
        hi = np.datetime64(np.iinfo(np.int64).max, "ns")
    else:
        stop = (pd.Period(end.strip()) + 1).start_time if isinstance(end, str) else \
            pd.Timestamp(end) + pd.Timedelta(1, "ns")
        hi = stop.to_datetime64().astype("datetime64[ns]")
    if hi <= lo:
        raise ValueError(f"Split {split!r} is empty: its end is not after its start.")
    return lo, hi


def valid_init_times(times: np.ndarray, split: Sequence, num_input_frames: int,
                     num_steps: int) -> np.ndarray:
    """Initial times (last input frame) whose whole window lies in the split and in `times`.

    times: datetime64 [T] of the dataset, strictly increasing. Returns sorted datetime64[ns].
    """
    times = np.asarray(times).astype("datetime64[ns]")
    lo, hi = split_bounds(split)
    inside = times[(times >= lo) & (times < hi)]
    ok = np.ones(inside.shape, bool)
    for offset in range(-(num_input_frames - 1), num_steps + 1):
        ok &= np.isin(inside + offset * SIX_HOURS, inside)
    return inside[ok]
