"""Typed graph network: encoder / processor / decoder building block of GraphCast.

One `TypedGraphNet` module embeds the features of its edge (and optionally node)
sets, runs `num_steps` rounds of message passing with separate weights per round,
and optionally decodes some node sets. Haiku paths match the official checkpoints:
every sub-module is built inside `_networks_builder`, so parameters live under
`<gnn>/~_networks_builder/<block>_mlp/~/linear_<i>` and `<block>_layer_norm`.

Node features are `[N, B, F]` (node-major, so gathers and segment sums act on
axis 0); edge features are `[E, B, F]` or, when batch independent, `[E, 1, F]`.
"""

import dataclasses
from typing import Mapping, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np


class Linear(hk.Module):
    """`y = x @ w + b` whose weight rows can also be applied to parts of a concatenated input."""

    def __init__(self, output_size: int, name: str):
        super().__init__(name=name)
        self.output_size = output_size

    def _weights(self, input_size: int, dtype):
        w_init = hk.initializers.TruncatedNormal(stddev=1.0 / np.sqrt(input_size))
        w = hk.get_parameter("w", [input_size, self.output_size], dtype, init=w_init)
        b = hk.get_parameter("b", [self.output_size], dtype, init=jnp.zeros)
        return w, b

    def __call__(self, x: jax.Array) -> jax.Array:
        w, b = self._weights(x.shape[-1], x.dtype)
        return jnp.dot(x, w) + b

    def parts(self, parts: Sequence[jax.Array]) -> list:
        """Per-part products `[x_i @ w[rows_i]]` of the concatenation `[x_0, x_1, ...]`, bias last.

        `sum(parts(xs)[:-1]) + parts(xs)[-1]` equals `self(concat(xs))` up to float rounding;
        the split lets a caller project small node tables before gathering them onto edges.
        """
        widths = [p.shape[-1] for p in parts]
        w, b = self._weights(sum(widths), parts[0].dtype)
        offsets = np.cumsum([0] + widths)
        return [jnp.dot(p, w[lo:hi]) for p, lo, hi in zip(parts, offsets[:-1], offsets[1:])] + [b]


class MLP(hk.Module):
    """`hidden_layers` swish layers of width `latent_size`, then a linear output layer."""

    def __init__(self, latent_size: int, hidden_layers: int, output_size: int, name: str):
        super().__init__(name=name)
        # Built in the constructor, as haiku's own MLP does: paths read `<name>/~/linear_<i>`.
        sizes = [latent_size] * hidden_layers + [output_size]
        self.layers = [Linear(size, name=f"linear_{i}") for i, size in enumerate(sizes)]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.from_first_layer(self.layers[0](x))

    def from_first_layer(self, h: jax.Array) -> jax.Array:
        """Continue from the (pre-activation) output of the first layer."""
        for layer in self.layers[1:]:
            h = layer(jax.nn.swish(h))
        return h


@dataclasses.dataclass(frozen=True)
class EdgeSet:
    """Directed edges from node set `sender_set` to node set `receiver_set`."""
    sender_set: str
    receiver_set: str
    senders: jax.Array    # [E] int32 indices into the sender set
    receivers: jax.Array  # [E] int32 indices into the receiver set
    features: jax.Array   # [E, B or 1, F]


