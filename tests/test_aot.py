"""The shared training update, the loop-aware FLOP counter and ahead-of-time targets."""

import dataclasses
import inspect
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from graphcast import config as config_lib
from graphcast import flops, memory, rollout, targets, update
from training import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--resolution", "6", "--mesh-size", "1", "--latent", "8", "--msg-steps", "1",
        "--levels", "13", "--ar-steps", "2", "--block-size", "0", "--json"]


def _scan_of_two_matmuls(checkpoint: bool):
    def f(x, w):
        layer = lambda c: jnp.tanh(c @ w) @ w.T
        layer = jax.checkpoint(layer) if checkpoint else layer
        return jax.lax.scan(lambda c, _: (layer(c), None), x, None, length=7)[0].sum()
    return f


def test_flop_counter_counts_every_scan_iteration_and_recomputation():
    x, w = jnp.ones((3, 4)), jnp.ones((4, 5))
    one_matmul = 2 * 3 * 4 * 5
    forward = flops.matmul_flops(_scan_of_two_matmuls(False), x, w)
    assert forward == {"flops": 7 * 2 * one_matmul, "while_loops": 0}
    # Backward of each matmul: two matmuls of the same size (w.r.t. input and weight).
    model = flops.matmul_flops(jax.grad(_scan_of_two_matmuls(False), argnums=1), x, w)
    assert model["flops"] == 3 * forward["flops"]
    # With remat the first matmul is recomputed (the second's output is not needed backward).
    executed = flops.matmul_flops(jax.grad(_scan_of_two_matmuls(True), argnums=1), x, w)
    assert executed["flops"] == model["flops"] + 7 * one_matmul
    # Why the counter exists: XLA's cost analysis counts the loop body once.
    xla = jax.jit(_scan_of_two_matmuls(False)).lower(x, w).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, list) else xla
    assert xla["flops"] < forward["flops"] / 2


def test_flop_counter_reports_while_loops_it_cannot_unroll():
    def f(x):
        return jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ c[0], c[1] + 1),
                                  (x, 0))[0]
    assert flops.matmul_flops(f, jnp.ones((2, 2))) == {"flops": 16, "while_loops": 1}


def test_experiment_optimizer_defaults_are_the_shared_updates():
    """describe --memory and the benchmark size graphcast.update's default direction; it must be
    the direction the experiment trains with by default."""
    defaults = {k: p.default for k, p in inspect.signature(update.make_direction).parameters.items()}
    cfg = optim.OptimConfig()
    assert defaults == {k: getattr(cfg, k) for k in defaults}


def test_update_skips_non_finite_steps_and_matches_adamw_otherwise():
    params = {"lin": {"w": jnp.ones((2, 2)), "b": jnp.zeros((2,))}}

    class Quadratic:  # the predictor interface update_fn needs: loss(params, batch)
        @staticmethod
        def loss(p, batch):
            value = jnp.sum((batch["x"] @ p["lin"]["w"] + p["lin"]["b"]) ** 2)
            return value, {"x": value}

    direction = update.make_direction()
    step = jax.jit(update.update_fn(Quadratic(), direction))
    opt_state = direction.init(params)
    new, _, scalars = step(params, opt_state, {"x": jnp.ones((1, 2))}, 1e-2)
    assert int(scalars["update_skipped"]) == 0 and float(scalars["loss/x"]) == 8.0
    assert not np.allclose(new["lin"]["w"], 1.0)
    same, same_state, scalars = step(params, opt_state, {"x": jnp.full((1, 2), np.nan)}, 1e-2)
    assert int(scalars["update_skipped"]) == 1
    jax.tree.map(np.testing.assert_array_equal, (same, same_state), (params, opt_state))


def test_unknown_target_is_named():
    with pytest.raises(ValueError, match="tpu-v9.*expected one of"):
        targets.target_device("tpu-v9")


@pytest.mark.skipif(targets.compiler_installed("tpu-v4"), reason="libtpu installed")
def test_missing_tpu_compiler_names_the_extra():
    with pytest.raises(targets.MissingExtraError, match=r'pip install -e "\.\[aot-tpu\]"'):
        targets.target_device("tpu-v4")


