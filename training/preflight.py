"""Up-front checks of a run's config, inputs and output locations, before anything compiles or
is written. `check_before_start(config, mode)` runs the checks that apply to the mode (train,
eval, export) and returns the run's `inputs.Inputs`, which keeps what the checks opened (data,
statistics, climatology, fine-tuning checkpoint) for the Experiment to reuse. Its parts:

* `check_config`: no I/O. Unknown fields, credentials placed in the config, destructive or
  impossible values (non-positive sizes and steps, zero workers, `max_checkpoints_to_keep < 1`,
  a mesh too large for any accelerator), batches that do not split over the devices.
* `check_inputs`: statistics (present, finite, positive spreads), the fine-tuning checkpoint
  (readable, finite, matching), the climatology (present, holding the targets, on a grid the
  model's can be read from), rollouts longer than a split holds, and the first example
  (NaN/Inf). Reading the source costs metadata plus one example.
* `check_writable`: an output location (checkpoint directory, export path) is reachable and
  writable, tested by writing a probe within a bounded time.

`redact` removes anything that looks like a credential from a text; the launcher applies it to
every log line and one-line error, the checkpointer to the config it saves.
"""

import dataclasses
import os
import re
import socket
import threading
from typing import Any, Callable, Iterator, Optional, Tuple

import jax
from absl import logging

from configs import base
from data import examples
from data import gcs
from data import validate
from graphcast import config as gc_config
from training import data_input
from training import inputs as inputs_lib
from training import optim


class ConfigError(ValueError):
    """A config field that is unknown, inconsistent or not allowed (e.g. a credential)."""


class BatchSizeError(ConfigError):
    """The global batch does not split evenly over the devices."""


class RolloutTooLongError(ConfigError):
    """A split holds no example long enough for the configured rollout."""


class LocationError(OSError):
    """An output location that is not writable, or does not answer within the time limit."""


class ClimatologyError(validate.DataValidationError):
    """eval.climatology cannot be opened or lacks a target variable."""


# Field names that hold credentials; they must come from the environment / ADC instead.
_SECRET_KEY = re.compile(r"token|secret|passw|private_key|credential|api_key|access_key|auth",
                         re.IGNORECASE)
_ALLOWED_TOKENS = {"", "anon", "google_default", "cloud"}  # gcsfs modes that carry no secret
_URL_USERINFO = re.compile(r"([a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)
# Query parameters that carry secrets: tokens, keys, signed-URL signatures and credentials.
_SECRET_QUERY = re.compile(
    r"([?&;][^=&;#\s]*(?:token|key|sig|signature|secret|passw|credential|auth)[^=&;#\s]*=)"
    r"[^&;#\s'\"]*", re.IGNORECASE)
REDACTED = "<redacted>"


def redact(text: str) -> str:
    """`text` with URL user:password@ parts and secret-carrying query values replaced."""
    text = _URL_USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m.group(1)}{REDACTED}", text)


