"""Tests for graphcast.data_utils and graphcast.solar_radiation against the reference fixtures.

The task and lead times come from fixture_config.json, so the checks hold for any fixture set
produced the same way.
"""

import json
import pathlib

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from graphcast import data_utils, solar_radiation
from graphcast.solar_radiation import TISR
from conftest import FIXTURE_DIR

FIXTURES = pathlib.Path(FIXTURE_DIR)


def _lead_times(spec: dict):
    """target_lead_times of fixture_config.json as the extraction expects them."""
    if "slice" in spec:
        return slice(*spec["slice"])
    return [pd.Timedelta(hours=h) for h in spec["hours"]]


@pytest.fixture(scope="module")
def config() -> dict:
    return json.loads((FIXTURES / "fixture_config.json").read_text())


@pytest.fixture(scope="module")
def task(config) -> dict:
    return dict(config["task_config"], target_lead_times=_lead_times(config["target_lead_times"]))


@pytest.fixture(scope="module")
def example() -> xr.Dataset:
    with xr.open_dataset(FIXTURES / "example_batch.nc") as ds:
        return ds.load()


@pytest.fixture(scope="module")
def expected() -> dict:
    out = {}
    for name in ("inputs", "targets", "forcings"):
        with xr.open_dataset(FIXTURES / f"{name}.nc") as ds:
            out[name] = ds.load()
    return out


def _assert_matches_fixtures(outputs, expected, task):
    for name, got, order in zip(("inputs", "targets", "forcings"), outputs,
                                ("input_variables", "target_variables", "forcing_variables")):
        assert list(got.data_vars) == list(task[order]), name
        xr.testing.assert_identical(got, expected[name])
        for var in got.data_vars:
            assert got[var].dtype == expected[name][var].dtype, (name, var)


# ----------------------------------------------------------------------------- extraction


def test_extraction_reproduces_fixtures(example, expected, task):
    _assert_matches_fixtures(data_utils.extract_inputs_targets_forcings(example, **task),
                             expected, task)


def test_extraction_without_stored_tisr_reproduces_fixtures(example, expected, task):
    outputs = data_utils.extract_inputs_targets_forcings(example.drop_vars(TISR), **task)
    _assert_matches_fixtures(outputs, expected, task)


def test_extraction_does_not_modify_its_input(example, task):
    before = example.copy()
    data_utils.extract_inputs_targets_forcings(example.drop_vars(TISR), **task)
    xr.testing.assert_identical(example, before)


def test_extraction_of_internal_layout(example, expected, task):
    """time = absolute datetime64, no batch dim: same values, without the batch axis."""
    internal = (example.isel(batch=0).drop_vars(["datetime", TISR])
                .assign_coords(time=example.datetime.values[0]))
    outputs = data_utils.extract_inputs_targets_forcings(internal, **task)
    for name, got in zip(("inputs", "targets", "forcings"), outputs):
        xr.testing.assert_identical(got, expected[name].isel(batch=0))


def test_list_lead_times_are_sorted_and_match_slice(example, expected, task, config):
    hours = config["target_lead_times"]["hours"]
    as_list = dict(task, target_lead_times=[f"{h}h" for h in reversed(hours)])
    _assert_matches_fixtures(data_utils.extract_inputs_targets_forcings(example, **as_list),
                             expected, task)


def test_single_lead_time_keeps_time_axis(example, task, config):
    last = config["target_lead_times"]["hours"][-1]
    _, targets, forcings = data_utils.extract_inputs_targets_forcings(
        example, **dict(task, target_lead_times=f"{last}h"))
    assert targets.sizes["time"] == forcings.sizes["time"] == 1
    assert targets.time.values[0] == pd.Timedelta(hours=last)


def test_ignores_extra_task_fields(example, task):
    data_utils.extract_inputs_targets_forcings(example, **task, loss_weights=None)


# ----------------------------------------------------------------------------- validation


def _extract(ds, task, **overrides):
    return data_utils.extract_inputs_targets_forcings(ds, **dict(task, **overrides))


def test_error_absent_pressure_level(example, task):
    with pytest.raises(KeyError, match=r"\[123\].*50"):
        _extract(example, task, pressure_levels=[50, 123])


def test_error_lists_all_missing_variables(example, task):
    ds = example.drop_vars(["land_sea_mask", "2m_temperature"])
    with pytest.raises(ValueError, match="2m_temperature.*land_sea_mask"):
        _extract(ds, task)


@pytest.mark.parametrize("coord", ["datetime", "lon"])
def test_error_missing_coordinate_for_progress(example, task, coord):
    with pytest.raises(ValueError, match=f"'{coord}'"):
        _extract(example.drop_vars(coord), task)


def test_error_missing_lat_for_tisr(example, task):
    ds = example.drop_vars([TISR, "lat"])
    with pytest.raises(ValueError, match="'lat'"):
        _extract(ds, task)


def test_error_target_forcing_overlap(example, task):
    targets = list(task["target_variables"]) + [task["forcing_variables"][0]]
    with pytest.raises(ValueError, match=task["forcing_variables"][0]):
        _extract(example, task, target_variables=targets)


