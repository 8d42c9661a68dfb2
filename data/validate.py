"""Checks on a source's metadata and coordinates, run before any data chunk is read.

Every failure is a `DataValidationError` (a ValueError) whose message names the source, the
variable / level / time / coordinate at fault, and what was expected. `nan_checked` adds the one
check that needs data: it raises `NaNDataError` naming variable and time when a chunk holding a NaN
is materialised.
"""

from typing import Iterable, Optional, Sequence

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from graphcast import config
from graphcast.config import ALL_ATMOSPHERIC_VARS, STATIC_VARS, TIME_STEP, TIME_STEP_HOURS
_MAX_SHOWN = 5  # offending items quoted in a message


class DataValidationError(ValueError):
    """A source that cannot be used as GraphCast training data; the message says why."""


class MissingVariablesError(DataValidationError):
    """Variables the task needs are absent and cannot be derived."""


class MissingLevelsError(DataValidationError, config.MissingLevelsError):
    """Pressure levels of the task are absent from the source."""


class TimeSpacingError(DataValidationError):
    """Time axis not strictly increasing, irregular, or not a divisor of the model's time step."""


class DuplicateTimesError(TimeSpacingError):
    """The same timestamp occurs more than once."""


class GridMismatchError(DataValidationError):
    """The lat/lon grid does not match the model resolution."""


class LatitudeError(DataValidationError):
    """Latitudes not uniformly spaced or outside [-90, 90]."""


class LongitudeConventionError(DataValidationError):
    """Longitudes not in [0, 360) (or not convertible to it), or not uniformly spaced."""


class DimensionError(DataValidationError):
    """A variable has the wrong dimensions or dimension order."""


class NaNDataError(DataValidationError):
    """A NaN or Inf was found in a chunk while reading."""


class CorruptDataError(DataValidationError):
    """A chunk or file could not be read or decoded."""


class SourceError(DataValidationError):
    """A source URL that cannot be opened (missing, forbidden, unreachable)."""


class SourceNotFoundError(SourceError, FileNotFoundError):
    """The bucket or object does not exist."""


class SourceAccessError(SourceError, PermissionError):
    """Access denied (HTTP 403) or no usable credentials."""


class SourceUnreachableError(SourceError, ConnectionError):
    """The storage endpoint could not be contacted."""


def _where(source: Optional[str]) -> str:
    return f" in {source}" if source else ""


def _show(items: Sequence) -> str:
    items = list(items)
    more = f" ... ({len(items) - _MAX_SHOWN} more)" if len(items) > _MAX_SHOWN else ""
    return ", ".join(str(i) for i in items[:_MAX_SHOWN]) + more


def expected_dims(name: str) -> tuple:
    """Dims of `name` in the normalized layout."""
    if name in ALL_ATMOSPHERIC_VARS:
        return ("time", "level", "lat", "lon")
    if name in STATIC_VARS:
        return ("lat", "lon")
    return ("time", "lat", "lon")


def check_variables(ds: xr.Dataset, required: Iterable[str], source: Optional[str] = None,
                    derivable: Iterable[str] = ()) -> None:
    """All of `required` present (or in `derivable`); lists every missing one."""
    derivable = set(derivable)
    missing = [v for v in required if v not in ds.variables and v not in derivable]
    if missing:
        raise MissingVariablesError(
            f"Variables {missing} are required by the task but missing{_where(source)}; "
            f"available data variables: {sorted(ds.data_vars)}.")


def check_levels(ds: xr.Dataset, levels: Sequence[int], source: Optional[str] = None) -> None:
    """Every task level present in the `level` coordinate."""
    if "level" not in ds.coords:
        raise MissingLevelsError(f"No `level` coordinate{_where(source)}, but the task needs "
                                 f"pressure levels {list(levels)}.")
    config.check_pressure_levels(ds["level"].values, levels, source or "the source",
                                 MissingLevelsError)


