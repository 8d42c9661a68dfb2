"""Defaults shared by every experiment config; each config file overrides what differs.

Layout (names are stable; scripts rely on them):
  config.training_steps, config.checkpoint_dir, config.random_seed, ... (jaxline's own keys)
  config.experiment_kwargs.config.model.*      ModelConfig fields
  config.experiment_kwargs.config.task.*       TaskConfig fields
  config.experiment_kwargs.config.data.*       source, stats_dir, global_batch_size, date ranges
  config.experiment_kwargs.config.optimizer.*  training.optim.OptimConfig fields
  config.experiment_kwargs.config.training.*   precision, remat, fine-tuning, failure limits
  config.experiment_kwargs.config.eval.*       evaluation rollouts, metrics, figure
  config.experiment_kwargs.config.memory.*     XLA allocator settings (applied before JAX starts)
"""

from jaxline import base_config
from ml_collections import config_dict

from graphcast import config as gc_config


def get_base_config(task: gc_config.TaskConfig) -> config_dict.ConfigDict:
    """jaxline's base config plus GraphCast defaults (the paper's optimizer; 1-deg-ish model)."""
    config = base_config.get_base_config()
    config.checkpoint_dir = "runs/default"
    config.random_seed = 42
    config.training_steps = 311_000
    # Step-based intervals: every host then saves (orbax needs all processes) at the same step.
    config.interval_type = "steps"
    config.checkpoint_interval_type = "steps"
    config.train_checkpoint_all_hosts = True
    config.best_checkpoint_all_hosts = True
    config.save_checkpoint_interval = 1000
    config.max_checkpoints_to_keep = 3
    config.log_train_data_interval = 50
    config.log_tensors_interval = 50
    config.best_model_eval_metric = "skill_mean"
    config.best_model_eval_metric_higher_is_better = True

    exp = config_dict.ConfigDict()

    # --- model: graphcast.config.ModelConfig fields ---
    exp.model = config_dict.ConfigDict(dict(
        resolution=1.0, mesh_size=5, latent_size=512, gnn_msg_steps=16, hidden_layers=1,
        radius_query_fraction_edge_length=0.6, mesh2grid_edge_normalization_factor=0.6180338738074472))

    # --- task: graphcast.config.TaskConfig fields (official five) ---
    exp.task = config_dict.ConfigDict(dict(
        input_variables=tuple(task.input_variables), target_variables=tuple(task.target_variables),
        forcing_variables=tuple(task.forcing_variables),
        pressure_levels=tuple(task.pressure_levels), input_duration=task.input_duration))

    # --- data: where examples and statistics come from, batch, date splits ---
    exp.data = config_dict.ConfigDict(dict(
        source="",                   # zarr dir, gs:// zarr or netCDF (data.sources.open_source)
        subsample_grid=False,        # a source grid k times finer: read every k-th point
        stats_dir="",                # folder or gs:// prefix with mean/stddev/diffs_stddev_by_level.nc
        global_batch_size=32,        # over all devices of all hosts
        train_start="1979-01-01", train_end="2015-12-31",
        eval_start="2016-01-01", eval_end="2017-12-31",
        seed=0,                      # shuffling seed (epoch order is a function of seed, epoch)
        prefetch=2,                  # batches prepared ahead of the step
        prefetch_memory_gb=1.0,      # ... as long as they fit in this many GiB (one always does)
        workers=4,                   # readers: threads, or processes with worker_processes
        worker_processes=False,      # read examples in `workers` processes (per-example work on
                                     # that many cores, not one GIL); same batches either way
        pin_workers=True,            # each worker process on its own core, decoding in one thread
                                     # (more bytes per core; workers = the cores data may use)
        wait_warn_fraction=0.1,      # warn once when training waits for data more than this
        wait_warn_steps=50,          # ... fraction of the time over this many steps
        generate_sample_dir="",      # if set and `source` is missing: python -m data.sample --out
        graph_cache_dir="",          # where built graphs are cached ('' = no cache)
        storage_options={},          # gcsfs options (endpoint_url, project...); never credentials
        check_nans=True,             # a NaN read from the source stops the run, naming it
    ))

    # --- optimizer: training.optim.OptimConfig (paper defaults) ---
    exp.optimizer = config_dict.ConfigDict(dict(
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, decay_param_names=("w",),
        clip_global_norm=32.0, warmup_steps=1000, peak_lr=1e-3, decay_steps=299_000,
        ar_start=2, ar_end=12, steps_per_ar=1000, curriculum_lr=3e-7))

    # --- training: precision, memory-saving remat, fine-tuning, failure handling ---
    exp.training = config_dict.ConfigDict(dict(
        bf16=False,                  # bfloat16 activations (params, aggregation, loss stay f32)
        remat_steps=True,            # rematerialize each autoregressive step in backprop
        offload_windows=False,       # with remat_steps: saved per-step input windows in host memory
        host_batch=False,            # multi-step rollouts: batch in host memory, each step's frames
                                     # copied in when read (trains through
                                     # update.data_parallel_update: pmap keeps it on device)
        remat_blocks=True,           # rematerialize processor rounds (in groups) and edge/node blocks
        recompute_grid=False,        # with remat_blocks and block_size: no grid-sized latent kept
                                     # for backprop (the grid path recomputed per row block)
        block_size=16384,            # >0: grid<->mesh edges and grid nodes in blocks of this many
        init_checkpoint="",          # official GraphCast .npz to fine-tune from (model/task checked)
        max_consecutive_nonfinite=10,  # stop after this many skipped (NaN/Inf) updates in a row
        checkpoint_save_timeout_s=1800,  # a background checkpoint save must finish in this time
        sigterm_grace_s=120,         # SIGTERM: save at the current step within this time, then exit
        lock_stale_s=300,            # a run lock without a heartbeat for this long is taken over
        example_log="",              # if set: append each step's example init times (audit)
        logdir="",                   # TensorBoard dir ('' = <checkpoint_dir>/tb)
    ))
    exp.training.run_steps = config.get_ref("training_steps")  # follows config.training_steps

    # --- eval: rollouts over the eval range, metrics, figure ---
    exp.eval = config_dict.ConfigDict(dict(
        num_batches=8,               # eval batches per evaluation (of global_batch_size examples)
        batch_size=0,                # 0 = data.global_batch_size
        rollout_steps=4,             # lead times 6h..6h*rollout_steps
        figure_lead_step=4,          # lead (in 6-hour steps) drawn in the PNG
        headline_lead_step=4,        # lead of the TensorBoard headline scalars
        climatology="",              # zarr (local or gs://) of the targets' climatology: enables ACC
        interval_steps=0,            # in-process evaluation every N train steps (0 = only at the end)
        at_end=True,                 # evaluate in-process after the last training step
        restore_wait_s=600,          # eval job: wait this long for an unreadable checkpoint
    ))

    # --- memory: XLA client allocator, set in the environment before JAX's backend starts ---
    exp.memory = config_dict.ConfigDict(dict(
        allocator="",                # "platform" = allocate on demand (slower, least fragmentation)
        mem_fraction=0.0,            # 0 = XLA default (0.75 of the accelerator)
        preallocate=True,            # False = XLA_PYTHON_CLIENT_PREALLOCATE=false
    ))

    config.experiment_kwargs = config_dict.ConfigDict(dict(config=exp))
    return config
