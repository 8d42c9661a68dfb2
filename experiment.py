"""GraphCast training with jaxline: pmapped AdamW steps, rollout curriculum, evaluation, checkpoints.

  python experiment.py --config=configs/sample.py                       # demo, minutes on a CPU
  python experiment.py --config=configs/era5_1deg.py --jaxline_mode=train
  python experiment.py --config=configs/era5_1deg.py --jaxline_mode=eval   # separate eval job
  python experiment.py --config=<cfg> --jaxline_mode=export --export_path=model.npz [--export_step=N]

This module is the jaxline Experiment (data-parallel training over all devices of all hosts,
evaluation) and the command line; `training.launch` runs the modes (train with in-process
evaluation every `eval.interval_steps` and at the end, eval, train_eval_multithreaded, export).
Training resumes automatically from the newest checkpoint in `config.checkpoint_dir`.
"""

import os
import time
from typing import Any, Mapping, Optional

from absl import app, flags, logging
from ml_collections import config_flags

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from jaxline import experiment as jl_experiment

from graphcast import rollout
from graphcast import update as gc_update
from graphcast.config import TIME_STEP_HOURS
from training import compat
from training import data_input
from training import evaluation
from training import inputs as inputs_lib
from training import launch
from training import logging_setup
from training import nonfinite
from training import optim
from training import preemption
from training import throughput

_AXIS = "devices"


