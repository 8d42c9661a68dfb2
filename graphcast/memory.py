"""Size the training update (graphcast.update) without allocating it.

The step is lowered and compiled with abstract parameters and batch
(`jax.ShapeDtypeStruct`), so full-size configurations can be sized on a small
machine. Statistics are units and the data random: only shapes matter here.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from graphcast import config as config_lib
from graphcast import normalization
from graphcast import rollout
from graphcast import update


def unit_stats(task_config: config_lib.TaskConfig) -> normalization.Stats:
    """Zero means and unit scales for every variable of the task."""
    names = (set(task_config.input_variables) | set(task_config.target_variables)
             | set(task_config.forcing_variables))
    shape = task_config.level_shape
    ones = {v: np.ones(shape(v), np.float32) for v in names}
    return normalization.Stats(mean={v: np.zeros(shape(v), np.float32) for v in names},
                               stddev=ones, diffs_stddev=ones)


def batch_shapes(task_config: config_lib.TaskConfig, batch: int, ar_steps: int,
                 height: int, width: int) -> dict:
    """Host-layout batch of abstract float32 arrays."""
    def array(v, steps):
        if v in config_lib.STATIC_VARS:
            shape = (batch, height, width)
        else:
            shape = (batch, steps, *task_config.level_shape(v), height, width)
        return jax.ShapeDtypeStruct(shape, jnp.float32)

    return {
        "inputs": {v: array(v, task_config.num_input_frames) for v in task_config.input_variables},
        "targets": {v: array(v, ar_steps) for v in task_config.target_variables},
        "forcings": {v: array(v, ar_steps) for v in task_config.forcing_variables},
    }


def abstract_step_args(predictor: rollout.Predictor, direction: optax.GradientTransformation,
                       batch: int = 1, ar_steps: int = 1, device=None) -> tuple:
    """Abstract (params, opt_state, batch, lr) of the update, placed on `device` when given
    (an ahead-of-time target device: TPU or GPU topology, no hardware needed); the batch in
    its host memory when `update.batch_in_host_memory`."""
    abstract_batch = batch_shapes(predictor.task_config, batch, ar_steps,
                                  predictor.grid_lat.size, predictor.grid_lon.size)
    params = jax.eval_shape(predictor.init, jax.random.PRNGKey(0), abstract_batch)
    opt_state = jax.eval_shape(direction.init, params)
    args = (params, opt_state, abstract_batch, jax.ShapeDtypeStruct((), jnp.float32))
    if device is None:
        return args
    on_device = jax.sharding.SingleDeviceSharding(device)
    for_batch = jax.sharding.SingleDeviceSharding(
        device, memory_kind="pinned_host" if update.batch_in_host_memory(predictor, ar_steps)
        else None)

    def place(tree, sharding):
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                            tree)
    return (place(params, on_device), place(opt_state, on_device),
            place(abstract_batch, for_batch), place(args[3], on_device))


def compile_train_step(predictor: rollout.Predictor, batch: int = 1, ar_steps: int = 1,
                       direction: Optional[optax.GradientTransformation] = None, device=None):
    """(compiled update, abstract args) of graphcast.update's training update, the one the
    experiment trains (paper-default optimizer unless `direction` is given), parameters and
    optimizer state donated; compiled for `device`'s backend when given."""
    direction = direction or update.make_direction()
    args = abstract_step_args(predictor, direction, batch, ar_steps, device)
    step = jax.jit(update.update_fn(predictor, direction), donate_argnums=(0, 1))
    return step.lower(*args).compile(), args


def memory_report(compiled) -> dict:
    """XLA's memory analysis of a compiled step, in bytes; `total_bytes` = what must fit in
    device memory (`host_temp_bytes`, `host_argument_bytes`: what offloading and a host-resident
    batch put in host memory instead; XLA:GPU counts host arguments in `argument_bytes`)."""
    m = compiled.memory_analysis()
    report = {"temp_bytes": int(m.temp_size_in_bytes),
              "argument_bytes": int(m.argument_size_in_bytes),
              "output_bytes": int(m.output_size_in_bytes),
              "alias_bytes": int(m.alias_size_in_bytes),
              "host_temp_bytes": int(getattr(m, "host_temp_size_in_bytes", 0)),
              "host_argument_bytes": int(getattr(m, "host_argument_size_in_bytes", 0))}
    report["total_bytes"] = (report["temp_bytes"] + report["argument_bytes"]
                             + report["output_bytes"] - report["alias_bytes"])
    return report
