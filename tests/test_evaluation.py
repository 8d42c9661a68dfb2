"""ACC against an independent numpy computation of WeatherBench2's definition, and the climatology's
grid and time handling."""

import datetime

import numpy as np
import pytest
import xarray as xr

from data import validate
from graphcast import config as gc_config
from training import evaluation

TASK = gc_config.TaskConfig(
    input_variables=("2m_temperature", "temperature"), target_variables=("2m_temperature", "temperature"),
    forcing_variables=(), pressure_levels=(500, 850), input_duration="12h")
LEVELS = (300, 500, 850)  # the store has one level more than the task, in another order


def _grid(resolution):
    return np.linspace(-90, 90, int(180 / resolution) + 1), np.arange(0, 360, resolution)


def write_climatology(path, resolution=30.0, days=range(1, 367), seed=0):
    """A WeatherBench2-layout climatology zarr (latitude descending) with random values."""
    rng = np.random.default_rng(seed)
    lat, lon = _grid(resolution)
    days = np.asarray(list(days))
    shape = (4, days.size, len(lat), len(lon))
    ds = xr.Dataset(
        {"2m_temperature": (("hour", "dayofyear", "latitude", "longitude"),
                            rng.normal(280, 5, shape).astype(np.float32)),
         "temperature": (("hour", "dayofyear", "level", "latitude", "longitude"),
                         rng.normal(250, 5, shape[:2] + (len(LEVELS),) + shape[2:]).astype(
                             np.float32))},
        coords={"hour": [0, 6, 12, 18], "dayofyear": days, "level": list(LEVELS),
                "latitude": lat[::-1], "longitude": lon})
    ds.to_zarr(path, mode="w", zarr_format=2, consolidated=True)
    return ds


def numpy_acc(pred, truth, init_times, lead_hours, clim_store, var, level, lat,
              levels=TASK.pressure_levels):
    """WeatherBench2's ACC written out: anomalies from the climatology at each valid time's day of
    year and hour, cell-area latitude weights, a correlation per initial time, then the mean over
    initial times. pred/truth: [B, T, (L), H, W] with latitude ascending."""
    step = lat[1] - lat[0]
    upper, lower = np.minimum(lat + step / 2, 90), np.maximum(lat - step / 2, -90)
    w = (np.sin(np.radians(upper)) - np.sin(np.radians(lower)))[:, None]
    table = clim_store[var]
    if level is not None:
        table = table.sel(level=level)
    table = table.transpose("hour", "dayofyear", "latitude", "longitude")
    values = np.asarray(table.values, np.float64)[:, :, ::-1]  # latitude ascending
    hours, days = list(table["hour"].values), list(table["dayofyear"].values)
    li = None if level is None else list(levels).index(level)
    out = []
    for j, lead in enumerate(lead_hours):
        per_init = []
        for b, t0 in enumerate(init_times):
            valid = datetime.datetime.fromisoformat(str(t0)[:19]) + datetime.timedelta(hours=lead)
            doy = (valid.date() - datetime.date(valid.year, 1, 1)).days + 1
            c = values[hours.index(valid.hour), days.index(doy)]
            p, t = pred[b, j], truth[b, j]
            if li is not None:
                p, t = p[li], t[li]
            fa, ta = p - c, t - c
            per_init.append(np.sum(w * fa * ta) / np.sqrt(np.sum(w * fa ** 2) * np.sum(w * ta ** 2)))
        out.append(np.mean(per_init))
    return out


def test_acc_matches_numpy_weatherbench2_definition(tmp_path):
    store = write_climatology(str(tmp_path / "clim.zarr"))
    lat, lon = _grid(30.0)
    # Leap year and year end: valid times cross 2020-02-29, 2020-12-31 (day 366) and 2021-01-01.
    init_times = np.array(["2020-02-28T18", "2020-12-31T00", "2020-12-31T12", "2021-03-01T06"],
                          "datetime64[ns]")
    lead_hours = [6, 12, 18, 24]
    clim = evaluation.Climatology(str(tmp_path / "clim.zarr"), TASK, lat, lon)
    values = clim.at(init_times, lead_hours)
    rng = np.random.default_rng(1)
    truth, pred = {}, {}
    for name, c in values.items():
        signal = rng.normal(0, 3, c.shape)
        truth[name] = c + signal
        pred[name] = c + 0.7 * signal + rng.normal(0, 2, c.shape)
    accumulator = evaluation.MetricsAccumulator(lat, TASK.pressure_levels, lead_hours)
    for half in (slice(0, 2), slice(2, 4)):  # two batches, as the experiment streams them
        accumulator.add({k: v[half] for k, v in pred.items()},
                        {k: v[half] for k, v in truth.items()},
                        climatology={k: v[half] for k, v in values.items()})
    metrics = accumulator.result()
    assert values["temperature"].shape == (4, 4, 2, len(lat), len(lon))
    for var, level in (("2m_temperature", None), ("temperature", 500), ("temperature", 850)):
        expected = numpy_acc(pred[var], truth[var], init_times, lead_hours, store, var, level, lat)
        got = [metrics[f"acc/{var}{'' if level is None else f'/{level}'}/{h}h"]
               for h in lead_hours]
        np.testing.assert_allclose(got, expected, rtol=1e-6)
        assert all(0.3 < a < 1 for a in got)
    table = evaluation.summary_table({**metrics, "rmse/2m_temperature/6h": 1.0}, 3, [6])
    assert "ACC" in table and f"ACC {metrics['acc/2m_temperature/6h']:.3f}" in table


