"""The official GraphCast checkpoint format: a flat `.npz` of `:`-joined keys.

Keys are `params:<module path>:<param name>`, `model_config:<field>`,
`task_config:<field>[:<index>]`, `description` and `license`. Configs are 0-d arrays
(unicode, int64, float64); a `None` optional field is simply absent. Loading never
unpickles: object arrays are rejected.
"""

import dataclasses
import io
import os
import typing
import zipfile
from typing import Any, Mapping, Optional

import numpy as np

from graphcast import config as config_lib
from graphcast import files

SEPARATOR = ":"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or that does not fit the run."""


@dataclasses.dataclass(frozen=True)
class CheckPoint:
    params: Mapping[str, Mapping[str, np.ndarray]]
    model_config: config_lib.ModelConfig
    task_config: config_lib.TaskConfig
    description: str = ""
    license: str = ""


def _leaf(value) -> np.ndarray:
    if isinstance(value, (bool, np.bool_)):
        return np.array(bool(value))
    if isinstance(value, (int, np.integer)):
        return np.array(int(value), dtype=np.int64)
    if isinstance(value, (float, np.floating)):
        return np.array(float(value), dtype=np.float64)
    if isinstance(value, str):
        return np.array(value)
    return np.asarray(value)


def _flatten_config(prefix: str, fields: Mapping[str, Any], out: dict) -> None:
    for name, value in fields.items():
        if value is None:
            continue
        key = f"{prefix}{SEPARATOR}{name}"
        if isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                out[f"{key}{SEPARATOR}{i}"] = _leaf(item)
        else:
            out[key] = _leaf(value)


def to_flat_dict(ckpt: CheckPoint) -> dict:
    """The `{key: array}` mapping stored in the `.npz` file."""
    flat = {}
    for module, params in ckpt.params.items():
        for name, value in params.items():
            if SEPARATOR in module or SEPARATOR in name:
                raise CheckpointError(f"Parameter path {module!r}/{name!r} contains {SEPARATOR!r}.")
            flat[f"params{SEPARATOR}{module}{SEPARATOR}{name}"] = np.asarray(value)
    _flatten_config("model_config", dataclasses.asdict(ckpt.model_config), flat)
    _flatten_config("task_config", ckpt.task_config.official_fields(), flat)
    flat["description"] = _leaf(ckpt.description)
    flat["license"] = _leaf(ckpt.license)
    return flat


def save(path_or_file, ckpt: CheckPoint, storage_options: Optional[dict] = None) -> None:
    """Writes the official format (atomically when given a path or a URL such as gs://...)."""
    flat = to_flat_dict(ckpt)
    if isinstance(path_or_file, str) and files.is_url(path_or_file):
        buffer = io.BytesIO()
        np.savez(buffer, **flat)
        files.write_bytes(path_or_file, buffer.getvalue(), storage_options)
    elif isinstance(path_or_file, (str, os.PathLike)):
        tmp = f"{path_or_file}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, **flat)
        os.replace(tmp, path_or_file)
    else:
        np.savez(path_or_file, **flat)


def _read_flat(path_or_file, name: str) -> dict:
    try:
        with np.load(path_or_file, allow_pickle=False) as data:
            flat = {}
            for key in data.files:
                try:
                    flat[key] = data[key]
                except ValueError as e:
                    raise CheckpointError(
                        f"Checkpoint {name}: entry {key!r} holds Python objects; refusing to unpickle "
                        "it (a GraphCast checkpoint only holds numeric and string arrays).") from e
            return flat
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"Checkpoint {name} is not a readable .npz file "
                              f"(truncated or corrupt?): {e}") from e


def _nest(flat: Mapping[str, np.ndarray], prefix: str) -> dict:
    start = prefix + SEPARATOR
    return {k[len(start):]: v for k, v in flat.items() if k.startswith(start)}


def _sequence(entries: Mapping[str, np.ndarray], field: str, convert) -> tuple:
    items = {k[len(field) + 1:]: v for k, v in entries.items() if k.startswith(field + SEPARATOR)}
    return tuple(convert(items[i]) for i in sorted(items, key=int))


def _scalar(value: np.ndarray, kind):
    return kind(value.item()) if np.ndim(value) == 0 else kind(value)


