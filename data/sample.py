"""A small synthetic ERA5-like dataset in the WeatherBench2 zarr layout, plus its statistics.

Why: tests, the demo config and benchmarks need data with every GraphCast variable and
coherent dynamics, without downloading ERA5. The fields are NOT real weather: planetary
waves (Rossby-Haurwitz-like patterns) drift eastwards by a solid-body rotation on top of a
balanced zonal-mean state; everything else is diagnosed from that state:
  * temperature: lapse-rate troposphere, tropopause, warming stratosphere, seasonal cycle;
  * geopotential: hypsometric integration of temperature from the 1000 hPa surface;
  * winds: geostrophic from geopotential (Coriolis parameter tapered at the equator);
  * vertical velocity: ascent with poleward flow (warm advection), plus a Hadley cell;
  * specific humidity: relative humidity (moist where ascending) times saturation;
  * 2 m temperature: 1000 hPa temperature, lapse to the orography, diurnal cycle driven by
    the TOA radiation (graphcast.solar_radiation);
  * mean sea level pressure from the 1000 hPa height; 10 m winds: reduced, turned 1000 hPa
    winds; precipitation: zero except where air ascends, scaled by humidity (skewed).
A model that learns the drift beats persistence. Deterministic (bitwise) for a given seed.

Usage: python -m data.sample --out DIR [--seed S --resolution 5.625 --start 2020-01-01 --days 60]
"""

import argparse
import os
from typing import Optional
import time as time_lib

import numcodecs
import numpy as np
import pandas as pd
import xarray as xr

from graphcast import config
from graphcast import solar_radiation

R_DRY = 287.05        # J/(kg K)
GRAVITY = 9.80665     # m/s^2
EARTH_RADIUS = 6.371e6
OMEGA = 7.292e-5      # rad/s
LAPSE_RATE = 6.5e-3   # K/m
LEVELS = config.PRESSURE_LEVELS_WEATHERBENCH_13
TISR = config.TISR


def grid(resolution: float) -> tuple:
    """Equiangular grid with poles: lat [-90..90] ascending, lon [0..360) (degrees, float64)."""
    n_lat = 180.0 / resolution
    if abs(n_lat - round(n_lat)) > 1e-9 or resolution <= 0:
        raise ValueError(f"--resolution {resolution} must divide 180 degrees (e.g. 4, 5.625).")
    n_lat = int(round(n_lat))
    lat = np.linspace(-90.0, 90.0, n_lat + 1)
    lon = np.arange(2 * n_lat) * (360.0 / (2 * n_lat))
    return lat, lon


def _sphere_bumps(rng: np.random.Generator, lat: np.ndarray, lon: np.ndarray, n: int,
                  sharpness: float) -> np.ndarray:
    """Sum of n random smooth bumps on the sphere, [H, W], values in about [0, a few]."""
    phi, lam = np.meshgrid(np.radians(lat), np.radians(lon), indexing="ij")
    xyz = np.stack([np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam), np.sin(phi)], -1)
    centres = rng.normal(size=(n, 3))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.uniform(0.5, 1.0, size=n)
    cos_dist = np.einsum("hwk,nk->nhw", xyz, centres)                      # [n, H, W]
    return np.sum(weights[:, None, None] * np.exp(sharpness * (cos_dist - 1.0)), axis=0)


def statics(rng: np.random.Generator, lat: np.ndarray, lon: np.ndarray) -> tuple:
    """Land-sea mask (fraction, ~30% land, Antarctica-like south cap) and surface geopotential."""
    phi = np.radians(lat)[:, None]
    land_field = _sphere_bumps(rng, lat, lon, 14, 12.0) + 2.0 * np.exp(-8.0 * (1 + np.sin(phi)))
    threshold = np.quantile(land_field, 0.7)
    lsm = 1.0 / (1.0 + np.exp(-(land_field - threshold) / 0.03))
    relief = _sphere_bumps(rng, lat, lon, 10, 25.0)
    height = lsm * 3000.0 * relief / relief.max()  # m
    return lsm, GRAVITY * height