def test_climatology_on_a_finer_grid_is_subsampled(tmp_path):
    fine = write_climatology(str(tmp_path / "fine.zarr"), resolution=15.0)
    lat, lon = _grid(30.0)
    clim = evaluation.Climatology(str(tmp_path / "fine.zarr"), TASK, lat, lon)
    got = clim.at(np.array(["2020-01-01T00"], "datetime64[ns]"), [6])["2m_temperature"][0, 0]
    expected = fine["2m_temperature"].sel(hour=6, dayofyear=1).values[::-1][::2, ::2]
    np.testing.assert_array_equal(got, expected)


def test_climatology_on_another_grid_is_refused(tmp_path):
    write_climatology(str(tmp_path / "coarse.zarr"), resolution=45.0)
    lat, lon = _grid(30.0)
    with pytest.raises(validate.GridMismatchError, match="coarse.zarr"):
        evaluation.Climatology(str(tmp_path / "coarse.zarr"), TASK, lat, lon)


def test_climatology_without_the_valid_day_names_it(tmp_path):
    write_climatology(str(tmp_path / "short.zarr"), days=range(1, 32))
    lat, lon = _grid(30.0)
    clim = evaluation.Climatology(str(tmp_path / "short.zarr"), TASK, lat, lon)
    with pytest.raises(ValueError, match=r"short.zarr.*2020-02-01 00:00:00 \(day of year 32, hour 0\)"):
        clim.at(np.array(["2020-01-31T18"], "datetime64[ns]"), [6, 12])


def test_missing_climatology_names_the_path(tmp_path):
    lat, lon = _grid(30.0)
    with pytest.raises(validate.SourceNotFoundError, match="nothing.zarr"):
        evaluation.Climatology(str(tmp_path / "nothing.zarr"), TASK, lat, lon)


def test_climatology_with_some_levels_gives_acc_for_those(tmp_path):
    write_climatology(str(tmp_path / "clim.zarr"))
    lat, lon = _grid(30.0)
    task = gc_config.TaskConfig(
        input_variables=TASK.input_variables, target_variables=TASK.target_variables,
        forcing_variables=(), pressure_levels=(500, 925), input_duration="12h")
    clim = evaluation.Climatology(str(tmp_path / "clim.zarr"), task, lat, lon)
    values = clim.at(np.array(["2020-01-01T00"], "datetime64[ns]"), [6])
    assert np.isnan(values["temperature"][:, :, 1]).all()
    assert not np.isnan(values["temperature"][:, :, 0]).any()
    accumulator = evaluation.MetricsAccumulator(lat, task.pressure_levels, [6])
    truth = {k: v + 1.0 for k, v in values.items()}
    accumulator.add(truth, truth, climatology=values)
    metrics = accumulator.result()
    assert "acc/temperature/500/6h" in metrics and "acc/temperature/925/6h" not in metrics
    assert "rmse/temperature/925/6h" in metrics


def test_sample_climatology_is_running_means_by_day_and_hour():
    from data import sample
    ds = sample.generate(seed=0, resolution=30.0, start="2020-12-30", days=4)  # crosses the year
    clim = sample.climatology(ds, window_days=3)
    assert dict(clim.sizes)["hour"] == 4 and sorted(clim["dayofyear"].values) == [1, 2, 365, 366]
    assert "toa_incident_solar_radiation" not in clim
    t2m = ds["2m_temperature"].sel(time=ds["time"].dt.hour == 6).values.astype(np.float64)
    expected = t2m[0:3].mean(axis=0)  # 2020-12-31 (day 366): the days before and after it
    step = sample.quantum(ds["2m_temperature"].values)[0]
    got = clim["2m_temperature"].sel(hour=6, dayofyear=366).values
    np.testing.assert_allclose(got, expected, atol=float(np.max(step)))
    assert clim["temperature"].dims == ("hour", "dayofyear", "level", "latitude", "longitude")
