"""The official checkpoint format: read, write bit-exactly, refuse pickles and mismatches."""

import dataclasses
import os
import zipfile

import numpy as np
import pytest

from graphcast import checkpoint as checkpoint_lib
from graphcast import config as config_lib
from conftest import FIXTURE_DIR

FIXTURES = FIXTURE_DIR
OFFICIAL = os.path.join(FIXTURES, "checkpoint.npz")


def read_npz(path):
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def test_load_official_checkpoint():
    ckpt = checkpoint_lib.load(OFFICIAL)
    raw = read_npz(OFFICIAL)
    assert ckpt.model_config.mesh_size == int(raw["model_config:mesh_size"])
    assert ckpt.model_config.mesh2grid_edge_normalization_factor == (
        float(raw["model_config:mesh2grid_edge_normalization_factor"])
        if "model_config:mesh2grid_edge_normalization_factor" in raw else None)
    n_inputs = sum(k.startswith("task_config:input_variables:") for k in raw)
    assert len(ckpt.task_config.input_variables) == n_inputs
    assert ckpt.task_config.input_variables[0] == str(raw["task_config:input_variables:0"])
    n_params = sum(k.startswith("params:") for k in raw)
    assert sum(len(p) for p in ckpt.params.values()) == n_params


def test_round_trip_is_bit_exact(tmp_path):
    ckpt = checkpoint_lib.load(OFFICIAL)
    out = tmp_path / "ours.npz"
    checkpoint_lib.save(out, ckpt)
    original, written = read_npz(OFFICIAL), read_npz(out)
    assert sorted(original) == sorted(written)
    for key in original:
        assert original[key].dtype == written[key].dtype, key
        assert original[key].shape == written[key].shape, key
        np.testing.assert_array_equal(original[key], written[key], err_msg=key)
    again = checkpoint_lib.load(out)
    assert again.model_config == ckpt.model_config
    assert again.task_config == ckpt.task_config
    assert again.description == ckpt.description and again.license == ckpt.license


def test_key_order_sorts_indices_numerically(tmp_path):
    ckpt = checkpoint_lib.load(OFFICIAL)
    task = dataclasses.replace(ckpt.task_config, pressure_levels=config_lib.PRESSURE_LEVELS[13])
    checkpoint_lib.save(tmp_path / "c.npz", dataclasses.replace(ckpt, task_config=task))
    assert checkpoint_lib.load(tmp_path / "c.npz").task_config.pressure_levels == (
        config_lib.PRESSURE_LEVELS[13])


def test_object_arrays_are_refused_without_unpickling(tmp_path):
    raw = read_npz(OFFICIAL)
    raw["description"] = np.array([{"evil": 1}], dtype=object)
    path = tmp_path / "pickled.npz"
    np.savez(path, **raw)
    with pytest.raises(checkpoint_lib.CheckpointError, match="description"):
        checkpoint_lib.load(path)


def test_truncated_file_is_a_named_error(tmp_path):
    data = open(OFFICIAL, "rb").read()
    path = tmp_path / "truncated.npz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint_lib.CheckpointError, match="truncated.npz"):
        checkpoint_lib.load(path)


def test_missing_config_field_is_named(tmp_path):
    raw = read_npz(OFFICIAL)
    del raw["model_config:latent_size"]
    np.savez(tmp_path / "c.npz", **raw)
    with pytest.raises(checkpoint_lib.CheckpointError, match="latent_size"):
        checkpoint_lib.load(tmp_path / "c.npz")


def test_save_is_atomic(tmp_path):
    path = tmp_path / "c.npz"
    ckpt = checkpoint_lib.load(OFFICIAL)
    checkpoint_lib.save(path, ckpt)
    assert zipfile.is_zipfile(path)
    assert os.listdir(tmp_path) == ["c.npz"]


def test_mismatch_with_run_names_fields():
    ckpt = checkpoint_lib.load(OFFICIAL)
    model = dataclasses.replace(ckpt.model_config, latent_size=ckpt.model_config.latent_size * 2)
    task = dataclasses.replace(ckpt.task_config, pressure_levels=(500, 850))
    with pytest.raises(checkpoint_lib.CheckpointError) as e:
        checkpoint_lib.check_matches(ckpt, model, task)
    assert "model.latent_size" in str(e.value) and "task.pressure_levels" in str(e.value)
    checkpoint_lib.check_matches(ckpt, ckpt.model_config, ckpt.task_config)


def test_grid_mismatch_is_named():
    ckpt = checkpoint_lib.load(OFFICIAL)
    resolution = ckpt.model_config.resolution
    good = np.arange(-90, 90 + resolution / 2, resolution)
    checkpoint_lib.check_grid(ckpt, good)
    with pytest.raises(checkpoint_lib.CheckpointError, match="degree"):
        checkpoint_lib.check_grid(ckpt, np.arange(-90, 90.1, resolution / 2))