def test_error_lead_times_beyond_data(example, task):
    short = example.isel(time=slice(0, 3))  # too few times for 2 inputs + 3 targets
    with pytest.raises(ValueError, match="too short"):
        _extract(short, task)


def test_error_lead_time_not_in_data(example, task):
    with pytest.raises(ValueError, match="not times of the data"):
        _extract(example, task, target_lead_times=["9h", "18h"])


# ----------------------------------------------------------------------------- TISR


def test_tisr_recomputed_bit_exact(example):
    got = solar_radiation.toa_incident_solar_radiation_for_dataset(example)
    ref = example[TISR]
    assert got.dims == ref.dims and got.dtype == np.float32
    ulps = np.abs(got.values.view(np.int32).astype(np.int64) - ref.values.view(np.int32))
    assert ulps.max() == 0, f"TISR differs by up to {ulps.max()} ulp"


def test_tisr_chunking_does_not_change_bits(example, monkeypatch):
    times, lat, lon = example.datetime.values[0], example.lat.values, example.lon.values
    whole = solar_radiation.toa_incident_solar_radiation(times, lat, lon)
    monkeypatch.setattr(solar_radiation, "_MAX_ELEMENTS_PER_CALL", 1)  # one timestamp per call
    np.testing.assert_array_equal(
        solar_radiation.toa_incident_solar_radiation(times, lat, lon), whole)


def test_tsi_table():
    table = solar_radiation.ERA5_TSI
    assert len(table.years) == 84 and table.years[0] == 1951.5 and table.years[-1] == 2034.5
    assert table.values[0] == pytest.approx(0.9965 * 1365.7765, rel=1e-15)
    np.testing.assert_array_equal(table.values[45:58], table.values[58:71])  # 13-year cycle
    np.testing.assert_array_equal(table.values[58:71], table.values[71:84])
    mid_2000 = np.array(["2000-07-02T00:00"], "datetime64[ns]")  # 183/366 = 0.5 of the year
    assert solar_radiation.interpolate_tsi(mid_2000)[0] == table.values[2000 - 1951]
    far = np.array(["1900-01-01", "2100-01-01"], "datetime64[ns]")  # clamped at the ends
    np.testing.assert_array_equal(solar_radiation.interpolate_tsi(far), table.values[[0, -1]])
    np.testing.assert_array_equal(
        solar_radiation.interpolate_tsi(far, solar_radiation.CONSTANT_TSI), [1361.0, 1361.0])


def test_tisr_physics():
    """Zero in polar night, ~constant at the lit pole, near TSI*3600 under the noon sun,
    linear in TSI."""
    lat = np.array([-90.0, 23.44, 90.0], np.float32)  # 23.44 N: overhead sun at the solstice
    lon = np.arange(0, 360, 90, dtype=np.float32)
    t = np.array(["2022-06-21T12:30"], "datetime64[ns]")  # hour centred on noon at lon 0
    era5 = solar_radiation.toa_incident_solar_radiation(t, lat, lon)
    const = solar_radiation.toa_incident_solar_radiation(t, lat, lon,
                                                         tsi=solar_radiation.CONSTANT_TSI)
    assert era5.shape == (1, 3, 4) and era5.dtype == np.float32
    assert np.all(era5[0, 0] == 0)  # south pole in June
    np.testing.assert_allclose(era5[0, 2], era5[0, 2, 0], rtol=1e-6)  # north pole: any lon
    tsi = solar_radiation.interpolate_tsi(t)[0]
    # overhead sun, Earth near aphelion (1/1.0167^2 = 0.967): about 0.967 * TSI * 1 h
    assert 0.96 * tsi * 3600 < era5[0, 1, 0] < 0.97 * tsi * 3600
    ratio = const[era5 > 0] / era5[era5 > 0]
    np.testing.assert_allclose(ratio, 1361.0 / tsi, rtol=1e-6)


# ----------------------------------------------------------------------------- progress


