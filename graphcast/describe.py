"""Print the graph sizes and parameter count of a GraphCast configuration.

    python -m graphcast.describe --checkpoint CKPT.npz [--resolution R] [--json]
    python -m graphcast.describe --mesh-size M --resolution R --radius-fraction F \
        [--latent L --msg-steps S --hidden-layers H --levels N] [--json]
    ... --memory [--batch B --ar-steps N --bf16 --remat-blocks --block-size K]

Only the counts are computed (no features, no mesh2grid search), so even 0.25 deg /
mesh 6 takes seconds and little memory. `--memory` also builds the graphs and compiles
one training step with abstract arrays to report XLA's memory estimate.
"""

import argparse
import dataclasses
import json
import sys
from typing import Optional

import numpy as np

from graphcast import checkpoint
from graphcast import config as config_lib
from graphcast import graphs
from graphcast import memory
from graphcast import rollout


def _mlp_params(in_size: int, out_size: int, latent: int, hidden_layers: int) -> int:
    """Linear weights and biases of an MLP with `hidden_layers` hidden layers of width `latent`."""
    return ((in_size * latent + latent) + (hidden_layers - 1) * (latent * latent + latent)
            + (latent * out_size + out_size))


def grid_input_channels(task_config: config_lib.TaskConfig) -> int:
    """Encoder input width per grid node: the data's channels and 3 structural features."""
    return task_config.num_input_channels() + 3


def count_parameters(model_config: config_lib.ModelConfig,
                     task_config: config_lib.TaskConfig) -> int:
    """Number of trainable parameters, counted from the MLP sizes; independent of mesh size
    and grid (the graphs only decide how often each MLP is applied)."""
    latent, hidden, steps = (model_config.latent_size, model_config.hidden_layers,
                             model_config.gnn_msg_steps)
    grid_in = grid_input_channels(task_config)
    outputs = task_config.num_outputs()

    def mlp_norm(in_size):  # MLP to latent followed by a LayerNorm
        return _mlp_params(in_size, latent, latent, hidden) + 2 * latent

    grid2mesh = (mlp_norm(4) + 2 * mlp_norm(grid_in) + mlp_norm(3 * latent) + mlp_norm(latent)
                 + mlp_norm(2 * latent))
    mesh = mlp_norm(4) + steps * (mlp_norm(3 * latent) + mlp_norm(2 * latent))
    mesh2grid = (mlp_norm(4) + mlp_norm(3 * latent) + mlp_norm(2 * latent) + mlp_norm(latent)
                 + _mlp_params(latent, outputs, latent, hidden))
    return grid2mesh + mesh + mesh2grid


def regular_grid(resolution: float) -> tuple:
    """(lat [H], lon [W]) of the equiangular grid with poles: lat -90..90, lon 0..360-res."""
    n_lat = 180.0 / resolution
    n_lon = 360.0 / resolution
    if resolution <= 0 or abs(n_lat - round(n_lat)) > 1e-9 or abs(n_lon - round(n_lon)) > 1e-9:
        raise ValueError(f"resolution={resolution} must divide 180 degrees evenly (e.g. 0.25, 1, 4).")
    lat = np.linspace(-90.0, 90.0, int(round(n_lat)) + 1)
    lon = np.arange(int(round(n_lon))) * float(resolution)
    return lat, lon


def task_on_levels(num_levels: int) -> config_lib.TaskConfig:
    """GraphCast's TASK variables on `num_levels` pressure levels: a standard set
    (graphcast.config.task_on_levels), else, for sizing, the lowest `num_levels` of ERA5's 37."""
    if num_levels in config_lib.PRESSURE_LEVELS:
        return config_lib.task_on_levels(num_levels)
    if not 1 <= num_levels <= len(config_lib.PRESSURE_LEVELS_ERA5_37):
        raise ValueError(f"--levels must be between 1 and 37, got {num_levels}.")
    return dataclasses.replace(config_lib.TASK,
                               pressure_levels=config_lib.PRESSURE_LEVELS_ERA5_37[-num_levels:])


def _read_checkpoint(path: str) -> tuple:
    """(ModelConfig, TaskConfig, parameter count) of an official-format checkpoint .npz."""
    ckpt = checkpoint.load(path)
    n_params = sum(np.asarray(v).size for module in ckpt.params.values() for v in module.values())
    return ckpt.model_config, ckpt.task_config, int(n_params)


