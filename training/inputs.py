"""What a run reads before it trains: the data source, the normalization statistics, the
climatology (evaluation) and the fine-tuning checkpoint, each opened once.

`Inputs` opens each on first use and keeps it. `preflight.check_before_start` creates one and
opens what it checks; `launch.run` hands that same object to every Experiment jaxline builds, so
nothing is opened twice. An Experiment built without one (tests) gets its own.
"""

import functools
from typing import Optional

from graphcast import checkpoint as gc_checkpoint
from graphcast import normalization
from training import data_input
from training import evaluation
from training import model_configs


class Inputs:
    """The run's inputs for the experiment config `cfg` (`config.experiment_kwargs.config`)."""

    def __init__(self, cfg):
        self.config = cfg
        self.model_config = model_configs.model_config_from(cfg)
        self.task_config = model_configs.task_config_from(cfg)

    @functools.cached_property
    def source(self) -> data_input.Source:
        """The dataset (lazy, normalized layout) and iterators over its splits."""
        return data_input.Source(self.config.data, self.task_config, self.model_config.resolution)

    @functools.cached_property
    def stats(self) -> normalization.Stats:
        """Normalization statistics from data.stats_dir."""
        data = self.config.data
        return normalization.load_stats(data.stats_dir, self.task_config,
                                        data_input.storage_options(data, data.stats_dir))

    @functools.cached_property
    def climatology(self) -> Optional[evaluation.Climatology]:
        """eval.climatology on the model's grid (for ACC), or None when not configured."""
        url = self.config.eval.climatology
        if not url:
            return None
        return evaluation.Climatology(url, self.task_config, self.source.lat, self.source.lon,
                                      data_input.storage_options(self.config.data, url) or None)

    @functools.cached_property
    def init_checkpoint(self) -> Optional[gc_checkpoint.CheckPoint]:
        """training.init_checkpoint, the official .npz to fine-tune from, checked: readable, of
        the config's model and task, on the data's grid, finite. None when not configured."""
        path = self.config.training.init_checkpoint
        if not path:
            return None
        # CheckpointError: missing, refused, truncated, corrupt, object arrays, mismatched
        ckpt = gc_checkpoint.load(path, data_input.storage_options(self.config.data, path))
        gc_checkpoint.check_matches(ckpt, self.model_config, self.task_config, source=path)
        gc_checkpoint.check_grid(ckpt, self.source.lat, source=self.config.data.source)
        gc_checkpoint.check_finite(ckpt, source=path)
        return ckpt
