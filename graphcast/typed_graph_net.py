"""Typed graph network: GraphCast's encoder, processor and decoder are each one of these.

A `TypedGraphNet` works on named node sets and edge sets (edges from one node set to another):

1. Embed: each edge set's features (and, with `embed_nodes`, each node set's) go through its
   own MLP and LayerNorm.
2. Message passing, `num_steps` rounds, each with its own weights. Every edge gets a new
   message `m = LN(MLP([e, v_sender, v_receiver]))` and its latent becomes `e + m`; every node
   set becomes `v + LN(MLP([v, per-receiver sums of m, one per incoming edge set]))`.
3. Decode: some node sets go through a final MLP without LayerNorm.

Node features are `[N, B, F]` (node-major, so gathers and segment sums act on axis 0); edge
features are `[E, B, F]` or, when batch independent, `[E, 1, F]`.

The rounds run as a `lax.scan` over the rounds' stacked parameters, with pure MLP functions
(`mlp`), so XLA can rematerialize them round by round. By default the edge MLP's first layer is
applied to the sender and receiver node tables before gathering them onto the edges (the same
function with far less per-edge work). For the one-round nets (encoder and decoder), a
`block_size` computes the edge sums and node-wise MLPs block by block of rows
(`blocked_message_passing`), so that no `[E, B, L]` tensor exists whole.

Haiku paths match the official checkpoints: every MLP and LayerNorm is built inside
`_networks_builder`, so parameters live under
`<gnn>/~_networks_builder/<name>_mlp/~/linear_<i>` and `<name>_layer_norm`.
"""

import dataclasses
from typing import Callable, Mapping, Optional, Sequence, Union

import haiku as hk
import jax
import jax.numpy as jnp
import jraph
import numpy as np

from graphcast import blocked_message_passing as blocked
from graphcast import mlp


@dataclasses.dataclass(frozen=True)
class EdgeSet:
    """Directed edges from node set `sender_set` to node set `receiver_set`."""
    sender_set: str
    receiver_set: str
    senders: jax.Array    # [E] int32 indices into the sender set
    receivers: jax.Array  # [E] int32 indices into the receiver set
    features: jax.Array   # [E, B or 1, F]
    # k when edge i goes to receiver i // k (sorted by receiver, exactly k each: GraphCast's
    # mesh->grid edges, k = 3); lets blocked sums be sums over k, without a scatter.
    fan_in: Optional[int] = None


def _node_update(params, x: jax.Array, *incoming: jax.Array) -> jax.Array:
    """`x + LN(MLP([x, sums of incoming edge sets...]))`: one node set's update in a round."""
    return x + mlp.mlp_norm_apply(params, jnp.concatenate((x,) + incoming, -1))


def fixed_fan_in(receivers: np.ndarray, num_receivers: int) -> Optional[int]:
    """k if `receivers` is [0]*k + [1]*k + ... + [num_receivers - 1]*k, else None."""
    k, rest = divmod(receivers.size, num_receivers)
    if rest or not k or not np.array_equal(receivers, np.repeat(np.arange(num_receivers), k)):
        return None
    return k


