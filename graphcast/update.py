"""The one training update: loss, gradients, clipped AdamW direction, learning-rate step.

`experiment.py` trains it (pmapped, or jitted over every process's devices by
`data_parallel_update`; gradients averaged over `axis_name`),
`benchmarks/train_step.py` times it and `python -m graphcast.describe --memory` sizes it, so
what is measured is what is trained. It lives in graphcast/ because it needs only the predictor
and optax: training/ adds the learning-rate schedule and jaxline around it, and the benchmark
and `describe` (which may not import training/) use it directly.

AdamW is split into a direction (clip -> Adam -> + weight_decay * w on weight matrices) and the
step `params - lr * direction`, so the learning rate is an argument (a function of the global
step chosen by the caller), not the optimizer's own counter.
"""

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np
import optax


def weight_decay_mask(params, names=("w",)):
    """True for leaves whose parameter name (last key) is in `names`: the weight matrices."""
    def is_decayed(path, _):
        last = path[-1]
        key = getattr(last, "key", getattr(last, "name", None))
        return key in names
    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_direction(*, clip_global_norm: float = 32.0, b1: float = 0.9, b2: float = 0.95,
                   eps: float = 1e-8, weight_decay: float = 0.1,
                   decay_param_names: tuple = ("w",)) -> optax.GradientTransformation:
    """Clip -> Adam -> + weight_decay * w: the AdamW update before scaling by -lr.

    The defaults are the GraphCast paper's (and `training.optim.OptimConfig`'s)."""
    return optax.chain(
        optax.clip_by_global_norm(clip_global_norm),
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay,
                                  mask=lambda p: weight_decay_mask(p, decay_param_names)),
    )


def apply_update(params, direction, lr):
    """params - lr * direction, keeping each leaf's dtype."""
    return jax.tree.map(lambda p, d: (p - lr * d).astype(p.dtype), params, direction)


def global_norm(tree) -> jnp.ndarray:
    return optax.tree.norm(tree)


def update_fn(predictor, direction: optax.GradientTransformation,
              axis_name: Optional[str] = None) -> Callable:
    """`(params, opt_state, batch, lr) -> (params, opt_state, scalars)`, not yet jitted.

    With `axis_name`, loss and gradients are averaged over that (pmap) axis. A step whose loss
    or gradient norm is not finite leaves parameters and optimizer state unchanged; `scalars`
    holds loss, grad_norm, update_skipped and the per-variable losses `loss/<name>`."""

    def update(params, opt_state, batch, lr):
        (loss, per_var), grads = jax.value_and_grad(predictor.loss, has_aux=True)(params, batch)
        if axis_name is not None:
            grads, loss, per_var = jax.lax.pmean((grads, loss, per_var), axis_name)
        grad_norm = global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        step_direction, new_opt_state = direction.update(grads, opt_state, params)
        new_params = apply_update(params, step_direction, lr)
        keep = lambda new, old: jnp.where(finite, new, old)  # skip non-finite updates
        scalars = {"loss": loss, "grad_norm": grad_norm,
                   "update_skipped": (~finite).astype(jnp.int32),
                   **{f"loss/{v}": x for v, x in per_var.items()}}
        return (jax.tree.map(keep, new_params, params),
                jax.tree.map(keep, new_opt_state, opt_state), scalars)

    return update


def data_parallel_update(predictor, direction: optax.GradientTransformation, axis_name: str,
                         devices: Sequence[jax.Device], num_steps: int) -> Callable:
    """`update_fn` over `devices` like `jax.pmap(..., donate_argnums=(0, 1))`, jitted, for
    batches of `num_steps`-step rollouts.

    Same arguments and results as the pmapped update (a leading axis of one slice per device),
    but the batch is taken in host memory when `batch_in_host_memory` says so ("pinned_host":
    put it there with `batch_sharding`), which pmap does not allow. `devices` may be every
    process's devices: arguments are then global arrays [len(devices), ...] (each process
    holding its devices' slices) and gradients are averaged over all of them."""
    mesh = Mesh(np.asarray(devices), (axis_name,))
    per_device = PartitionSpec(axis_name)
    inner = update_fn(predictor, direction, axis_name)

    def update(params, opt_state, batch, lr):
        squeeze = lambda tree: jax.tree.map(lambda x: x[0], tree)
        out = inner(squeeze(params), squeeze(opt_state), squeeze(batch), lr[0])
        return jax.tree.map(lambda x: x[None], out)

    # check_vma=False as under pmap: the model's scans start from unsharded zeros.
    sharded = jax.shard_map(update, mesh=mesh, in_specs=per_device, out_specs=per_device,
                            check_vma=False)
    on_device = NamedSharding(mesh, per_device)
    return jax.jit(sharded, donate_argnums=(0, 1),
                   in_shardings=(on_device, on_device,
                                 batch_sharding(predictor, mesh, axis_name, num_steps),
                                 on_device), out_shardings=on_device)


def batch_in_host_memory(predictor, num_steps: int) -> bool:
    """Whether the update of `num_steps`-step rollouts takes its batch in host memory: with the
    host_batch lever, from 2 steps on. For 1 step, XLA:TPU's temporaries for the frame copies
    outweigh the batch they keep off the device (full GraphCast on TPU v4: 13.9 GiB with the
    batch on the device, 16.3 in host memory)."""
    return predictor.host_batch and num_steps > 1


def batch_sharding(predictor, mesh: Mesh, axis_name: str, num_steps: int) -> NamedSharding:
    """Where `data_parallel_update` takes a batch of `num_steps`-step rollouts: one slice per
    device along `axis_name`, in host memory ("pinned_host", which the accelerator reads
    directly) when `batch_in_host_memory`."""
    host = batch_in_host_memory(predictor, num_steps)
    return NamedSharding(mesh, PartitionSpec(axis_name), memory_kind="pinned_host" if host else None)