class Experiment(jl_experiment.AbstractExperiment):
    """GraphCast data-parallel training (pmap over all devices of all hosts) and evaluation.

    jaxline builds it as `Experiment(mode, init_rng=..., config=...)`; `training.launch.run`
    adds `inputs`, what the up-front checks opened (data, statistics, climatology, fine-tuning
    checkpoint), so nothing is opened twice. Without it the Experiment opens its own."""

    # Replicated: one copy per device on the leading axis (local devices; with
    # training.host_batch, global arrays over every process's devices).
    CHECKPOINT_ATTRS = {"_params": "params", "_opt_state": "opt_state"}
    # Host values: data iterator position and failure counters.
    NON_BROADCAST_CHECKPOINT_ATTRS = {"_data_state": "data_state", "_counters": "counters"}

    def __init__(self, mode: str, init_rng: Optional[jax.Array] = None, config=None,
                 inputs: Optional[inputs_lib.Inputs] = None):
        super().__init__(mode=mode, init_rng=init_rng)
        if config is None:
            raise ValueError("Experiment needs experiment_kwargs.config.")
        self.mode = mode
        self.config = config
        self._init_rng = init_rng if init_rng is not None else jax.random.PRNGKey(0)
        self._inputs = inputs or inputs_lib.Inputs(config)
        self.model_config = self._inputs.model_config
        self.task_config = self._inputs.task_config
        self.optim_config = optim.OptimConfig.from_mapping(dict(config.optimizer))
        self._direction = optim.make_direction(self.optim_config)
        self._params = None          # replicated [devices, ...] haiku params (_replicate)
        self._opt_state = None       # replicated optimizer state
        self._restored = None        # snapshot restored before the lazy initialization
        self._data_state = None
        self._nonfinite = nonfinite.Guard(config.training.max_consecutive_nonfinite)
        self._throughput = throughput.Throughput(config.data.global_batch_size)
        self._predictor = None
        self._train_input = None
        self._updates = {}           # ar_steps -> pmapped update (one compile per rollout length)
        self._sharding = None        # training.host_batch: over every process's devices
        self._batch_shardings = {}   # rollout steps -> where the batch goes (training.host_batch)
        self._predict_fn = None

    @property
    def source(self) -> data_input.Source:
        return self._inputs.source

    @property
    def _counters(self) -> dict:
        return self._nonfinite.counters

    @property
    def predictor(self) -> rollout.Predictor:
        if self._predictor is None:
            training = self.config.training
            self._predictor = rollout.Predictor(
                self.model_config, self.task_config, self._inputs.stats, self.source.lat,
                self.source.lon, bf16=training.bf16, remat_steps=training.remat_steps,
                offload_windows=training.offload_windows, host_batch=training.host_batch,
                remat_blocks=training.remat_blocks, block_size=training.block_size or None,
                recompute_grid=training.recompute_grid,
                graph_cache_dir=self.config.data.graph_cache_dir or None)
        return self._predictor

    # -- checkpointing (jaxline calls these) ---------------------------------------------------
    def snapshot_state(self) -> Mapping[str, Any]:
        """Host copies of params, optimizer state leaves, data position and counters."""
        if self._params is None:
            if self._restored is None:
                raise RuntimeError("Nothing to checkpoint yet: the experiment has not initialized.")
            return dict(self._restored)
        self._nonfinite.resolve()
        opt_leaves = jax.tree.leaves(self._opt_state)
        return {
            "params": jax.tree.map(compat.first_local, self._params),
            "opt_state": {f"{i:05d}": compat.first_local(x) for i, x in enumerate(opt_leaves)},
            "data_state": dict(self._data_state or {}),
            "counters": dict(self._counters),
        }

    def restore_from_snapshot(self, snapshot_state: Mapping[str, Any]) -> None:
        """Keeps the snapshot; the (lazy) initialization or the next evaluation consumes it."""
        self._restored = dict(snapshot_state)
        self._params = self._opt_state = None
        self._train_input = None
        self._data_state = snapshot_state.get("data_state")
        self._nonfinite.counters = dict(snapshot_state.get("counters") or self._counters)

    # -- training --------------------------------------------------------------------------------
    def should_run_step(self, global_step: int, config) -> bool:
        """jaxline's loop condition, also false once SIGTERM has asked the run to stop."""
        return (not preemption.STOP_REQUESTED.is_set()
                and super().should_run_step(global_step, config))

    def _initialize_train(self) -> None:
        self._train_input = self._build_train_input()
        params, opt_leaves = self._initial_params()
        opt_state = self._direction.init(params)
        if opt_leaves is not None:
            treedef = jax.tree.structure(opt_state)
            opt_state = jax.tree.unflatten(treedef, [np.asarray(opt_leaves[k])
                                                     for k in sorted(opt_leaves)])
        self._params = self._replicate(params)
        self._opt_state = self._replicate(opt_state)
        self._restored = None

    def _global_sharding(self) -> NamedSharding:
        """training.host_batch: one slice per device on the 1-D mesh of every process's devices
        that the jitted update runs over (gradients averaged over all of them, as pmap does)."""
        if self._sharding is None:
            mesh = Mesh(np.asarray(compat.global_devices()), (_AXIS,))
            self._sharding = NamedSharding(mesh, PartitionSpec(_AXIS))
        return self._sharding

    def _replicate(self, tree):
        """One copy of `tree` per device: per local device for pmap; with training.host_batch
        global arrays over every process's devices, which the jitted update takes and returns."""
        if not self.predictor.host_batch:
            return compat.bcast_local_devices(tree)
        return compat.bcast_global_devices(tree, self._global_sharding())

    def _build_train_input(self):
        """Shuffled epochs of the train split from the saved position: host batches
        [local_devices, per_device_batch, ...] plus their `init_time`s."""
        ar_steps_used = optim.distinct_ar_steps(self.optim_config, self.config.training.run_steps)
        return self.source.train_iterator(
            global_batch_size=self.config.data.global_batch_size,
            state=self._data_state or None, num_steps=1, max_num_steps=max(ar_steps_used))

    def _initial_params(self):
        """(params, optimizer leaves or None): from the checkpoint, a fine-tuning .npz, or init."""
        if self._restored is not None:
            return self._restored["params"], self._restored["opt_state"]
        if self._inputs.init_checkpoint is not None:
            logging.info("Fine-tuning from %s.", self.config.training.init_checkpoint)
            return self._inputs.init_checkpoint.params, None
        example = self.source.example_batch()
        return jax.jit(self.predictor.init)(self._init_rng, example), None

    def _update_fn(self, ar_steps: int):
        """The pmapped loss+grad+AdamW update for one rollout length (compiled on first use);
        with training.host_batch jitted over every process's devices instead (pmap cannot take
        a batch in host memory)."""
        if ar_steps not in self._updates:
            logging.info("Compiling the training step for %d autoregressive step(s).", ar_steps)
            if self.predictor.host_batch:
                self._updates[ar_steps] = gc_update.data_parallel_update(
                    self.predictor, self._direction, _AXIS, compat.global_devices(), ar_steps)
            else:
                update = gc_update.update_fn(self.predictor, self._direction, axis_name=_AXIS)
                self._updates[ar_steps] = jax.pmap(update, axis_name=_AXIS,
                                                   donate_argnums=(0, 1))
        return self._updates[ar_steps]

    def _place_batch(self, batch: dict, ar_steps: int) -> dict:
        """The host batch on the local devices, one slice each. With training.host_batch, this
        process's slices of a global batch over every process's devices, for multi-step
        rollouts in their host memory (each rollout step copies in only the frames it reads)."""
        if not self.predictor.host_batch:
            return compat.shard_local(batch)
        first = ar_steps not in self._batch_shardings
        if first:
            self._batch_shardings[ar_steps] = gc_update.batch_sharding(
                self.predictor, self._global_sharding().mesh, _AXIS, ar_steps)
        placed = compat.shard_global(batch, self._batch_shardings[ar_steps])
        if first:
            sharding = jax.tree.leaves(placed)[0].sharding
            logging.info("Batches of %d-step rollouts: in %s memory of %d devices over %d "
                         "process(es).", ar_steps, sharding.memory_kind, jax.device_count(),
                         jax.process_count())
        return placed

    def _place_lr(self, lr: float):
        """The learning rate, one copy per device, laid out as the update takes it."""
        local = np.full((jax.local_device_count(),), lr, np.float32)
        if not self.predictor.host_batch:
            return local
        return compat.shard_global(local, self._global_sharding())

    def _next_batch(self) -> dict:
        """The next host batch of the train iterator (tests override it to inject faults)."""
        return self._train_input.next()

    def _log_examples(self, step: int, init_times: np.ndarray) -> None:
        """Appends `step init_time...` to training.example_log (audits the data order across
        restarts: a replayed step after a restart repeats its line with the same times)."""
        path = self.config.training.example_log
        if not path or jax.process_index() != 0:
            return
        times = " ".join(str(t) for t in np.asarray(init_times).ravel())
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{step} {times}\n")

    def step(self, *, global_step: jax.Array, rng: jax.Array, writer) -> dict:
        del rng, writer  # GraphCast's training step is deterministic.
        if self._params is None:
            self._initialize_train()
        step = int(compat.first_local(global_step))
        lr, ar_steps = optim.schedule(step, self.optim_config)
        if ar_steps != self._train_input.num_steps:
            logging.info("Step %d: the rollout curriculum now uses %d steps.", step, ar_steps)
            self._train_input.set_num_steps(ar_steps)  # drops prefetched batches of the old length
        batch = self._next_batch()
        self._data_state = self._train_input.state
        init_times = batch.pop("init_time")
        self._log_examples(step, init_times)
        self._params, self._opt_state, scalars = self._update_fn(ar_steps)(
            self._params, self._opt_state, self._place_batch(batch, ar_steps),
            self._place_lr(lr))
        self._nonfinite.record(step, scalars.pop("update_skipped"), init_times)
        rates = self._throughput.step_done(*self._train_input.last_wait)   # the iterator's timing
        return {**compat.device0(scalars), "learning_rate": np.float32(lr),
                "ar_steps": np.int32(ar_steps), **rates,
                "nonfinite_skipped": np.int32(self._counters["nonfinite_skipped"])}

    # -- evaluation ------------------------------------------------------------------------------
    def _eval_params(self):
        """Host params to evaluate: the live training params, or the restored checkpoint's."""
        if self._params is not None:
            return jax.tree.map(compat.first_local, self._params)
        if self._restored is not None:
            return self._restored["params"]
        if self._inputs.init_checkpoint is not None:
            return self._inputs.init_checkpoint.params
        raise RuntimeError("evaluate() has no parameters: no checkpoint was restored in "
                           f"{self.config.get('checkpoint_dir', '?')} and no init_checkpoint is set.")

    def evaluate(self, *, global_step: jax.Array, rng: jax.Array, writer) -> dict:
        del rng
        step = int(compat.first_local(global_step))
        cfg = self.config.eval
        params = compat.bcast_local_devices(self._eval_params())
        if self._predict_fn is None:
            predictor = self.predictor
            self._predict_fn = jax.pmap(lambda p, i, f: predictor.predict(p, i, f), axis_name=_AXIS)

        def predict(batch):
            device_batch = compat.shard_local({"inputs": batch["inputs"],
                                               "forcings": batch["forcings"]})
            return jax.device_get(self._predict_fn(params, device_batch["inputs"],
                                                   device_batch["forcings"]))

        lead_hours = [TIME_STEP_HOURS * (k + 1) for k in range(cfg.rollout_steps)]
        began = time.perf_counter()
        batches = self.source.eval_batches(
            batch_size=cfg.batch_size or self.config.data.global_batch_size,
            num_steps=cfg.rollout_steps, num_batches=cfg.num_batches)
        accumulator, first = evaluation.verify_forecasts(
            predict, batches, self.source.lat, self.task_config.pressure_levels, lead_hours,
            self._inputs.climatology)
        metrics = accumulator.result()
        headline_hours = TIME_STEP_HOURS * cfg.headline_lead_step
        scalars = {**metrics, **evaluation.headline(metrics, headline_hours),
                   "skill_mean": evaluation.mean_skill(metrics),
                   "eval_examples": accumulator.num_examples,
                   "eval_seconds": time.perf_counter() - began}
        if jax.process_index() == 0:
            if first is not None:
                evaluation.write_figure(
                    first, self.source.lat, self.source.lon, self.task_config.pressure_levels,
                    min(cfg.figure_lead_step, cfg.rollout_steps) - 1, step,
                    os.path.join(self.config.training.logdir or "runs/tb", "eval_figures"), writer)
            print(evaluation.summary_table(metrics, step, lead_hours), flush=True)
        return scalars