def check_time(times: np.ndarray, source: Optional[str] = None) -> pd.Timedelta:
    """Returns the time step after checking duplicates, order, regularity and 6 h divisibility."""
    t = pd.DatetimeIndex(times)
    if len(t) < 2:
        raise TimeSpacingError(f"Need at least 2 time steps{_where(source)}, found {len(t)}.")
    dup = t[t.duplicated()]
    if len(dup):
        raise DuplicateTimesError(f"Duplicate times{_where(source)}: {_show(dup.unique())}.")
    diffs = t[1:] - t[:-1]
    bad = np.nonzero(diffs <= pd.Timedelta(0))[0]
    if len(bad):
        raise TimeSpacingError(f"Times not increasing{_where(source)} at "
                               f"{_show(f'{t[i]} -> {t[i + 1]}' for i in bad)}.")
    step = diffs[0]
    irregular = np.nonzero(diffs != step)[0]
    if len(irregular):
        raise TimeSpacingError(
            f"Irregular time spacing{_where(source)}: expected every {step}, found "
            f"{_show(f'{t[i]} -> {t[i + 1]} ({diffs[i]})' for i in irregular)}.")
    if step > TIME_STEP or TIME_STEP % step != pd.Timedelta(0):
        raise TimeSpacingError(f"Time step {step}{_where(source)} does not divide "
                               f"{TIME_STEP_HOURS}h; need {TIME_STEP_HOURS}-hourly data or a finer "
                               f"step that divides {TIME_STEP_HOURS}h (1h, 2h, 3h).")
    return step


def _spacing(values: np.ndarray, name: str, error: type, source: Optional[str]) -> float:
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        raise error(f"`{name}` has {v.size} value(s){_where(source)}; need a grid.")
    d = np.diff(v)
    step = d[0]
    bad = np.nonzero(~np.isclose(d, step, rtol=0, atol=1e-3 * abs(step)))[0]
    if step == 0 or len(bad):
        raise error(f"`{name}` is not uniformly spaced{_where(source)}: first step {step}, differs "
                    f"at {_show(f'{v[i]} -> {v[i + 1]}' for i in bad)}.")
    return float(step)


def check_latitude(lat: np.ndarray, source: Optional[str] = None) -> float:
    """Uniform, within [-90, 90]; returns the (signed) spacing."""
    step = _spacing(lat, "lat", LatitudeError, source)
    if np.min(lat) < -90 - 1e-6 or np.max(lat) > 90 + 1e-6:
        raise LatitudeError(f"Latitudes{_where(source)} span {np.min(lat)}..{np.max(lat)}, "
                            "outside [-90, 90].")
    return step


def check_longitude(lon: np.ndarray, source: Optional[str] = None,
                    allow_shift: bool = True) -> bool:
    """Uniform and in [0, 360), or in [-180, 180) when `allow_shift`; returns True if shifting
    to [0, 360) is needed."""
    lon = np.asarray(lon, dtype=np.float64)
    _spacing(np.sort(lon), "lon", LongitudeConventionError, source)
    if lon.min() >= 0 and lon.max() < 360:
        return False
    if lon.min() >= -180 and lon.max() < 180:
        if allow_shift:
            return True
        raise LongitudeConventionError(
            f"Longitudes{_where(source)} are in [-180, 180) ({lon.min()}..{lon.max()}); GraphCast "
            "uses [0, 360). Pass allow_lon_shift=True to convert.")
    raise LongitudeConventionError(f"Longitudes{_where(source)} span {lon.min()}..{lon.max()}; "
                                   "expected [0, 360) or [-180, 180).")