def _wave_parameters(rng: np.random.Generator, num_waves: int = 6) -> dict:
    """Random zonal wavenumbers, amplitudes (m^2/s^2 at 1000 hPa), phases, drift rates."""
    m = rng.choice(np.arange(1, 8), size=num_waves, replace=False)
    background_rate = 30.0 / EARTH_RADIUS  # rad/s: 30 m/s solid-body drift at the equator
    return dict(
        m=m,
        amplitude=rng.uniform(600.0, 1400.0, num_waves),
        phase=rng.uniform(0, 2 * np.pi, num_waves),
        rate=background_rate * (1.0 - 3.0 / ((m + 1) * (m + 2))),  # longer waves drift slower
        mod_period=rng.uniform(5.0, 15.0, num_waves) * 86400.0,
        mod_phase=rng.uniform(0, 2 * np.pi, num_waves),
    )


def _vertical_shape(x: np.ndarray) -> tuple:
    """Wave amplitude factor s(x) and ds/dx, x = ln(1000 hPa / p): grows to 250 hPa, then decays."""
    x_jet = np.log(1000.0 / 250.0)
    below = 0.5 + 1.5 * np.sin(0.5 * np.pi * np.minimum(x / x_jet, 1.0))
    d_below = 1.5 * 0.5 * np.pi / x_jet * np.cos(0.5 * np.pi * np.minimum(x / x_jet, 1.0))
    above = 2.0 * np.exp(-(x - x_jet) / 1.5)
    s = np.where(x <= x_jet, below, above)
    ds = np.where(x <= x_jet, d_below, -above / 1.5)
    return s, ds


def _softmax2(a: np.ndarray, b: np.ndarray, width: float) -> np.ndarray:
    """Smooth max(a, b)."""
    return b + width * np.logaddexp(0.0, (a - b) / width)


