"""GraphCast_small-like training on ERA5 at 1 degree, 13 levels (precipitation as a target only).

Run (single node, all local GPUs):
  python experiment.py --config=configs/era5_1deg.py \
    --config.experiment_kwargs.config.data.source=gs://weatherbench2/datasets/era5/1959-2023_01_10-6h-240x121_equiangular_with_poles_conservative.zarr \
    --config.experiment_kwargs.config.data.stats_dir=gs://.../stats_1deg \
    --config.checkpoint_dir=gs://MY_BUCKET/runs/era5_1deg
(or a 1-degree zarr made by `python -m data.prepare --resolution 1.0 --levels 13`).
Model: mesh 5, latent 512, 16 message-passing steps, 1 hidden layer. Global batch 32, 311,000 steps
(paper schedule and 2..12-step curriculum). Expected cost: roughly 1.5-2 s per step on 8 x A100/H100
with bf16 and per-step remat (about a week for the full schedule); memory ~10-20 GiB per device at
1 AR step, more during the 12-step curriculum. Evaluate in a separate job with --jaxline_mode=eval.
"""

from ml_collections import config_dict

from configs import base
from graphcast import config as gc_config


def get_config(arg: str = "") -> config_dict.ConfigDict:
    """arg is unused (kept for the config_flags 'file.py:arg' convention)."""
    del arg
    config = base.get_base_config(gc_config.TASK_13_PRECIP_OUT)
    config.checkpoint_dir = "runs/era5_1deg"
    exp = config.experiment_kwargs.config

    # model: GraphCast_small
    exp.model.update(dict(resolution=1.0, mesh_size=5, latent_size=512, gnn_msg_steps=16,
                          hidden_layers=1, radius_query_fraction_edge_length=0.6))

    # data: prepared 1-degree ERA5 (13 levels); the 0.25-degree WB2 zarr works too when given a
    # resolution-matching prepared copy (python -m data.prepare --resolution 1.0)
    exp.data.update(dict(source="", stats_dir="", global_batch_size=32,
                         train_start="1979-01-01", train_end="2015-12-31",
                         eval_start="2016-01-01", eval_end="2017-12-31",
                         prefetch=4, workers=8, graph_cache_dir="runs/graph_cache"))

    # training: bf16 activations and per-AR-step remat keep the 12-step curriculum in memory
    exp.training.update(dict(bf16=True, remat_steps=True))

    # eval: 8 batches of 5-day rollouts, headline at 24 h
    exp.eval.update(dict(num_batches=8, batch_size=0, rollout_steps=20, figure_lead_step=4,
                         headline_lead_step=4))

    # memory: XLA's pooled allocator with 95% of the GPU reserved up front; set
    # allocator="platform" (on-demand, slower, least fragmentation) if long rollouts fragment
    exp.memory.update(dict(allocator="", mem_fraction=0.95, preallocate=True))
    return config
