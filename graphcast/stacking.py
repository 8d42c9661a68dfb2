"""Variables <-> channels: the fixed channel order of GraphCast's inputs and outputs.

Arrays follow the host batch layout: atmospheric `[B, T, L, H, W]`, surface and
forcing `[B, T, H, W]`, static `[B, H, W]`. Channels are taken per variable in
sorted-name order (digits before letters), time-major and level-minor inside a
variable; all input channels come first, then the forcing channels. Grid nodes are
lat-major: node = i_lat * W + i_lon.
"""

from typing import Mapping

import jax
import jax.numpy as jnp

from graphcast import config as config_lib


def _as_channels(x: jax.Array) -> jax.Array:
    """[B, (T, L,) H, W] -> [B, channels, H, W], time-major / level-minor."""
    b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    return x.reshape(b, -1, h, w)


def stack_to_grid_nodes(inputs: Mapping[str, jax.Array],
                        forcings: Mapping[str, jax.Array]) -> jax.Array:
    """Inputs (sorted) then forcings (sorted) as node-major channels: [H*W, B, C]."""
    blocks = ([_as_channels(inputs[v]) for v in sorted(inputs)]
              + [_as_channels(forcings[v]) for v in sorted(forcings)])
    stacked = jnp.concatenate(blocks, axis=1)                    # [B, C, H, W]
    b, c, h, w = stacked.shape
    return jnp.transpose(stacked, (2, 3, 0, 1)).reshape(h * w, b, c)


def output_channel_slices(task_config: config_lib.TaskConfig) -> dict:
    """`{target: slice}` of the decoder's output channels, targets in sorted-name order."""
    slices, start = {}, 0
    for v in sorted(task_config.target_variables):
        size = task_config.channels(v)
        slices[v] = slice(start, start + size)
        start += size
    return slices


def unstack_from_grid_nodes(outputs: jax.Array, task_config: config_lib.TaskConfig,
                            grid_shape: tuple) -> dict:
    """[H*W, B, O] -> `{target: [B, 1, (L,) H, W]}` (one time step)."""
    h, w = grid_shape
    n, b, o = outputs.shape
    slices = output_channel_slices(task_config)
    expected = task_config.num_outputs()
    if o != expected:
        raise ValueError(f"The network produced {o} output channels but the task's targets need "
                         f"{expected}.")
    grid = jnp.transpose(outputs.reshape(h, w, b, o), (2, 3, 0, 1))  # [B, O, H, W]
    result = {}
    for v, s in slices.items():
        block = grid[:, s]
        if v in config_lib.ALL_ATMOSPHERIC_VARS:
            result[v] = block[:, None]                    # [B, 1, L, H, W]
        else:
            result[v] = block                             # [B, 1, H, W]
    return result
