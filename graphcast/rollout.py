"""The trainable predictor: normalization, one-step network, autoregressive rollout and loss.

`Predictor` turns host-layout batches (see `graphcast.stacking`) into predictions and
into GraphCast's multi-step training loss. Each step normalizes the current input
window and the step's forcings, runs the network, turns its outputs into physical
predictions (residuals of the last input frame where the target is also an input),
and rolls the window forward with its own predictions and the next forcings. The
multi-step loss is the mean of the per-step losses, with gradients through time.
"""

import contextlib
from typing import Mapping, Optional

import haiku as hk
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
import numpy as np

from graphcast import config as config_lib
from graphcast import graphs as graphs_lib
from graphcast import losses
from graphcast import model
from graphcast import normalization
from graphcast import stacking

Arrays = Mapping[str, jax.Array]


def _float32_params_as(dtype):
    """Parameters stored in float32 but read in `dtype` (the mixed-precision path)."""

    def creator(next_creator, shape, param_dtype, init, context):
        del param_dtype, context
        return next_creator(shape, jnp.float32, init)

    def getter(next_getter, value, context):
        value = next_getter(value)
        return value.astype(dtype) if context.original_dtype == dtype else value

    stack = contextlib.ExitStack()
    stack.enter_context(hk.custom_creator(creator))
    stack.enter_context(hk.custom_getter(getter))
    return stack


_WINDOW = "rollout_window"
# Everything of a step is recomputed in the backward pass; its input window alone is saved,
# in host memory.
_OFFLOAD_WINDOWS = jax.checkpoint_policies.save_and_offload_only_these_names(
    names_which_can_be_saved=[], names_which_can_be_offloaded=[_WINDOW],
    offload_src="device", offload_dst="pinned_host")


def _named_window(body):
    """`body` whose carried window is named, so that a remat policy can offload it."""
    def named(rolling, xs):
        return body(jax.tree.map(lambda x: checkpoint_name(x, _WINDOW), rolling), xs)
    return named