def check_grid(lat: np.ndarray, lon: np.ndarray, resolution: float,
               source: Optional[str] = None) -> None:
    """Lat/lon spacing equal to `resolution` and a full 360-degree longitude circle."""
    found_lat = abs(_spacing(lat, "lat", LatitudeError, source))
    found_lon = abs(_spacing(np.sort(lon), "lon", LongitudeConventionError, source))
    n_lon = 360.0 / resolution
    if (not np.isclose(found_lat, resolution, atol=1e-4) or
            not np.isclose(found_lon, resolution, atol=1e-4) or not np.isclose(len(lon), n_lon)):
        raise GridMismatchError(
            f"Grid{_where(source)} does not match the model resolution: expected {resolution} deg "
            f"({int(round(n_lon))} longitudes), found lat spacing {found_lat:g} deg, lon spacing "
            f"{found_lon:g} deg with {len(lon)} longitudes ({len(lat)} x {len(lon)} grid).")


def check_dims(ds: xr.Dataset, variables: Iterable[str], source: Optional[str] = None,
               strict_order: bool = False) -> list:
    """Each variable has its layout's dims; returns those present in another order.

    Static variables may also carry a `time` dim (ARCO-ERA5 stores them per time). With
    `strict_order` a different order is an error too.
    """
    reordered = []
    for name in variables:
        if name not in ds.data_vars:
            continue
        want, got = expected_dims(name), ds[name].dims
        allowed = [want] + ([("time",) + want] if name in STATIC_VARS else [])
        if any(got == a for a in allowed):
            continue
        if any(set(got) == set(a) for a in allowed) and not strict_order:
            reordered.append(name)
            continue
        raise DimensionError(f"Variable {name!r}{_where(source)} has dims {got}; expected {want}"
                             f"{' (a time dim is allowed)' if name in STATIC_VARS else ''}.")
    return reordered


def _nan_check_block(block: np.ndarray, *, variable: str, times: Optional[np.ndarray],
                     time_axis: Optional[int], block_info=None) -> np.ndarray:
    bad = ~np.isfinite(block)
    if bad.any():
        where = ""
        if time_axis is not None and block_info is not None:
            start, stop = block_info[0]["array-location"][time_axis]
            bad_t = bad.any(axis=tuple(a for a in range(block.ndim) if a != time_axis))
            where = f" at time(s) {_show(pd.DatetimeIndex(times[start:stop][bad_t]))}"
        kinds = " and ".join(k for k, found in (("NaN", np.isnan(block).any()),
                                                ("Inf", np.isinf(block).any())) if found)
        raise NaNDataError(f"{kinds} found in variable {variable!r}{where}.")
    return block


def check_finite(array: np.ndarray, *, variable: str, time) -> None:
    """Raises NaNDataError naming `variable` and `time` if `array` holds a NaN or Inf. One sum
    decides for finite data (a NaN or Inf anywhere makes it non-finite); only a non-finite sum,
    which finite values can also give by overflowing, is looked at element by element."""
    if np.isfinite(np.sum(array)):
        return
    kinds = " and ".join(k for k, found in (("NaN", np.isnan(array).any()),
                                            ("Inf", np.isinf(array).any())) if found)
    if kinds:
        raise NaNDataError(f"{kinds} found in variable {variable!r} at time(s) "
                           f"{_show(pd.DatetimeIndex([time]))}.")


def nan_checked(ds: xr.Dataset) -> xr.Dataset:
    """Lazily wraps every floating dask-backed variable so that computing a chunk holding a NaN
    or Inf raises NaNDataError naming the variable and the times."""
    out = ds.copy()
    times = ds["time"].values if "time" in ds.coords else None
    for name, var in ds.data_vars.items():
        # var.chunks first: .data of a lazily indexed variable would read all of it.
        if var.chunks is None or not isinstance(var.data, da.Array) or \
                not np.issubdtype(var.dtype, np.floating):
            continue
        axis = var.dims.index("time") if "time" in var.dims and times is not None else None
        data = var.data.map_blocks(_nan_check_block, variable=name, times=times, time_axis=axis,
                                   dtype=var.dtype, meta=np.array((), var.dtype))
        out[name] = var.copy(data=data)
    return out