def _bench(*extra, **env):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"),
                          *TINY, *extra], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": ROOT, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_benchmark_reports_target_memory_and_flops():
    r = _bench("--compile-only")
    assert r["target"] == "cpu"
    assert r["total_bytes"] == (r["temp_bytes"] + r["argument_bytes"] + r["output_bytes"]
                                - r["alias_bytes"])
    # steps+blocks remat recomputes the forward pass: more executed than model FLOPs.
    assert 0 < r["model_flops"] < r["executed_flops"] < 2 * r["model_flops"]


@pytest.mark.skipif(not targets.compiler_installed("tpu-v4"),
                    reason='needs the TPU compiler: pip install -e ".[aot-tpu]"')
@pytest.mark.slow
def test_benchmark_compiles_for_tpu_v4_and_offloading_windows_saves_device_memory():
    # Windows big enough to matter: 4 deg grid, 4 steps.
    larger = ["--resolution", "4", "--mesh-size", "2", "--latent", "64", "--msg-steps", "4",
              "--block-size", "16384", "--ar-steps", "4"]
    kept = _bench("--target", "tpu-v4", *larger)
    assert kept["target"] == "tpu-v4" and kept["device_memory_bytes"] == 32 * 2 ** 30
    assert 0 < kept["total_bytes"] < kept["device_memory_bytes"]
    offloaded = _bench("--target", "tpu-v4", "--offload-windows", *larger)
    assert offloaded["total_bytes"] < kept["total_bytes"]
    assert offloaded["host_temp_bytes"] > kept["host_temp_bytes"]


def _tiny_predictors(shared=None, **levers):
    """A tiny predictor without levers and one with `levers`, sharing graphs and `shared`."""
    shared = shared or {}
    task = dataclasses.replace(config_lib.TASK_13,
                               pressure_levels=config_lib.PRESSURE_LEVELS_WEATHERBENCH_13)
    model = config_lib.ModelConfig(resolution=10.0, mesh_size=1, latent_size=8, gnn_msg_steps=1,
                                   hidden_layers=1, radius_query_fraction_edge_length=0.6)
    lat = np.linspace(-90, 90, 19, dtype=np.float32)
    lon = np.arange(0, 360, 10.0, dtype=np.float32)
    plain = rollout.Predictor(model, task, memory.unit_stats(task), lat, lon,
                              bf16=levers.get("bf16", False), **shared)
    return plain, rollout.Predictor(model, task, plain.stats, lat, lon, graphs=plain.graphs,
                                    **shared, **levers)


def _random_batch(predictor, ar_steps):
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32)),
                        memory.batch_shapes(predictor.task_config, 1, ar_steps,
                                            predictor.grid_lat.size, predictor.grid_lon.size))


@pytest.mark.skipif(not targets.compiler_installed("tpu-v4"),
                    reason='needs the TPU compiler: pip install -e ".[aot-tpu]"')
@pytest.mark.slow
def test_benchmark_keeps_a_host_batch_out_of_tpu_v4_device_memory():
    # 0.5 deg: XLA:TPU (libtpu of jax 0.10.2) rejects host-memory slices of 1 and 4 deg frames
    # with an internal layout check; 0.5 and 0.25 deg compile.
    r = _bench("--target", "tpu-v4", "--resolution", "0.5", "--mesh-size", "2", "--ar-steps", "3",
               "--block-size", "16384", "--host-batch")
    task = dataclasses.replace(config_lib.TASK_13,
                               pressure_levels=config_lib.PRESSURE_LEVELS_WEATHERBENCH_13)
    batch = sum(int(np.prod(s.shape)) * 4 for s in jax.tree.leaves(
        memory.batch_shapes(task, 1, 3, 361, 720)))
    assert r["host_argument_bytes"] >= batch > r["argument_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("lever", ["offload_windows", "host_batch"])
def test_memory_levers_leave_loss_and_gradients_unchanged(lever, bf16):
    plain, levered = _tiny_predictors(bf16=bf16, **{lever: True})
    batch = _random_batch(plain, 3)
    params = jax.jit(plain.init)(jax.random.PRNGKey(0), batch)
    # host_batch reads the batch from host memory (the CPU backend has "pinned_host" too).
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    levered_batch = jax.device_put(batch, host) if lever == "host_batch" else batch
    results = [jax.jit(jax.value_and_grad(lambda p, q=q, b=b: q.loss(p, b)[0]))(params)
               for q, b in ((plain, batch), (levered, levered_batch))]
    jax.tree.map(np.testing.assert_array_equal, *results)


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True])
def test_recompute_grid_leaves_loss_and_gradients_unchanged(bf16):
    """The grid path fused per row block (blocks of 64 grid nodes: 21 receivers per fan-in
    block, the last padded) computes the same loss; its gradients differ by the order of float
    sums over other blocks (float32: 1e-5 of the largest, as the other blocked paths; bf16:
    within bf16's rounding), and it creates the same parameters."""
    plain, levered = _tiny_predictors(dict(remat_blocks=True, block_size=64), bf16=bf16,
                                      recompute_grid=True)
    batch = _random_batch(plain, 2)
    params = jax.jit(plain.init)(jax.random.PRNGKey(0), batch)
    jax.tree.map(np.testing.assert_array_equal,
                 jax.jit(levered.init)(jax.random.PRNGKey(0), batch), params)
    (loss, grads), (levered_loss, levered_grads) = [
        jax.jit(jax.value_and_grad(lambda p, q=q: q.loss(p, batch)[0]))(params)
        for q in (plain, levered)]
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
    rtol, atol = (1e-2, 2e-2 * scale) if bf16 else (1e-6, 1e-5 * scale)
    np.testing.assert_allclose(float(levered_loss), float(loss), rtol=rtol)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=atol),
                 levered_grads, grads)


