"""Running experiment.py's modes: train (with in-process evaluation), eval (watches the
checkpoint directory, keeps a "best" series), train_eval_multithreaded (both), export.

No TensorFlow: jaxline.train is driven directly (jaxline.platform imports TensorFlow). However a
run ends, pending checkpoint saves finish before the process exits, and the error shown is the
one that ended it. User errors print one line and exit with their kind's status
(graphcast.exit_status); bugs keep their traceback.
"""

import concurrent.futures
import functools
import os
import signal
import sys
import threading
from typing import Optional

import jax
import numpy as np
from absl import flags, logging

from jaxline import base_config as jl_base_config
from jaxline import train as jl_train
from jaxline import utils as jl_utils

from data import validate
from graphcast import checkpoint as gc_checkpoint
from graphcast import config as gc_config
from graphcast import exit_status
from graphcast import normalization
from training import checkpointer as ckpt_lib
from training import compat
from training import export as export_lib
from training import nonfinite
from training import preemption
from training import preflight
from training import run_lock
from training import writer as writer_lib

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
    (nonfinite.NonFiniteError, exit_status.DIVERGED),
    (preemption.Terminated, exit_status.TERMINATED),
    (KeyboardInterrupt, exit_status.INTERRUPTED),
)


def apply_memory_settings(memory) -> None:
    """XLA client allocator environment; effective only before JAX's backend starts."""
    if memory.allocator:
        os.environ["XLA_PYTHON_CLIENT_ALLOCATOR"] = memory.allocator
    if memory.mem_fraction:
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(memory.mem_fraction)
    if not memory.preallocate:
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"


def initialize_distributed(coordinator: str = "", num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, bind_address: Optional[str] = None,
                           cpu_devices: Optional[int] = None) -> None:
    """jax.distributed.initialize from explicit values, or from the environment when
    `coordinator` is 'auto' (SLURM, Open MPI, cloud TPU); `cpu_devices` simulates host devices."""
    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    if coordinator == "auto":
        jax.distributed.initialize()
    elif coordinator:
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes,
            process_id=process_id, coordinator_bind_address=bind_address,
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


def _train(config, experiment_class, make_writer) -> None:
    """jaxline training under the directory's run lock; pending saves finish however it ends."""
    exp = config.experiment_kwargs.config
    checkpointer = ckpt_lib.Checkpointer(config, "train")
    lock = None
    if jax.process_index() == 0:
        lock = run_lock.RunLock(config.checkpoint_dir, stale_after_s=exp.training.lock_stale_s,
                                storage_options=dict(exp.data.storage_options or {}) or None)
        lock.acquire()
        checkpointer.run_lock = lock
    preemption.STOP_REQUESTED.clear()
    previous = signal.signal(signal.SIGTERM, preemption.on_sigterm(exp.training.sigterm_grace_s)) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        actions = (_eval_action(checkpointer, config, make_writer("eval")),)
        jl_train.train(experiment_class, config, checkpointer, make_writer("train"),
                       periodic_actions=actions)
    finally:
        _finish_saves(checkpointer)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if lock is not None:
            lock.release()
    if preemption.STOP_REQUESTED.is_set():
        step = checkpointer.get_experiment_state("latest").global_step  # jaxline's final save
        raise preemption.Terminated(
            f"Stopped by SIGTERM; saved checkpoint step {step} in "
            f"{checkpointer.directory('latest')}. Rerun the same command to resume.")


def run(config, mode: str, experiment_class) -> None:
    """Runs one jaxline mode of `experiment_class` with the persistent checkpointer and the
    TensorBoard writer. jaxline builds the Experiment as `(mode, init_rng=..., config=...)`;
    `inputs=`, what the up-front checks opened, is added here so that every Experiment of the
    run reuses it instead of opening the data, statistics and climatology again."""
    jl_base_config.validate_config(config)
    exp = config.experiment_kwargs.config
    inputs = preflight.check_before_start(config, mode)
    experiment_class = functools.partial(experiment_class, inputs=inputs)
    with config.unlocked():
        exp.training.logdir = default_logdir(config)
    chief = jax.process_index() == 0
    total = config.training_steps

    def make_writer(prefix):
        return writer_lib.Writer(exp.training.logdir, prefix=prefix, total_steps=total,
                                 console=chief)

    if mode == "train":
        _train(config, experiment_class, make_writer)
    elif mode == "eval":
        checkpointer = ckpt_lib.Checkpointer(config, mode)
        try:
            jl_train.evaluate(experiment_class, config, checkpointer, make_writer("eval"),
                              jaxline_mode="eval")
        finally:
            _finish_saves(checkpointer)  # finishes the async "best" save before the process exits
    elif mode == "train_eval_multithreaded":
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            training = pool.submit(_train, config, experiment_class, make_writer)
            jl_train.evaluate(experiment_class, config, ckpt_lib.Checkpointer(config, "eval"),
                              make_writer("eval"), jaxline_mode="eval")
            training.result()
    else:
        raise ValueError(f"Unknown --jaxline_mode {mode!r}.")


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


def main(config, mode: str, experiment_class, export_path: str = "",
         export_step: Optional[int] = None) -> None:
    """Runs `mode` (JAX's distributed runtime already initialized), reporting user errors as
    one line with their exit status; a stuck checkpoint save ends the process at once."""
    compat.apply()
    if mode == "export":
        message = exit_status.run_reporting(
            lambda: export_lib.export(config, export_path, export_step), USER_ERRORS,
            preflight.redact)
        print(message, flush=True)
        return
    try:
        exit_status.run_reporting(lambda: run(config, mode, experiment_class), USER_ERRORS,
                                  preflight.redact)
    except ckpt_lib.CheckpointTimeoutError:
        # The stuck save's writer threads are not daemons: a normal exit would wait for them
        # forever. The error is reported, then the process ends here.
        logging.exception("Stopping the run: a checkpoint save is stuck.")
        logging.flush()
        os._exit(exit_status.SAVE_TIMEOUT)
