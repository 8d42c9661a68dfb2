"""The fast formulation computes the same loss and gradients as the plain one.

Plain: concatenate-then-multiply edge MLPs, no rematerialization (the reference's
formulation). Fast: first layer applied to node tables before gathering, plus
rematerialization of message-passing rounds, row blocks and autoregressive steps; blocked:
grid<->mesh edges and nodes in blocks of rows as well. Run on the benchmark
configuration (1 deg, 13 levels, mesh 4, latent 64, 4 message-passing steps).
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest

from graphcast import blocked_message_passing as blocked
from graphcast import config as config_lib
from graphcast import memory
from graphcast import mlp
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
    chex.assert_trees_all_close(grads_a, grads_b, rtol=0, atol=1e-5 * scale)


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
    # Blocks of rows that do not divide the edge count, so padding is exercised.
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
    chex.assert_trees_all_equal_shapes(blocked_params, params)


def test_fixed_fan_in():
    assert typed_graph_net.fixed_fan_in(np.array([0, 0, 1, 1, 2, 2]), 3) == 2
    assert typed_graph_net.fixed_fan_in(np.array([0, 1, 2]), 3) == 1
    assert typed_graph_net.fixed_fan_in(np.array([0, 0, 1, 2, 2, 1]), 3) is None  # unsorted
    assert typed_graph_net.fixed_fan_in(np.array([0, 0, 0, 1, 2]), 3) is None     # uneven
    assert typed_graph_net.fixed_fan_in(np.array([0, 0, 1, 1, 1, 1]), 3) is None  # 2 has none


def _mlp_norm_params(rng, in_size, latent):
    def linear(n_in):
        return (jnp.asarray(rng.standard_normal((n_in, latent), np.float32) / np.sqrt(n_in)),
                jnp.asarray(rng.standard_normal(latent, np.float32)))
    return {"mlp": [linear(in_size), linear(latent)],
            "norm": (jnp.asarray(rng.uniform(0.5, 1.5, latent).astype(np.float32)),
                     jnp.asarray(rng.standard_normal(latent, np.float32)))}


@pytest.mark.parametrize("num_senders", [5, 20])  # senders projected as a table / per block
@pytest.mark.parametrize("remat", [False, True])
def test_blocked_sums_match_whole_array_sums(num_senders, remat):
    """Both blocked edge sums equal embedding, concatenating, applying the edge MLP to all
    edges at once and summing per receiver (block sizes that leave padding)."""
    rng = np.random.default_rng(0)
    latent, batch, num_receivers, k = 8, 2, 11, 3
    num_edges = num_receivers * k
    embed = _mlp_norm_params(rng, 4, latent)
    update = _mlp_norm_params(rng, 3 * latent, latent)
    features = jnp.asarray(rng.standard_normal((num_edges, 1, 4), np.float32))
    senders = jnp.asarray(rng.integers(0, num_senders, num_edges), jnp.int32)
    receivers = jnp.repeat(jnp.arange(num_receivers, dtype=jnp.int32), k)
    senders_table = jnp.asarray(rng.standard_normal((num_senders, batch, latent), np.float32))
    receivers_table = jnp.asarray(rng.standard_normal((num_receivers, batch, latent), np.float32))

    latents = mlp.mlp_norm_apply(embed, features)
    messages = mlp.mlp_norm_apply(update, jnp.concatenate(
        [jnp.broadcast_to(latents, (num_edges, batch, latent)), senders_table[senders],
         receivers_table[receivers]], axis=-1))
    expected = jraph.segment_sum(messages, receivers, num_segments=num_receivers)

    options = dict(block_size=7, remat=remat, sum_dtype=jnp.float32)
    shuffled = rng.permutation(num_edges)  # scatter sums take receivers in any order
    scattered = blocked.scatter_sums(embed, update, features[shuffled], senders[shuffled],
                                     receivers[shuffled], senders_table, receivers_table,
                                     **options)
    by_fan_in = blocked.fan_in_sums(embed, update, features, senders, k, senders_table,
                                    receivers_table, **options)
    for sums in (scattered, by_fan_in):
        chex.assert_shape(sums, (num_receivers, batch, latent))
        chex.assert_trees_all_close(sums, expected, rtol=1e-5, atol=1e-5)


def test_rows_in_blocks_match_whole_rows():
    def fn(a, b):
        return jnp.sin(a) * b

    x = jnp.arange(30.0).reshape(10, 1, 3)
    for block_size in (3, 5, 10, None):
        chex.assert_trees_all_close(
            blocked.rows(fn, x, 2 * x, block_size=block_size, remat=True), fn(x, 2 * x))