class _Generator:
    """Evaluates every variable at one time; holds the grid, statics and wave parameters."""

    def __init__(self, seed: int, resolution: float):
        rng = np.random.default_rng(seed)
        self.lat, self.lon = grid(resolution)
        self.lsm, self.zs = statics(rng, self.lat, self.lon)
        self.waves = _wave_parameters(rng)
        self.p = np.array(LEVELS, np.float64)[:, None, None]             # [L, 1, 1] hPa
        self.x = np.log(1000.0 / self.p)                                  # [L, 1, 1]
        self.phi = np.radians(self.lat)[None, :, None]                    # [1, H, 1]
        self.lam = np.radians(self.lon)[None, None, :]                    # [1, 1, W]
        self.dlam = np.radians(self.lon[1] - self.lon[0])
        sin_phi = np.sin(self.phi)
        # 1/f tapered to 0 across the equator so geostrophic winds stay finite.
        self.inv_f = sin_phi / (2 * OMEGA * (sin_phi ** 2 + np.sin(np.radians(12.0)) ** 2))
        self.cos_phi = np.maximum(np.cos(self.phi), 1e-6)

    def _wave_field(self, t_seconds: float) -> np.ndarray:
        """Geopotential wave anomaly at 1000 hPa, [1, H, W] (m^2/s^2)."""
        w = self.waves
        total = np.zeros((1, self.lat.size, self.lon.size))
        for k in range(len(w["m"])):
            m = w["m"][k]
            amp = w["amplitude"][k] * (1 + 0.35 * np.sin(2 * np.pi * t_seconds / w["mod_period"][k]
                                                         + w["mod_phase"][k]))
            meridional = np.cos(self.phi) ** m * np.sin(self.phi) ** 2 * (1 + 0.5 ** m) * 2.0
            total = total + amp * meridional * np.cos(m * (self.lam - w["rate"][k] * t_seconds)
                                                      + w["phase"][k])
        return total

    def _temperature(self, t_seconds: float, day_of_year: float, wave: np.ndarray) -> np.ndarray:
        """Temperature [L, H, W] (K): background profile plus the waves' hypsometric anomaly."""
        sin_phi = np.sin(self.phi)
        season = np.cos(2 * np.pi * (day_of_year - 196.0) / 365.25)   # +1 in NH summer
        t_surface = 300.0 - 45.0 * sin_phi ** 2 + 10.0 * sin_phi * season
        t_lapse = t_surface * (self.p / 1000.0) ** (R_DRY * LAPSE_RATE / GRAVITY)
        t_tropopause = 203.0 + 20.0 * sin_phi ** 2
        x_tropopause = np.log(1000.0 / (100.0 + 150.0 * sin_phi ** 2))
        background = _softmax2(t_lapse, t_tropopause, 3.0) + 4.0 * _softmax2(
            self.x - x_tropopause, 0.0 * self.x, 0.2)
        _, ds_dx = _vertical_shape(self.x)
        return background + wave * ds_dx / R_DRY                           # dZ/dln(p0/p) = R T

    def _geopotential(self, temperature: np.ndarray, z1000: np.ndarray) -> np.ndarray:
        """Hypsometric integration upwards from the 1000 hPa surface, [L, H, W]."""
        z = np.empty_like(temperature)
        z[-1] = z1000[0]
        for i in range(len(LEVELS) - 2, -1, -1):   # LEVELS ascend in hPa: index -1 is 1000 hPa
            z[i] = z[i + 1] + R_DRY * 0.5 * (temperature[i] + temperature[i + 1]) * (
                self.x[i, 0, 0] - self.x[i + 1, 0, 0])
        return z

    def _winds(self, z: np.ndarray) -> tuple:
        """Geostrophic u, v [L, H, W] from geopotential."""
        dz_dphi = np.gradient(z, np.radians(self.lat), axis=1, edge_order=2)
        dz_dlam = (np.roll(z, -1, axis=2) - np.roll(z, 1, axis=2)) / (2 * self.dlam)
        u = -self.inv_f * dz_dphi / EARTH_RADIUS
        v = self.inv_f * dz_dlam / (EARTH_RADIUS * self.cos_phi)
        return u, v

    def fields(self, when: np.datetime64, start: np.datetime64, tisr_now: np.ndarray,
               tisr_before: np.ndarray) -> dict:
        """All time-dependent variables at `when` (float64 arrays, lat ascending)."""
        t_seconds = float((when - start) / np.timedelta64(1, "s"))
        day_of_year = pd.Timestamp(when).day_of_year + pd.Timestamp(when).hour / 24.0
        wave = self._wave_field(t_seconds)
        temperature = self._temperature(t_seconds, day_of_year, wave)
        s, _ = _vertical_shape(np.zeros(1))
        z1000 = 800.0 - 2500.0 * (np.sin(self.phi) ** 2 - 1.0 / 3.0) + wave * s[0]
        z = self._geopotential(temperature, z1000)
        u, v = self._winds(z)
        profile = np.maximum(np.sin(np.pi * (1000.0 - self.p) / 950.0), 0.0) + 0.15
        hadley = (-0.06 * np.exp(-(self.phi / np.radians(10.0)) ** 2)
                  + 0.04 * np.exp(-((np.abs(self.phi) - np.radians(25.0)) / np.radians(8.0)) ** 2))
        omega = (-0.025 * v * np.tanh(self.phi / np.radians(10.0)) + hadley) * profile  # Pa/s
        rh = (0.65 - 0.3 * np.tanh(omega / 0.08)) * (0.25 + 0.75 * self.p / 1000.0)
        e_sat = 611.2 * np.exp(17.67 * (temperature - 273.15) / (temperature - 29.65))  # Pa
        q = rh * 0.622 * e_sat / (self.p * 100.0 - 0.378 * e_sat)
        # Surface variables.
        height = self.zs / GRAVITY
        forcing = 0.5 * (tisr_now + tisr_before)                                   # J/m^2
        anomaly = forcing - forcing.mean(axis=1, keepdims=True)                      # vs zonal mean
        diurnal = (0.35 + 0.65 * self.lsm) * 2.4e-6 * anomaly
        t2m = temperature[-1] - LAPSE_RATE * height + diurnal
        msl = 1e5 * np.exp(z[-1] / (R_DRY * temperature[-1]))
        turn = np.radians(20.0) * np.tanh(self.phi[0] / np.radians(10.0))
        reduction = 0.75 - 0.2 * self.lsm
        u10 = reduction * (u[-1] * np.cos(turn) - v[-1] * np.sin(turn))
        v10 = reduction * (u[-1] * np.sin(turn) + v[-1] * np.cos(turn))
        lift = np.maximum(-omega[LEVELS.index(700)] - 0.01, 0.0)
        precip = 20.0 * lift ** 1.5 * q[LEVELS.index(850)]                          # m per 6 h
        return {
            "temperature": temperature, "geopotential": z, "u_component_of_wind": u,
            "v_component_of_wind": v, "vertical_velocity": omega, "specific_humidity": q,
            "2m_temperature": t2m, "mean_sea_level_pressure": msl,
            "10m_u_component_of_wind": u10, "10m_v_component_of_wind": v10,
            "total_precipitation_6hr": precip, TISR: tisr_now,
        }