class Predictor:
    """GraphCast with normalization and autoregressive rollout, as pure functions of params.

    Args:
      model_config, task_config: the model and what it reads and predicts.
      stats: normalization statistics covering the task (`normalization.load_stats`).
      grid_lat, grid_lon: the data grid (lat ascending as stored, lon ascending), degrees.
      bf16: run the network in bfloat16 (parameters stay float32; aggregation on the
        encoder, normalization, residuals and loss stay float32).
      remat_steps: rematerialize each autoregressive step in the backward pass.
      offload_windows: with remat_steps, keep each step's saved input window (what the
        backward pass recomputes the step from) in host memory instead of device memory.
        Same values, less accelerator memory for multi-step rollouts; the CPU backend
        ignores it.
      host_batch: the batch may live in host memory (`batch_memory_kind`): the input window
        is copied to the device at the start and each step's targets and forcings when that
        step reads them, so the rollout's 12 target frames never occupy device memory at
        once. Same values; a batch that is already on the device is read as it is.
      remat_blocks, block_size, split_first_layer, recompute_grid: memory and speed options
        of the network, none of which changes the function computed: see
        `model.GraphCastNetwork`.
      graphs: prebuilt static graphs (built, or read from `graph_cache_dir`, if absent).
    """

    def __init__(self, model_config: config_lib.ModelConfig,
                 task_config: config_lib.TaskConfig, stats: normalization.Stats,
                 grid_lat: np.ndarray, grid_lon: np.ndarray, *, bf16: bool = False,
                 remat_steps: bool = True, remat_blocks: bool = False,
                 offload_windows: bool = False,
                 host_batch: bool = False,
                 block_size: Optional[int] = None,
                 split_first_layer: bool = True,
                 recompute_grid: bool = False,
                 graphs: Optional[graphs_lib.StaticGraphs] = None,
                 graph_cache_dir: Optional[str] = None):
        self.model_config = model_config
        self.task_config = task_config
        self.stats = stats
        self.grid_lat = np.asarray(grid_lat, np.float32)
        self.grid_lon = np.asarray(grid_lon, np.float32)
        self.bf16 = bf16
        self.remat_steps = remat_steps
        self.remat_blocks = remat_blocks
        if offload_windows and not remat_steps:
            raise ValueError("offload_windows=True needs remat_steps=True: the offloaded windows "
                             "are what each rematerialized step is recomputed from.")
        self.offload_windows = offload_windows
        self.host_batch = host_batch
        self.block_size = block_size
        self.split_first_layer = split_first_layer
        if recompute_grid and not (remat_blocks and block_size):
            raise ValueError("recompute_grid=True needs remat_blocks=True and a block_size: the "
                             "grid's rows are recomputed block by block.")
        self.recompute_grid = recompute_grid
        self.graphs = graphs if graphs is not None else graphs_lib.build_graphs(
            model_config, self.grid_lat, self.grid_lon, cache_dir=graph_cache_dir)
        self._variable_weights = task_config.variable_loss_weights()
        self._loss_fn = hk.transform(self._loss)
        self._predict_fn = hk.transform(self._predict)

    # Public pure functions ---------------------------------------------------------------

    def init(self, rng: jax.Array, batch: Mapping[str, Arrays]) -> hk.Params:
        """Fresh parameters (haiku's default initializers) with the official paths."""
        return self._loss_fn.init(rng, batch["inputs"], batch["targets"], batch["forcings"])

    def loss(self, params: hk.Params, batch: Mapping[str, Arrays]):
        """Scalar loss (mean over batch and steps) and `{target: scalar}` diagnostics."""
        per_example, diagnostics = self._loss_fn.apply(
            params, None, batch["inputs"], batch["targets"], batch["forcings"])
        return jnp.mean(per_example), {v: jnp.mean(d) for v, d in diagnostics.items()}

    def loss_per_example(self, params: hk.Params, batch: Mapping[str, Arrays]):
        """`([B], {target: [B]})`: the loss before averaging over the batch."""
        return self._loss_fn.apply(params, None, batch["inputs"], batch["targets"],
                                   batch["forcings"])

    def predict(self, params: hk.Params, inputs: Arrays, forcings: Arrays,
                num_steps: Optional[int] = None) -> dict:
        """`{target: [B, steps, (L,) H, W]}`; steps = the forcings' time axis unless given."""
        return self._predict_fn.apply(params, None, inputs, forcings, num_steps)

    # Inside the haiku transforms -----------------------------------------------------------

    def _precision(self):
        return _float32_params_as(jnp.bfloat16) if self.bf16 else contextlib.nullcontext()

    def _split_inputs(self, inputs: Arrays):
        """(static inputs, inputs that roll forward in time); rejects other time-dependent ones."""
        rolling_names = set(self.task_config.target_variables) | set(
            self.task_config.forcing_variables)
        static, rolling = {}, {}
        for v, x in inputs.items():
            if v in rolling_names:
                rolling[v] = x
            elif x.ndim > 3:
                raise config_lib.TaskConfigError(
                    f"Input variable {v!r} has a time axis (shape {x.shape}) but is neither a target "
                    "nor a forcing, so it cannot be fed back autoregressively. Add it to "
                    "TaskConfig.target_variables or forcing_variables, or supply it as a static "
                    "[batch, lat, lon] field.")
            else:
                static[v] = x
        return static, rolling

    def _network(self) -> model.GraphCastNetwork:
        """Built once per transformed call, outside the scanned step, so that haiku creates
        each GNN module once (a second construction would add `_1`-suffixed parameters)."""
        return model.GraphCastNetwork(
            self.model_config, self.task_config, self.graphs,
            dtype=jnp.bfloat16 if self.bf16 else jnp.float32,
            split_first_layer=self.split_first_layer, remat_blocks=self.remat_blocks,
            block_size=self.block_size, recompute_grid=self.recompute_grid)

    def _network_outputs(self, network: model.GraphCastNetwork, inputs: Arrays,
                         forcings: Arrays) -> dict:
        """One step in normalized space: `{target: [B, 1, (L,) H, W]}` float32."""
        norm_inputs = normalization.normalize(inputs, self.stats)
        norm_forcings = normalization.normalize(forcings, self.stats)
        grid_inputs = stacking.stack_to_grid_nodes(norm_inputs, norm_forcings)  # [Ng, B, C]
        with self._precision():
            outputs = network(grid_inputs)                                      # [Ng, B, O]
        return stacking.unstack_from_grid_nodes(
            outputs.astype(jnp.float32), self.task_config,
            (self.grid_lat.size, self.grid_lon.size))

    def _advance(self, rolling: Arrays, predictions: Arrays, forcings: Arrays) -> dict:
        """Drops the oldest frame and appends the newest (predicted or forced) one."""
        newest = {**predictions, **forcings}
        return {v: jnp.concatenate([x[:, 1:], newest[v]], axis=1) for v, x in rolling.items()}

    def _scan(self, body, rolling, xs, num_steps):
        if num_steps == 1:
            # A one-iteration loop would keep every activation for the backward pass in
            # loop-carried buffers; calling the step directly lets XLA free them early.
            rolling, ys = body(rolling, jax.tree.map(lambda x: x[0], xs))
            return rolling, jax.tree.map(lambda y: y[None], ys)
        if self.remat_steps and self.offload_windows:
            body = hk.remat(_named_window(body), policy=_OFFLOAD_WINDOWS)
        elif self.remat_steps:
            body = hk.remat(body)
        return hk.scan(body, rolling, xs, length=num_steps)

    @staticmethod
    def _per_step(arrays: Arrays) -> dict:
        """[B, T, ...] -> [T, B, 1, ...], the scanned layout."""
        return {v: jnp.moveaxis(x, 1, 0)[:, :, None] for v, x in arrays.items()}

    def _on_device(self, arrays: Arrays) -> dict:
        """`arrays` copied to device memory if the batch lives in host memory (host_batch)."""
        if not self.host_batch:
            return dict(arrays)
        return jax.device_put(dict(arrays), jax.memory.Space.Device)

    def _at_step(self, arrays: Arrays, t: jax.Array) -> dict:
        """[B, T, ...] -> [B, 1, ...] at step t, read in place (a time-major copy of the whole
        rollout's targets, 10 GiB at 0.25 deg and 12 steps, would stay live through the step)
        and, with host_batch, copied from host memory only now."""
        return self._on_device(
            {v: jax.lax.dynamic_slice_in_dim(x, t, 1, axis=1) for v, x in arrays.items()})

    def _predict(self, inputs: Arrays, forcings: Arrays, num_steps: Optional[int]):
        static, rolling = self._split_inputs(inputs)
        if num_steps is None:
            if not forcings:
                raise ValueError("predict() needs num_steps when the task has no forcings.")
            num_steps = next(iter(forcings.values())).shape[1]

        network = self._network()

        def step(rolling, forcings_t):
            current = {**static, **rolling}
            predictions = normalization.denormalize_outputs(
                self._network_outputs(network, current, forcings_t), current, self.stats)
            return self._advance(rolling, predictions, forcings_t), predictions

        _, predictions = self._scan(step, rolling, self._per_step(forcings), num_steps)
        return {v: jnp.moveaxis(p[:, :, 0], 0, 1) for v, p in predictions.items()}

    def _loss(self, inputs: Arrays, targets: Arrays, forcings: Arrays):
        static, rolling = self._split_inputs(self._on_device(inputs))
        num_steps = next(iter(targets.values())).shape[1]
        network = self._network()

        def step(rolling, t):
            targets_t, forcings_t = self._at_step(targets, t), self._at_step(forcings, t)
            current = {**static, **rolling}
            outputs = self._network_outputs(network, current, forcings_t)
            per_variable = losses.weighted_mse_per_variable(
                outputs, normalization.normalize_targets(targets_t, current, self.stats),
                self.grid_lat, self.task_config.pressure_levels)
            loss = losses.weighted_sum(per_variable, self._variable_weights)
            predictions = normalization.denormalize_outputs(outputs, current, self.stats)
            return self._advance(rolling, predictions, forcings_t), (loss, per_variable)

        _, (step_losses, step_diagnostics) = self._scan(step, rolling, jnp.arange(num_steps),
                                                        num_steps)
        return (jnp.mean(step_losses, axis=0),
                {v: jnp.mean(d, axis=0) for v, d in step_diagnostics.items()})
