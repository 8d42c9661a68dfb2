"""Persistent jaxline checkpointer on orbax-checkpoint (local paths and gs://).

Implements jaxline's `Checkpointer` protocol (save / restore / can_be_restored / restore_path /
get_experiment_state / wait_for_checkpointing_to_finish) with one orbax `CheckpointManager` per
series ("latest" for training, "best" for the eval job) under `<checkpoint_dir>/<series>/<step>`.

What a checkpoint holds: every array the experiment's `snapshot_state()` returns (params, optimizer
state, ...) and jaxline's train RNG, as numpy in orbax's array store; every plain value (global step,
data-iterator state, counters, best metric) and the run's config as JSON. Orbax writes into a
temporary directory and renames it when complete, so a half-written step is never listed and never
restored; saves run in the background; only the newest `max_to_keep` steps are kept.

Faults: a save whose arrays hold a NaN/Inf is refused (NonFiniteCheckpointError, naming the
arrays) so no non-finite value reaches storage. Training restores the newest readable step; an
unreadable newer one is moved aside to `unreadable-<step>-<time>` (logged), so the retrained step
is saved again and "latest" is always readable. A checkpoint whose recorded model or task differs
from the config is refused, naming the fields. The eval job instead waits up to
`eval.restore_wait_s` for an unreadable newest step to become readable (another job may still be
writing it) and, as long, for a first checkpoint to appear. Credentials are redacted from the
config saved with each checkpoint.

A save that hangs (storage that accepts connections but never answers) must not hang the run:
each save is given `training.checkpoint_save_timeout_s` in all. Its blocking phase (orbax lists
the steps, creates the temporary directory and starts the writes) and the wait for its background
phase (at the series' next save, and at the end) run on a saver thread that the training thread
waits for no longer than that; past it, CheckpointTimeoutError names the step and directory. The
previous complete step stays the newest listed one. For gs://, orbax's clients get request
timeouts too: gcsfs through `data.gcs`, tensorstore (which writes the arrays) through its curl
settings.
"""

import concurrent.futures
import json
import os
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from data import gcs
from graphcast import checkpoint as gc_checkpoint
from training import compat
from training import preflight
from training import run_lock as run_lock_lib

_ARRAY_TYPES = (np.ndarray, np.generic, jax.Array)


def _configure_tensorstore_for_gcs() -> None:
    """Points orbax's array writes (tensorstore) at the same GCS endpoint as everything else and
    makes a stalled request fail (and be retried) instead of waiting forever.

    tensorstore ignores STORAGE_EMULATOR_HOST (gcsfs, which writes orbax's metadata, honours it):
    without TENSORSTORE_GCS_HTTP_URL, arrays would go to storage.googleapis.com while metadata goes
    to the emulator, and an async save would never finish. Both settings are read when
    tensorstore first opens a GCS store; values already in the environment win.
    """
    endpoint = gcs.endpoint()
    if endpoint:
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL",
                              endpoint if "://" in endpoint else f"http://{endpoint}")
    os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES", "1")  # < 1 byte/s ...
    os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", "60")  # ... for 60 s: abort


class ExperimentState:
    """Mutable attribute bag that jaxline fills (global_step, experiment_module, train_step_rng...)."""

    def items(self):
        return list(vars(self).items())


def _is_array_tree(value: Any) -> bool:
    leaves = jax.tree.leaves(value)
    return bool(leaves) and all(isinstance(x, _ARRAY_TYPES) for x in leaves)


def _to_host(tree: Any) -> Any:
    """Copies device arrays to numpy so later (donated) updates cannot change what is written."""
    return jax.tree.map(lambda x: np.array(jax.device_get(x)), tree)


def _to_json(value: Any) -> Any:
    """Plain JSON value of a python/numpy scalar or a (nested) dict/list of them."""
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        return np.asarray(value).item()
    return value


class NonFiniteCheckpointError(FloatingPointError):
    """A checkpoint about to be written holds NaN/Inf values."""


class CheckpointRestoreError(RuntimeError):
    """No step of a checkpoint series could be read."""


class NoCheckpointError(CheckpointRestoreError):
    """The eval job found no checkpoint within eval.restore_wait_s."""


class ConfigMismatchError(gc_checkpoint.CheckpointError):
    """A checkpoint was written with another model or task than the config describes."""


class CheckpointTimeoutError(TimeoutError):
    """A background checkpoint save did not finish within its time limit.

    Its writer threads may still be blocked on storage, and Python waits for them at exit:
    `training.launch` exits the process directly after reporting this error.
    """


def check_finite(arrays: Any, what: str) -> None:
    """Raises NonFiniteCheckpointError naming every floating array with a NaN/Inf."""
    bad = [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(arrays)
           if np.issubdtype(np.asarray(x).dtype, np.floating) and not np.isfinite(x).all()]
    if bad:
        raise NonFiniteCheckpointError(f"Refusing to write {what}: non-finite values in {bad}.")


