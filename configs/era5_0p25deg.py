"""Full GraphCast: ERA5 at 0.25 degree, 37 levels, mesh 6, latent 512, 16 message-passing steps.

Run as it is (multi-node; see launch/slurm_multinode.sbatch), from public data on Google Cloud Storage:
  sbatch launch/slurm_multinode.sbatch configs/era5_0p25deg.py \
    --config.checkpoint_dir=gs://MY_BUCKET/runs/graphcast_0p25
Defaults: data = ARCO-ERA5's 0.25-degree 37-level ERA5 (hourly; read at 00/06/12/18 UTC with
6-hour precipitation summed from the hourly values), statistics = DeepMind's
(gs://dm_graphcast/stats), ACC climatology = WeatherBench2's 1990-2019 ERA5 climatology (ACC for
the levels it holds). Public buckets are read anonymously unless the environment has credentials.
Global batch 32 (1 example per device on 32 devices), 311,000 steps with the paper schedule.
Cost: not measured here (no GPU); DeepMind reports about 4 weeks on 32 TPU v4 for this model.
Memory: bf16, per-AR-step remat and offloaded windows are required; per-device figures for TPU
v4 / H100 (README, "Accelerator memory"): `benchmarks/train_step.py --target ...`.
"""

from ml_collections import config_dict

from configs import base
from graphcast import config as gc_config

ARCO_ERA5_0P25 = "gs://gcp-public-data-arco-era5/ar/full_37-1h-0p25deg-chunk-1.zarr-v3"
DM_STATS = "gs://dm_graphcast/stats"
WB2_CLIMATOLOGY_0P25 = ("gs://weatherbench2/datasets/era5-hourly-climatology/"
                        "1990-2019_6h_1440x721.zarr")


def get_config(arg: str = "") -> config_dict.ConfigDict:
    """arg is unused (kept for the config_flags 'file.py:arg' convention)."""
    del arg
    config = base.get_base_config(gc_config.TASK)
    config.checkpoint_dir = "runs/era5_0p25deg"
    exp = config.experiment_kwargs.config

    # model: GraphCast (the paper's)
    exp.model.update(dict(resolution=0.25, mesh_size=6, latent_size=512, gnn_msg_steps=16,
                          hidden_layers=1, radius_query_fraction_edge_length=0.6))

    # data: public ARCO-ERA5 0.25-degree, 37 levels; DeepMind's statistics. A host's batch is 8
    # examples, 23 GB: prefetch_memory_gb=48 keeps two in flight so that all 16 workers read
    # (README, "Per-host input budget": each worker also keeps a 4.4 GB heap).
    exp.data.update(dict(source=ARCO_ERA5_0P25, stats_dir=DM_STATS, global_batch_size=32,
                         train_start="1979-01-01", train_end="2017-12-31",
                         eval_start="2018-01-01", eval_end="2018-12-31",
                         prefetch=2, prefetch_memory_gb=48, workers=16, worker_processes=True,
                         graph_cache_dir="runs/graph_cache"))

    # training: memory is the constraint at this size. Per device, full GraphCast, bf16 (README,
    # "Accelerator memory"): recompute_grid keeps no grid-sized latent for the backward pass
    # (TPU v4, 1 step: 21.0 -> 13.9 GiB, 9% more executed FLOPs); offload_windows keeps the
    # rollout's saved windows in host memory (H100, 12 steps: 60.9 -> 30.3 GiB). With both, 12
    # steps: H100 27.0 GiB; TPU v4 31.9 GiB (13.8 GiB of it the padded batch), above 30 GiB.
    # host_batch keeps multi-step batches in host memory: TPU v4, 12 steps with all three
    # 18.5 GiB. It trains over every process's devices, so this multi-node command runs it.
    exp.training.update(dict(bf16=True, remat_steps=True, remat_blocks=True, block_size=32768,
                             offload_windows=True, host_batch=True, recompute_grid=True))

    # eval: 4 batches of 10-day rollouts, headline at 24 h; ACC against WeatherBench2's climatology
    exp.eval.update(dict(num_batches=4, batch_size=0, rollout_steps=40, figure_lead_step=4,
                         headline_lead_step=4, climatology=WB2_CLIMATOLOGY_0P25))

    # memory: use nearly all device memory, allocated on demand
    exp.memory.update(dict(allocator="platform", mem_fraction=0.0, preallocate=False))
    return config
