"""Typed graph network: encoder / processor / decoder building block of GraphCast.

One `TypedGraphNet` module embeds the features of its edge (and optionally node)
sets, runs `num_steps` rounds of message passing with separate weights per round,
and optionally decodes some node sets. Haiku paths match the official checkpoints:
every sub-module is built inside `_networks_builder`, so parameters live under
`<gnn>/~_networks_builder/<block>_mlp/~/linear_<i>` and `<block>_layer_norm`.

The message-passing rounds run as a `lax.scan` over the rounds' stacked parameters
(read through those modules), with pure MLP / LayerNorm functions: a loop XLA can
rematerialize round by round, where an unrolled Python loop would keep every
round's activations.

Node features are `[N, B, F]` (node-major, so gathers and segment sums act on
axis 0); edge features are `[E, B, F]` or, when batch independent, `[E, 1, F]`.
"""

import dataclasses
from typing import Mapping, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

LAYER_NORM_EPS = 1e-5


# Pure functions of explicit parameters -------------------------------------------------

def mlp_apply(layers: Sequence[tuple], x: jax.Array) -> jax.Array:
    """`layers` = [(w, b), ...]: linear layers with swish between them."""
    for i, (w, b) in enumerate(layers):
        if i:
            x = jax.nn.swish(x)
        x = jnp.dot(x, w) + b
    return x