def _dataclass_from(cls, entries: Mapping[str, np.ndarray], name: str, path: str):
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if hint is tuple:
            kind = int if field.name == "pressure_levels" else str
            present = any(k.startswith(field.name + SEPARATOR) for k in entries)
            if not present:
                raise CheckpointError(f"Checkpoint {path} has no {name}:{field.name}.")
            values[field.name] = _sequence(entries, field.name, lambda v, k=kind: _scalar(v, k))
        elif field.name in entries:
            kind = {str: str, int: int, float: float}.get(hint, float)
            values[field.name] = _scalar(entries[field.name], kind)
        elif field.default is dataclasses.MISSING:
            raise CheckpointError(f"Checkpoint {path} has no {name}:{field.name}.")
    return cls(**values)


def load(path_or_file, storage_options: Optional[dict] = None) -> CheckPoint:
    """Reads an official (or our) checkpoint into a `CheckPoint`, from a path, a URL (e.g.
    gs://dm_graphcast/params/<name with spaces>.npz) or a file object."""
    path = str(path_or_file) if isinstance(path_or_file, (str, os.PathLike)) else "<file object>"
    if isinstance(path_or_file, str) and files.is_url(path_or_file):
        try:
            path_or_file = io.BytesIO(files.read_bytes(path_or_file, storage_options))
        except (FileNotFoundError, PermissionError) as e:
            raise CheckpointError(f"Cannot read checkpoint: {e}") from e
    flat = _read_flat(path_or_file, path)
    params = {}
    for key, value in _nest(flat, "params").items():
        module, _, name = key.rpartition(SEPARATOR)
        params.setdefault(module, {})[name] = value
    if not params:
        raise CheckpointError(f"Checkpoint {path} holds no params:* entries.")
    try:
        model_config = _dataclass_from(config_lib.ModelConfig, _nest(flat, "model_config"),
                                       "model_config", path)
        task_config = _dataclass_from(config_lib.TaskConfig, _nest(flat, "task_config"),
                                      "task_config", path)
    except config_lib.TaskConfigError as e:
        raise CheckpointError(f"Checkpoint {path} holds an invalid task: {e}") from e
    return CheckPoint(params=params, model_config=model_config, task_config=task_config,
                      description=str(flat.get("description", np.array("")).item()),
                      license=str(flat.get("license", np.array("")).item()))


def check_matches(ckpt: CheckPoint, model_config: config_lib.ModelConfig,
                  task_config: config_lib.TaskConfig, source: str = "checkpoint") -> None:
    """Raises a `CheckpointError` naming every field where the checkpoint and the run differ."""
    diffs = []
    for field in dataclasses.fields(config_lib.ModelConfig):
        a, b = getattr(ckpt.model_config, field.name), getattr(model_config, field.name)
        if a != b:
            diffs.append(f"model.{field.name}: {source} has {a!r}, config has {b!r}")
    for field, a in ckpt.task_config.official_fields().items():
        b = getattr(task_config, field)
        if field.endswith("variables"):
            a, b = tuple(sorted(a)), tuple(sorted(b))
        if a != b:
            diffs.append(f"task.{field}: {source} has {a!r}, config has {b!r}")
    if diffs:
        raise CheckpointError("The checkpoint does not match the configured model/task:\n  "
                              + "\n  ".join(diffs))


def check_grid(ckpt: CheckPoint, grid_lat: np.ndarray, source: str = "dataset") -> None:
    """The checkpoint's resolution (0 = any) must match the data's latitude spacing."""
    resolution = ckpt.model_config.resolution
    if resolution and len(grid_lat) > 1:
        spacing = abs(float(grid_lat[1] - grid_lat[0]))
        if not np.isclose(spacing, resolution, atol=1e-3):
            raise CheckpointError(f"The checkpoint was trained at {resolution} degrees but the "
                                  f"{source} grid has {spacing} degree spacing.")


def check_finite(ckpt: CheckPoint, source: str = "checkpoint") -> None:
    """Raises a `CheckpointError` naming every parameter holding a NaN or Inf."""
    bad = [f"{module}/{name}" for module, params in ckpt.params.items()
           for name, value in params.items()
           if np.issubdtype(np.asarray(value).dtype, np.floating)
           and not np.isfinite(value).all()]
    if bad:
        raise CheckpointError(f"{source} holds non-finite (NaN/Inf) parameters in {bad}; it "
                              "cannot be used. Take an earlier checkpoint.")