def _redacted(tree: Any) -> Any:
    """JSON config tree with credential-looking string fields replaced by '<redacted>', and
    credentials inside other strings (URLs) redacted."""
    if isinstance(tree, dict):
        return {k: preflight.REDACTED if isinstance(v, str) and preflight.is_credential(k, v)
                else _redacted(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_redacted(v) for v in tree]
    return preflight.redact(tree) if isinstance(tree, str) else tree


def check_same_model(saved_config_json: str, config_json_now: str, what: str) -> None:
    """Raises ConfigMismatchError naming every model/task field where the config recorded with
    a checkpoint differs from the current one."""
    def sections(text):
        exp = json.loads(text or "{}").get("experiment_kwargs", {}).get("config", {})
        return {s: exp.get(s) or {} for s in ("model", "task")}

    saved, now = sections(saved_config_json), sections(config_json_now)
    diffs = [f"{section}.{key}: checkpoint has {saved[section].get(key)!r}, config has "
             f"{now[section].get(key)!r}"
             for section in ("model", "task") if saved[section]
             for key in sorted(set(saved[section]) | set(now[section]))
             if saved[section].get(key) != now[section].get(key)]
    if diffs:
        raise ConfigMismatchError(
            f"{what} was written with another model/task than the config: " + "; ".join(diffs)
            + ". Use the config it was trained with, or another checkpoint_dir.")


def config_json(config) -> str:
    """The run's config as JSON for checkpoints, without credentials."""
    if not hasattr(config, "to_json_best_effort"):
        return "{}"
    return json.dumps(_redacted(json.loads(config.to_json_best_effort())), sort_keys=True)


class Checkpointer:
    """jaxline checkpointer writing orbax checkpoints to `config.checkpoint_dir`."""

    def __init__(self, config, mode: str, *, max_to_keep: Optional[int] = None,
                 best_to_keep: int = 2, enable_async: bool = True):
        if not config.get("checkpoint_dir"):
            raise ValueError("config.checkpoint_dir is empty: set it to a local path or gs:// URL.")
        root = str(config.checkpoint_dir).rstrip("/")
        self._root = root if "://" in root else os.path.abspath(root)  # orbax needs absolute paths
        if gcs.is_gcs(self._root):
            _configure_tensorstore_for_gcs()
        self._mode = mode
        self._config_json = config_json(config)
        exp = config.get("experiment_kwargs", {}).get("config", {})
        self._restore_wait_s = float(exp.get("eval", {}).get("restore_wait_s", 600))
        self._save_timeout_s = float(
            exp.get("training", {}).get("checkpoint_save_timeout_s", 1800))
        self._pending: dict = {}  # series -> (step, monotonic time its save started)
        self._saver = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt_save")
        self._keep = {"latest": max_to_keep or config.get("max_checkpoints_to_keep", 5),
                      "best": best_to_keep}
        self._async = enable_async
        self._states: dict = {}
        self._managers: dict = {}
        self._seen_a_checkpoint = False
        self.run_lock = None  # training: the directory's RunLock (saves stop if it is lost)

    # -- helpers ---------------------------------------------------------------------------
    def directory(self, ckpt_series: str) -> str:
        """Directory holding the numbered steps of one series."""
        return f"{self._root}/{ckpt_series}"

    def manager(self, ckpt_series: str) -> ocp.CheckpointManager:
        """The orbax manager of a series (created on first use)."""
        if ckpt_series not in self._managers:
            # The temporary step directory is created before save() returns, not by orbax's
            # background directory creation: its writers wait for that signal for 300 s, and
            # on a loaded machine a save was seen to die of that wait ("Timeout waiting for
            # key ... step_directory_creation") before writing anything.
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self._keep.get(ckpt_series, 2), create=True,
                enable_async_checkpointing=self._async,
                async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
            self._managers[ckpt_series] = ocp.CheckpointManager(
                self.directory(ckpt_series), options=options, item_names=("arrays", "meta"))
        return self._managers[ckpt_series]

    def latest_step(self, ckpt_series: str) -> Optional[int]:
        """Newest complete step of a series, re-reading the directory (another job may write it)."""
        return self._fresh(ckpt_series).latest_step()

    def all_steps(self, ckpt_series: str) -> list:
        return sorted(self._fresh(ckpt_series).all_steps())

    def _fresh(self, ckpt_series: str) -> ocp.CheckpointManager:
        """The manager with its step list re-read from storage, unless it is itself writing
        (re-reading during an async save would lose track of the pending step)."""
        manager = self.manager(ckpt_series)
        if not manager.is_saving_in_progress():
            manager.reload()
        return manager

    def read(self, ckpt_series: str, step: Optional[int] = None) -> tuple:
        """(arrays, meta) of a step (default: the newest), arrays as numpy."""
        if step is None:
            step = self.latest_step(ckpt_series)
            if step is None:
                raise FileNotFoundError(f"No complete checkpoint in {self.directory(ckpt_series)}.")
        elif step not in self.all_steps(ckpt_series):
            raise FileNotFoundError(f"Checkpoint step {step} not found in "
                                    f"{self.directory(ckpt_series)}; have {self.all_steps(ckpt_series)}.")
        restored = self.manager(ckpt_series).restore(step, args=ocp.args.Composite(
            arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
        return restored["arrays"], restored["meta"]

    # -- jaxline protocol ------------------------------------------------------------------
    def get_experiment_state(self, ckpt_series: str) -> ExperimentState:
        if ckpt_series not in self._states:
            self._states[ckpt_series] = ExperimentState()
        return self._states[ckpt_series]

    def save(self, ckpt_series: str) -> None:
        state = self.get_experiment_state(ckpt_series)
        arrays, plain = {}, {}
        for key, value in state.items():
            if key == "experiment_module":
                for name, item in value.snapshot_state().items():
                    (arrays if _is_array_tree(item) else plain)[f"experiment/{name}"] = item
            elif key == "train_step_rng":
                if value is not None:
                    arrays[key] = jax.tree.map(lambda x: x[0], value)  # one copy per device
            elif _is_array_tree(value) and np.ndim(jax.tree.leaves(value)[0]) > 0:
                arrays[key] = value
            else:
                plain[key] = value
        step = int(state.global_step)
        self._wait_for_pending_save(ckpt_series)
        if self.run_lock is not None and self.run_lock.lost:
            raise run_lock_lib.RunLockedError(
                f"Not saving step {step}: another run took over the lock {self.run_lock.path}.")
        manager = self.manager(ckpt_series)
        if step in manager.all_steps():
            logging.info("Checkpoint %s step %d already exists; not rewriting it.", ckpt_series, step)
            return
        meta = {"plain": _to_json(plain), "series": ckpt_series, "step": step,
                "saved_at": time.time(), "config": self._config_json}
        host_arrays = _to_host(arrays)
        check_finite(host_arrays, f"checkpoint {ckpt_series} step {step}")
        self._pending[ckpt_series] = (step, time.monotonic())
        logging.info("Saving checkpoint %s step %d to %s (async).", ckpt_series, step,
                     self.directory(ckpt_series))
        # The blocking phase (orbax lists, creates the temporary directory and starts the writes)
        # runs on the saver thread, so that storage which never answers cannot hang training.
        self._bounded(ckpt_series, self._saver.submit(
            manager.save, step, args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(host_arrays), meta=ocp.args.JsonSave(meta))))

    def can_be_restored(self, ckpt_series: str) -> bool:
        return self.latest_step(ckpt_series) is not None

    def _read_newest_readable(self, ckpt_series: str) -> tuple:
        """(arrays, meta) of the newest step that reads back; an unreadable newer step is moved
        aside (so that it is neither "latest" nor in the way of the retrained step)."""
        failures = []
        for step in reversed(self.all_steps(ckpt_series)):
            try:
                return self.read(ckpt_series, step)
            except Exception as e:  # noqa: BLE001 -- any unreadable step: try the previous one
                failures.append(f"step {step}: {e}")
                self._move_aside(ckpt_series, step, e)
        raise CheckpointRestoreError(f"No readable checkpoint in {self.directory(ckpt_series)}: "
                                     f"{failures or 'no complete step'}.")

    def _move_aside(self, ckpt_series: str, step: int, error: Exception) -> None:
        """Renames an unreadable step to `unreadable-<step>-<unix time>` (process 0 renames;
        every process waits for it)."""
        source = f"{self.directory(ckpt_series)}/{step}"
        target = f"{self.directory(ckpt_series)}/unreadable-{step}-{int(time.time())}"
        if jax.process_index() == 0:
            if gcs.is_gcs(source):
                fs = gcs.filesystem(source)
                fs.mv(source.split("://", 1)[1], target.split("://", 1)[1], recursive=True)
            else:
                os.rename(source, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
            multihost_utils.sync_global_devices(f"moved aside {source}")
        logging.error("Checkpoint %s is unreadable (%s); moved it aside to %s and trying the "
                      "previous step.", source, error, target)

    def _read_waiting(self, ckpt_series: str) -> tuple:
        """(arrays, meta) of the newest step, waiting while it is unreadable (being written)."""
        deadline = time.monotonic() + self._restore_wait_s
        while True:
            try:
                return self.read(ckpt_series)
            except Exception as e:  # noqa: BLE001 -- half-written or vanished: wait and re-list
                if time.monotonic() > deadline:
                    raise CheckpointRestoreError(
                        f"The newest checkpoint in {self.directory(ckpt_series)} stayed unreadable "
                        f"for eval.restore_wait_s={self._restore_wait_s:g} s: {e}") from e
                logging.warning("Newest checkpoint in %s is not readable yet (%s); waiting.",
                                self.directory(ckpt_series), e)
                time.sleep(min(2.0, self._restore_wait_s))

    def restore(self, ckpt_series: str) -> None:
        if self._mode == "eval":
            arrays, meta = self._read_waiting(ckpt_series)
        else:
            arrays, meta = self._read_newest_readable(ckpt_series)
        check_same_model(meta.get("config", "{}"), self._config_json,
                         f"Checkpoint {self.directory(ckpt_series)}/{meta['step']}")
        plain = meta["plain"]
        state = self.get_experiment_state(ckpt_series)
        snapshot = {k.split("/", 1)[1]: v for k, v in {**arrays, **plain}.items()
                    if k.startswith("experiment/")}
        for key, _ in state.items():
            if key == "experiment_module":
                state.experiment_module.restore_from_snapshot(snapshot)
            elif key == "train_step_rng":
                if "train_step_rng" in arrays:
                    state.train_step_rng = compat.bcast_local_devices(arrays["train_step_rng"])
            elif key in arrays:
                setattr(state, key, arrays[key])
            elif key in plain:
                setattr(state, key, plain[key])
        logging.info("Restored checkpoint %s step %d from %s.", ckpt_series, meta["step"],
                     self.directory(ckpt_series))

    def restore_path(self, ckpt_series: str) -> Optional[str]:
        step = self.latest_step(ckpt_series)
        if step is None and self._mode == "eval" and not self._seen_a_checkpoint:
            step = self._wait_for_first_checkpoint(ckpt_series)
        self._seen_a_checkpoint = self._seen_a_checkpoint or step is not None
        return None if step is None else f"{self.directory(ckpt_series)}/{step}"

    def _wait_for_first_checkpoint(self, ckpt_series: str) -> int:
        """Eval job: the first step to appear, polled for up to eval.restore_wait_s."""
        directory = self.directory(ckpt_series)
        logging.warning("No checkpoint in %s yet; waiting up to eval.restore_wait_s=%g s for "
                        "the training job to write one.", directory, self._restore_wait_s)
        deadline = time.monotonic() + self._restore_wait_s
        while True:
            step = self.latest_step(ckpt_series)
            if step is not None:
                return step
            if time.monotonic() >= deadline:
                raise NoCheckpointError(
                    f"No checkpoint appeared in {directory} within eval.restore_wait_s="
                    f"{self._restore_wait_s:g} s. Check config.checkpoint_dir (is the training "
                    "job writing there?) or raise eval.restore_wait_s.")
            time.sleep(min(2.0, max(deadline - time.monotonic(), 0.0)))

    def _wait_for_pending_save(self, ckpt_series: str) -> None:
        """Waits for the series' pending save (raising the error of a failed one), and raises
        CheckpointTimeoutError once it has run for longer than checkpoint_save_timeout_s."""
        if ckpt_series in self._pending:
            # Queued behind the save's blocking phase on the single saver thread.
            # On a timeout the entry stays: later waits (close()) then fail at once, not hang.
            self._bounded(ckpt_series, self._saver.submit(
                self._managers[ckpt_series].wait_until_finished))
            del self._pending[ckpt_series]

    def _bounded(self, ckpt_series: str, future: concurrent.futures.Future) -> None:
        """The future's result, waiting no longer than the pending save's time limit allows."""
        step, started = self._pending[ckpt_series]
        try:
            future.result(timeout=max(0.0, started + self._save_timeout_s - time.monotonic()))
        except concurrent.futures.TimeoutError:
            raise CheckpointTimeoutError(
                f"Saving checkpoint {ckpt_series} step {step} to {self.directory(ckpt_series)} "
                f"has not finished after {time.monotonic() - started:.0f} s "
                f"(training.checkpoint_save_timeout_s={self._save_timeout_s:g}): the storage is "
                f"unreachable or stalled. Step {step} is incomplete and will not be restored; "
                "the previous complete step is kept.") from None

    def wait_for_checkpointing_to_finish(self) -> None:
        for ckpt_series in list(self._managers):
            self._wait_for_pending_save(ckpt_series)

    def close(self) -> None:
        """Waits (bounded) for pending writes and releases the managers."""
        self.wait_for_checkpointing_to_finish()
        for manager in self._managers.values():
            manager.close()
        self._managers.clear()
        self._saver.shutdown()
