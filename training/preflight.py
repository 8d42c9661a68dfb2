"""Up-front checks of a run's config and inputs, before anything compiles or is written.

`check(config)` fails fast with a named error for everything that would otherwise surface late
(after a compile, mid-run, or inside the eval job): unknown config fields, credentials placed in
the config, a batch that does not split over the devices, data that does not match the task and
grid (data.validate's named errors), statistics without a task variable or level, a fine-tuning
checkpoint that is unreadable or does not match, rollouts longer than the split holds, a
climatology that is missing or does not fit (when the run evaluates), and a NaN in the first
example. Reading the source costs metadata plus one example.
"""

import dataclasses
import re
from typing import Any, Iterator, Optional, Tuple

import jax
import numpy as np

from configs import base
from data import examples
from graphcast import checkpoint as gc_checkpoint
from graphcast import config as gc_config
from graphcast import normalization
from training import data_input
from training import evaluation
from training import optim


class ConfigError(ValueError):
    """A config field that is unknown, inconsistent or not allowed (e.g. a credential)."""


class BatchSizeError(ConfigError):
    """The global batch does not split evenly over the devices."""


class RolloutTooLongError(ConfigError):
    """A split holds no example long enough for the configured rollout."""


# Field names that hold credentials; they must come from the environment / ADC instead.
_SECRET_KEY = re.compile(r"token|secret|passw|private_key|credential|api_key|access_key|auth",
                         re.IGNORECASE)
_ALLOWED_TOKENS = {"", "anon", "google_default", "cloud"}  # gcsfs modes that carry no secret
_URL_USERINFO = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@\s]+@", re.IGNORECASE)


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
        bool(_URL_USERINFO.search(value))


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
                f"Config field {path} looks like a credential (a secret-like name, or a URL with "
                "user:password@). Configs are logged and saved with checkpoints, so credentials "
                "are refused there: use application-default credentials (gcloud auth "
                "application-default login) or GOOGLE_APPLICATION_CREDENTIALS in the environment.")


def check_batch(config) -> None:
    """The global batch splits evenly over all devices of all processes."""
    batch, devices = config.experiment_kwargs.config.data.global_batch_size, jax.device_count()
    if batch <= 0 or batch % devices:
        raise BatchSizeError(
            f"data.global_batch_size={batch} does not divide over the {devices} devices "
            f"({jax.process_count()} process(es) x {jax.local_device_count()} local); use a "
            f"multiple of {devices}.")


def check_rollouts(source, config, ar_steps: int, with_eval: bool,
                   with_train: bool = True) -> None:
    """Train split (if trained on) fits `ar_steps`-step examples; eval split (if evaluated)
    eval.rollout_steps."""
    data, task = config.experiment_kwargs.config.data, source.task
    times = source.dataset["time"].values
    wanted = {}
    if with_train:
        wanted["train"] = ((data.train_start, data.train_end), ar_steps)
    if with_eval:
        wanted["eval"] = ((data.eval_start, data.eval_end),
                          config.experiment_kwargs.config.eval.rollout_steps)
    for name, (split, steps) in wanted.items():
        if not examples.valid_init_times(times, split, task.num_input_frames, steps).size:
            raise RolloutTooLongError(
                f"The {name} split {split} holds no example with {task.num_input_frames} input "
                f"frames and {steps} rollout steps (data {source.cfg.source} has times "
                f"{times[0]} .. {times[-1]}); shorten the rollout or widen the split.")


def check_init_checkpoint(path: str, model_config, task_config, lat: np.ndarray,
                          source: str, storage_options: Optional[dict] = None) -> None:
    """The fine-tuning checkpoint is a readable official .npz that fits the model, task and grid."""
    if not path:
        return
    # CheckpointError: missing, refused, truncated, corrupt, object arrays
    ckpt = gc_checkpoint.load(path, storage_options)
    gc_checkpoint.check_matches(ckpt, model_config, task_config, source=path)
    gc_checkpoint.check_grid(ckpt, lat, source=source)


def check_inputs(config, model_config, task_config, ar_steps: int, source,
                 with_eval: bool = True, with_train: bool = True) -> None:
    """Statistics, fine-tuning checkpoint, rollout lengths and the first example of `source`;
    with_eval: the run evaluates (its eval split must fit eval.rollout_steps); with_train: it
    trains (its train split must fit `ar_steps`)."""
    exp = config.experiment_kwargs.config
    stats_dir, init_checkpoint = exp.data.stats_dir, exp.training.init_checkpoint
    # StatsError naming the file/URL, variable or level
    normalization.load_stats(stats_dir, task_config,
                             data_input.storage_options(exp.data, stats_dir))
    check_init_checkpoint(init_checkpoint, model_config, task_config, source.lat, exp.data.source,
                          data_input.storage_options(exp.data, init_checkpoint))
    check_rollouts(source, config, ar_steps, with_eval, with_train)
    if with_eval and exp.eval.climatology:  # metadata only: missing URL, variables, levels, grid
        evaluation.Climatology(exp.eval.climatology, task_config, source.lat, source.lon,
                               dict(exp.data.get("storage_options") or {}) or None)
    source.example_batch()  # NaNDataError naming variable and time if the first chunk has one


def check_config(config) -> None:
    """The checks that need no data: fields, credentials, batch split."""
    check_known_fields(config)
    check_no_credentials(config)
    check_batch(config)
