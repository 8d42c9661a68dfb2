"""The GraphCast network: grid -> mesh encoder, mesh processor, mesh -> grid decoder.

`GraphCastNetwork` maps the stacked, normalized grid inputs `[Ng, B, C]` to the
normalized outputs `[Ng, B, O]` for one 6-hour step. It is a plain object that
creates its three haiku modules (`grid2mesh_gnn`, `mesh_gnn`, `mesh2grid_gnn`) at
the top level of the transformed function, as the official parameter paths require.
"""

from typing import Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from graphcast import blocked_message_passing as blocked
from graphcast import config as config_lib
from graphcast import graphs as graphs_lib
from graphcast import typed_graph_net

GRID = "grid_nodes"
MESH = "mesh_nodes"


class GraphCastNetwork:
    """One prediction step of GraphCast on node-major arrays.

    Args:
      model_config: network sizes.
      task_config: decides the number of output channels.
      graphs: the static grid/mesh graphs and their structural features.
      dtype: activation dtype (float32, or bfloat16 for the mixed-precision path).
      split_first_layer, remat_blocks, block_size: see `typed_graph_net.TypedGraphNet`
        (the block size applies to the encoder and decoder, the nets of one round: their
        grid<->mesh edges and node-wise MLPs).
      recompute_grid: with remat_blocks and a block size, keep no grid-sized latent for the
        backward pass. The grid nodes' path (the encoder's embedding and update, which feed
        nothing but the decoder, then the decoder's messages, update and output MLP) runs as
        one function per block of grid rows, recomputed in the backward pass from the grid
        inputs; the encoder's mesh side is rematerialized as a whole, so its grid embedding
        (the grid->mesh senders) is recomputed too. Same function, less accelerator memory.
    """

    def __init__(self, model_config: config_lib.ModelConfig, task_config: config_lib.TaskConfig,
                 graphs: graphs_lib.StaticGraphs, dtype=jnp.float32, split_first_layer: bool = True,
                 remat_blocks: bool = False, block_size: Optional[int] = None,
                 recompute_grid: bool = False):
        self._graphs = graphs
        self._dtype = dtype
        self._recompute_grid = recompute_grid

        def gnn(name, **kwargs):
            return typed_graph_net.TypedGraphNet(
                name=name, latent_size=model_config.latent_size,
                hidden_layers=model_config.hidden_layers, split_first_layer=split_first_layer,
                remat_blocks=remat_blocks, **kwargs)

        # Constructed here, once, at the top level of the transformed function: calling the
        # network again (every autoregressive step) reuses the same parameters.
        self._encoder = gnn("grid2mesh_gnn", edge_sets=("grid2mesh",), node_sets=(GRID, MESH),
                            num_steps=1, embed_nodes=True, f32_aggregation=True,
                            block_size=block_size)
        self._processor = gnn("mesh_gnn", edge_sets=("mesh",), node_sets=(MESH,),
                              num_steps=model_config.gnn_msg_steps, embed_nodes=False)
        self._decoder = gnn("mesh2grid_gnn", edge_sets=("mesh2grid",), node_sets=(GRID, MESH),
                            num_steps=1, embed_nodes=False,
                            node_output_sizes={GRID: task_config.num_outputs()},
                            block_size=block_size)

    def _edge_set(self, sender_set, receiver_set, senders, receivers, features):
        # Static features are cast straight from their stored dtype (float64 for edges) to the
        # activation dtype and stay batch independent: [E, 1, F].
        num_receivers = (self._graphs.num_grid_nodes if receiver_set == GRID
                         else self._graphs.num_mesh_nodes)
        return typed_graph_net.EdgeSet(
            sender_set=sender_set, receiver_set=receiver_set,
            senders=jnp.asarray(senders, jnp.int32), receivers=jnp.asarray(receivers, jnp.int32),
            features=jnp.asarray(np.asarray(features).astype(self._dtype))[:, None, :],
            fan_in=typed_graph_net.fixed_fan_in(np.asarray(receivers), num_receivers))

    def __call__(self, grid_inputs: jax.Array) -> jax.Array:
        """[Ng, B, C] normalized inputs and forcings -> [Ng, B, O] normalized outputs."""
        g = self._graphs
        num_grid, batch, channels = grid_inputs.shape
        grid_static = jnp.asarray(g.grid_node_features.astype(self._dtype))   # [Ng, 3]
        mesh_static = jnp.asarray(g.mesh_node_features.astype(self._dtype))   # [Nm, 3]

        # Encoder inputs: grid data + structural features; mesh nodes get zeros of the same
        # width, so both node sets feed an embedding MLP of width C + 3.
        grid_nodes = jnp.concatenate(
            [grid_inputs.astype(self._dtype),
             jnp.broadcast_to(grid_static[:, None, :], (num_grid, batch, 3))], axis=-1)
        mesh_nodes = jnp.concatenate(
            [jnp.zeros((g.num_mesh_nodes, 1, channels), self._dtype), mesh_static[:, None, :]],
            axis=-1)  # [Nm, 1, C + 3]

        grid2mesh = {"grid2mesh": self._edge_set(GRID, MESH, g.grid2mesh_senders,
                                                 g.grid2mesh_receivers, g.grid2mesh_edge_features)}
        if self._recompute_grid:
            encoded_mesh = hk.remat(lambda grid, mesh: self._encoder(
                {GRID: grid, MESH: mesh}, grid2mesh)[MESH])(grid_nodes, mesh_nodes)
            encoded_grid = blocked.RowFunction(self._encoder.node_function(
                GRID, grid_nodes.shape[-1], self._dtype, grid2mesh), (grid_nodes,))
        else:
            encoded = self._encoder({GRID: grid_nodes, MESH: mesh_nodes}, grid2mesh)
            encoded_mesh, encoded_grid = encoded[MESH], encoded[GRID]
        processed = self._processor(
            {MESH: encoded_mesh},
            {"mesh": self._edge_set(MESH, MESH, g.mesh_senders, g.mesh_receivers,
                                    g.mesh_edge_features)})
        decoded = self._decoder(
            {GRID: encoded_grid, MESH: processed[MESH]},
            {"mesh2grid": self._edge_set(MESH, GRID, g.mesh2grid_senders, g.mesh2grid_receivers,
                                         g.mesh2grid_edge_features)})
        return decoded[GRID]
