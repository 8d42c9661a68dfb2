"""GraphCast_small-like training on ERA5 at 1 degree, 13 levels (precipitation as a target only).

Run as it is (single node, all local GPUs), from public data on Google Cloud Storage:
  python experiment.py --config=configs/era5_1deg.py --config.checkpoint_dir=gs://MY_BUCKET/runs/era5_1deg
Defaults: data = WeatherBench2's 0.25-degree 13-level ERA5 (gs://weatherbench2, read at every 4th
point, as DeepMind made its 1-degree data), statistics = DeepMind's (gs://dm_graphcast/stats),
ACC climatology = WeatherBench2's 1990-2019 ERA5 climatology (also every 4th point). Public
buckets are read anonymously unless the environment has credentials.
Reading 1 degree out of 0.25 degree moves 16x the bytes (see README, Performance); for the full
schedule write a prepared 1-degree copy to your bucket once and train from it:
  python -m data.prepare --source gs://weatherbench2/datasets/era5/1959-2023_01_10-wb13-6h-1440x721_with_derived_variables.zarr \
    --out gs://MY_BUCKET/era5_1deg_13.zarr --resolution 1.0 --levels 13 --start 1979-01-01 --end 2017-12-31
  python experiment.py --config=configs/era5_1deg.py \
    --config.experiment_kwargs.config.data.source=gs://MY_BUCKET/era5_1deg_13.zarr
Model: mesh 5, latent 512, 16 message-passing steps, 1 hidden layer. Global batch 32, 311,000 steps
(paper schedule and 2..12-step curriculum). Cost: an ESTIMATE, not measured (no GPU was
available): see README, "Cost of configs/era5_1deg.py", for the FLOPs of the compiled step and the
assumed utilization. Evaluate in a separate job with --jaxline_mode=eval.
"""

from ml_collections import config_dict

from configs import base
from graphcast import config as gc_config

WB2_ERA5_0P25 = ("gs://weatherbench2/datasets/era5/"
                 "1959-2023_01_10-wb13-6h-1440x721_with_derived_variables.zarr")
DM_STATS = "gs://dm_graphcast/stats"
WB2_CLIMATOLOGY_0P25 = ("gs://weatherbench2/datasets/era5-hourly-climatology/"
                        "1990-2019_6h_1440x721.zarr")


def get_config(arg: str = "") -> config_dict.ConfigDict:
    """arg is unused (kept for the config_flags 'file.py:arg' convention)."""
    del arg
    config = base.get_base_config(gc_config.TASK_13_PRECIP_OUT)
    config.checkpoint_dir = "runs/era5_1deg"
    exp = config.experiment_kwargs.config

    # model: GraphCast_small
    exp.model.update(dict(resolution=1.0, mesh_size=5, latent_size=512, gnn_msg_steps=16,
                          hidden_layers=1, radius_query_fraction_edge_length=0.6))

    # data: public WeatherBench2 ERA5 at 0.25 degree, read at every 4th point; DeepMind's statistics
    exp.data.update(dict(source=WB2_ERA5_0P25, subsample_grid=True, stats_dir=DM_STATS,
                         global_batch_size=32,
                         train_start="1979-01-01", train_end="2015-12-31",
                         eval_start="2016-01-01", eval_end="2017-12-31",
                         prefetch=4, workers=8, worker_processes=True,
                         graph_cache_dir="runs/graph_cache"))

    # training: bf16 activations and per-AR-step remat keep the 12-step curriculum in memory.
    # offload_windows and host_batch stay off (base): XLA:TPU of jax 0.10.2 rejects host_batch's
    # host-memory frame slices at 1 degree (README, "Accelerator memory")
    exp.training.update(dict(bf16=True, remat_steps=True))

    # eval: 8 batches of 5-day rollouts, headline at 24 h; ACC against WeatherBench2's climatology
    exp.eval.update(dict(num_batches=8, batch_size=0, rollout_steps=20, figure_lead_step=4,
                         headline_lead_step=4, climatology=WB2_CLIMATOLOGY_0P25))

    # memory: XLA's pooled allocator with 95% of the GPU reserved up front; set
    # allocator="platform" (on-demand, slower, least fragmentation) if long rollouts fragment
    exp.memory.update(dict(allocator="", mem_fraction=0.95, preallocate=True))
    return config
