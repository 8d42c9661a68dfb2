"""Memory levers of the typed graph network: the same function, in less memory.

`typed_graph_net` states message passing on whole arrays. At full GraphCast size the encoder's
and decoder's per-edge tensors `[E, B, L]` and grid-sized intermediates do not fit one device,
so for those one-round nets `TypedGraphNet` computes them here, over blocks of rows (edges or
nodes) of at most `block_size`, with the same edge-message function (`mlp.edge_messages`):

* `rows`: a node-wise function, one block of rows at a time;
* `scatter_sums`: per-receiver sums of one edge set's new messages, one block of edges at a
  time, scatter-added into a running sum; the edges are embedded block by block too;
* `fan_in_sums`: the same for edges sorted by receiver with a fixed fan-in k (GraphCast's
  mesh->grid edges, k = 3): a block of receivers with its k-times-larger block of edges, summed
  over k, with no scatter and no running receiver-sized sum; the receivers may be a
  `RowFunction` and the sums followed by the receivers' own update, all in the same block;
* `scan_rounds`: the message-passing rounds as a scan, rematerialized in groups of rounds.

With `remat` (the `remat_blocks` option), the backward pass recomputes each block of rows, and
each round, instead of keeping their activations.
"""

from typing import Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from graphcast import mlp


class RowFunction(NamedTuple):
    """Node latents `fn(*inputs)` of a node-wise `fn`, left uncomputed: `fan_in_sums` computes
    them block by block where it uses them (and, with remat, again in the backward pass), so they
    never exist whole and are not kept for the backward pass. `inputs` are [N, ...] arrays."""
    fn: Callable
    inputs: tuple


