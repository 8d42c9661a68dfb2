"""TaskConfig validation at construction, and statistics coverage errors."""

import dataclasses

import numpy as np
import pandas as pd
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


# ----------------------------------------------------------------------------- domain facts

@pytest.mark.parametrize("name", ["TASK_13", "TASK_13_PRECIP_OUT", "three_frames"])
def test_channel_count_matches_the_built_model(name):
    """num_input_channels / num_outputs are the widths of the model's grid encoder and decoder."""
    import jax
    from graphcast import memory, rollout
    t = (dataclasses.replace(config_lib.TASK_13, input_duration="18h") if name == "three_frames"
         else config_lib.STANDARD_TASKS[name])
    model = config_lib.ModelConfig(resolution=30.0, mesh_size=1, latent_size=8, gnn_msg_steps=1,
                                   hidden_layers=1, radius_query_fraction_edge_length=0.6)
    lat, lon = np.linspace(-90, 90, 7), np.arange(12) * 30.0
    predictor = rollout.Predictor(model, t, memory.unit_stats(t), lat, lon)
    params = jax.eval_shape(predictor.init, jax.random.PRNGKey(0),
                            memory.batch_shapes(t, 1, 1, lat.size, lon.size))
    encoder = params["grid2mesh_gnn/~_networks_builder/encoder_nodes_grid_nodes_mlp/~/linear_0"]
    decoder = params["mesh2grid_gnn/~_networks_builder/decoder_nodes_grid_nodes_mlp/~/linear_1"]
    structural = 3  # cos(lat), sin(lon), cos(lon) of each grid node
    assert encoder["w"].shape[0] == t.num_input_channels() + structural
    assert decoder["w"].shape[1] == t.num_outputs()
    assert t.channels("temperature") == 13 and t.channels("2m_temperature") == 1


def test_task_on_levels():
    assert config_lib.task_on_levels(13) == config_lib.TASK_13
    assert config_lib.task_on_levels(37) == config_lib.TASK
    assert config_lib.task_on_levels(25).pressure_levels == config_lib.PRESSURE_LEVELS_HRES_25
    with pytest.raises(config_lib.TaskConfigError, match=r"12 pressure levels.*\[13, 25, 37\]"):
        config_lib.task_on_levels(12)


def test_missing_pressure_levels_are_one_error_naming_variable_and_levels():
    """Data, statistics and extraction report absent levels with one check and one base error
    type; data and statistics keep their own subclasses (exit statuses 4 and 5)."""
    from data import validate
    from graphcast import data_utils
    other_levels = _stats(["2m_temperature", "temperature", "land_sea_mask",
                           "toa_incident_solar_radiation"], levels=(500, 1000))
    ds = xr.Dataset({"temperature": (("level",), np.ones(2))}, coords={"level": [500, 1000]})
    cases = [
        (lambda: normalization.stats_from_datasets(
            {"mean": other_levels, "stddev": other_levels, "diffs_stddev": other_levels}, task()),
         normalization.StatsError, "statistics/mean_by_level.nc: variable 'temperature'"),
        (lambda: validate.check_levels(ds, (500, 850), "era5.zarr"),
         validate.DataValidationError, "era5.zarr"),
        (lambda: data_utils._select_levels(ds, (500, 850)), KeyError, "the dataset's 'level'"),
    ]
    for fail, kind, where in cases:
        with pytest.raises(config_lib.MissingLevelsError) as e:
            fail()
        assert isinstance(e.value, kind)
        assert str(e.value) == (f"{where}: pressure levels [850] hPa required by the task "
                                "(pressure_levels [500, 850]) are missing; available levels: "
                                "[500, 1000].")


def test_time_step_and_progress_names():
    assert config_lib.TIME_STEP == pd.Timedelta(hours=config_lib.TIME_STEP_HOURS) \
        == pd.Timedelta("6h")
    assert config_lib.GENERATED_FORCING_VARS == ("year_progress_sin", "year_progress_cos",
                                                 "day_progress_sin", "day_progress_cos")
    assert set(config_lib.GENERATED_FORCING_VARS) < set(config_lib.PROGRESS_VARS)