def test_recompute_grid_needs_blocks():
    with pytest.raises(ValueError, match="recompute_grid=True needs remat_blocks=True"):
        _tiny_predictors(recompute_grid=True)
    with pytest.raises(ValueError, match="recompute_grid=True needs remat_blocks=True"):
        _tiny_predictors(remat_blocks=True, recompute_grid=True)


def test_offload_windows_needs_step_remat():
    with pytest.raises(ValueError, match="offload_windows=True needs remat_steps=True"):
        _tiny_predictors(remat_steps=False, offload_windows=True)


def test_host_batch_keeps_one_step_batches_on_the_device():
    """With host_batch, multi-step rollouts take their batch in host memory; 1-step ones keep it
    on the device (the frame copies cost XLA:TPU more than the batch), in the experiment's
    placement and in what the benchmark and describe --memory compile alike."""
    _, levered = _tiny_predictors(host_batch=True)
    mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ("d",))
    assert update.batch_sharding(levered, mesh, "d", 1).memory_kind in (None, "device")
    assert update.batch_sharding(levered, mesh, "d", 2).memory_kind == "pinned_host"
    direction = update.make_direction()
    for steps, kind in ((1, "device"), (3, "pinned_host")):
        batch = memory.abstract_step_args(levered, direction, 1, steps, jax.devices()[0])[2]
        assert {s.sharding.memory_kind for s in jax.tree.leaves(batch)} == {kind}, steps


@pytest.mark.slow
def test_data_parallel_update_takes_a_host_batch_and_matches_pmap():
    # Blocked rows: scans whose carries start as zeros (shard_map must not reject them).
    plain, levered = _tiny_predictors(dict(remat_blocks=True, block_size=64), host_batch=True)
    direction = update.make_direction()
    n = jax.local_device_count()
    batch = jax.tree.map(lambda x: jnp.stack([x] * n), _random_batch(plain, 2))
    params = jax.jit(plain.init)(jax.random.PRNGKey(0), jax.tree.map(lambda x: x[0], batch))
    stacked = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * n), tree)
    lr = jnp.full((n,), 1e-3, jnp.float32)
    expected = jax.pmap(update.update_fn(plain, direction, "d"), axis_name="d")(
        stacked(params), stacked(direction.init(params)), batch, lr)
    devices = jax.local_devices()
    step = update.data_parallel_update(levered, direction, "d", devices, 2)
    sharding = update.batch_sharding(levered, jax.sharding.Mesh(np.asarray(devices), ("d",)), "d",
                                     2)
    assert sharding.memory_kind == "pinned_host"
    got = step(stacked(params), stacked(direction.init(params)),
               jax.device_put(batch, sharding), lr)
    jax.tree.map(np.testing.assert_array_equal, expected, got)


@pytest.mark.skipif(not targets.compiler_installed("a100"),
                    reason='needs the CUDA compiler: pip install -e ".[aot-gpu]"')
def test_benchmark_compiles_for_a100_from_the_shipped_spec():
    r = _bench("--target", "a100", JAX_PLATFORMS="cpu")  # no GPU needed: compile only
    assert r["target"] == "a100" and r["device_memory_bytes"] == 40 * 10 ** 9
    assert 0 < r["total_bytes"] < r["device_memory_bytes"]
