"""Top-of-atmosphere incident solar radiation (ERA5's `tisr`), derived when a task
needs it as a forcing and the data lack it.

The flux is integrated over the hour ending at each timestamp (J/m^2). The arithmetic
is float32 JAX on purpose: that is what the reference does (x64 disabled), and values
computed in float64 differ by ~2e-5 relative. The integration instants form the last
axis, as in the reference's summation order, which reproduces its fixture bit for bit.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import xarray as xr

from graphcast.config import TISR

TISR_ATTRS = {"units": "J m**-2", "long_name": "TOA incident solar radiation, 1h accumulation"}

_SECONDS_PER_DAY = 86400.0
_J2000_JULIAN_DATE = 2451545.0
_INTEGRATION_PERIOD = pd.Timedelta(hours=1)
_NUM_INTEGRATION_BINS = 360  # 361 instants, 10 s apart.
_OBLIQUITY_RAD = 0.409093
_ERA5_TSI_FACTOR = 0.9965


class TsiTable(NamedTuple):
    """Total solar irradiance (W/m^2) at fractional years; interpolated linearly, clamped."""
    years: np.ndarray   # [N] float64, increasing
    values: np.ndarray  # [N] float64


# Yearly TSI used for ERA5, 1951..1995, then one 13-year solar cycle repeated for 1996..2034.
_RAW_TSI_1951_1995 = (
    1365.7765, 1365.7676, 1365.6284, 1365.6564, 1365.7773, 1366.3109, 1366.6681, 1366.6328,
    1366.3828, 1366.2767, 1365.9199, 1365.7484, 1365.6963, 1365.6976, 1365.7341, 1365.9178,
    1366.1143, 1366.1644, 1366.2476, 1366.2426, 1365.9580, 1366.0525, 1365.7991, 1365.7271,
    1365.5345, 1365.6453, 1365.8331, 1366.2747, 1366.6348, 1366.6482, 1366.6951, 1366.2859,
    1366.1992, 1365.8103, 1365.6416, 1365.6379, 1365.7899, 1366.0826, 1366.6479, 1366.5533,
    1366.4457, 1366.3021, 1366.0286, 1365.7971, 1365.6996,
)
_RAW_TSI_CYCLE = (
    1365.6121, 1365.7399, 1366.1021, 1366.3851, 1366.6836, 1366.6022, 1366.6807, 1366.2300,
    1366.0480, 1365.8545, 1365.8107, 1365.7240, 1365.6918,
)
_RAW_TSI = _RAW_TSI_1951_1995 + 3 * _RAW_TSI_CYCLE  # 84 years: 1951..2034

ERA5_TSI = TsiTable(years=np.arange(1951, 1951 + len(_RAW_TSI)) + 0.5,
                    values=_ERA5_TSI_FACTOR * np.array(_RAW_TSI))
CONSTANT_TSI = TsiTable(years=np.array([0.0]), values=np.array([1361.0]))


def fractional_years(timestamps: np.ndarray) -> np.ndarray:
    """year + (day_of_year - 1 + fraction_of_day) / days_in_year, float64 [T]."""
    ts = pd.DatetimeIndex(timestamps)
    day_fraction = (ts - ts.normalize()) / pd.Timedelta(days=1)
    days_in_year = 365 + ts.is_leap_year
    return np.asarray(ts.year + (ts.day_of_year - 1 + day_fraction) / days_in_year)


def interpolate_tsi(timestamps: np.ndarray, tsi: Optional[TsiTable] = None) -> np.ndarray:
    """TSI (W/m^2, float64 [T]) at each timestamp by linear interpolation of the table."""
    table = ERA5_TSI if tsi is None else tsi
    return np.interp(fractional_years(timestamps), table.years, table.values)


def _days_since_j2000(timestamp: pd.Timestamp) -> float:
    """Julian date minus J2000.0, as a Python float (cast to float32 by the caller)."""
    return timestamp.to_julian_date() - _J2000_JULIAN_DATE


def _flux(days: jax.Array, sin_lat: jax.Array, cos_lat: jax.Array, lon_rad: jax.Array,
          tsi: jax.Array) -> jax.Array:
    """Instantaneous TOA flux (W/m^2), broadcasting days [N] against the grid.

    Shapes: days [N], sin_lat/cos_lat [H, 1, 1], lon_rad [W, 1], tsi [1] -> [H, W, N].
    """
    years = days / 365.25
    rotation = days % 1.0  # 0 at noon; floor modulo.
    rel = 1.7535 + 6.283076 * years
    rem = 6.240041 + 6.283020 * years
    rlls = 4.8951 + 6.283076 * years
    one = jnp.ones_like(years)
    sin_rel, cos_rel = jnp.sin(rel), jnp.cos(rel)
    sin_rem = jnp.sin(rem)
    cos_2rlls = jnp.cos(2.0 * rlls)
    # Ecliptic longitude of the sun, equation of time and sun distance: each is a dot
    # product of stacked terms [N, k] with a coefficient vector [k] (fixes the rounding).
    ecliptic_lon = jnp.dot(
        jnp.stack([one, years, sin_rel, cos_rel, jnp.sin(2.0 * rel), jnp.cos(2.0 * rel)], axis=-1),
        jnp.array([4.8952, 6.283320, -0.0075, -0.0326, -0.0003, 0.0002]))
    eot_seconds = jnp.dot(
        jnp.stack([jnp.sin(2.0 * rlls), sin_rem, sin_rem * cos_2rlls, jnp.sin(4.0 * rlls),
                   jnp.sin(2.0 * rem)], axis=-1),
        jnp.array([591.8, -459.4, 39.5, -12.7, -4.8]))
    distance_au = jnp.dot(jnp.stack([one, sin_rel, cos_rel], axis=-1),
                          jnp.array([1.0001, -0.0163, 0.0037]))
    sin_dec = jnp.sin(_OBLIQUITY_RAD) * jnp.sin(ecliptic_lon)  # [N]
    cos_dec = jnp.sqrt(1.0 - sin_dec ** 2)

    hour_angle = 2.0 * jnp.pi * (rotation + eot_seconds / _SECONDS_PER_DAY) + lon_rad  # [W, N]
    sin_altitude = cos_lat * cos_dec * jnp.cos(hour_angle) + sin_lat * sin_dec       # [H, W, N]
    return tsi * (1.0 / distance_au) ** 2 * jnp.maximum(sin_altitude, 0.0)


@jax.jit
def _integrated_flux(days: jax.Array, sin_lat: jax.Array, cos_lat: jax.Array,
                     lon_rad: jax.Array, tsi: jax.Array) -> jax.Array:
    """Trapezoid integral (J/m^2) [H, W] of the flux over the hour ending at `days`.

    days and tsi are scalars, sin_lat/cos_lat [H, 1], lon_rad [W]. The integration
    instants form the last axis (this layout fixes the summation order of the result).
    """
    offsets = (pd.timedelta_range(start=-_INTEGRATION_PERIOD, end=pd.Timedelta(0),
                                  periods=_NUM_INTEGRATION_BINS + 1)
               / pd.Timedelta(days=1)).to_numpy()  # [361] float64, added in float32
    fluxes = _flux(days[..., None] + offsets, sin_lat[..., None], cos_lat[..., None],
                   lon_rad[..., None], tsi[..., None])  # [H, W, 361]
    dx_seconds = (_INTEGRATION_PERIOD / _NUM_INTEGRATION_BINS) / pd.Timedelta(seconds=1)
    return jax.scipy.integrate.trapezoid(fluxes, dx=dx_seconds, axis=-1)


# Timestamps per call are limited so that [chunk, H, W, 361] float32 stays near 512 MiB.
_MAX_ELEMENTS_PER_CALL = 2 ** 27
_integrated_flux_over_time = jax.jit(jax.vmap(_integrated_flux, in_axes=(0, None, None, None, 0)))


def toa_incident_solar_radiation(timestamps: np.ndarray, lat_deg: np.ndarray,
                                 lon_deg: np.ndarray, *, tsi: Optional[TsiTable] = None
                                 ) -> np.ndarray:
    """TISR (J/m^2) accumulated over the hour ending at each timestamp, float32 [T, H, W].

    timestamps: datetime64 [T]; lat_deg [H], lon_deg [W] in degrees (float32 like the data).
    tsi: TSI table, default ERA5_TSI (CONSTANT_TSI is the 1361 W/m^2 alternative).
    Timestamps are evaluated in chunks by a vmapped jit of the per-timestamp integral;
    on the reference fixture this gives the same bits as one call per timestamp (checked in the
    tests); on other grids XLA may round a few values 1 ulp differently. Always runs on
    the CPU backend: keeps accelerators free for the model and matches the CPU reference.
    """
    with jax.default_device(jax.devices("cpu")[0]):
        return _toa_on_default_device(np.asarray(timestamps).reshape(-1), lat_deg, lon_deg, tsi)


def _toa_on_default_device(timestamps: np.ndarray, lat_deg: np.ndarray, lon_deg: np.ndarray,
                           tsi: Optional[TsiTable]) -> np.ndarray:
    """toa_incident_solar_radiation without the device pinning; timestamps [T]."""
    lat = jnp.radians(jnp.asarray(lat_deg)).reshape((-1, 1))  # [H, 1]
    lon = jnp.radians(jnp.asarray(lon_deg))                     # [W]
    sin_lat, cos_lat = jnp.sin(lat), jnp.cos(lat)
    num = len(timestamps)
    if num == 0:
        return np.zeros((0, lat.shape[0], lon.shape[0]), np.float32)
    # Day counts go to float32 one by one, like jnp.array(python float) would.
    days = np.array([_days_since_j2000(pd.Timestamp(t)) for t in timestamps]).astype(np.float32)
    tsi_values = interpolate_tsi(timestamps, tsi).astype(np.float32)
    chunk = max(1, min(num, _MAX_ELEMENTS_PER_CALL
                       // (lat.shape[0] * lon.shape[0] * (_NUM_INTEGRATION_BINS + 1))))
    pad = -num % chunk  # repeat the last timestamp so every call has the same shape
    days = np.concatenate([days, np.repeat(days[-1:], pad)])
    tsi_values = np.concatenate([tsi_values, np.repeat(tsi_values[-1:], pad)])
    out = [np.asarray(_integrated_flux_over_time(days[i:i + chunk], sin_lat, cos_lat, lon,
                                                 tsi_values[i:i + chunk]))
           for i in range(0, num + pad, chunk)]
    return np.concatenate(out, axis=0)[:num]


def find_timestamps(ds: xr.Dataset | xr.DataArray) -> xr.DataArray:
    """The absolute timestamps of a dataset: its `datetime` coordinate (DeepMind layout,
    dims e.g. (batch, time)), or its `time` coordinate when that is datetime64 (internal
    layout). Raises ValueError naming `datetime` when neither exists."""
    if "datetime" in ds.coords:
        return ds.coords["datetime"]
    if "time" in ds.coords and np.issubdtype(ds.coords["time"].dtype, np.datetime64):
        return ds.coords["time"]
    raise ValueError("Absolute timestamps are needed but the dataset has no 'datetime' coordinate "
                     "and its 'time' coordinate is not datetime64 "
                     f"(coordinates: {sorted(map(str, ds.coords))}).")


def toa_incident_solar_radiation_for_dataset(ds: xr.Dataset | xr.DataArray, *,
                                             tsi: Optional[TsiTable] = None) -> xr.DataArray:
    """TISR for every timestamp of `ds` (see find_timestamps), float32 DataArray with the
    timestamps' dims (e.g. (batch, time) or (time,)) followed by (lat, lon)."""
    for name in ("lat", "lon"):
        if name not in ds.coords:
            raise ValueError(f"Computing {TISR} needs a '{name}' coordinate; the dataset has "
                             f"{sorted(map(str, ds.coords))}.")
    times = find_timestamps(ds)
    lat, lon = ds.coords["lat"], ds.coords["lon"]
    flat = times.values.reshape(-1)
    unique, inverse = np.unique(flat, return_inverse=True)
    values = toa_incident_solar_radiation(unique, lat.values, lon.values, tsi=tsi)[inverse]
    values = values.reshape(times.shape + (lat.size, lon.size))
    coords = {name: c for name, c in times.coords.items()}
    coords.update(lat=lat, lon=lon)
    return xr.DataArray(values, dims=times.dims + ("lat", "lon"), coords=coords, name=TISR,
                        attrs=dict(TISR_ATTRS))
