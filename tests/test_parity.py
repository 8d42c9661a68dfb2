"""Parity with the reference GraphCast: parameters, inputs, predictions, loss and gradients.

Every expectation is read from the fixture folder (GRAPHCAST_FIXTURE_DIR, default
tests/fixtures/graphcast_reference); tolerances are the ones its README lists, relative to the
statistics, so another fixture set (grid, mesh, width, task) runs unchanged.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

from graphcast import checkpoint as checkpoint_lib
from graphcast import data_utils
from graphcast import normalization
from graphcast import rollout
from graphcast import stacking
from conftest import FIXTURE_DIR

FIXTURES = FIXTURE_DIR


def fixture(name):
    return os.path.join(FIXTURES, name)


@pytest.fixture(scope="module")
def ref():
    """Everything the reference produced, loaded once."""
    ckpt = checkpoint_lib.load(fixture("checkpoint.npz"))
    task = ckpt.task_config
    inputs = xr.load_dataset(fixture("inputs.nc"))
    targets = xr.load_dataset(fixture("targets.nc"))
    forcings = xr.load_dataset(fixture("forcings.nc"))
    batch = {"inputs": data_utils.dataset_to_arrays(inputs, task.input_variables),
             "targets": data_utils.dataset_to_arrays(targets, task.target_variables),
             "forcings": data_utils.dataset_to_arrays(forcings, task.forcing_variables)}
    stats = normalization.load_stats(fixture("stats"), task)
    with open(fixture("loss.json")) as f:
        loss = json.load(f)
    return dict(ckpt=ckpt, task=task, inputs=inputs, targets=targets, batch=batch, stats=stats,
                loss=loss, params=jax.tree.map(jnp.asarray, ckpt.params),
                stddev=xr.load_dataset(fixture("stats/stddev_by_level.nc")))


def make_predictor(ref, **kwargs):
    return rollout.Predictor(ref["ckpt"].model_config, ref["task"], ref["stats"],
                             ref["inputs"]["lat"].values, ref["inputs"]["lon"].values, **kwargs)


def first_steps(batch, n):
    return {k: {v: x[:, :n] if k != "inputs" else x for v, x in arrays.items()}
            for k, arrays in batch.items()}


def assert_close_in_stddev(ours: dict, reference: xr.Dataset, ref, tol: float, rms_tol=None):
    """Per variable and level: max |ours - reference| <= tol x stddev_by_level."""
    levels = list(ref["task"].pressure_levels)
    for v in ref["task"].target_variables:
        expected = reference[v]
        dims = [d for d in ("batch", "time", "level", "lat", "lon") if d in expected.dims]
        expected = expected.transpose(*dims).values
        got = np.asarray(ours[v]).reshape(expected.shape)
        std = ref["stddev"][v]
        std = std.sel(level=levels).values[:, None, None] if "level" in dims else std.values
        err = np.abs(got - expected) / std
        assert np.all(np.isfinite(got)), v
        assert err.max() <= tol, f"{v}: max |d|/std = {err.max():.3g} > {tol}"
        if rms_tol is not None:
            rms = np.sqrt(np.mean(err ** 2))
            assert rms <= rms_tol, f"{v}: rms |d|/std = {rms:.3g} > {rms_tol}"


def test_parameter_tree_matches_checkpoint(ref):
    predictor = make_predictor(ref)
    theirs = {(m, n): p.shape for m, ps in ref["ckpt"].params.items() for n, p in ps.items()}
    # A multi-step init must not create a second copy of the network (`grid2mesh_gnn_1/...`).
    for steps in (1, ref["targets"].sizes["time"]):
        params = jax.jit(predictor.init)(jax.random.PRNGKey(0), first_steps(ref["batch"], steps))
        ours = {(m, n): p.shape for m, ps in params.items() for n, p in ps.items()}
        assert ours == theirs
    with open(fixture("fixture_config.json")) as f:
        assert sum(np.prod(s) for s in ours.values()) == json.load(f)["num_params"]


def test_grid_node_inputs_match(ref):
    """The stacked, normalized encoder input of step 1 (data channels only)."""
    expected = np.load(fixture("grid_node_inputs_step1_f32.npy"))
    batch = ref["batch"]
    first_forcings = {v: x[:, :1] for v, x in batch["forcings"].items()}
    stacked = stacking.stack_to_grid_nodes(normalization.normalize(batch["inputs"], ref["stats"]),
                                           normalization.normalize(first_forcings, ref["stats"]))
    assert stacked.shape == expected.shape
    np.testing.assert_allclose(np.asarray(stacked), expected, rtol=1e-6, atol=1e-6)


def test_rollout_f32_matches(ref):
    predictor = make_predictor(ref)
    batch = ref["batch"]
    predictions = jax.jit(predictor.predict)(ref["params"], batch["inputs"], batch["forcings"])
    assert_close_in_stddev(predictions, xr.load_dataset(fixture("predictions_f32.nc")), ref, 1e-4)


def test_one_step_f32_matches(ref):
    predictor = make_predictor(ref)
    batch = first_steps(ref["batch"], 1)
    predictions = jax.jit(predictor.predict)(ref["params"], batch["inputs"], batch["forcings"])
    assert_close_in_stddev(predictions, xr.load_dataset(fixture("predictions_1step_f32.nc")),
                           ref, 1e-4)


def test_plain_path_matches_split_first_layer(ref):
    """The unsplit edge MLP (concatenate, then multiply) computes the same function."""
    batch = ref["batch"]
    plain = make_predictor(ref, split_first_layer=False)
    predictions = jax.jit(plain.predict)(ref["params"], batch["inputs"], batch["forcings"])
    assert_close_in_stddev(predictions, xr.load_dataset(fixture("predictions_f32.nc")), ref, 1e-4)


def test_rollout_bf16_matches_loosely(ref):
    """bf16 lands in the band the reference's own bf16 path spans around float32."""
    predictor = make_predictor(ref, bf16=True)
    batch = ref["batch"]
    predictions = jax.jit(predictor.predict)(ref["params"], batch["inputs"], batch["forcings"])
    assert_close_in_stddev(predictions, xr.load_dataset(fixture("predictions_bf16.nc")), ref,
                           tol=0.3, rms_tol=0.03)


