"""GraphCast's training loss: latitude- and level-weighted MSE, weighted sum over variables."""

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np



def latitude_weights(lat: np.ndarray) -> np.ndarray:
    """Weights proportional to the area each latitude row stands for, normalized to mean 1.

    Grids that include the poles give the pole rows a cap of half a row (`sin(d/4)^2`);
    grids offset by half a row use `cos(lat)`. Raises for non-uniform or partial grids.
    """
    lat = np.asarray(lat, dtype=np.float64)
    spacing = np.diff(lat)
    if lat.size < 2 or not np.allclose(spacing, spacing[0]):
        raise ValueError(f"Latitudes must be uniformly spaced to compute loss weights; got {lat}.")
    delta = np.deg2rad(abs(spacing[0]))
    top, bottom = np.max(lat), np.min(lat)
    if np.isclose(top, 90.0) and np.isclose(bottom, -90.0):
        w = np.cos(np.deg2rad(lat)) * np.sin(delta / 2)
        w[0] = w[-1] = np.sin(delta / 4) ** 2
    elif np.isclose(top, 90.0 - np.rad2deg(delta) / 2) and np.isclose(bottom, -top):
        w = np.cos(np.deg2rad(lat))
    else:
        raise ValueError(f"Latitudes must span the globe (from -90 to 90, or offset by half a "
                         f"row); got {bottom}..{top}.")
    return w / w.mean()


def level_weights(pressure_levels) -> np.ndarray:
    """Proportional to pressure, mean 1."""
    levels = np.asarray(pressure_levels, dtype=np.float64)
    return levels / levels.mean()


def weighted_mse_per_variable(predictions: Mapping[str, jax.Array],
                              targets: Mapping[str, jax.Array],
                              lat: np.ndarray, pressure_levels) -> dict:
    """`{var: [B]}`: mean over time, level, lat and lon of the weighted squared error."""
    w_lat = latitude_weights(lat).astype(np.float32)[:, None]        # [H, 1]
    w_lev = level_weights(pressure_levels).astype(np.float32)[:, None, None]  # [L, 1, 1]
    losses = {}
    for v in sorted(predictions):
        err = jnp.square(predictions[v] - targets[v]) * w_lat
        if predictions[v].ndim == 5:                                 # [B, T, L, H, W]
            err = err * w_lev
        losses[v] = jnp.mean(err, axis=tuple(range(1, err.ndim)))
    return losses


def weighted_sum(per_variable: Mapping[str, jax.Array], weights: Mapping[str, float]) -> jax.Array:
    """`sum_v weight_v * loss_v`, over the variables in sorted-name order."""
    return sum(weights[v] * per_variable[v] for v in sorted(per_variable))
