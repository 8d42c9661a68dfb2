"""The model and task an experiment config describes: its `model` and `task` sections as
graphcast's validated dataclasses (field names as in the dataclasses)."""

from graphcast import config as gc_config


def model_config_from(cfg) -> gc_config.ModelConfig:
    """ModelConfig from the config's `model` section."""
    return gc_config.ModelConfig(**dict(cfg.model))


def task_config_from(cfg) -> gc_config.TaskConfig:
    """TaskConfig from the config's `task` section (lists become tuples)."""
    return gc_config.TaskConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                                   for k, v in dict(cfg.task).items()})