def test_loss_and_diagnostics_match(ref):
    expected = ref["loss"]["f32_3step"]
    predictor = make_predictor(ref)
    loss, diagnostics = jax.jit(predictor.loss)(ref["params"], ref["batch"])
    np.testing.assert_allclose(float(loss), expected["loss"], rtol=1e-5)
    for v, value in expected["per_variable"].items():
        np.testing.assert_allclose(float(diagnostics[v]), value, rtol=1e-5, err_msg=v)
    one = ref["loss"]["f32_1step"]
    loss1, _ = jax.jit(predictor.loss)(ref["params"], first_steps(ref["batch"], 1))
    np.testing.assert_allclose(float(loss1), one["loss"], rtol=1e-5)


def test_bf16_loss_close(ref):
    predictor = make_predictor(ref, bf16=True)
    loss, _ = jax.jit(predictor.loss)(ref["params"], ref["batch"])
    np.testing.assert_allclose(float(loss), ref["loss"]["bf16_3step"]["loss"], rtol=1e-2)


def test_gradients_match(ref):
    expected = ref["loss"]["f32_3step"]
    predictor = make_predictor(ref)
    grads = jax.jit(jax.grad(lambda p: predictor.loss(p, ref["batch"])[0]))(ref["params"])
    flat = {f"{m}:{n}": np.asarray(g, np.float64) for m, gs in grads.items() for n, g in gs.items()}
    global_norm = np.sqrt(sum(np.sum(g ** 2) for g in flat.values()))
    np.testing.assert_allclose(global_norm, expected["grad_global_l2_norm"], rtol=1e-5)
    for module, norm in expected["grad_l2_norm_per_top_level_module"].items():
        ours = np.sqrt(sum(np.sum(g ** 2) for k, g in flat.items() if k.startswith(module + "/")))
        np.testing.assert_allclose(ours, norm, rtol=1e-5, err_msg=module)
    with np.load(fixture("grads_f32_3step.npz"), allow_pickle=False) as reference:
        assert set(reference.files) == set(flat)
        scale = max(np.abs(reference[k]).max() for k in reference.files)
        for key in reference.files:
            np.testing.assert_allclose(flat[key], reference[key], rtol=0, atol=1e-5 * scale,
                                       err_msg=key)


