"""GraphCast training with jaxline: pmapped AdamW steps, rollout curriculum, evaluation, checkpoints.

  python experiment.py --config=configs/sample.py                       # demo, minutes on a CPU
  python experiment.py --config=configs/era5_1deg.py --jaxline_mode=train
  python experiment.py --config=configs/era5_1deg.py --jaxline_mode=eval   # separate eval job
  python experiment.py --config=<cfg> --jaxline_mode=export --export_path=model.npz [--export_step=N]

Modes: `train` (with in-process evaluation every `eval.interval_steps` and after the last step),
`eval` (watches the checkpoint directory, evaluates each new checkpoint, keeps a "best" series),
`train_eval_multithreaded` (both in one process), `export` (official GraphCast .npz).
Training resumes automatically from the newest checkpoint in `config.checkpoint_dir`.
No TensorFlow: jaxline.train is driven directly (jaxline.platform imports TensorFlow).

However a run ends, pending checkpoint saves finish before the process exits, and the error shown
is the one that ended it. SIGTERM (preemption) saves a checkpoint at the current step, then exits
with status 143. User errors print one line and exit with their kind's status
(graphcast.exit_status); bugs keep their traceback.
"""

import concurrent.futures
import logging as std_logging
import os
import signal
import sys
import threading
import time
from typing import Any, Mapping, Optional

from absl import app, flags, logging
from ml_collections import config_flags

import jax
import numpy as np

from jaxline import base_config as jl_base_config
from jaxline import experiment as jl_experiment
from jaxline import train as jl_train
from jaxline import utils as jl_utils

from data import validate
from graphcast import checkpoint as gc_checkpoint
from graphcast import config as gc_config
from graphcast import exit_status
from graphcast import memory
from graphcast import normalization
from graphcast import rollout
from graphcast import update as gc_update
from training import checkpointer as ckpt_lib
from training import compat
from training import data_input
from training import evaluation
from training import optim
from training import preflight
from training import run_lock
from training import writer as writer_lib

_AXIS = "devices"
EXIT_CHECKPOINT_TIMEOUT = exit_status.SAVE_TIMEOUT  # process exit status when a save is stuck
_LICENSE = ("Parameters trained with graphcast-trainer; the GraphCast architecture is DeepMind's "
            "(Lam et al. 2023). Check the license of the training data before redistribution.")


def model_config_from(cfg) -> gc_config.ModelConfig:
    """ModelConfig from the config's `model` section (all fields, names as in the dataclass)."""
    return gc_config.ModelConfig(**dict(cfg.model))


def task_config_from(cfg) -> gc_config.TaskConfig:
    """TaskConfig from the config's `task` section."""
    return gc_config.TaskConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                                   for k, v in dict(cfg.task).items()})


def _shard0(x):
    """The first local device's value of a per-device array [devices, ...] (stays on device)."""
    if isinstance(x, jax.Array):
        return x.addressable_data(0).reshape(x.shape[1:])  # works across processes too
    return np.asarray(x)[0]


def _first_local(x) -> np.ndarray:
    """Host copy of the first local device's value of a per-device array."""
    return np.asarray(_shard0(x))


def _device0(tree):
    """First-device values of per-device scalars (what jaxline logs), without a host sync."""
    return jax.tree.map(_shard0, tree)


class NonFiniteError(FloatingPointError):
    """Too many consecutive training steps had a NaN/Inf loss or gradient."""


class Terminated(Exception):
    """SIGTERM ended the run (after the checkpoint at the current step was saved)."""


# Set by the SIGTERM handler: the training loop stops after the current step.
_STOP_REQUESTED = threading.Event()