def training_memory(model_config: config_lib.ModelConfig, task_config: config_lib.TaskConfig,
                    resolution: float, *, batch: int, ar_steps: int, bf16: bool,
                    remat_blocks: bool, block_size: Optional[int]) -> dict:
    """XLA's compiled memory (bytes) of the training update the experiment trains
    (graphcast.update, paper-default optimizer), with abstract arrays."""
    lat, lon = regular_grid(resolution)
    predictor = rollout.Predictor(model_config, task_config, memory.unit_stats(task_config),
                                  lat, lon, bf16=bf16, remat_steps=True,
                                  remat_blocks=remat_blocks, block_size=block_size)
    compiled, _ = memory.compile_train_step(predictor, batch=batch, ar_steps=ar_steps)
    return memory.memory_report(compiled)


def describe(model_config: config_lib.ModelConfig, n_params: int,
             resolution: Optional[float] = None) -> dict:
    """Counts of the graphs for `model_config` on the regular grid of `resolution`
    (defaults to model_config.resolution)."""
    resolution = model_config.resolution if resolution is None else resolution
    lat, lon = regular_grid(resolution)
    counts = graphs.count_graphs(model_config, lat, lon)
    return {
        "resolution": float(resolution),
        "mesh_size": int(model_config.mesh_size),
        "radius_fraction": float(model_config.radius_query_fraction_edge_length),
        "grid2mesh_radius": float(graphs.grid2mesh_radius(model_config)),
        "grid_nodes": counts.grid_nodes,
        "mesh_nodes": counts.mesh_nodes,
        "mesh_edges": counts.mesh_edges,
        "grid2mesh_edges": counts.grid2mesh_edges,
        "mesh2grid_edges": counts.mesh2grid_edges,
        "params": int(n_params),
    }


_LABELS = (("grid_nodes", "grid nodes"), ("mesh_nodes", "mesh nodes"),
           ("mesh_edges", "multi-mesh edges"), ("grid2mesh_edges", "grid2mesh edges"),
           ("mesh2grid_edges", "mesh2grid edges"), ("params", "parameters"))


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m graphcast.describe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="official-format checkpoint .npz")
    parser.add_argument("--mesh-size", type=int)
    parser.add_argument("--resolution", type=float, help="grid spacing in degrees")
    parser.add_argument("--radius-fraction", type=float)
    parser.add_argument("--latent", type=int, default=512)
    parser.add_argument("--msg-steps", type=int, default=16)
    parser.add_argument("--hidden-layers", type=int, default=1)
    parser.add_argument("--levels", type=int, default=13)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--memory", action="store_true",
                        help="also compile one training step abstractly and report its memory")
    parser.add_argument("--batch", type=int, default=1, help="per-device batch (--memory)")
    parser.add_argument("--ar-steps", type=int, default=1, help="rollout steps (--memory)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 activations (--memory)")
    parser.add_argument("--remat-blocks", action="store_true",
                        help="rematerialize message-passing rounds and row blocks (--memory)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="grid<->mesh edges and nodes in blocks of this many rows (--memory)")
    args = parser.parse_args(argv)

    if args.checkpoint:
        model_config, task_config, n_params = _read_checkpoint(args.checkpoint)
        resolution = args.resolution if args.resolution is not None else model_config.resolution
        if not resolution:
            parser.error("the checkpoint's resolution is 0 (any grid): pass --resolution")
    else:
        missing = [flag for flag, value in (("--mesh-size", args.mesh_size),
                                            ("--resolution", args.resolution),
                                            ("--radius-fraction", args.radius_fraction))
                   if value is None]
        if missing:
            parser.error(f"without --checkpoint, {', '.join(missing)} must be given")
        model_config = config_lib.ModelConfig(
            resolution=args.resolution, mesh_size=args.mesh_size, latent_size=args.latent,
            gnn_msg_steps=args.msg_steps, hidden_layers=args.hidden_layers,
            radius_query_fraction_edge_length=args.radius_fraction)
        resolution = args.resolution
        task_config = task_on_levels(args.levels)
        n_params = count_parameters(model_config, task_config)

    info = describe(model_config, n_params, resolution)
    if args.memory:
        info.update(training_memory(model_config, task_config, resolution, batch=args.batch,
                                    ar_steps=args.ar_steps, bf16=args.bf16,
                                    remat_blocks=args.remat_blocks, block_size=args.block_size))
    if args.json:
        print(json.dumps(info))
    else:
        print(f"resolution {info['resolution']} deg, mesh_size {info['mesh_size']}, "
              f"radius {info['radius_fraction']} x longest finest edge "
              f"= {info['grid2mesh_radius']:.9g}")
        for key, label in _LABELS:
            print(f"{label:<18} {info[key]:>14,}")
        if args.memory:
            for key in ("temp_bytes", "argument_bytes", "output_bytes", "total_bytes"):
                print(f"{key.replace('_', ' '):<18} {info[key] / 2 ** 30:>10.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
