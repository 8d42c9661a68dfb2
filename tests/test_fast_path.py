"""The fast formulation computes the same loss and gradients as the plain one.

Plain: concatenate-then-multiply edge MLPs, no rematerialization (the reference's
formulation). Fast: first layer applied to node tables before gathering, plus
rematerialization of blocks and autoregressive steps. Run on the benchmark
configuration (1 deg, 13 levels, mesh 4, latent 64, 4 message-passing steps).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from graphcast import config as config_lib
from graphcast import memory
from graphcast import rollout
from graphcast import typed_graph_net

BENCH_MODEL = config_lib.ModelConfig(resolution=1.0, mesh_size=4, latent_size=64, gnn_msg_steps=4,
                                     hidden_layers=1, radius_query_fraction_edge_length=0.6)


def random_batch(task, steps, lat, lon, seed=0):
    rng = np.random.default_rng(seed)
    shapes = memory.batch_shapes(task, 1, steps, lat.size, lon.size)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32)), shapes)


def loss_and_grads(predictor, params, batch):
    return jax.jit(jax.value_and_grad(lambda p: predictor.loss(p, batch)[0]))(params)


def assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-5)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_a))
    for x, y in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("model, resolution, steps", [
    (BENCH_MODEL, 1.0, 1),
    (dataclasses.replace(BENCH_MODEL, mesh_size=2, latent_size=16, gnn_msg_steps=2), 10.0, 2),
])
def test_fast_path_matches_plain_path(model, resolution, steps):
    task = dataclasses.replace(config_lib.TASK_13,
                               pressure_levels=config_lib.PRESSURE_LEVELS_WEATHERBENCH_13)
    lat = np.linspace(-90, 90, int(180 / resolution) + 1, dtype=np.float32)
    lon = np.arange(0, 360, resolution, dtype=np.float32)
    stats = memory.unit_stats(task)
    plain = rollout.Predictor(model, task, stats, lat, lon, split_first_layer=False,
                              remat_steps=False)
    fast = rollout.Predictor(model, task, stats, lat, lon, graphs=plain.graphs,
                             split_first_layer=True, remat_steps=True, remat_blocks=True)
    # Blocks that do not divide the edge count, so padding is exercised.
    blocked = rollout.Predictor(model, task, stats, lat, lon, graphs=plain.graphs,
                                remat_steps=True, remat_blocks=True,
                                block_size=plain.graphs.grid2mesh_senders.size // 3 + 7)
    # The decoder's blocks then take the scatter-free path (3 sorted edges per grid node).
    assert typed_graph_net.fixed_fan_in(plain.graphs.mesh2grid_receivers,
                                        plain.graphs.num_grid_nodes) == 3
    batch = random_batch(task, steps, lat, lon)
    params = jax.jit(plain.init)(jax.random.PRNGKey(0), batch)
    reference = loss_and_grads(plain, params, batch)
    assert_same(reference, loss_and_grads(fast, params, batch))
    assert_same(reference, loss_and_grads(blocked, params, batch))
    blocked_params = jax.jit(blocked.init)(jax.random.PRNGKey(0), batch)
    assert jax.tree.map(jnp.shape, blocked_params) == jax.tree.map(jnp.shape, params)


def test_fixed_fan_in():
    assert typed_graph_net.fixed_fan_in(np.array([0, 0, 1, 1, 2, 2]), 3) == 2
    assert typed_graph_net.fixed_fan_in(np.array([0, 1, 2]), 3) == 1
    assert typed_graph_net.fixed_fan_in(np.array([0, 0, 1, 2, 2, 1]), 3) is None  # unsorted
    assert typed_graph_net.fixed_fan_in(np.array([0, 0, 0, 1, 2]), 3) is None     # uneven
    assert typed_graph_net.fixed_fan_in(np.array([0, 0, 1, 1, 1, 1]), 3) is None  # 2 has none