class Experiment(jl_experiment.AbstractExperiment):
    """GraphCast data-parallel training (pmap over all devices of all hosts) and evaluation."""

    # Replicated over local devices (one copy per device on the leading axis).
    CHECKPOINT_ATTRS = {"_params": "params", "_opt_state": "opt_state"}
    # Host values: data iterator position and failure counters.
    NON_BROADCAST_CHECKPOINT_ATTRS = {"_data_state": "data_state", "_counters": "counters"}

    def __init__(self, mode: str, init_rng: Optional[jax.Array] = None, config=None):
        super().__init__(mode=mode, init_rng=init_rng)
        if config is None:
            raise ValueError("Experiment needs experiment_kwargs.config.")
        self.mode = mode
        self.config = config
        self._init_rng = init_rng if init_rng is not None else jax.random.PRNGKey(0)
        self.model_config = model_config_from(config)
        self.task_config = task_config_from(config)
        self.optim_config = optim.OptimConfig.from_mapping(dict(config.optimizer))
        self._direction = optim.make_direction(self.optim_config)
        self._params = None          # replicated [local_devices, ...] haiku params
        self._opt_state = None       # replicated optimizer state
        self._restored = None        # snapshot restored before the lazy initialization
        self._data_state = None
        self._counters = {"nonfinite_skipped": 0, "consecutive_nonfinite": 0}
        self._bad_steps = []         # steps of the current run of skipped updates (this process)
        self._source = None
        self._predictor = None
        self._train_input = None
        self._updates = {}           # ar_steps -> pmapped update (one compile per rollout length)
        self._predict_fn = None
        self._pending = None         # (step, skipped flag on device, init times) of the last step
        self._last_step_end = None
        self._examples_per_sec = None

    # -- shared pieces -------------------------------------------------------------------------
    @property
    def source(self) -> data_input.Source:
        if self._source is None:
            self._source = data_input.Source(self.config.data, self.task_config,
                                             self.model_config.resolution)
        return self._source

    @property
    def predictor(self) -> rollout.Predictor:
        if self._predictor is None:
            data = self.config.data
            stats = normalization.load_stats(data.stats_dir, self.task_config,
                                             data_input.storage_options(data, data.stats_dir))
            training = self.config.training
            self._predictor = rollout.Predictor(
                self.model_config, self.task_config, stats, self.source.lat, self.source.lon,
                bf16=training.bf16, remat_steps=training.remat_steps,
                offload_windows=training.offload_windows,
                remat_blocks=training.remat_blocks, block_size=training.block_size or None,
                graph_cache_dir=self.config.data.graph_cache_dir or None)
        return self._predictor

    # -- checkpointing (jaxline calls these) ---------------------------------------------------
    def snapshot_state(self) -> Mapping[str, Any]:
        """Host copies of params, optimizer state leaves, data position and counters."""
        if self._params is None:
            if self._restored is None:
                raise RuntimeError("Nothing to checkpoint yet: the experiment has not initialized.")
            return dict(self._restored)
        self._resolve_pending()
        opt_leaves = jax.tree.leaves(self._opt_state)
        return {
            "params": jax.tree.map(_first_local, self._params),
            "opt_state": {f"{i:05d}": _first_local(x) for i, x in enumerate(opt_leaves)},
            "data_state": dict(self._data_state or {}),
            "counters": dict(self._counters),
        }

    def restore_from_snapshot(self, snapshot_state: Mapping[str, Any]) -> None:
        """Keeps the snapshot; the (lazy) initialization or the next evaluation consumes it."""
        self._restored = dict(snapshot_state)
        self._params = self._opt_state = None
        self._train_input = None
        self._data_state = snapshot_state.get("data_state")
        self._counters = dict(snapshot_state.get("counters") or self._counters)

    # -- training --------------------------------------------------------------------------------
    def should_run_step(self, global_step: int, config) -> bool:
        """jaxline's loop condition, also false once SIGTERM has asked the run to stop."""
        return not _STOP_REQUESTED.is_set() and super().should_run_step(global_step, config)

    def _initialize_train(self) -> None:
        data = self.config.data
        self._train_input = self.source.train_iterator(
            global_batch_size=data.global_batch_size, state=self._data_state or None,
            num_steps=1, max_num_steps=max(self._ar_steps_used()))
        params, opt_leaves = self._initial_params()
        opt_state = self._direction.init(params)
        if opt_leaves is not None:
            treedef = jax.tree.structure(opt_state)
            opt_state = jax.tree.unflatten(treedef, [np.asarray(opt_leaves[k])
                                                     for k in sorted(opt_leaves)])
        self._params = compat.bcast_local_devices(params)
        self._opt_state = compat.bcast_local_devices(opt_state)
        self._restored = None

    def _ar_steps_used(self) -> list:
        """Rollout lengths this run will train with (fixes the data's valid initial times)."""
        return optim.distinct_ar_steps(self.optim_config, self.config.training.run_steps)

    def _initial_params(self):
        """(params, optimizer leaves or None): from the checkpoint, a fine-tuning .npz, or init."""
        if self._restored is not None:
            return self._restored["params"], self._restored["opt_state"]
        path = self.config.training.init_checkpoint
        if path:
            ckpt = gc_checkpoint.load(path, data_input.storage_options(self.config.data, path))
            gc_checkpoint.check_matches(ckpt, self.model_config, self.task_config, source=path)
            gc_checkpoint.check_grid(ckpt, self.source.lat, source=self.config.data.source)
            logging.info("Fine-tuning from %s.", path)
            return ckpt.params, None
        example = self.source.example_batch()
        return jax.jit(self.predictor.init)(self._init_rng, example), None

    def _update_fn(self, ar_steps: int):
        """The pmapped loss+grad+AdamW update for one rollout length (compiled on first use)."""
        if ar_steps in self._updates:
            return self._updates[ar_steps]
        logging.info("Compiling the training step for %d autoregressive step(s).", ar_steps)
        update = gc_update.update_fn(self.predictor, self._direction, axis_name=_AXIS)
        self._updates[ar_steps] = jax.pmap(update, axis_name=_AXIS, donate_argnums=(0, 1))
        return self._updates[ar_steps]

    def _resolve_pending(self) -> None:
        """Counts the previous step's skipped update (read one step late to avoid a host sync)."""
        if self._pending is None:
            return
        step, skipped, init_times = self._pending
        self._pending = None
        if not int(_first_local(skipped)):
            self._counters["consecutive_nonfinite"] = 0
            self._bad_steps = []
            return
        self._counters["nonfinite_skipped"] += 1
        self._counters["consecutive_nonfinite"] += 1
        self._bad_steps.append(step)
        logging.warning("Step %d: non-finite loss or gradient; update skipped (batch init times %s).",
                        step, init_times)
        limit = self.config.training.max_consecutive_nonfinite
        if limit and self._counters["consecutive_nonfinite"] >= limit:
            raise NonFiniteError(
                f"{self._counters['consecutive_nonfinite']} consecutive steps (steps "
                f"{self._bad_steps}) had a non-finite loss or gradient (last batch init times "
                f"{init_times}); stopping (training.max_consecutive_nonfinite={limit}). Check the "
                "data for NaNs or lower the learning rate.")

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
        step = int(_first_local(global_step))
        lr, ar_steps = optim.schedule(step, self.optim_config)
        if ar_steps != self._train_input.num_steps:
            logging.info("Step %d: the rollout curriculum now uses %d steps.", step, ar_steps)
            self._train_input.set_num_steps(ar_steps)  # drops prefetched batches of the old length
        began = time.perf_counter()
        batch = self._next_batch()
        data_wait = time.perf_counter() - began
        self._data_state = self._train_input.state
        init_times = batch.pop("init_time")
        self._log_examples(step, init_times)
        n_local = jax.local_device_count()
        update = self._update_fn(ar_steps)
        self._params, self._opt_state, scalars = update(
            self._params, self._opt_state, compat.shard_local(batch),
            np.full((n_local,), lr, np.float32))
        self._resolve_pending()
        self._pending = (step, scalars.pop("update_skipped"), np.asarray(init_times).ravel()[:4])

        now = time.perf_counter()
        interval = now - self._last_step_end if self._last_step_end else None
        self._last_step_end = now
        if interval:
            rate = self.config.data.global_batch_size / interval
            self._examples_per_sec = rate if self._examples_per_sec is None else \
                0.9 * self._examples_per_sec + 0.1 * rate
        return {**_device0(scalars), "learning_rate": np.float32(lr),
                "ar_steps": np.int32(ar_steps),
                "examples_per_sec": np.float32(self._examples_per_sec or 0.0),
                "data_wait_fraction": np.float32(min(data_wait / interval, 1.0) if interval else 0.0),
                "nonfinite_skipped": np.int32(self._counters["nonfinite_skipped"])}

    # -- evaluation ------------------------------------------------------------------------------
    def _eval_params(self):
        """Host params to evaluate: the live training params, or the restored checkpoint's."""
        if self._params is not None:
            return jax.tree.map(_first_local, self._params)
        if self._restored is not None:
            return self._restored["params"]
        path = self.config.training.init_checkpoint
        if path:
            ckpt = gc_checkpoint.load(path, data_input.storage_options(self.config.data, path))
            gc_checkpoint.check_matches(ckpt, self.model_config, self.task_config, source=path)
            return ckpt.params
        raise RuntimeError("evaluate() has no parameters: no checkpoint was restored in "
                           f"{self.config.get('checkpoint_dir', '?')} and no init_checkpoint is set.")

    def evaluate(self, *, global_step: jax.Array, rng: jax.Array, writer) -> dict:
        del rng
        step = int(_first_local(global_step))
        cfg = self.config.eval
        params = compat.bcast_local_devices(self._eval_params())
        if self._predict_fn is None:
            predictor = self.predictor
            self._predict_fn = jax.pmap(lambda p, i, f: predictor.predict(p, i, f), axis_name=_AXIS)
        lead_hours = [6 * (k + 1) for k in range(cfg.rollout_steps)]
        accumulator = evaluation.MetricsAccumulator(self.source.lat, self.task_config.pressure_levels,
                                                    lead_hours)
        climatology = evaluation.Climatology(
            cfg.climatology, self.task_config, self.source.lat, self.source.lon,
            dict(self.config.data.storage_options or {}) or None) if cfg.climatology else None
        first = None
        began = time.perf_counter()
        for batch in self.source.eval_batches(batch_size=cfg.batch_size or
                                              self.config.data.global_batch_size,
                                              num_steps=cfg.rollout_steps,
                                              num_batches=cfg.num_batches):
            init_times = batch.pop("init_time")
            device_batch = compat.shard_local({"inputs": batch["inputs"],
                                               "forcings": batch["forcings"]})
            predictions = jax.device_get(self._predict_fn(params, device_batch["inputs"],
                                                          device_batch["forcings"]))
            flat = lambda tree: {k: np.reshape(v, (-1,) + v.shape[2:]) for k, v in tree.items()}
            preds, targets, inputs = flat(predictions), flat(batch["targets"]), flat(batch["inputs"])
            last_inputs = {k: v[:, -1] for k, v in inputs.items() if k in targets}
            clim = climatology.at(np.ravel(init_times), lead_hours) if climatology else None
            accumulator.add(preds, targets, last_inputs, clim)
            if first is None:
                first = (preds, targets)
        metrics = evaluation.allreduce(accumulator).result()
        seconds = time.perf_counter() - began
        headline_lead = 6 * cfg.headline_lead_step
        scalars = {**metrics, **evaluation.headline(metrics, headline_lead),
                   "skill_mean": evaluation.mean_skill(metrics),
                   "eval_examples": accumulator.num_examples, "eval_seconds": seconds}
        if jax.process_index() == 0:
            self._write_figure(step, first, writer)
            print(evaluation.summary_table(metrics, step, lead_hours), flush=True)
        return scalars

    def _write_figure(self, step: int, first, writer) -> None:
        cfg = self.config.eval
        if first is None:
            return
        lead_index = min(cfg.figure_lead_step, cfg.rollout_steps) - 1
        png = evaluation.forecast_figure(
            first[0], first[1], self.source.lat, self.source.lon, self.task_config.pressure_levels,
            lead_index, 6 * (lead_index + 1), title=f"step {step}")
        out_dir = os.path.join(self.config.training.logdir or "runs/tb", "eval_figures")
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"step_{step:08d}.png")
        with open(path, "wb") as f:
            f.write(png)
        logging.info("Wrote %s.", path)
        if writer is not None and hasattr(writer, "write_images"):
            writer.write_images(step, {"forecast": evaluation.png_to_array(png)})