def block_layout(count: int, max_size: int) -> tuple:
    """(blocks, block size, padding) covering `count` rows with blocks of at most `max_size`;
    equal blocks without padding when they divide `count` (reshapes are then free)."""
    num_blocks = -(-count // max_size)
    size = -(-count // num_blocks)
    return num_blocks, size, num_blocks * size - count


def rows(fn: Callable, *xs: jax.Array, block_size: Optional[int], remat: bool) -> jax.Array:
    """`fn(*xs)` for a node-wise `fn`; with a block size, over blocks of rows (rematerialized
    per block with `remat`), so that its intermediates exist one block at a time."""
    if block_size is None or xs[0].shape[0] <= block_size:
        return fn(*xs)
    num_blocks, size, pad = block_layout(xs[0].shape[0], block_size)
    count = xs[0].shape[0]
    blocked = tuple(jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(
        (num_blocks, size) + x.shape[1:]) for x in xs)
    body = jax.checkpoint(fn) if remat else fn
    out = jax.lax.map(lambda args: body(*args), blocked)
    return out.reshape((num_blocks * size,) + out.shape[2:])[:count]


def scatter_sums(embed: Mapping, update: Mapping, features: jax.Array, senders: jax.Array,
                 receivers: jax.Array, senders_table: jax.Array, receivers_table: jax.Array, *,
                 block_size: int, remat: bool, sum_dtype) -> jax.Array:
    """Per-receiver sums of the new messages of one edge set, one block of edges at a time.

    Each block embeds its static edge features (`embed`: the edge set's embedding MLP),
    computes its messages (`update`: the edge MLP of the one round) and scatter-adds them into
    the running sums. Padding edges (to fill the last block) are masked out.

    Args:
      features: [E, 1, F] static edge features; senders, receivers: [E] node indices.
      senders_table, receivers_table: [Ns, B, L], [Nr, B, L] node latents.
    Returns:
      [Nr, B, L] sums in `sum_dtype`.
    """
    latent = receivers_table.shape[-1]
    w = update["mlp"][0][0]
    w_senders = w[latent:2 * latent]
    # The receivers' first-layer slice is applied once to their table, in row blocks (a
    # grid-sized product and its gradient then never exist whole in a wider dtype: XLA on
    # CPU computes bf16 products in float32). A sender table about as large as the edge
    # set (the encoder's grid) is instead projected per block of gathered rows, since a
    # projected copy of it would be kept whole for the backward pass; a much smaller one
    # (mesh senders) is projected once, as a table.
    receiver_part = rows(lambda x: jnp.dot(x, w[2 * latent:]), receivers_table,
                         block_size=block_size, remat=remat)                  # [Nr, B, L]
    num_edges = senders.shape[0]
    project_per_block = 4 * senders_table.shape[0] > num_edges
    if not project_per_block:
        senders_table = rows(lambda x: jnp.dot(x, w_senders), senders_table,
                             block_size=block_size, remat=remat)
    num_blocks, size, pad = block_layout(num_edges, block_size)

    def in_blocks(x):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((num_blocks, size) + x.shape[1:])

    xs = (in_blocks(features), in_blocks(senders), in_blocks(receivers),
          in_blocks(jnp.ones((num_edges,), receivers_table.dtype)))

    def add_block(sums, x):
        features, senders, receivers, valid = x
        latents = mlp.mlp_norm_apply(embed, features)                           # [Eb, 1, L]
        sender_part = senders_table[senders]                                    # [Eb, B, L]
        if project_per_block:
            sender_part = jnp.dot(sender_part, w_senders)
        messages = mlp.edge_messages(update, jnp.dot(latents, w[:latent]), sender_part,
                                     receiver_part[receivers]) * valid[:, None, None]
        # A scatter-add into the running sums (jraph's segment sums would start from zeros).
        return sums.at[receivers].add(messages.astype(sum_dtype)), None

    if remat:
        add_block = jax.checkpoint(add_block)
    sums, _ = jax.lax.scan(add_block, jnp.zeros(receivers_table.shape, sum_dtype), xs)
    return sums


def fan_in_sums(embed: Mapping, update: Mapping, features: jax.Array, senders: jax.Array,
                fan_in: int, senders_table: jax.Array,
                receivers_table: Union[jax.Array, RowFunction], *, block_size: int, remat: bool,
                sum_dtype, then: Optional[Callable] = None) -> jax.Array:
    """`scatter_sums` for edges sorted by receiver, exactly `fan_in` (k) per receiver.

    A block of receivers and its k-times-larger block of edges are processed together and
    the sums are sums over k: no scatter, no running [Nr, B, L] sum, and the receivers'
    first-layer slice is applied one block at a time. Returns [Nr, B, L] in `sum_dtype`.

    The receivers may be a `RowFunction`, computed per block; with `then`, each block returns
    `then(receivers, sums)` (e.g. the receivers' node update) instead of the sums, so that
    neither the receivers nor their sums exist whole: returns [Nr, ...] of `then`'s rows.
    """
    if not isinstance(receivers_table, RowFunction):
        receivers_table = RowFunction(lambda x: x, (receivers_table,))
    latent, k = update["mlp"][0][0].shape[0] // 3, fan_in
    w = update["mlp"][0][0]
    sender_part = rows(lambda x: jnp.dot(x, w[latent:2 * latent]), senders_table,
                       block_size=block_size, remat=remat)                      # [Ns, B, L]
    num_receivers = receivers_table.inputs[0].shape[0]
    num_blocks, size, pad = block_layout(num_receivers, max(1, block_size // k))

    def in_blocks(x, rows_per_receiver):
        x = jnp.pad(x, [(0, pad * rows_per_receiver)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((num_blocks, size * rows_per_receiver) + x.shape[1:])

    xs = (in_blocks(features, k), in_blocks(senders, k),
          tuple(in_blocks(x, 1) for x in receivers_table.inputs))

    def sum_block(x):
        features, senders, inputs = x                           # [k*b, 1, F], [k*b], ([b, ...])
        receivers = receivers_table.fn(*inputs)                               # [b, B, L]
        latents = mlp.mlp_norm_apply(embed, features)                         # [k*b, 1, L]
        messages = mlp.edge_messages(update, jnp.dot(latents, w[:latent]),
                                     sender_part[senders],                    # [k*b, B, L]
                                     jnp.dot(receivers, w[2 * latent:]),      # [b, B, L]
                                     fan_in=k)                                # [b, k, B, L]
        sums = jnp.sum(messages.astype(sum_dtype), axis=1)                    # [b, B, L]
        return sums if then is None else then(receivers, sums)

    if remat:
        sum_block = jax.checkpoint(sum_block)
    out = jax.lax.map(sum_block, xs)
    return out.reshape((num_blocks * size,) + out.shape[2:])[:num_receivers]


def _group_size(num_rounds: int) -> int:
    """The largest divisor of `num_rounds` not above its square root (rounded up)."""
    limit = int(np.ceil(np.sqrt(num_rounds)))
    return max(g for g in range(1, limit + 1) if num_rounds % g == 0)


def scan_rounds(round_fn: Callable, carry, stacked_params, *, remat: bool):
    """`lax.scan(round_fn, carry, stacked_params)`'s final carry.

    With `remat`, groups of g rounds, and the rounds within a group, are rematerialized: the
    backward pass keeps about S/g + g carries instead of S (g ~ sqrt(S) for S rounds).
    """
    if not remat:
        return jax.lax.scan(round_fn, carry, stacked_params)[0]
    num_rounds = jax.tree.leaves(stacked_params)[0].shape[0]
    group = _group_size(num_rounds)
    grouped = jax.tree.map(lambda x: x.reshape((-1, group) + x.shape[1:]), stacked_params)

    @jax.checkpoint
    def group_of_rounds(carry, params):
        return jax.lax.scan(jax.checkpoint(round_fn), carry, params)[0], None

    return jax.lax.scan(group_of_rounds, carry, grouped)[0]
