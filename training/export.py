"""Export of a training checkpoint as an official GraphCast .npz (loadable by DeepMind's
notebook and `graphcast.predict`), refusing parameters that do not fit the config."""

from typing import Optional

import jax
import numpy as np

from graphcast import checkpoint as gc_checkpoint
from graphcast import config as gc_config
from graphcast import memory
from graphcast import rollout
from training import checkpointer as ckpt_lib
from training import data_input
from training import model_configs
from training import preflight

LICENSE = ("Parameters trained with graphcast-trainer; the GraphCast architecture is DeepMind's "
           "(Lam et al. 2023). Check the license of the training data before redistribution.")


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
    preflight.check_before_start(config, "export", export_path=path)
    exp = config.experiment_kwargs.config
    checkpointer = ckpt_lib.Checkpointer(config, "export")
    arrays, meta = checkpointer.read("latest", step)
    where = f"checkpoint {checkpointer.directory('latest')}/{meta['step']}"
    ckpt_lib.check_same_model(meta.get("config", "{}"), ckpt_lib.config_json(config), where)
    ckpt = gc_checkpoint.CheckPoint(
        params=arrays["experiment/params"], model_config=model_configs.model_config_from(exp),
        task_config=model_configs.task_config_from(exp),
        description=export_description(config, meta["step"]), license=LICENSE)
    gc_checkpoint.check_finite(ckpt, source=where)
    check_param_shapes(ckpt.params, ckpt.model_config, ckpt.task_config, where)
    gc_checkpoint.save(path, ckpt, data_input.storage_options(exp.data, path))
    return f"Exported step {meta['step']} ({len(jax.tree.leaves(ckpt.params))} arrays) to {path}."