def layer_norm(x: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
    """LayerNorm over the last axis with exact variance (the formula haiku's LayerNorm uses)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.var(x, axis=-1, keepdims=True)
    inv = scale * jax.lax.rsqrt(variance + jnp.asarray(LAYER_NORM_EPS, variance.dtype))
    return inv * (x - mean) + offset


def block_apply(params: Mapping, x: jax.Array) -> jax.Array:
    """MLP followed by LayerNorm (every block but the final decoder)."""
    return layer_norm(mlp_apply(params["mlp"], x), *params["norm"])


def first_layer_parts(params: Mapping, parts: Sequence[jax.Array]) -> list:
    """`[x_i @ w[rows_i]]` for the concatenation `[x_0, x_1, ...]` of a block's input.

    Summed (plus the bias) they equal the first layer applied to the concatenation; the
    split lets a caller project node tables before gathering them onto the edges.
    """
    w = params["mlp"][0][0]
    offsets = np.cumsum([0] + [p.shape[-1] for p in parts])
    return [jnp.dot(p, w[lo:hi]) for p, lo, hi in zip(parts, offsets[:-1], offsets[1:])]


def block_from_first_layer(params: Mapping, h: jax.Array) -> jax.Array:
    """Rest of a block from the first layer's pre-activation `h` (bias included)."""
    return layer_norm(mlp_apply(params["mlp"][1:], jax.nn.swish(h)), *params["norm"])


def _group_size(num_rounds: int) -> int:
    """The largest divisor of `num_rounds` not above its square root (rounded up)."""
    limit = int(np.ceil(np.sqrt(num_rounds)))
    return max(g for g in range(1, limit + 1) if num_rounds % g == 0)


def _blocking(count: int, max_size: int) -> tuple:
    """(blocks, block size, padding) covering `count` rows with blocks of at most `max_size`;
    equal blocks without padding when they divide `count` (reshapes are then free)."""
    num_blocks = -(-count // max_size)
    size = -(-count // num_blocks)
    return num_blocks, size, num_blocks * size - count


# Parameter-owning modules (they fix the checkpoint paths) --------------------------------

class Linear(hk.Module):
    def __init__(self, output_size: int, name: str):
        super().__init__(name=name)
        self.output_size = output_size

    def params(self, input_size: int, dtype) -> tuple:
        """(w [input_size, output_size], b [output_size]), created on first use."""
        w_init = hk.initializers.TruncatedNormal(stddev=1.0 / np.sqrt(input_size))
        w = hk.get_parameter("w", [input_size, self.output_size], dtype, init=w_init)
        b = hk.get_parameter("b", [self.output_size], dtype, init=jnp.zeros)
        return w, b


class MLP(hk.Module):
    """`hidden_layers` swish layers of width `latent_size`, then a linear output layer."""

    def __init__(self, latent_size: int, hidden_layers: int, output_size: int, name: str):
        super().__init__(name=name)
        # Built in the constructor, as haiku's own MLP does: paths read `<name>/~/linear_<i>`.
        sizes = [latent_size] * hidden_layers + [output_size]
        self.layers = [Linear(size, name=f"linear_{i}") for i, size in enumerate(sizes)]

    def params(self, input_size: int, dtype) -> list:
        widths = [input_size] + [layer.output_size for layer in self.layers[:-1]]
        return [layer.params(width, dtype) for layer, width in zip(self.layers, widths)]


class LayerNorm(hk.Module):
    def params(self, width: int, dtype) -> tuple:
        scale = hk.get_parameter("scale", [width], dtype, init=jnp.ones)
        offset = hk.get_parameter("offset", [width], dtype, init=jnp.zeros)
        return scale, offset


@dataclasses.dataclass(frozen=True)
class Block:
    """An MLP, optionally followed by a LayerNorm."""
    mlp: MLP
    norm: Optional[LayerNorm]

    def params(self, input_size: int, dtype) -> dict:
        params = {"mlp": self.mlp.params(input_size, dtype)}
        if self.norm is not None:
            params["norm"] = self.norm.params(self.mlp.layers[-1].output_size, dtype)
        return params

    def __call__(self, x: jax.Array) -> jax.Array:
        params = self.params(x.shape[-1], x.dtype)
        if self.norm is None:
            return mlp_apply(params["mlp"], x)
        return block_apply(params, x)


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
      edge_sets: names of the edge sets it processes (each embedded by its own block).
      node_sets: node sets that are updated in each round (and embedded if `embed_nodes`).
      num_steps: message-passing rounds, each with its own weights.
      node_output_sizes: node sets decoded by a final MLP without LayerNorm.
      f32_aggregation: sum messages in float32 whatever the activation dtype.
      split_first_layer: project sender/receiver node tables through their slice of the
        edge MLP's first layer before gathering (same function, far less per-edge work).
      remat_blocks: recompute each message-passing round (and, in edge blocks, each block)
        in the backward pass instead of keeping its activations.
      block_size: with a single message-passing step (whose edge latents are discarded
        afterwards, as in GraphCast's encoder and decoder), embed, update and sum the edges in
        blocks of this many edges, so that no `[E, B, L]` tensor exists whole; node-wise blocks
        (embedding, update, decoding) likewise run over blocks of this many nodes.
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
        """Builds every block; its name puts `~_networks_builder` into the parameter paths."""
        # Modules are created right here (not in a helper method, which would add its own
        # `~_<method>` path segment).
        def make_block(name, with_norm=True, output_size=None):
            mlp = MLP(self._latent_size, self._hidden_layers, output_size or self._latent_size,
                      name=f"{name}_mlp")
            return Block(mlp, LayerNorm(name=f"{name}_layer_norm") if with_norm else None)

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
        nodes = dict(nodes)
        if self._embed_nodes:
            for v in self._node_sets:
                params = blocks[f"encoder_nodes_{v}"].params(nodes[v].shape[-1], nodes[v].dtype)
                nodes[v] = self._rows(lambda x, p=params: block_apply(p, x), nodes[v])
        # Batch-independent node sets (e.g. embedded mesh nodes, [N, 1, L]) join the batch here.
        batch = max(x.shape[1] for x in nodes.values())
        nodes = {v: jnp.broadcast_to(x, x.shape[:1] + (batch,) + x.shape[2:])
                 for v, x in nodes.items()}
        dtype = next(iter(nodes.values())).dtype

        if self._block_size is not None:
            sums = {e: (self._fan_in_sums if s.fan_in else self._blocked_sums)(
                blocks, e, s, nodes) for e, s in edges.items()}
            nodes = self._node_updates(self._step_params(blocks, 0, edges, dtype)["nodes"],
                                       nodes, edges, sums)
        else:
            edges = {e: dataclasses.replace(s, features=blocks[f"encoder_edges_{e}"](s.features))
                     for e, s in edges.items()}
            nodes = self._message_passing(blocks, nodes, edges, dtype)

        for v in self._node_output_sizes:
            params = blocks[f"decoder_nodes_{v}"].params(nodes[v].shape[-1], nodes[v].dtype)
            nodes[v] = self._rows(lambda x, p=params: mlp_apply(p["mlp"], x), nodes[v])
        return nodes

    # Message passing ---------------------------------------------------------------------

    def _step_params(self, blocks, step: int, edges: Mapping[str, EdgeSet], dtype) -> dict:
        """Parameters of one round: `{"edges": {edge set: block}, "nodes": {node set: block}}`."""
        latent = self._latent_size
        incoming = {v: sum(s.receiver_set == v for s in edges.values()) for v in self._node_sets}
        return {
            "edges": {e: blocks[f"processor_edges_{step}_{e}"].params(3 * latent, dtype)
                      for e in edges},
            "nodes": {v: blocks[f"processor_nodes_{step}_{v}"].params((1 + incoming[v]) * latent,
                                                                      dtype)
                      for v in self._node_sets},
        }

    def _message_passing(self, blocks, nodes: dict, edges: dict, dtype) -> dict:
        """All rounds, as a scan over the rounds' stacked parameters."""
        step_params = [self._step_params(blocks, k, edges, dtype) for k in range(self._num_steps)]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *step_params)
        latents = {e: s.features for e, s in edges.items()}

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
        latents = {e: jnp.broadcast_to(x, x.shape[:1] + (batch,) + x.shape[2:])
                   for e, x in latents.items()}
        carry = (nodes, latents)
        if not self._remat_blocks:
            return jax.lax.scan(round_, carry, stacked)[0][0]
        # Rematerialize groups of g rounds, and rounds within a group: the backward pass
        # keeps about S/g + g carries instead of S (g ~ sqrt(S)).
        group = _group_size(self._num_steps)
        grouped = jax.tree.map(lambda x: x.reshape((-1, group) + x.shape[1:]), stacked)

        @jax.checkpoint
        def group_of_rounds(carry, params):
            return jax.lax.scan(jax.checkpoint(round_), carry, params)[0], None

        return jax.lax.scan(group_of_rounds, carry, grouped)[0][0]

    def _edge_messages(self, params, edge_set: EdgeSet, nodes: Mapping[str, jax.Array]):
        """New messages `LN(MLP([e, v_s[senders], v_r[receivers]]))`: [E, B, L]."""
        sender_nodes = nodes[edge_set.sender_set]
        receiver_nodes = nodes[edge_set.receiver_set]
        bias = params["mlp"][0][1]
        if self._split_first_layer:
            e_part, s_part, r_part = first_layer_parts(
                params, [edge_set.features, sender_nodes, receiver_nodes])
            h = (e_part + s_part[edge_set.senders]) + r_part[edge_set.receivers] + bias
            return block_from_first_layer(params, h)
        batch = sender_nodes.shape[1]
        features = jnp.broadcast_to(edge_set.features, edge_set.features.shape[:1] + (batch,)
                                    + edge_set.features.shape[2:])
        return block_apply(params, jnp.concatenate(
            [features, sender_nodes[edge_set.senders], receiver_nodes[edge_set.receivers]],
            axis=-1))

    def _node_updates(self, params, nodes: dict, edges: Mapping[str, EdgeSet],
                      sums: Mapping[str, jax.Array]) -> dict:
        """`v + LN(MLP([v, sums of incoming edge sets in sorted order]))` for every node set."""
        updated = dict(nodes)
        for v in self._node_sets:
            incoming = [sums[e] for e in sorted(edges) if edges[e].receiver_set == v]
            updated[v] = self._rows(
                lambda x, *inc, p=params[v]: x + block_apply(p, jnp.concatenate((x,) + inc, -1)),
                nodes[v], *incoming)
        return updated

    def _rows(self, fn, *xs: jax.Array) -> jax.Array:
        """`fn(*xs)` for a node-wise fn; with a block size, over blocks of rows (rematerialized
        per block with `remat_blocks`), so that its intermediates exist one block at a time."""
        if self._block_size is None or xs[0].shape[0] <= self._block_size:
            return fn(*xs)
        num_blocks, size, pad = _blocking(xs[0].shape[0], self._block_size)
        rows = xs[0].shape[0]
        blocked = tuple(jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(
            (num_blocks, size) + x.shape[1:]) for x in xs)
        body = jax.checkpoint(fn) if self._remat_blocks else fn
        out = jax.lax.map(lambda args: body(*args), blocked)
        return out.reshape((num_blocks * size,) + out.shape[2:])[:rows]

    def _aggregate(self, messages: jax.Array, edge_set: EdgeSet, num_nodes: int) -> jax.Array:
        """Sum of incoming messages per receiver node: [N, B, L]."""
        dtype = messages.dtype
        if self._f32_aggregation:
            messages = messages.astype(jnp.float32)
        return jax.ops.segment_sum(messages, edge_set.receivers, num_segments=num_nodes).astype(dtype)

    def _blocked_sums(self, blocks, name: str, edge_set: EdgeSet,
                      nodes: Mapping[str, jax.Array]) -> jax.Array:
        """Per-receiver sums of the new messages of one edge set, one block of edges at a time.

        Each block embeds its static edge features, computes its messages from the first-layer
        slices of its senders and receivers and scatter-adds them into the running sums; with
        `remat_blocks` the backward pass recomputes a block instead of storing it. Padding
        edges (to fill the last block) are masked out. Returns [N_receivers, B, L].
        """
        receivers_table = nodes[edge_set.receiver_set]
        dtype, latent = receivers_table.dtype, self._latent_size
        sum_dtype = jnp.float32 if self._f32_aggregation else dtype
        embed = blocks[f"encoder_edges_{name}"].params(edge_set.features.shape[-1], dtype)
        update = blocks[f"processor_edges_0_{name}"].params(3 * latent, dtype)
        # The receivers' first-layer slice is applied once to their table, in row blocks (a
        # grid-sized product and its gradient then never exist whole in a wider dtype: XLA on
        # CPU computes bf16 products in float32). A sender table about as large as the edge
        # set (the encoder's grid) is instead projected per block of gathered rows, since a
        # projected copy of it would be kept whole for the backward pass; a much smaller one
        # (mesh senders) is projected once, as a table.
        w = update["mlp"][0][0]
        w_senders = w[latent:2 * latent]
        receiver_part = self._rows(lambda x: jnp.dot(x, w[2 * latent:]), receivers_table)  # [Nr, B, L]
        senders_table = nodes[edge_set.sender_set]
        num_edges = edge_set.senders.shape[0]
        project_per_block = 4 * senders_table.shape[0] > num_edges
        if not project_per_block:
            senders_table = self._rows(lambda x: jnp.dot(x, w_senders), senders_table)

        num_blocks, size, pad = _blocking(num_edges, self._block_size)

        def in_blocks(x):
            x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
            return x.reshape((num_blocks, size) + x.shape[1:])

        xs = (in_blocks(edge_set.features), in_blocks(edge_set.senders),
              in_blocks(edge_set.receivers), in_blocks(jnp.ones((num_edges,), dtype)))

        def block(sums, x):
            features, senders, receivers, valid = x
            latents = block_apply(embed, features)                                # [Eb, 1, L]
            sender_part = senders_table[senders]                                  # [Eb, B, L]
            if project_per_block:
                sender_part = jnp.dot(sender_part, w_senders)
            h = ((jnp.dot(latents, w[:latent]) + sender_part) + receiver_part[receivers]
                 + update["mlp"][0][1])
            messages = block_from_first_layer(update, h) * valid[:, None, None]
            return sums.at[receivers].add(messages.astype(sum_dtype)), None

        if self._remat_blocks:
            block = jax.checkpoint(block)
        sums, _ = jax.lax.scan(block, jnp.zeros(receivers_table.shape, sum_dtype), xs)
        return sums.astype(dtype)

    def _fan_in_sums(self, blocks, name: str, edge_set: EdgeSet,
                     nodes: Mapping[str, jax.Array]) -> jax.Array:
        """`_blocked_sums` for edges sorted by receiver with a fixed fan-in k: a block of
        receivers and its k-times-larger block of edges are processed together, and the sums
        are sums over k. No scatter, no running [N_receivers, B, L] sum, and the receivers'
        first-layer slice is applied one block at a time. Returns [N_receivers, B, L]."""
        receivers_table = nodes[edge_set.receiver_set]
        dtype, latent, k = receivers_table.dtype, self._latent_size, edge_set.fan_in
        sum_dtype = jnp.float32 if self._f32_aggregation else dtype
        embed = blocks[f"encoder_edges_{name}"].params(edge_set.features.shape[-1], dtype)
        update = blocks[f"processor_edges_0_{name}"].params(3 * latent, dtype)
        w = update["mlp"][0][0]
        sender_part = self._rows(lambda x: jnp.dot(x, w[latent:2 * latent]),
                                 nodes[edge_set.sender_set])                     # [Ns, B, L]

        num_receivers = receivers_table.shape[0]
        num_blocks, size, pad = _blocking(num_receivers, max(1, self._block_size // k))

        def in_blocks(x, rows_per_receiver):
            x = jnp.pad(x, [(0, pad * rows_per_receiver)] + [(0, 0)] * (x.ndim - 1))
            return x.reshape((num_blocks, size * rows_per_receiver) + x.shape[1:])

        xs = (in_blocks(edge_set.features, k), in_blocks(edge_set.senders, k),
              in_blocks(receivers_table, 1))

        def block(x):
            features, senders, receivers = x                      # [k*b, 1, F], [k*b], [b, B, L]
            latents = block_apply(embed, features)                                # [k*b, 1, L]
            h = jnp.dot(latents, w[:latent]) + sender_part[senders]               # [k*b, B, L]
            h = h.reshape((size, k) + h.shape[1:])                                # [b, k, B, L]
            h = h + jnp.dot(receivers, w[2 * latent:])[:, None] + update["mlp"][0][1]
            messages = block_from_first_layer(update, h)                          # [b, k, B, L]
            return jnp.sum(messages.astype(sum_dtype), axis=1)                    # [b, B, L]

        if self._remat_blocks:
            block = jax.checkpoint(block)
        sums = jax.lax.map(block, xs)
        return sums.reshape((num_blocks * size,) + sums.shape[2:])[:num_receivers].astype(dtype)
