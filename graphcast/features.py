"""Geometric node and edge features of the three graphs.

Node features are float32 from float32 lat/lon; edge features are float64, expressed in a
frame where the receiver sits at lat 0, lon 0. Operation order follows the reference so
that the features match it bit for bit.
"""

from typing import Optional

import numpy as np
from scipy.spatial import transform


def lat_lon_to_xyz(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Unit vectors [N, 3] float32 from lat/lon in degrees (float32 arithmetic throughout)."""
    phi = np.deg2rad(np.asarray(lon, dtype=np.float32))
    theta = np.deg2rad(90 - np.asarray(lat, dtype=np.float32))
    return np.stack([np.cos(phi) * np.sin(theta), np.sin(phi) * np.sin(theta), np.cos(theta)],
                    axis=-1)


def xyz_to_lat_lon(xyz: np.ndarray) -> tuple:
    """(lat, lon) in degrees, float32, lon in [0, 360), from float32 points [N, 3]."""
    xyz = np.asarray(xyz, dtype=np.float32)
    phi = np.arctan2(xyz[:, 1], xyz[:, 0])
    theta = np.arccos(xyz[:, 2])
    return 90 - np.rad2deg(theta), np.mod(np.rad2deg(phi), 360)


def node_features(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """[sin lat, cos lon, sin lon] per node, [N, 3] float32.

    The first entry is computed as cos(colatitude), hence -4.37e-8 rather than 0 at lat 0.
    """
    phi = np.deg2rad(np.asarray(lon, dtype=np.float32))
    theta = np.deg2rad(90 - np.asarray(lat, dtype=np.float32))
    return np.stack([np.cos(theta), np.cos(phi), np.sin(phi)], axis=-1)


def receiver_rotations(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Rotation matrices [N, 3, 3] float64 taking each node to (1, 0, 0): R_y(pi/2 - theta) R_z(-phi).

    Built with scipy (extrinsic "zy" Euler angles) because that is how the reference rounds.
    """
    phi = np.deg2rad(np.asarray(lon, dtype=np.float32))
    theta = np.deg2rad(90 - np.asarray(lat, dtype=np.float32))
    angles = np.stack([-phi, -theta + np.pi / 2], axis=1)              # [N, 2] float32
    return transform.Rotation.from_euler("zy", angles).as_matrix()


def _rotate(matrices: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Per-row matrix-vector product: [N, 3, 3] x [N, 3] -> [N, 3] float64."""
    return np.einsum("nji,ni->nj", matrices, points)


def edge_features(sender_lat: np.ndarray, sender_lon: np.ndarray,
                  receiver_lat: np.ndarray, receiver_lon: np.ndarray,
                  senders: np.ndarray, receivers: np.ndarray,
                  normalizer: Optional[float] = None,
                  chunk_size: int = 1 << 16) -> np.ndarray:
    """[length, dx, dy, dz] per edge, [E, 3+1] float64, in the receiver's local frame.

    Sender and receiver positions are rotated separately and then subtracted (reference
    rounding). Divided by `normalizer`, or by the longest edge of this set when None.
    Edges are processed in chunks of `chunk_size` so temporaries stay small and cache-warm.
    """
    sender_xyz = lat_lon_to_xyz(sender_lat, sender_lon)                 # [Ns, 3] f32
    receiver_xyz = lat_lon_to_xyz(receiver_lat, receiver_lon)           # [Nr, 3] f32
    rotations = receiver_rotations(receiver_lat, receiver_lon)          # [Nr, 3, 3] f64
    receiver_local = _rotate(rotations, receiver_xyz)                   # [Nr, 3] f64
    out = np.empty((senders.shape[0], 4), dtype=np.float64)             # [E, 4]
    for start in range(0, senders.shape[0], chunk_size):
        s = senders[start:start + chunk_size]
        r = receivers[start:start + chunk_size]
        relative = _rotate(rotations[r], sender_xyz[s]) - receiver_local[r]   # [e, 3]
        out[start:start + chunk_size, 1:] = relative
        out[start:start + chunk_size, 0] = np.linalg.norm(relative, axis=-1)
    scale = out[:, 0].max() if normalizer is None else normalizer
    out /= scale
    return out