def test_recompute_grid_keeps_reference_loss_and_gradients(ref):
    """The recompute_grid lever (grid path fused per block of rows; blocks that leave
    padding) stays within the reference's float32 tolerances, and bf16 within its bf16 one."""
    levers = dict(remat_blocks=True, block_size=1000, recompute_grid=True)
    predictor = make_predictor(ref, **levers)
    expected = ref["loss"]["f32_3step"]
    loss, grads = jax.jit(jax.value_and_grad(lambda p: predictor.loss(p, ref["batch"])[0]))(
        ref["params"])
    np.testing.assert_allclose(float(loss), expected["loss"], rtol=1e-5)
    flat = {f"{m}:{n}": np.asarray(g) for m, gs in grads.items() for n, g in gs.items()}
    with np.load(fixture("grads_f32_3step.npz"), allow_pickle=False) as reference:
        scale = max(np.abs(reference[k]).max() for k in reference.files)
        for key in reference.files:
            np.testing.assert_allclose(flat[key], reference[key], rtol=0, atol=1e-5 * scale,
                                       err_msg=key)
    bf16 = make_predictor(ref, bf16=True, **levers)
    loss, _ = jax.jit(bf16.loss)(ref["params"], ref["batch"])
    np.testing.assert_allclose(float(loss), ref["loss"]["bf16_3step"]["loss"], rtol=1e-2)


def test_predict_cli_reproduces_reference(ref, tmp_path):
    steps = ref["targets"].sizes["time"]
    out = tmp_path / "predictions.nc"
    subprocess.run([sys.executable, "-m", "graphcast.predict",
                    "--checkpoint", fixture("checkpoint.npz"),
                    "--dataset", fixture("example_batch.nc"), "--stats-dir", fixture("stats"),
                    "--steps", str(steps), "--output", str(out)], check=True)
    written = xr.load_dataset(out)
    for v in ref["task"].target_variables:
        assert written[v].dims == ref["targets"][v].dims
    ours = data_utils.dataset_to_arrays(written, ref["task"].target_variables)
    assert_close_in_stddev(ours, xr.load_dataset(fixture("predictions_f32.nc")), ref, 1e-4)
    np.testing.assert_array_equal(written["time"].values, ref["targets"]["time"].values)


def test_time_dependent_input_that_is_not_fed_back_is_rejected(ref):
    """An unknown input name passes TaskConfig, but a time axis in the data is caught."""
    task = dataclasses.replace(ref["task"], input_variables=ref["task"].input_variables
                               + ("my_field",))
    stats = dataclasses.replace(ref["stats"], mean={**ref["stats"].mean, "my_field": np.float32(0)},
                                stddev={**ref["stats"].stddev, "my_field": np.float32(1)})
    predictor = rollout.Predictor(ref["ckpt"].model_config, task, stats,
                                  ref["inputs"]["lat"].values, ref["inputs"]["lon"].values)
    batch = ref["batch"]
    inputs = {**batch["inputs"], "my_field": batch["inputs"]["2m_temperature"]}
    with pytest.raises(ValueError, match="'my_field'.*fed back"):
        predictor.loss(ref["params"], {**batch, "inputs": inputs})
