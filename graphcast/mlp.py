"""The MLPs of the typed graph network: parameter-owning haiku modules and pure functions.

Every edge and node set of a `typed_graph_net.TypedGraphNet` has its own MLP (swish between
linear layers), followed by a LayerNorm everywhere but in the final decoder. The haiku modules
here only create the parameters, so that their names fix the official checkpoint paths
(`<name>_mlp/~/linear_<i>/{w,b}`, `<name>_layer_norm/{scale,offset}`); the MLPs are applied by
pure functions of those parameters, which can run inside `lax.scan` over stacked weights.
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


def mlp_norm_apply(params: Mapping, x: jax.Array) -> jax.Array:
    """MLP followed by LayerNorm."""
    return layer_norm(mlp_apply(params["mlp"], x), *params["norm"])


def first_layer_parts(params: Mapping, parts: Sequence[jax.Array]) -> list:
    """`[x_i @ w[rows_i]]` for the concatenation `[x_0, x_1, ...]` of an MLP's input.

    Summed (plus the bias) they equal the first layer applied to the concatenation; the
    split lets a caller project node tables before gathering them onto the edges.
    """
    w = params["mlp"][0][0]
    offsets = np.cumsum([0] + [p.shape[-1] for p in parts])
    return [jnp.dot(p, w[lo:hi]) for p, lo, hi in zip(parts, offsets[:-1], offsets[1:])]


def edge_messages(params: Mapping, edge_part: jax.Array, sender_part: jax.Array,
                  receiver_part: jax.Array, fan_in: Optional[int] = None) -> jax.Array:
    """New edge messages `LN(MLP([e, v_sender, v_receiver]))` from the first-layer parts.

    The parts are the edge, sender and receiver slices of the first layer (`first_layer_parts`)
    gathered onto the edges, `[E, B, L]` (or broadcastable to it): the one formula every path
    of the graph network uses, whole-array or block by block. With `fan_in` k (edges sorted by
    receiver, exactly k each), `receiver_part` is per receiver, `[E / k, B, L]`, and the
    messages come out grouped by receiver, `[E / k, k, B, L]`, ready to be summed over k.
    """
    h = edge_part + sender_part
    if fan_in:
        h = h.reshape((-1, fan_in) + h.shape[1:])
        receiver_part = receiver_part[:, None]
    h = h + receiver_part + params["mlp"][0][1]
    return layer_norm(mlp_apply(params["mlp"][1:], jax.nn.swish(h)), *params["norm"])


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
class MLPWithNorm:
    """An MLP, optionally followed by a LayerNorm: the parameters of one edge or node function."""
    mlp: MLP
    norm: Optional[LayerNorm]

    def params(self, input_size: int, dtype) -> dict:
        """`{"mlp": [(w, b), ...], "norm": (scale, offset)}` (no "norm" without a LayerNorm)."""
        params = {"mlp": self.mlp.params(input_size, dtype)}
        if self.norm is not None:
            params["norm"] = self.norm.params(self.mlp.layers[-1].output_size, dtype)
        return params
