"""Makes jaxline 0.0.8 run on current JAX, without TensorFlow; moves values between the host
and jaxline's per-device layout (a leading axis of local devices, or of every process's devices
for the global arrays of `training.host_batch`).

jaxline still calls APIs that JAX removed (`jax.device_put_sharded`, `jax.tree_map`), and its
`platform` module imports TensorFlow. `apply()` patches the few broken entry points in place;
it is idempotent and must run before `jaxline.train.train` / `evaluate` are called.
"""

from typing import Any

import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_AXIS = "devices"


def local_device_sharding() -> NamedSharding:
    """Sharding that splits a leading axis of length `jax.local_device_count()` over local devices."""
    mesh = Mesh(np.asarray(jax.local_devices()), (_AXIS,))
    return NamedSharding(mesh, PartitionSpec(_AXIS))


def shard_local(tree: Any) -> Any:
    """Places every leaf's leading axis (one slice per local device) onto the local devices.

    Replaces the removed `jax.device_put_sharded`: leaves are [local_devices, ...] host arrays.
    """
    _check_local_axis(tree, "shard_local")
    return jax.device_put(tree, local_device_sharding())


def _check_local_axis(tree: Any, caller: str) -> None:
    n = jax.local_device_count()
    for leaf in jax.tree.leaves(tree):
        if np.shape(leaf)[:1] != (n,):
            raise ValueError(f"{caller} expects a leading axis of {n} local devices, got a leaf "
                             f"of shape {np.shape(leaf)}.")


def bcast_local_devices(value: Any) -> Any:
    """Copies every leaf onto each local device, adding a leading device axis (jaxline's contract)."""
    n = jax.local_device_count()
    host = jax.tree.map(lambda v: np.broadcast_to(np.asarray(v), (n,) + np.shape(v)), value)
    return jax.device_put(host, local_device_sharding())


def global_devices() -> list:
    """Every process's devices, each process's together (by process, then id): the order of a
    global array's leading device axis, so each process's slice of it is contiguous."""
    return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def shard_global(tree: Any, sharding: NamedSharding) -> Any:
    """Each process's [local_devices, ...] host leaves as one global array [all devices, ...]
    with `sharding` (over `global_devices()`, in its memory kind): every process passes its own
    slices, as for `shard_local`."""
    _check_local_axis(tree, "shard_global")
    return jax.make_array_from_process_local_data(sharding, tree)


def bcast_global_devices(value: Any, sharding: NamedSharding) -> Any:
    """Copies every leaf onto each device of every process, as one global array [all devices,
    ...] with `sharding` (the global counterpart of `bcast_local_devices`)."""
    n = jax.local_device_count()
    host = jax.tree.map(lambda v: np.broadcast_to(np.asarray(v), (n,) + np.shape(v)), value)
    return shard_global(host, sharding)


def _shard0(x: Any) -> Any:
    """The first local device's value of a per-device array [devices, ...] (stays on device;
    never reads another process's shards of a global array)."""
    if isinstance(x, jax.Array):
        return x.addressable_data(0).reshape(x.shape[1:])  # works across processes too
    return np.asarray(x)[0]


def first_local(x: Any) -> np.ndarray:
    """Host copy of the first local device's value of a per-device array."""
    return np.asarray(_shard0(x))


def device0(tree: Any) -> Any:
    """First-device values of per-device scalars (what jaxline logs), without a host sync."""
    return jax.tree.map(_shard0, tree)


def _device_put_sharded(sharded_tree: Any, devices) -> Any:
    """Drop-in for jaxline.utils._device_put_sharded (used by its double_buffer)."""
    del devices  # Always the local devices in jaxline.
    return shard_local(sharded_tree)


def ensure_flags_parsed() -> None:
    """jaxline's decorators read absl flags; mark them parsed when called outside `app.run`."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def apply() -> None:
    """Patches jaxline and JAX in place (idempotent)."""
    if not hasattr(jax, "tree_map"):
        jax.tree_map = jax.tree.map
    from jaxline import utils as jaxline_utils  # pylint: disable=import-outside-toplevel
    jaxline_utils.bcast_local_devices = bcast_local_devices
    jaxline_utils._device_put_sharded = _device_put_sharded  # pylint: disable=protected-access
    ensure_flags_parsed()