# -- command line ------------------------------------------------------------------------------

_CONFIG = config_flags.DEFINE_config_file("config", "configs/sample.py", "Experiment config file.")
_MODE = flags.DEFINE_enum("jaxline_mode", "train",
                          ["train", "eval", "train_eval_multithreaded", "export"], "What to run.")
_EXPORT_PATH = flags.DEFINE_string("export_path", "", "export: output .npz (official format).")
_EXPORT_STEP = flags.DEFINE_integer("export_step", None, "export: checkpoint step (default newest).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "Multi-process: host:port of process 0 (with --num_processes and "
    "--process_id); 'auto' lets JAX detect SLURM/Open MPI/cloud TPU environments.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
_BIND_ADDRESS = flags.DEFINE_string("coordinator_bind_address", None,
                                    "Multi-process: address the coordinator listens on.")
_LOCAL_DEVICES = flags.DEFINE_integer("cpu_devices", None,
                                      "CPU only: number of host devices to simulate (tests).")


def main(argv) -> None:
    del argv
    logging_setup.install(flags.FLAGS["verbosity"].value)
    config = _CONFIG.value
    launch.apply_memory_settings(config.experiment_kwargs.config.memory)  # before JAX's backend
    launch.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  _BIND_ADDRESS.value, _LOCAL_DEVICES.value)
    launch.main(config, _MODE.value, Experiment, _EXPORT_PATH.value, _EXPORT_STEP.value)


if __name__ == "__main__":
    app.run(main, flags_parser=launch.parse_flags)