class TypedGraphNet(hk.Module):
    """Embed, `num_steps` rounds of typed message passing, optional node decoding.

    Args:
      latent_size, hidden_layers: width and depth of every MLP.
      edge_sets: names of the edge sets it processes (each embedded by its own block).
      node_sets: node sets that are updated in each round (and embedded if `embed_nodes`).
      num_steps: message-passing rounds, each with its own weights.
      node_output_sizes: node sets decoded by a final MLP without LayerNorm.
      f32_aggregation: sum messages in float32 whatever the activation dtype.
      split_first_layer: project sender/receiver node tables through their slice of the
        edge MLP's first layer before gathering (same function, far less per-edge work).
      remat_blocks: recompute each MLP + LayerNorm block in the backward pass instead of
        keeping its intermediate activations (less memory, about one more forward pass).
    """

    def __init__(self, *, name: str, latent_size: int, hidden_layers: int,
                 edge_sets: Sequence[str], node_sets: Sequence[str], num_steps: int,
                 embed_nodes: bool, node_output_sizes: Optional[Mapping[str, int]] = None,
                 f32_aggregation: bool = False, split_first_layer: bool = True,
                 remat_blocks: bool = False):
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

    def _networks_builder(self):
        """Builds every block; its name puts `~_networks_builder` into the parameter paths."""
        # Modules are created right here (not in a helper method, which would add its own
        # `~_<method>` path segment).
        def make_block(name, with_norm=True, output_size=None):
            mlp = MLP(self._latent_size, self._hidden_layers, output_size or self._latent_size,
                      name=f"{name}_mlp")
            norm = (hk.LayerNorm(axis=-1, create_scale=True, create_offset=True,
                                 name=f"{name}_layer_norm") if with_norm else None)
            return mlp, norm

        blocks = {}
        for e in self._edge_sets:
            blocks[f"encoder_edges_{e}"] = make_block(f"encoder_edges_{e}")
        if self._embed_nodes:
            for v in self._node_sets:
                blocks[f"encoder_nodes_{v}"] = make_block(f"encoder_nodes_{v}")
        for k in range(self._num_steps):
            for e in self._edge_sets:
                blocks[f"processor_edges_{k}_{e}"] = make_block(f"processor_edges_{k}_{e}")
            for v in self._node_sets:
                blocks[f"processor_nodes_{k}_{v}"] = make_block(f"processor_nodes_{k}_{v}")
        for v, size in self._node_output_sizes.items():
            blocks[f"decoder_nodes_{v}"] = make_block(f"decoder_nodes_{v}", with_norm=False,
                                                       output_size=size)
        return blocks

    def __call__(self, nodes: Mapping[str, jax.Array], edges: Mapping[str, EdgeSet]) -> dict:
        """Returns the updated node features `{node_set: [N, B, F]}`."""
        blocks = self._networks_builder()

        remat = hk.remat if self._remat_blocks else (lambda f: f)

        def apply(name, x):
            mlp, norm = blocks[name]
            return remat(lambda x: norm(mlp(x)))(x)

        def edge_update(name, edge_set):
            block = blocks[name]
            return remat(lambda e, s, r: self._edge_update(block, edge_set, e, s, r))(
                edge_set.features, nodes[edge_set.sender_set], nodes[edge_set.receiver_set])

        edges = {e: dataclasses.replace(s, features=apply(f"encoder_edges_{e}", s.features))
                 for e, s in edges.items()}
        nodes = dict(nodes)
        if self._embed_nodes:
            for v in self._node_sets:
                nodes[v] = apply(f"encoder_nodes_{v}", nodes[v])
        # Batch-independent node sets (e.g. embedded mesh nodes, [N, 1, L]) join the batch here.
        batch = max(x.shape[1] for x in nodes.values())
        nodes = {v: jnp.broadcast_to(x, x.shape[:1] + (batch,) + x.shape[2:])
                 for v, x in nodes.items()}

        for k in range(self._num_steps):
            messages = {e: edge_update(f"processor_edges_{k}_{e}", s) for e, s in edges.items()}
            updates = {}
            for v in self._node_sets:
                incoming = [self._aggregate(messages[e], edges[e], nodes[v].shape[0])
                            for e in sorted(edges) if edges[e].receiver_set == v]
                updates[v] = apply(f"processor_nodes_{k}_{v}",
                                   jnp.concatenate([nodes[v]] + incoming, axis=-1))
            nodes.update({v: nodes[v] + u for v, u in updates.items()})
            edges = {e: dataclasses.replace(s, features=s.features + messages[e])
                     for e, s in edges.items()}

        for v in self._node_output_sizes:
            mlp, _ = blocks[f"decoder_nodes_{v}"]
            nodes[v] = mlp(nodes[v])
        return nodes

    def _edge_update(self, block, edge_set: EdgeSet, features: jax.Array,
                     sender_nodes: jax.Array, receiver_nodes: jax.Array) -> jax.Array:
        """New messages `LN(MLP([e, v_s[senders], v_r[receivers]]))`: [E, B, L]."""
        mlp, norm = block
        if self._split_first_layer:
            e_part, s_part, r_part, bias = mlp.layers[0].parts(
                [features, sender_nodes, receiver_nodes])
            h = (e_part + s_part[edge_set.senders]) + r_part[edge_set.receivers] + bias
        else:
            batch = sender_nodes.shape[1]
            features = jnp.broadcast_to(features, features.shape[:1] + (batch,)
                                        + features.shape[2:])
            h = mlp.layers[0](jnp.concatenate(
                [features, sender_nodes[edge_set.senders], receiver_nodes[edge_set.receivers]],
                axis=-1))
        return norm(mlp.from_first_layer(h))

    def _aggregate(self, messages: jax.Array, edge_set: EdgeSet, num_nodes: int) -> jax.Array:
        """Sum of incoming messages per receiver node: [N, B, L]."""
        dtype = messages.dtype
        if self._f32_aggregation:
            messages = messages.astype(jnp.float32)
        return jax.ops.segment_sum(messages, edge_set.receivers, num_segments=num_nodes).astype(dtype)
