"""TaskConfig validation at construction, and statistics coverage errors."""

import dataclasses

import numpy as np
import pytest
import xarray as xr

from graphcast import config as config_lib
from graphcast import normalization

BASE = dict(input_variables=("2m_temperature", "temperature", "land_sea_mask",
                             "toa_incident_solar_radiation"),
            target_variables=("2m_temperature", "temperature"),
            forcing_variables=("toa_incident_solar_radiation",),
            pressure_levels=(500, 850), input_duration="12h")


def task(**changes):
    return config_lib.TaskConfig(**{**BASE, **changes})


def test_standard_tasks_are_valid():
    assert config_lib.TASK.num_outputs() == 227
    assert config_lib.TASK_13.num_outputs() == 83
    assert config_lib.TASK_13_PRECIP_OUT.num_outputs() == 83
    assert task().num_input_frames == 2


@pytest.mark.parametrize("changes, words", [
    (dict(input_variables=BASE["input_variables"] + ("10m_u_component_of_wind",)),
     ["'10m_u_component_of_wind'", "fed back", "target_variables", "forcing_variables"]),
    (dict(forcing_variables=("toa_incident_solar_radiation", "temperature")),
     ["temperature", "both"]),
    (dict(target_variables=("temperature", "temperature")), ["target_variables", "temperature"]),
    (dict(input_variables=BASE["input_variables"] + ("land_sea_mask",)), ["input_variables"]),
    (dict(pressure_levels=(500, 500)), ["pressure_levels", "500"]),
    (dict(target_variables=()), ["target_variables", "empty"]),
    (dict(input_duration="9h"), ["input_duration", "6h"]),
    (dict(input_duration="0h"), ["input_duration"]),
    (dict(input_duration="soon"), ["input_duration"]),
    (dict(loss_weights={"mean_sea_level_pressure": 0.1}),
     ["loss_weights", "mean_sea_level_pressure", "not targets"]),
])
def test_bad_tasks_are_rejected_with_named_errors(changes, words):
    with pytest.raises(config_lib.TaskConfigError) as e:
        task(**changes)
    for word in words:
        assert word in str(e.value)


def test_static_and_unknown_inputs_pass_construction():
    # Known statics are fine; an unknown name is checked against the data's time axis later.
    task(input_variables=BASE["input_variables"] + ("geopotential_at_surface", "my_static_field"))


def test_loss_weights_default_to_graphcasts_for_present_targets():
    weights = task().variable_loss_weights()
    assert weights == {"2m_temperature": 1.0, "temperature": 1.0}
    no_precip = dataclasses.replace(config_lib.TASK_13, target_variables=tuple(
        v for v in config_lib.TASK_13.target_variables if v != "total_precipitation_6hr"),
        input_variables=tuple(v for v in config_lib.TASK_13.input_variables
                              if v != "total_precipitation_6hr"))
    assert "total_precipitation_6hr" not in no_precip.variable_loss_weights()
    assert no_precip.variable_loss_weights()["mean_sea_level_pressure"] == 0.1
    custom = task(loss_weights={"temperature": 2.0})
    assert custom.variable_loss_weights()["temperature"] == 2.0


def _stats(variables, levels=(500, 850, 1000)):
    data = {v: (("level",), np.ones(len(levels))) if v == "temperature" else ((), 1.0)
            for v in variables}
    return xr.Dataset(data, coords={"level": list(levels)})


def test_missing_statistics_are_named():
    t = task()
    full = _stats(["2m_temperature", "temperature", "land_sea_mask", "toa_incident_solar_radiation"])
    ok = normalization.stats_from_datasets(
        {"mean": full, "stddev": full, "diffs_stddev": full}, t)
    assert ok.mean["temperature"].shape == (2,)
    partial = full.drop_vars("land_sea_mask")
    with pytest.raises(normalization.StatsError, match="land_sea_mask"):
        normalization.stats_from_datasets({"mean": partial, "stddev": full, "diffs_stddev": full}, t)
    other_levels = _stats(["2m_temperature", "temperature", "land_sea_mask",
                           "toa_incident_solar_radiation"], levels=(100, 200))
    with pytest.raises(normalization.StatsError, match="500"):
        normalization.stats_from_datasets(
            {"mean": other_levels, "stddev": full, "diffs_stddev": full}, t)