def _walk(tree: Any, prefix: str) -> Iterator[Tuple[str, Any]]:
    """(dotted path, leaf) of a ConfigDict / dict tree."""
    if hasattr(tree, "items"):
        for key, value in tree.items():
            yield from _walk(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, tree


def is_credential(key: str, value: str) -> bool:
    """Whether a string config field named `key` holds a credential."""
    return bool(_SECRET_KEY.search(key)) and value.strip() not in _ALLOWED_TOKENS or \
        redact(value) != value


def check_known_fields(config) -> None:
    """Every experiment field exists in the dataclass or base config it configures."""
    exp = config.experiment_kwargs.config
    known = {
        "model": {f.name for f in dataclasses.fields(gc_config.ModelConfig)},
        "task": {f.name for f in dataclasses.fields(gc_config.TaskConfig)},
        "optimizer": {f.name for f in dataclasses.fields(optim.OptimConfig)},
    }
    reference = base.get_base_config(gc_config.TASK).experiment_kwargs.config
    for section in reference:
        known.setdefault(section, set(reference[section]))
    for section in exp:
        where = f"experiment_kwargs.config.{section}"
        if section not in known:
            raise ConfigError(f"Unknown config section {where}; known sections: {sorted(known)}.")
        unknown = sorted(set(exp[section]) - known[section])
        if unknown:
            raise ConfigError(f"Unknown config field(s) {[f'{where}.{k}' for k in unknown]}; "
                              f"known fields of {where}: {sorted(known[section])}.")


def check_no_credentials(config) -> None:
    """Credentials must come from the environment / application-default credentials, never from
    the config (which is logged and saved with every checkpoint). The value is never echoed."""
    for path, value in _walk(config, ""):
        if not isinstance(value, str):
            continue
        if is_credential(path.rsplit(".", 1)[-1], value):
            raise ConfigError(
                f"Config field {path} looks like a credential (a secret-like name, a URL with "
                "user:password@, or a token/key/signature query parameter). Configs are logged "
                "and saved with checkpoints, so credentials are refused there: use "
                "application-default credentials (gcloud auth "
                "application-default login) or GOOGLE_APPLICATION_CREDENTIALS in the environment.")


def check_batch(config, mode: str = "train") -> None:
    """The training batch (train) and the evaluation batch (train with evaluation, eval) split
    evenly over all devices of all processes."""
    exp, devices = config.experiment_kwargs.config, jax.device_count()
    batches = []
    if mode == "train":
        batches.append(("data.global_batch_size", exp.data.global_batch_size))
    if mode == "eval" or (mode == "train" and (exp.eval.at_end or exp.eval.interval_steps)):
        field = "eval.batch_size" if exp.eval.batch_size else \
            "eval.batch_size (0: data.global_batch_size)"
        batches.append((field, exp.eval.batch_size or exp.data.global_batch_size))
    for field, batch in batches:
        if batch <= 0 or batch % devices:
            raise BatchSizeError(
                f"{field}={batch} does not divide over the {devices} devices "
                f"({jax.process_count()} process(es) x {jax.local_device_count()} local); use a "
                f"multiple of {devices}.")


# The largest multi-mesh accepted: one float32 copy of its edges (latents, 4 features and the two
# int32 indices) must stay under this many bytes; a step keeps several such copies.
MAX_MESH_EDGE_BYTES = 16 * 2 ** 30


def mesh_sizes(mesh_size: int) -> Tuple[int, int]:
    """(nodes, directed edges) of the multi-mesh of refinement `mesh_size`."""
    return 10 * 4 ** mesh_size + 2, 20 * (4 ** (mesh_size + 1) - 1)


def _require(field: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise ConfigError(f"Config field {field}={value!r} is not allowed: expected {expected}.")


def check_sizes(config) -> None:
    """Sizes, counts and steps are in range (named with the expected range)."""
    exp = config.experiment_kwargs.config
    top = {"training_steps": (1, "a positive number of steps"),
           "max_checkpoints_to_keep": (1, "at least 1 (0 would delete every checkpoint)"),
           "save_checkpoint_interval": (0, ">= 0 (0 = only the final checkpoint)")}
    for field, (low, expected) in top.items():
        value = config[field]
        _require(field, value, isinstance(value, int) and value >= low, expected)
    positive = {"model": ("latent_size", "gnn_msg_steps", "hidden_layers"),
                "data": ("global_batch_size", "workers", "wait_warn_steps"),
                "eval": ("rollout_steps", "num_batches", "figure_lead_step", "headline_lead_step")}
    for section, fields in positive.items():
        for field in fields:
            value = exp[section][field]
            _require(f"experiment_kwargs.config.{section}.{field}", value,
                     isinstance(value, int) and value >= 1, "a positive integer")
    non_negative = {"data": ("prefetch",), "eval": ("batch_size", "interval_steps"),
                    "training": ("block_size", "max_consecutive_nonfinite")}
    for section, fields in non_negative.items():
        for field in fields:
            value = exp[section][field]
            _require(f"experiment_kwargs.config.{section}.{field}", value,
                     isinstance(value, int) and value >= 0, "an integer >= 0")
    for section, field in (("training", "checkpoint_save_timeout_s"),
                           ("training", "lock_stale_s"), ("training", "sigterm_grace_s"),
                           ("model", "resolution"),
                           ("model", "radius_query_fraction_edge_length")):
        value = exp[section][field]
        _require(f"experiment_kwargs.config.{section}.{field}", value,
                 isinstance(value, (int, float)) and value > 0, "a positive number")
    _require("experiment_kwargs.config.model.resolution", exp.model.resolution,
             exp.model.resolution <= 90, "a grid spacing in degrees (0 < resolution <= 90)")
    for field in ("figure_lead_step", "headline_lead_step"):
        _require(f"experiment_kwargs.config.eval.{field}", exp.eval[field],
                 exp.eval[field] <= exp.eval.rollout_steps,
                 f"at most eval.rollout_steps={exp.eval.rollout_steps}")
    check_mesh(exp.model.mesh_size, exp.model.latent_size)


def check_mesh(mesh_size, latent_size: int) -> None:
    """The multi-mesh is one an accelerator can hold (sizes stated when it is not)."""
    field = "experiment_kwargs.config.model.mesh_size"
    _require(field, mesh_size, isinstance(mesh_size, int) and mesh_size >= 0,
             "an integer >= 0 (GraphCast uses 6)")
    nodes, edges = mesh_sizes(mesh_size)
    edge_bytes = edges * (latent_size + 6) * 4
    if edge_bytes > MAX_MESH_EDGE_BYTES:
        raise ConfigError(
            f"Config field {field}={mesh_size} is too large: its multi-mesh has {nodes:,} nodes "
            f"and {edges:,} edges, and one float32 copy of the edges at latent_size "
            f"{latent_size} takes {edge_bytes / 2 ** 30:,.0f} GiB (limit "
            f"{MAX_MESH_EDGE_BYTES / 2 ** 30:.0f} GiB; a step keeps several). GraphCast uses "
            f"mesh_size 6: {mesh_sizes(6)[0]:,} nodes, {mesh_sizes(6)[1]:,} edges.")


def check_rollouts(source, config, ar_steps: int, with_eval: bool) -> None:
    """Train split (if trained on: ar_steps > 0) fits `ar_steps`-step examples; eval split (if
    evaluated) eval.rollout_steps."""
    data, task = config.experiment_kwargs.config.data, source.task
    times = source.dataset["time"].values
    wanted = {"train": ((data.train_start, data.train_end), ar_steps)} if ar_steps else {}
    if with_eval:
        wanted["eval"] = ((data.eval_start, data.eval_end),
                          config.experiment_kwargs.config.eval.rollout_steps)
    for name, (split, steps) in wanted.items():
        if not examples.valid_init_times(times, split, task.num_input_frames, steps).size:
            raise RolloutTooLongError(
                f"The {name} split {split} holds no example with {task.num_input_frames} input "
                f"frames and {steps} rollout steps (data {source.cfg.source} has times "
                f"{times[0]} .. {times[-1]}); shorten the rollout or widen the split.")


def check_climatology(inputs: inputs_lib.Inputs) -> None:
    """eval.climatology opens, holds the targets and fits the model grid (otherwise it would be
    read only at the first evaluation, which may come after the whole training run)."""
    try:
        inputs.climatology  # pylint: disable=pointless-statement
    except Exception as e:  # noqa: BLE001 -- whatever the reader raises, name the field and path
        raise ClimatologyError(f"eval.climatology={inputs.config.eval.climatology} cannot be "
                               f"used: {type(e).__name__}: {e}") from e


def check_inputs(config, inputs: inputs_lib.Inputs, ar_steps: int,
                 with_eval: bool = True) -> None:
    """Statistics, fine-tuning checkpoint, climatology, rollout lengths and the first example,
    opened through `inputs` (which keeps them for the run); ar_steps: the longest training
    rollout (0: the mode does not train); with_eval: the run evaluates (its eval split must fit
    eval.rollout_steps)."""
    # Opening checks each input (a named error otherwise); `inputs` keeps it for the run.
    inputs.stats  # pylint: disable=pointless-statement
    if ar_steps:
        inputs.init_checkpoint  # pylint: disable=pointless-statement
    if with_eval:
        check_climatology(inputs)
    check_rollouts(inputs.source, config, ar_steps, with_eval)
    inputs.source.example_batch()  # NaNDataError naming variable and time if the first chunk has one


def check_config(config, mode: str = "train") -> None:
    """The checks that need no data: fields, credentials, value ranges, batch splits."""
    check_known_fields(config)
    check_no_credentials(config)
    check_sizes(config)
    check_batch(config, mode)


def check_before_start(config, mode: str = "train",
                       export_path: str = "") -> Optional[inputs_lib.Inputs]:
    """The checks for `mode`, named errors before any compile or write: the config (every mode);
    data, statistics, climatology and fine-tuning checkpoint (train, eval); output locations:
    the checkpoint directory (train, and eval when it exists) or the export path (export).

    Returns the run's Inputs holding what was opened (None for export, which opens none)."""
    check_config(config, "train" if mode == "train_eval_multithreaded" else mode)
    exp = config.experiment_kwargs.config
    inputs = inputs_lib.Inputs(exp)  # builds the model and task: TaskConfigError
    storage = dict(exp.data.storage_options or {}) or None
    if mode != "export":
        for line in data_input.input_summary(config):
            logging.info(line)
        data_input.ensure_sample_data(exp.data, exp.eval.climatology)
        optim_config = optim.OptimConfig.from_mapping(dict(exp.optimizer))
        trains = mode in ("train", "train_eval_multithreaded")
        ar_steps = max(optim.distinct_ar_steps(optim_config, exp.training.run_steps)) \
            if trains else 0
        # Opening the data validates its metadata (variables, levels, times, grid).
        inputs.source  # pylint: disable=pointless-statement
        with_eval = mode != "train" or bool(exp.eval.at_end or exp.eval.interval_steps)
        check_inputs(config, inputs, ar_steps, with_eval)
    if mode in ("train", "train_eval_multithreaded") and jax.process_index() == 0:
        check_writable(config.checkpoint_dir, "config.checkpoint_dir", storage_options=storage)
    checkpoint_dir = str(config.checkpoint_dir)
    if mode == "eval" and jax.process_index() == 0 and ("://" in checkpoint_dir
                                                         or os.path.isdir(checkpoint_dir)):
        # The eval job writes best/ there; a directory that is not there yet is waited for.
        check_writable(checkpoint_dir, "config.checkpoint_dir (eval writes best/ there)",
                       create=False, storage_options=storage)
    if mode == "export":
        check_writable(os.path.dirname(os.path.abspath(export_path)) if "://" not in
                       export_path else export_path.rsplit("/", 1)[0],
                       f"the directory of --export_path={export_path}", create=False)
        return None
    return inputs


def _bounded(fn: Callable[[], None], timeout_s: float) -> Optional[BaseException]:
    """Runs fn in a daemon thread; its error, or TimeoutError if it has not returned in time."""
    outcome: list = []

    def target():
        try:
            fn()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 -- handed to the caller
            outcome.append(e)

    thread = threading.Thread(target=target, daemon=True, name="location_probe")
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        return TimeoutError(f"no answer within {timeout_s:g} s")
    return outcome[0]


def check_writable(location: str, what: str, *, create: bool = True, timeout_s: float = 60.0,
                   storage_options: Optional[dict] = None) -> None:
    """Writes and deletes a probe file in the directory `location` (created if `create`, else
    it must exist), within `timeout_s`; LocationError names `what` and `location`."""
    location = str(location).rstrip("/") or "/"
    probe = f"{location}/.write_probe-{socket.gethostname()}-{os.getpid()}"

    def write_probe():
        if gcs.is_gcs(location):
            gcs.check_reachable(location, storage_options)
            fs = gcs.filesystem(location, storage_options)
            with gcs.named_errors(location):
                fs.pipe(probe.split("://", 1)[1], b"probe")
                fs.rm(probe.split("://", 1)[1])
            return
        if create:
            os.makedirs(location, exist_ok=True)
        elif not os.path.isdir(location):
            raise FileNotFoundError(f"directory {location} does not exist")
        with open(probe, "wb") as f:
            f.write(b"probe")
        os.remove(probe)

    error = _bounded(write_probe, timeout_s)
    if error is not None:
        raise LocationError(f"{what} {location} is not writable: {type(error).__name__}: "
                            f"{error}. Check the path, its permissions and the storage.")
