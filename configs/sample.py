"""Tiny GraphCast on the embedded synthetic sample: the demo and the training tests.

Run (139 s measured on a shared 2-core CPU machine, including ~24 s to generate ./sample_data on
first use):
  python experiment.py --config=configs/sample.py
It trains a 32-latent, mesh-2 model on a 5.625-degree grid (5 levels) for 300 steps (1 AR step, then
a short 2-3 step curriculum), evaluates 24 h rollouts against persistence and the sample's
climatology (RMSE, skill, ACC), checkpoints to runs/sample and prints the table. Everything in
./sample_data is SYNTHETIC, not ERA5. With data.source set elsewhere (another folder, a gs:// copy
made with `python -m data.sample` and uploaded) nothing is generated: set data.stats_dir and
eval.climatology to match.
"""

import dataclasses

from ml_collections import config_dict

from configs import base
from graphcast import config as gc_config

_LEVELS = (250, 500, 700, 850, 1000)


def get_config(arg: str = "") -> config_dict.ConfigDict:
    """arg: optional 'steps=N' to shorten/lengthen the run (tests use small N)."""
    task = dataclasses.replace(gc_config.TASK_13_PRECIP_OUT, pressure_levels=_LEVELS)
    config = base.get_base_config(task)
    steps = int(dict(kv.split("=") for kv in arg.split(",") if kv).get("steps", 300))
    config.training_steps = steps
    config.checkpoint_dir = "runs/sample"
    config.save_checkpoint_interval = 100
    config.log_train_data_interval = 25
    config.log_tensors_interval = 25
    exp = config.experiment_kwargs.config

    # model: tiny
    exp.model.update(dict(resolution=5.625, mesh_size=2, latent_size=32, gnn_msg_steps=3,
                          hidden_layers=1, radius_query_fraction_edge_length=0.6))

    # data: the synthetic sample (60 days from 2020-01-01), generated on first use
    exp.data.update(dict(
        source="sample_data/era5_sample.zarr", stats_dir="sample_data/stats",
        generate_sample_dir="sample_data", global_batch_size=2,
        train_start="2020-01-01", train_end="2020-02-14",
        eval_start="2020-02-15", eval_end="2020-02-29", prefetch=2, workers=2))

    # optimizer: short warm-up and cosine, then a 2..3-step curriculum over the last sixth
    decay = max(int(steps * 5 / 6) - max(steps // 20, 1), 1)
    exp.optimizer.update(dict(warmup_steps=max(steps // 20, 1), peak_lr=3e-3,
                              decay_steps=decay, ar_start=2, ar_end=3,
                              steps_per_ar=max((steps - decay - max(steps // 20, 1)) // 2, 1),
                              curriculum_lr=3e-4))

    # eval: 4 batches of 24 h rollouts; ACC against the sample's own climatology
    exp.eval.update(dict(num_batches=4, batch_size=4, rollout_steps=4, figure_lead_step=4,
                         headline_lead_step=4, climatology="sample_data/climatology.zarr"))
    return config