class TypedGraphNet(hk.Module):
    """Embed, `num_steps` rounds of typed message passing, optional node decoding.

    Args:
      latent_size, hidden_layers: width and depth of every MLP.
      edge_sets: names of the edge sets it processes (each embedded by its own MLP).
      node_sets: node sets that are updated in each round (and embedded if `embed_nodes`).
      num_steps: message-passing rounds, each with its own weights.
      node_output_sizes: node sets decoded by a final MLP without LayerNorm.
      f32_aggregation: sum messages in float32 whatever the activation dtype.
      split_first_layer: project sender/receiver node tables through their slice of the
        edge MLP's first layer before gathering (same function, far less per-edge work).
      remat_blocks: in the backward pass, recompute instead of storing the message-passing
        rounds (in groups of about sqrt(num_steps)) and, with `block_size`, each block of rows.
      block_size: with a single message-passing step (whose edge latents are discarded
        afterwards, as in GraphCast's encoder and decoder), embed, update and sum the edges in
        blocks of at most this many edges, and run the node-wise MLPs over blocks of at most
        this many nodes; ignored for more steps.
    """

    def __init__(self, *, name: str, latent_size: int, hidden_layers: int,
                 edge_sets: Sequence[str], node_sets: Sequence[str], num_steps: int,
                 embed_nodes: bool, node_output_sizes: Optional[Mapping[str, int]] = None,
                 f32_aggregation: bool = False, split_first_layer: bool = True,
                 remat_blocks: bool = False, block_size: Optional[int] = None):
        super().__init__(name=name)
        self._latent_size = latent_size
        self._hidden_layers = hidden_layers
        self._edge_sets = tuple(edge_sets)
        self._node_sets = tuple(node_sets)
        self._num_steps = num_steps
        self._embed_nodes = embed_nodes
        self._node_output_sizes = dict(node_output_sizes or {})
        self._f32_aggregation = f32_aggregation
        self._split_first_layer = split_first_layer
        self._remat_blocks = remat_blocks
        self._block_size = block_size if num_steps == 1 else None

    def _networks_builder(self) -> dict:
        """Builds every MLP; its name puts `~_networks_builder` into the parameter paths."""
        # Modules are created right here (not in a helper method, which would add its own
        # `~_<method>` path segment).
        def make(name, with_norm=True, output_size=None):
            net = mlp.MLP(self._latent_size, self._hidden_layers,
                          output_size or self._latent_size, name=f"{name}_mlp")
            return mlp.MLPWithNorm(net, mlp.LayerNorm(name=f"{name}_layer_norm")
                                   if with_norm else None)

        networks = {}
        for e in self._edge_sets:
            networks[f"encoder_edges_{e}"] = make(f"encoder_edges_{e}")
        if self._embed_nodes:
            for v in self._node_sets:
                networks[f"encoder_nodes_{v}"] = make(f"encoder_nodes_{v}")
        for k in range(self._num_steps):
            for e in self._edge_sets:
                networks[f"processor_edges_{k}_{e}"] = make(f"processor_edges_{k}_{e}")
            for v in self._node_sets:
                networks[f"processor_nodes_{k}_{v}"] = make(f"processor_nodes_{k}_{v}")
        for v, size in self._node_output_sizes.items():
            networks[f"decoder_nodes_{v}"] = make(f"decoder_nodes_{v}", with_norm=False,
                                                  output_size=size)
        return networks

    def __call__(self, nodes: Mapping[str, Union[jax.Array, blocked.RowFunction]],
                 edges: Mapping[str, EdgeSet]) -> dict:
        """Returns the updated node features `{node_set: [N, B, F]}`.

        A node set may be given as a `blocked.RowFunction` (see `_lazy_receivers`)."""
        networks = self._networks_builder()
        if any(isinstance(x, blocked.RowFunction) for x in nodes.values()):
            return self._lazy_receivers(networks, nodes, edges)
        nodes = dict(nodes)
        if self._embed_nodes:
            for v in self._node_sets:
                params = networks[f"encoder_nodes_{v}"].params(nodes[v].shape[-1], nodes[v].dtype)
                nodes[v] = self._rows(lambda x, p=params: mlp.mlp_norm_apply(p, x), nodes[v])
        # Batch-independent node sets (e.g. embedded mesh nodes, [N, 1, L]) join the batch here.
        batch = max(x.shape[1] for x in nodes.values())
        nodes = {v: jnp.broadcast_to(x, x.shape[:1] + (batch,) + x.shape[2:])
                 for v, x in nodes.items()}
        dtype = next(iter(nodes.values())).dtype

        if self._block_size is not None:
            # One round whose edge latents are not kept: embed, update and sum edges in blocks.
            sums = {e: self._blocked_sums(networks, e, s, nodes) for e, s in edges.items()}
            nodes = self._node_updates(self._round_params(networks, 0, edges, dtype)["nodes"],
                                       nodes, edges, sums)
        else:
            edges = {e: dataclasses.replace(s, features=self._embed_edges(networks, e, s))
                     for e, s in edges.items()}
            nodes = self._message_passing(networks, nodes, edges, dtype)

        for v in self._node_output_sizes:
            params = networks[f"decoder_nodes_{v}"].params(nodes[v].shape[-1], nodes[v].dtype)
            nodes[v] = self._rows(lambda x, p=params: mlp.mlp_apply(p["mlp"], x), nodes[v])
        return nodes

    def node_function(self, node_set: str, input_size: int, dtype,
                      edges: Mapping[str, EdgeSet]) -> Callable:
        """`node_set`'s output as a pure row function of its input features, `[b, B, input_size]
        -> [b, B, L]`: its embedding, then its update in the one round. Only for a node set that
        receives none of `edges` (its update is then node-wise), in a one-round net that embeds
        nodes. The same parameters and operations as `__call__`, for a caller that computes the
        rows block by block where it needs them (a `blocked.RowFunction`)."""
        if (self._num_steps != 1 or not self._embed_nodes
                or any(s.receiver_set == node_set for s in edges.values())):
            raise ValueError(f"{self.module_name}: node_function({node_set!r}) needs a one-round "
                             "net that embeds nodes and a node set that receives no edges.")
        networks = self._networks_builder()
        embed = networks[f"encoder_nodes_{node_set}"].params(input_size, dtype)
        update = networks[f"processor_nodes_0_{node_set}"].params(self._latent_size, dtype)
        return lambda x: _node_update(update, mlp.mlp_norm_apply(embed, x))

    def _lazy_receivers(self, networks, nodes: Mapping, edges: Mapping[str, EdgeSet]) -> dict:
        """The one round of a blocked net whose one edge set, with a fixed fan-in, goes to a
        node set given as a `blocked.RowFunction` that this net decodes (GraphCast's decoder
        fed with the encoder's grid function): per block of receivers, their latents, the
        incoming message sums, their update and decoding run as one function (rematerialized
        with `remat_blocks`), so no receiver-sized latent exists whole or is kept for the
        backward pass. Other node sets (receiving no edges) are updated as in `__call__`."""
        lazy = [v for v, x in nodes.items() if isinstance(x, blocked.RowFunction)]
        name, edge_set = next(iter(edges.items())) if len(edges) == 1 else (None, None)
        if (self._block_size is None or self._embed_nodes or len(lazy) != 1 or edge_set is None
                or edge_set.receiver_set != lazy[0] or not edge_set.fan_in
                or lazy[0] not in self._node_output_sizes):
            raise ValueError(
                f"{self.module_name}: a node set given as a RowFunction ({lazy}) needs a blocked "
                "one-round net without node embedding, one edge set with a fixed fan-in going "
                "to it, and it decoded.")
        v = lazy[0]
        senders_table = nodes[edge_set.sender_set]
        dtype = senders_table.dtype
        embed = networks[f"encoder_edges_{name}"].params(edge_set.features.shape[-1], dtype)
        update = networks[f"processor_edges_0_{name}"].params(3 * self._latent_size, dtype)
        node_params = self._round_params(networks, 0, edges, dtype)["nodes"]
        decode = networks[f"decoder_nodes_{v}"].params(self._latent_size, dtype)

        def update_and_decode(x, sums):
            x = _node_update(node_params[v], x, sums.astype(x.dtype))
            return mlp.mlp_apply(decode["mlp"], x)

        outputs = {v: blocked.fan_in_sums(
            embed, update, edge_set.features, edge_set.senders, edge_set.fan_in, senders_table,
            nodes[v], block_size=self._block_size, remat=self._remat_blocks,
            sum_dtype=jnp.float32 if self._f32_aggregation else dtype, then=update_and_decode)}
        for u in self._node_sets:
            if u != v:
                outputs[u] = self._rows(lambda x, p=node_params[u]: _node_update(p, x), nodes[u])
        return outputs

    # Message passing ---------------------------------------------------------------------

    @staticmethod
    def _embed_edges(networks, name: str, edge_set: EdgeSet) -> jax.Array:
        features = edge_set.features
        params = networks[f"encoder_edges_{name}"].params(features.shape[-1], features.dtype)
        return mlp.mlp_norm_apply(params, features)

    def _round_params(self, networks, step: int, edges: Mapping[str, EdgeSet], dtype) -> dict:
        """Parameters of one round: `{"edges": {edge set: MLP}, "nodes": {node set: MLP}}`."""
        latent = self._latent_size
        incoming = {v: sum(s.receiver_set == v for s in edges.values()) for v in self._node_sets}
        return {
            "edges": {e: networks[f"processor_edges_{step}_{e}"].params(3 * latent, dtype)
                      for e in edges},
            "nodes": {v: networks[f"processor_nodes_{step}_{v}"].params(
                (1 + incoming[v]) * latent, dtype) for v in self._node_sets},
        }

    def _message_passing(self, networks, nodes: dict, edges: dict, dtype) -> dict:
        """All rounds, as a scan over the rounds' stacked parameters."""
        round_params = [self._round_params(networks, k, edges, dtype)
                        for k in range(self._num_steps)]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *round_params)

        def round_(carry, params):
            nodes, latents = carry
            graph = {e: dataclasses.replace(edges[e], features=latents[e]) for e in edges}
            messages = {e: self._edge_messages(params["edges"][e], s, nodes)
                        for e, s in graph.items()}
            sums = {e: self._aggregate(messages[e], s, nodes[s.receiver_set].shape[0])
                    for e, s in graph.items()}
            nodes = self._node_updates(params["nodes"], nodes, graph, sums)
            latents = {e: latents[e] + messages[e] for e in latents}
            return (nodes, latents), None

        # Edge latents start batch independent ([E, 1, L]) and gain the batch in round 1.
        batch = next(iter(nodes.values())).shape[1]
        latents = {e: jnp.broadcast_to(s.features, s.features.shape[:1] + (batch,)
                                       + s.features.shape[2:]) for e, s in edges.items()}
        nodes, _ = blocked.scan_rounds(round_, (nodes, latents), stacked,
                                       remat=self._remat_blocks)
        return nodes

    def _edge_messages(self, params, edge_set: EdgeSet, nodes: Mapping[str, jax.Array]):
        """New messages `LN(MLP([e, v_s[senders], v_r[receivers]]))`: [E, B, L]."""
        sender_nodes = nodes[edge_set.sender_set]
        receiver_nodes = nodes[edge_set.receiver_set]
        if self._split_first_layer:
            e_part, s_part, r_part = mlp.first_layer_parts(
                params, [edge_set.features, sender_nodes, receiver_nodes])
            return mlp.edge_messages(params, e_part, s_part[edge_set.senders],
                                     r_part[edge_set.receivers])
        # The reference's formulation: concatenate, then apply the whole MLP.
        batch = sender_nodes.shape[1]
        features = jnp.broadcast_to(edge_set.features, edge_set.features.shape[:1] + (batch,)
                                    + edge_set.features.shape[2:])
        return mlp.mlp_norm_apply(params, jnp.concatenate(
            [features, sender_nodes[edge_set.senders], receiver_nodes[edge_set.receivers]],
            axis=-1))

    def _aggregate(self, messages: jax.Array, edge_set: EdgeSet, num_nodes: int) -> jax.Array:
        """Sum of incoming messages per receiver node: [N, B, L]."""
        dtype = messages.dtype
        if self._f32_aggregation:
            messages = messages.astype(jnp.float32)
        return jraph.segment_sum(messages, edge_set.receivers, num_segments=num_nodes).astype(dtype)

    def _node_updates(self, params, nodes: dict, edges: Mapping[str, EdgeSet],
                      sums: Mapping[str, jax.Array]) -> dict:
        """`v + LN(MLP([v, sums of incoming edge sets in sorted order]))` for every node set."""
        updated = dict(nodes)
        for v in self._node_sets:
            incoming = [sums[e] for e in sorted(edges) if edges[e].receiver_set == v]
            updated[v] = self._rows(
                lambda x, *inc, p=params[v]: _node_update(p, x, *inc), nodes[v], *incoming)
        return updated

    # Block by block (memory levers, in `blocked_message_passing`) --------------------------

    def _rows(self, fn, *xs: jax.Array) -> jax.Array:
        """`fn(*xs)` for a node-wise fn; over blocks of rows when a block size is set."""
        return blocked.rows(fn, *xs, block_size=self._block_size, remat=self._remat_blocks)

    def _blocked_sums(self, networks, name: str, edge_set: EdgeSet,
                      nodes: Mapping[str, jax.Array]) -> jax.Array:
        """Per-receiver sums of one edge set's messages in its only round, block by block."""
        receivers_table = nodes[edge_set.receiver_set]
        dtype = receivers_table.dtype
        embed = networks[f"encoder_edges_{name}"].params(edge_set.features.shape[-1], dtype)
        update = networks[f"processor_edges_0_{name}"].params(3 * self._latent_size, dtype)
        options = dict(block_size=self._block_size, remat=self._remat_blocks,
                       sum_dtype=jnp.float32 if self._f32_aggregation else dtype)
        senders_table = nodes[edge_set.sender_set]
        if edge_set.fan_in:
            sums = blocked.fan_in_sums(embed, update, edge_set.features, edge_set.senders,
                                       edge_set.fan_in, senders_table, receivers_table,
                                       **options)
        else:
            sums = blocked.scatter_sums(embed, update, edge_set.features, edge_set.senders,
                                        edge_set.receivers, senders_table, receivers_table,
                                        **options)
        return sums.astype(dtype)