# -- driver ------------------------------------------------------------------------------------

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


def apply_memory_settings(memory) -> None:
    """XLA client allocator environment; effective only before JAX's backend starts."""
    if memory.allocator:
        os.environ["XLA_PYTHON_CLIENT_ALLOCATOR"] = memory.allocator
    if memory.mem_fraction:
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(memory.mem_fraction)
    if not memory.preallocate:
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"


def initialize_distributed() -> None:
    """jax.distributed.initialize from the flags (explicit) or the environment ('auto')."""
    if _LOCAL_DEVICES.value:
        jax.config.update("jax_num_cpu_devices", _LOCAL_DEVICES.value)
    if _COORDINATOR.value == "auto":
        jax.distributed.initialize()
    elif _COORDINATOR.value:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value, coordinator_bind_address=_BIND_ADDRESS.value,
            initialization_timeout=120)
    logging.info("Process %d of %d; %d local / %d global devices.", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def default_logdir(config) -> str:
    """TensorBoard folder: training.logdir, else <checkpoint_dir>/tb (runs/tb for gs:// runs)."""
    exp = config.experiment_kwargs.config
    if exp.training.logdir:
        return exp.training.logdir
    if "://" in config.checkpoint_dir:
        return os.path.join("runs", "tb", os.path.basename(config.checkpoint_dir.rstrip("/")))
    return os.path.join(config.checkpoint_dir, "tb")


def export_description(config, step: int) -> str:
    """The exported file's description (credentials redacted from every value it quotes)."""
    return preflight.redact(
        f"GraphCast trained with graphcast-trainer: {config.checkpoint_dir} step {step}, data "
        f"{config.experiment_kwargs.config.data.source}.")


def check_param_shapes(params, model_config: gc_config.ModelConfig,
                       task_config: gc_config.TaskConfig, source: str) -> None:
    """The parameters have exactly the paths and shapes the config's model initializes."""
    n_lat = int(round(180.0 / model_config.resolution))
    lat = np.linspace(-90.0, 90.0, n_lat + 1)
    lon = np.arange(int(round(360.0 / model_config.resolution))) * model_config.resolution
    predictor = rollout.Predictor(model_config, task_config, memory.unit_stats(task_config),
                                  lat, lon)
    expected = jax.eval_shape(predictor.init, jax.random.PRNGKey(0),
                              memory.batch_shapes(task_config, 1, 1, lat.size, lon.size))
    shapes = lambda tree: {f"{m}/{n}": tuple(np.shape(v)) for m, p in tree.items()
                           for n, v in p.items()}
    want, have = shapes(expected), shapes(params)
    diffs = [f"{k}: checkpoint {have.get(k)}, config {want.get(k)}"
             for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
    if diffs:
        found, wanted = _size_fields(params), _size_fields(expected)
        fields = [f"model.{k}: parameters have {found[k]}, config has {wanted[k]}"
                  for k in wanted if found.get(k) != wanted[k]] or ["task or grid"]
        raise ckpt_lib.ConfigMismatchError(
            f"The parameters of {source} do not have the shapes of the configured model "
            f"({'; '.join(fields)}): {len(diffs)} arrays differ, e.g. {'; '.join(diffs[:3])}.")


def _size_fields(params) -> dict:
    """latent_size, gnn_msg_steps and hidden_layers as the parameter tree shows them (haiku
    module names of the GraphCast networks)."""
    latent = [np.shape(p["offset"])[0] for m, p in params.items()
              if m.endswith("encoder_edges_grid2mesh_layer_norm")]
    rounds = {m.split("processor_edges_", 1)[1].split("_", 1)[0] for m in params
              if m.startswith("mesh_gnn/") and "processor_edges_" in m}
    layers = [m for m in params if "encoder_edges_grid2mesh_mlp/" in m]
    return {"latent_size": latent[0] if latent else None, "gnn_msg_steps": len(rounds),
            "hidden_layers": len(layers) - 1}


def export(config, path: str, step: Optional[int]) -> str:
    """Writes checkpoint `step` (default newest) as an official GraphCast .npz; returns a summary.

    Refuses (named errors, before writing) an unwritable export path, non-finite parameters, and
    parameters whose recorded config or shapes do not match the config's model and task."""
    if not path:
        raise preflight.ConfigError("--jaxline_mode=export needs --export_path=MODEL.npz.")
    check_before_start(config, "export", export_path=path)
    exp = config.experiment_kwargs.config
    checkpointer = ckpt_lib.Checkpointer(config, "export")
    arrays, meta = checkpointer.read("latest", step)
    where = f"checkpoint {checkpointer.directory('latest')}/{meta['step']}"
    ckpt_lib.check_same_model(meta.get("config", "{}"), ckpt_lib.config_json(config), where)
    ckpt = gc_checkpoint.CheckPoint(
        params=arrays["experiment/params"], model_config=model_config_from(exp),
        task_config=task_config_from(exp), description=export_description(config, meta["step"]),
        license=_LICENSE)
    gc_checkpoint.check_finite(ckpt, source=where)
    check_param_shapes(ckpt.params, ckpt.model_config, ckpt.task_config, where)
    gc_checkpoint.save(path, ckpt, data_input.storage_options(exp.data, path))
    return f"Exported step {meta['step']} ({len(jax.tree.leaves(ckpt.params))} arrays) to {path}."


def _eval_action(checkpointer, config, writer) -> jl_utils.PeriodicAction:
    """In-process evaluation of the live parameters every eval.interval_steps and at the end."""
    exp_cfg = config.experiment_kwargs.config.eval
    state = checkpointer.get_experiment_state("latest")

    def evaluate_now(step, _):
        # Save first: an evaluation that fails must not lose the steps since the last save
        # (at the end, jaxline's own final save would come only after this evaluation).
        checkpointer.save("latest")
        scalars = state.experiment_module.evaluate(global_step=np.array([step]), rng=None,
                                                   writer=writer)
        writer.write_scalars(step, scalars)

    return jl_utils.PeriodicAction(
        evaluate_now, interval_type="steps", interval=exp_cfg.interval_steps or 10 ** 15,
        run_async=False, end_step_to_action=config.training_steps if exp_cfg.at_end else None)


def check_before_start(config, mode: str = "train", export_path: str = "") -> None:
    """training.preflight's checks for `mode`, named errors before any compile or write: the
    config (every mode); data, statistics, climatology and fine-tuning checkpoint (train, eval);
    output locations: the checkpoint directory (train) or the export path (export)."""
    preflight.check_config(config, "train" if mode == "train_eval_multithreaded" else mode)
    exp = config.experiment_kwargs.config
    model_config, task_config = model_config_from(exp), task_config_from(exp)
    if mode != "export":
        for line in data_input.input_summary(config):
            logging.info(line)
        data_input.ensure_sample_data(exp.data, exp.eval.climatology)
        optim_config = optim.OptimConfig.from_mapping(dict(exp.optimizer))
        trains = mode in ("train", "train_eval_multithreaded")
        ar_steps = max(optim.distinct_ar_steps(optim_config, exp.training.run_steps)) \
            if trains else 0
        source = data_input.Source(exp.data, task_config, model_config.resolution)
        eval_cfg = exp.eval
        with_eval = mode != "train" or bool(eval_cfg.at_end or eval_cfg.interval_steps)
        preflight.check_inputs(config, model_config, task_config, ar_steps, source, with_eval)
    if mode in ("train", "train_eval_multithreaded") and jax.process_index() == 0:
        preflight.check_writable(config.checkpoint_dir, "config.checkpoint_dir",
                                 storage_options=dict(exp.data.storage_options or {}) or None)
    checkpoint_dir = str(config.checkpoint_dir)
    if mode == "eval" and jax.process_index() == 0 and ("://" in checkpoint_dir
                                                         or os.path.isdir(checkpoint_dir)):
        # The eval job writes best/ there; a directory that is not there yet is waited for.
        preflight.check_writable(checkpoint_dir, "config.checkpoint_dir (eval writes best/ there)",
                                 create=False,
                                 storage_options=dict(exp.data.storage_options or {}) or None)
    if mode == "export":
        preflight.check_writable(os.path.dirname(os.path.abspath(export_path)) if "://" not in
                                 export_path else export_path.rsplit("/", 1)[0],
                                 f"the directory of --export_path={export_path}", create=False)


def _finish_saves(checkpointer) -> None:
    """Waits for the pending saves; while another error propagates, a failure here is logged
    instead of hiding it."""
    if sys.exc_info()[0] is None:
        checkpointer.close()
        return
    try:
        checkpointer.close()
    except Exception:  # noqa: BLE001 -- the error that ended the run is the one to show
        logging.exception("While stopping after an error, a pending checkpoint save failed too:")


def _on_sigterm(grace_s: float):
    """SIGTERM handler: stop after the current step (the checkpoint at that step is saved at the
    end of training); past `grace_s` s the process exits regardless, keeping the previous one."""
    def handler(signum, frame):
        del signum, frame
        if _STOP_REQUESTED.is_set():
            return
        _STOP_REQUESTED.set()
        logging.warning("SIGTERM: saving a checkpoint at the current step, then exiting "
                        "(at most training.sigterm_grace_s=%g s).", grace_s)

        def give_up():
            logging.error("SIGTERM: the checkpoint was not saved within %g s; exiting without it "
                          "(the previous checkpoint stays the newest).", grace_s)
            logging.flush()
            os._exit(exit_status.TERMINATED)

        timer = threading.Timer(grace_s, give_up)
        timer.daemon = True
        timer.start()
    return handler


def _train(config, make_writer) -> None:
    """jaxline training under the directory's run lock; pending saves finish however it ends."""
    exp = config.experiment_kwargs.config
    checkpointer = ckpt_lib.Checkpointer(config, "train")
    lock = None
    if jax.process_index() == 0:
        lock = run_lock.RunLock(config.checkpoint_dir, stale_after_s=exp.training.lock_stale_s,
                                storage_options=dict(exp.data.storage_options or {}) or None)
        lock.acquire()
        checkpointer.run_lock = lock
    _STOP_REQUESTED.clear()
    previous = signal.signal(signal.SIGTERM, _on_sigterm(exp.training.sigterm_grace_s)) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        actions = (_eval_action(checkpointer, config, make_writer("eval")),)
        jl_train.train(Experiment, config, checkpointer, make_writer("train"),
                       periodic_actions=actions)
    finally:
        _finish_saves(checkpointer)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if lock is not None:
            lock.release()
    if _STOP_REQUESTED.is_set():
        step = checkpointer.get_experiment_state("latest").global_step  # jaxline's final save
        raise Terminated(f"Stopped by SIGTERM; saved checkpoint step {step} in "
                         f"{checkpointer.directory('latest')}. Rerun the same command to resume.")


def run(config, mode: str) -> None:
    """Runs one jaxline mode with the persistent checkpointer and the TensorBoard writer."""
    jl_base_config.validate_config(config)
    exp = config.experiment_kwargs.config
    check_before_start(config, mode)
    with config.unlocked():
        exp.training.logdir = default_logdir(config)
    chief = jax.process_index() == 0
    total = config.training_steps

    def make_writer(prefix):
        return writer_lib.Writer(exp.training.logdir, prefix=prefix, total_steps=total,
                                 console=chief)

    if mode == "train":
        _train(config, make_writer)
    elif mode == "eval":
        checkpointer = ckpt_lib.Checkpointer(config, mode)
        try:
            jl_train.evaluate(Experiment, config, checkpointer, make_writer("eval"),
                              jaxline_mode="eval")
        finally:
            _finish_saves(checkpointer)  # finishes the async "best" save before the process exits
    elif mode == "train_eval_multithreaded":
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            training = pool.submit(_train, config, make_writer)
            jl_train.evaluate(Experiment, config, ckpt_lib.Checkpointer(config, "eval"),
                              make_writer("eval"), jaxline_mode="eval")
            training.result()
    else:
        raise ValueError(f"Unknown --jaxline_mode {mode!r}.")


class _OwnInfoOnly(std_logging.Filter):
    """Keeps the console readable: libraries' INFO lines (orbax, jaxline's config dump)
    show only with --verbosity=1; our own INFO lines and every warning always show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "site-packages" not in record.pathname


class _Redacting(std_logging.Filter):
    """Removes credentials (URL user:password@, token/key/signature query values) from every
    log line, whoever logs it (jaxline logs the whole config)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = preflight.redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


# User errors: one line and a distinct exit status (first match wins); anything else is a bug.
USER_ERRORS = (
    (preflight.ConfigError, exit_status.CONFIG),
    (gc_config.TaskConfigError, exit_status.CONFIG),
    (preflight.LocationError, exit_status.LOCATION),
    (normalization.StatsError, exit_status.STATS),
    (validate.DataValidationError, exit_status.DATA),
    (gc_checkpoint.CheckpointError, exit_status.CHECKPOINT),
    (ckpt_lib.CheckpointRestoreError, exit_status.CHECKPOINT),
    (ckpt_lib.NonFiniteCheckpointError, exit_status.CHECKPOINT),
    (run_lock.RunLockedError, exit_status.LOCKED),
    (NonFiniteError, exit_status.DIVERGED),
    (Terminated, exit_status.TERMINATED),
    (KeyboardInterrupt, exit_status.INTERRUPTED),
)


def parse_flags(argv):
    """absl flag parsing; a bad flag or an unknown --config.<field> is a one-line user error."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        exit_status.report(preflight.ConfigError(str(e)), exit_status.CONFIG, preflight.redact)
    except (AttributeError, KeyError) as e:  # ml_collections: an override of an unknown field
        key = str(e).strip("\"'")
        named = [a.split("=", 1)[0] for a in argv if a.startswith("--config.") and
                 f".{key}" in a.split("=", 1)[0]]
        exit_status.report(preflight.ConfigError(
            f"Unknown config field {named[0] if named else key!r} on the command line; the "
            "fields and their defaults are in configs/base.py."), exit_status.CONFIG,
            preflight.redact)


def main(argv) -> None:
    del argv
    logging.get_absl_handler().addFilter(_Redacting())
    if flags.FLAGS["verbosity"].value < 1:
        logging.get_absl_handler().addFilter(_OwnInfoOnly())
    config = _CONFIG.value
    apply_memory_settings(config.experiment_kwargs.config.memory)  # before JAX's backend starts
    initialize_distributed()
    compat.apply()
    if _MODE.value == "export":
        message = exit_status.run_reporting(
            lambda: export(config, _EXPORT_PATH.value, _EXPORT_STEP.value), USER_ERRORS,
            preflight.redact)
        print(message, flush=True)
        return
    try:
        exit_status.run_reporting(lambda: run(config, _MODE.value), USER_ERRORS, preflight.redact)
    except ckpt_lib.CheckpointTimeoutError:
        # The stuck save's writer threads are not daemons: a normal exit would wait for them
        # forever. The error is reported, then the process ends here.
        logging.exception("Stopping the run: a checkpoint save is stuck.")
        logging.flush()
        os._exit(EXIT_CHECKPOINT_TIMEOUT)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