def test_progress_at_known_instants():
    times = np.array(["1970-01-01T00:00", "1970-01-01T06:00", "2022-01-01T18:00:00.9"],
                     "datetime64[ns]")
    seconds = data_utils.seconds_since_epoch(times)
    np.testing.assert_array_equal(seconds, [0, 21600, 1641060000])  # sub-second truncated
    year = data_utils.year_progress(seconds)
    assert year.dtype == np.float32 and year[0] == 0
    assert year[2] == np.float32(np.mod(1641060000 / 86400 / 365.24219, 1.0))
    lon = np.array([0.0, 90.0, 270.0], np.float32)
    day = data_utils.day_progress(seconds, lon)
    assert day.shape == (3, 3) and day.dtype == np.float32
    np.testing.assert_allclose(day[0], [0.0, 0.25, 0.75], atol=1e-7)
    np.testing.assert_allclose(day[1], [0.25, 0.5, 0.0], atol=1e-7)  # wraps to [0, 1)
    sin, cos = data_utils.progress_sin_cos(day)
    assert sin.dtype == np.float32
    np.testing.assert_allclose(sin[1], [1.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(cos[1], [0.0, -1.0, 1.0], atol=1e-6)


def test_add_derived_vars_dims_and_values(example, expected):
    ds = data_utils.add_derived_vars(example)
    for name in data_utils.PROGRESS_VARS:
        assert ds[name].dtype == np.float32
    assert ds["year_progress"].dims == ("batch", "time")
    assert ds["day_progress_sin"].dims == ("batch", "time", "lon")
    first = len(expected["inputs"].time)  # forcings start right after the inputs
    steps = slice(first, first + len(expected["forcings"].time))
    for name in ("year_progress_sin", "day_progress_cos"):
        np.testing.assert_array_equal(ds[name].values[:, steps], expected["forcings"][name].values)


def test_add_derived_vars_keeps_existing(example):
    ds = example.assign(year_progress=(("batch", "time"), np.zeros((1, 5), np.float32)))
    ds = data_utils.add_derived_vars(ds)
    assert "year_progress_sin" not in ds and "day_progress_sin" in ds


def test_batch_larger_than_one(example):
    """Each batch element gets the TISR and progress of its own timestamps."""
    shifted = example.assign_coords(datetime=example.datetime + np.timedelta64(30, "h"))
    pair = xr.concat([example.drop_vars(TISR), shifted.drop_vars(TISR)], dim="batch",
                     data_vars="minimal", coords="minimal", compat="override")
    ds = data_utils.add_tisr_var(data_utils.add_derived_vars(pair))
    assert ds[TISR].dims == ("batch", "time", "lat", "lon")
    np.testing.assert_array_equal(ds[TISR].values[0], example[TISR].values[0])
    alone = solar_radiation.toa_incident_solar_radiation(
        shifted.datetime.values[0], example.lat.values, example.lon.values)
    np.testing.assert_array_equal(ds[TISR].values[1], alone)
    assert not np.array_equal(ds["day_progress_sin"].values[0], ds["day_progress_sin"].values[1])


# ----------------------------------------------------------------------------- arrays


def test_dataset_to_arrays_layout(example, expected, task):
    inputs, targets, forcings = (expected[k] for k in ("inputs", "targets", "forcings"))
    b, h, w = inputs.sizes["batch"], inputs.sizes["lat"], inputs.sizes["lon"]
    arrays = data_utils.dataset_to_arrays(inputs, task["input_variables"])
    assert list(arrays) == list(task["input_variables"])
    t, levels = inputs.sizes["time"], len(task["pressure_levels"])
    assert arrays["temperature"].shape == (b, t, levels, h, w)
    assert arrays["2m_temperature"].shape == (b, t, h, w)
    assert arrays["land_sea_mask"].shape == (b, h, w)
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays.values())
    np.testing.assert_array_equal(arrays["temperature"], inputs["temperature"].values)
    np.testing.assert_array_equal(arrays["land_sea_mask"][0], inputs["land_sea_mask"].values)
    year = arrays["year_progress_sin"]
    assert year.shape == (b, t, h, w)
    np.testing.assert_array_equal(year[:, :, 3, 7], inputs["year_progress_sin"].values)
    day = data_utils.dataset_to_arrays(forcings, ["day_progress_cos"])["day_progress_cos"]
    assert day.shape == (b, forcings.sizes["time"], h, w)
    np.testing.assert_array_equal(day[:, :, 5, :], forcings["day_progress_cos"].values)


def test_dataset_to_arrays_any_dim_order(expected):
    targets = expected["targets"]
    flipped = targets.transpose("lon", "lat", "level", "time", "batch")
    a = data_utils.dataset_to_arrays(flipped, ["geopotential"])["geopotential"]
    np.testing.assert_array_equal(a, targets["geopotential"].values)


def test_dataset_to_arrays_errors(expected):
    ds = expected["targets"].expand_dims(member=2)
    with pytest.raises(ValueError, match="'member'"):
        data_utils.dataset_to_arrays(ds, ["2m_temperature"])
    with pytest.raises(ValueError, match="'nope'"):
        data_utils.dataset_to_arrays(expected["targets"], ["nope"])


@pytest.mark.parametrize("template_order", [None, ("time", "batch")])
def test_arrays_round_trip(expected, task, template_order):
    targets = expected["targets"]
    arrays = data_utils.dataset_to_arrays(targets, task["target_variables"])
    template = targets if template_order is None else targets.transpose(*template_order, ...)
    back = data_utils.arrays_to_dataset(arrays, template)
    xr.testing.assert_equal(back, targets)
    assert back["temperature"].dims == ("batch", "time", "level", "lat", "lon")
    assert list(back.data_vars) == list(task["target_variables"])


def test_arrays_to_dataset_errors(expected):
    targets = expected["targets"]
    with pytest.raises(ValueError, match="'2m_temperature'.*shape"):
        data_utils.arrays_to_dataset({"2m_temperature": np.zeros((1, 1, 2, 2))}, targets)
    with pytest.raises(ValueError, match="'unknown'"):
        data_utils.arrays_to_dataset({"unknown": np.zeros((1,))}, targets)