_UNITS = {
    "temperature": "K", "geopotential": "m**2 s**-2", "u_component_of_wind": "m s**-1",
    "v_component_of_wind": "m s**-1", "vertical_velocity": "Pa s**-1",
    "specific_humidity": "kg kg**-1", "2m_temperature": "K", "mean_sea_level_pressure": "Pa",
    "10m_u_component_of_wind": "m s**-1", "10m_v_component_of_wind": "m s**-1",
    "total_precipitation_6hr": "m", TISR: "J m**-2",
    "geopotential_at_surface": "m**2 s**-2", "land_sea_mask": "(0 - 1)",
}


def generate(*, seed: int = 0, resolution: float = 5.625, start: str = "2020-01-01",
             days: int = 60) -> xr.Dataset:
    """The synthetic dataset in the WeatherBench2 layout (in memory, float32, lat descending)."""
    if days < 1:
        raise ValueError(f"--days must be >= 1, got {days}.")
    gen = _Generator(seed, resolution)
    start64 = np.datetime64(pd.Timestamp(start), "ns")
    step = config.TIME_STEP.to_timedelta64()
    times = start64 + np.arange(days * (24 // config.TIME_STEP_HOURS)) * step  # [T]
    tisr = solar_radiation.toa_incident_solar_radiation(
        np.concatenate([[start64 - step], times]), gen.lat.astype(np.float32),
        gen.lon.astype(np.float32)).astype(np.float64)                        # [T+1, H, W]
    per_time = [gen.fields(t, start64, tisr[i + 1], tisr[i]) for i, t in enumerate(times)]
    data_vars = {}
    for name in per_time[0]:
        stacked = np.stack([f[name] for f in per_time])[..., ::-1, :].astype(np.float32)
        if name != TISR:   # TISR stays exactly what graphcast computes
            stacked = quantize(stacked)
        dims = ("time", "level", "latitude", "longitude") if stacked.ndim == 4 else (
            "time", "latitude", "longitude")
        data_vars[name] = (dims, stacked, {"units": _UNITS[name]})
    for name, value in (("geopotential_at_surface", gen.zs), ("land_sea_mask", gen.lsm)):
        data_vars[name] = (("latitude", "longitude"), value[::-1].astype(np.float32),
                           {"units": _UNITS[name]})
    coords = {"time": times, "level": np.array(LEVELS, np.int64),
              "latitude": gen.lat[::-1].copy(), "longitude": gen.lon}
    attrs = {"synthetic": "true",
             "description": ("SYNTHETIC data, not ERA5: drifting planetary waves with diagnosed "
                             "fields, made by data.sample for tests and demos."),
             "seed": seed, "resolution_degrees": resolution}
    return xr.Dataset(data_vars, coords, attrs)


def quantum(values: np.ndarray, fraction: float = 1 / 32) -> np.ndarray:
    """The power-of-two step below `fraction` of the std of the 6 h changes of [T, (L,) H, W]
    values, per level (shape broadcastable to a frame with a leading axis)."""
    axes = (0, 2, 3) if values.ndim == 4 else (0, 1, 2)
    change = np.diff(values.astype(np.float64), axis=0).std(axis=axes, keepdims=True)
    return np.exp2(np.floor(np.log2(np.maximum(change * fraction, 1e-30))))


def quantize(values: np.ndarray, step: Optional[np.ndarray] = None) -> np.ndarray:
    """Rounds float32 values to `step` (default: `quantum(values)`), like GRIB packing: the
    dropped low bits make the zarr several times smaller while the steps stay far below the
    signal a model learns. Exact in float32."""
    step = quantum(values) if step is None else step
    return (np.round(values / step) * step).astype(np.float32)


def climatology(ds: xr.Dataset, window_days: int = 31) -> xr.Dataset:
    """A WeatherBench2-layout climatology of the sample (dims hour, dayofyear, [level,] latitude,
    longitude) for ACC: per hour of day, the mean over a `window_days` window centred on each day
    (clipped at the sample's ends), for every time-dependent variable except TOA radiation. Only
    the days of year the sample covers are present."""
    names = [v for v in ds.data_vars
             if "time" in ds[v].dims and v != TISR]
    hours = []
    for hour in np.unique(ds["time"].dt.hour.values):
        series = ds[names].isel(time=ds["time"].dt.hour.values == hour).astype(np.float64)
        smooth = series.rolling(time=window_days, center=True, min_periods=1).mean()
        smooth = smooth.assign_coords(dayofyear=("time", series["time"].dt.dayofyear.values))
        hours.append(smooth.groupby("dayofyear").mean().expand_dims(hour=[int(hour)]))
    clim = xr.concat(hours, "hour").transpose("hour", "dayofyear", ...)
    for name in names:  # packed with the data's steps: a quarter of the size, same precision
        step = quantum(ds[name].values)[None]
        clim[name] = clim[name].copy(data=quantize(clim[name].values, step))
    clim.attrs = {"synthetic": "true", "description": (
        f"Climatology of the SYNTHETIC sample (data.sample): per hour, {window_days}-day running "
        "means grouped by day of year.")}
    return clim


def write(ds: xr.Dataset, path: str) -> None:
    """Write as zarr v2 like WeatherBench2: one time step per chunk, blosc-zstd bitshuffle."""
    compressor = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)
    encoding = {}
    for name, var in ds.data_vars.items():
        chunks = tuple(1 if d == "time" else n for d, n in zip(var.dims, var.shape))
        encoding[name] = {"chunks": chunks, "compressors": [compressor]}
    ds.to_zarr(path, mode="w", zarr_format=2, consolidated=True, encoding=encoding)


def write_climatology(clim: xr.Dataset, path: str) -> None:
    """Write as zarr v2, one (hour, day of year) field per chunk, like WeatherBench2's."""
    compressor = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)
    encoding = {name: {"chunks": tuple(1 if d in ("hour", "dayofyear") else n
                                       for d, n in zip(var.dims, var.shape)),
                       "compressors": [compressor]}
                for name, var in clim.data_vars.items()}
    clim.to_zarr(path, mode="w", zarr_format=2, consolidated=True, encoding=encoding)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=float, default=5.625)
    parser.add_argument("--start", default="2020-01-01")
    parser.add_argument("--days", type=int, default=60)
    args = parser.parse_args(argv)
    from data import stats  # late import: the generator itself needs no dask machinery
    began = time_lib.perf_counter()
    ds = generate(seed=args.seed, resolution=args.resolution, start=args.start, days=args.days)
    os.makedirs(args.out, exist_ok=True)
    zarr_path = os.path.join(args.out, "era5_sample.zarr")
    write(ds, zarr_path)
    write_climatology(climatology(ds), os.path.join(args.out, "climatology.zarr"))
    generated = time_lib.perf_counter() - began
    times = ds["time"].values
    stats.run(zarr_path, str(times[0]), str(times[-1]), os.path.join(args.out, "stats"))
    print(f"wrote {zarr_path} ({ds.sizes['time']} times, {ds.sizes['latitude']}x"
          f"{ds.sizes['longitude']} grid) and {args.out}/climatology.zarr in {generated:.1f} s, "
          f"{args.out}/stats in "
          f"{time_lib.perf_counter() - began - generated:.1f} s")


if __name__ == "__main__":
    main()
