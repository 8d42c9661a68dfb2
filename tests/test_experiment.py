"""End-to-end tests of experiment.py on the synthetic sample (CPU, tiny model).

Multi-device and multi-process runs happen in subprocesses (the device count is fixed when JAX
starts); the rest runs in this process through jaxline.train with the persistent checkpointer.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import experiment
from configs import sample as sample_config
from jaxline import train as jl_train
from data import sources
from graphcast import normalization
from training import checkpointer as ckpt_lib
from training import compat
from training import evaluation
from training import export as export_lib
from training import launch
from training import model_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory):
    """20 days of synthetic sample data (+ statistics), generated once per session."""
    out = tmp_path_factory.mktemp("sample")
    subprocess.run([sys.executable, "-m", "data.sample", "--out", str(out), "--days", "20"],
                   check=True, cwd=ROOT, capture_output=True)
    return str(out)


def tiny_config(sample: str, checkpoint_dir: str, steps: int, batch: int = 2):
    """The sample config shrunk for tests: mesh 1, latent 16, 2 levels, 1-2 rollout steps."""
    config = sample_config.get_config(f"steps={steps}")
    config.checkpoint_dir = checkpoint_dir
    config.save_checkpoint_interval = 1000
    config.log_train_data_interval = 1
    config.log_tensors_interval = 1000
    exp = config.experiment_kwargs.config
    exp.model.update(dict(mesh_size=1, latent_size=16, gnn_msg_steps=1))
    exp.task.pressure_levels = (500, 850)
    exp.data.update(dict(source=f"{sample}/era5_sample.zarr", stats_dir=f"{sample}/stats",
                         generate_sample_dir="", global_batch_size=batch, prefetch=2, workers=1,
                         train_start="2020-01-01", train_end="2020-01-13",
                         eval_start="2020-01-14", eval_end="2020-01-20"))
    exp.optimizer.update(dict(warmup_steps=2, peak_lr=3e-3, decay_steps=1000, ar_end=2))
    exp.eval.update(dict(num_batches=1, batch_size=2, rollout_steps=2, figure_lead_step=2,
                         headline_lead_step=2, at_end=False,
                         climatology=f"{sample}/climatology.zarr"))
    exp.training.logdir = os.path.join(checkpoint_dir, "tb")
    return config


class RecordingWriter:
    def __init__(self):
        self.scalars, self.images = {}, {}

    def write_scalars(self, step, scalars):
        self.scalars[int(step)] = {k: float(np.asarray(v).reshape(())) for k, v in scalars.items()
                                   if np.size(v) == 1}

    def write_images(self, step, images):
        self.images[int(step)] = images


class StopAt(experiment.Experiment):
    """Stops the training loop early (as a pre-empted job would), at STOP steps."""
    STOP = None

    def should_run_step(self, global_step, config):
        return global_step < min(self.STOP, config.training_steps)


def train(config, experiment_class=experiment.Experiment):
    compat.apply()
    writer = RecordingWriter()
    checkpointer = ckpt_lib.Checkpointer(config, "train")
    jl_train.train(experiment_class, config, checkpointer, writer)
    checkpointer.close()
    return writer, checkpointer


def saved_params(checkpoint_dir, step=None):
    config = sample_config.get_config()
    config.checkpoint_dir = checkpoint_dir
    arrays, meta = ckpt_lib.Checkpointer(config, "read").read("latest", step)
    return arrays["experiment/params"], meta


@pytest.mark.slow
def test_a_run_opens_its_inputs_once(sample_dir, tmp_path, monkeypatch):
    """Preflight, training and the in-process evaluation share what preflight opened: the data
    source, the statistics, the climatology and the fine-tuning checkpoint are each opened once
    per run."""
    from graphcast import checkpoint as gc_checkpoint
    config = tiny_config(sample_dir, str(tmp_path / "run"), steps=1)
    exp = config.experiment_kwargs.config
    params, _ = experiment.Experiment("train", config=exp)._initial_params()  # pylint: disable=protected-access
    init = str(tmp_path / "init.npz")
    gc_checkpoint.save(init, gc_checkpoint.CheckPoint(
        params=jax.tree.map(np.asarray, params), model_config=model_configs.model_config_from(exp),
        task_config=model_configs.task_config_from(exp)))
    exp.training.init_checkpoint = init
    exp.eval.at_end = True
    opened = {"source": 0, "stats": 0, "climatology": 0, "checkpoint": 0}

    def counted(kind, open_fn):
        def wrapper(*args, **kwargs):
            opened[kind] += 1
            return open_fn(*args, **kwargs)
        return wrapper

    # Each wrapper calls the real function and counts: whoever opens the input, it is counted.
    monkeypatch.setattr(sources, "open_source", counted("source", sources.open_source))
    monkeypatch.setattr(normalization, "load_stats", counted("stats", normalization.load_stats))
    monkeypatch.setattr(evaluation, "Climatology", counted("climatology", evaluation.Climatology))
    monkeypatch.setattr(gc_checkpoint, "load", counted("checkpoint", gc_checkpoint.load))
    compat.apply()
    launch.run(config, "train", experiment.Experiment)
    assert opened == {"source": 1, "stats": 1, "climatology": 1, "checkpoint": 1}
    assert saved_params(config.checkpoint_dir)[1]["step"] == 1


def test_no_tensorflow_imported():
    assert "tensorflow" not in sys.modules


@pytest.mark.slow
def test_sample_config_trains_loss_falls_evaluates_and_exports(sample_dir, tmp_path):
    config = tiny_config(sample_dir, str(tmp_path / "run"), steps=30)
    writer, _ = train(config)
    losses = [writer.scalars[s]["loss"] for s in sorted(writer.scalars)]
    assert len(losses) == 30 and np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    assert writer.scalars[30]["learning_rate"] > 0 and writer.scalars[30]["ar_steps"] == 1
    assert 0.0 <= writer.scalars[30]["data_wait_fraction"] <= 1.0
    assert "tensorflow" not in sys.modules

    # Evaluation of the saved checkpoint, as the eval job does (one-off).
    config.one_off_evaluate = True
    eval_writer = RecordingWriter()
    jl_train.evaluate(experiment.Experiment, config, ckpt_lib.Checkpointer(config, "eval"),
                      eval_writer, jaxline_mode="eval")
    metrics = eval_writer.scalars[30]
    for name in ("rmse/geopotential/500/12h", "persistence_rmse/2m_temperature/6h",
                 "bias/temperature/850/6h", "skill/geopotential/500/12h", "skill_mean",
                 "headline/z500_rmse_12h", "headline/t2m_skill_12h"):
        assert name in metrics, name
    assert metrics["rmse/geopotential/500/12h"] > 0
    figure = tmp_path / "run" / "tb" / "eval_figures" / "step_00000030.png"
    assert figure.read_bytes()[:4] == b"\x89PNG"
    assert eval_writer.images[30]["forecast"].ndim == 3

    # Export through graphcast.checkpoint and read it back.
    from graphcast import checkpoint as gc_checkpoint
    out = tmp_path / "model.npz"
    print(export_lib.export(config, str(out), None))
    loaded = gc_checkpoint.load(str(out))
    params, _ = saved_params(str(tmp_path / "run"))
    jax.tree.map(np.testing.assert_array_equal, loaded.params, params)
    assert loaded.model_config == model_configs.model_config_from(config.experiment_kwargs.config)
    assert loaded.task_config == model_configs.task_config_from(config.experiment_kwargs.config)
    _predict_with_export(loaded, sample_dir)


def sample_example(sample, task):
    """(DeepMind-style example: batch, time, [level,] lat, lon + datetime; the sample's frames it
    was cut from) for `task`, four 6-hourly times from the synthetic sample."""
    import xarray as xr
    names = set(task.input_variables + task.target_variables + task.forcing_variables)
    ds = xr.open_zarr(f"{sample}/era5_sample.zarr").isel(time=slice(40, 44))
    ds = ds.rename(latitude="lat", longitude="lon").sortby("lat")
    ds = ds[[v for v in ds.data_vars if v in names]].sel(level=list(task.pressure_levels)).load()
    times = ds.time.values
    dynamic = [v for v in ds.data_vars if "time" in ds[v].dims]
    example = ds.assign_coords(time=times - times[0])
    example = example.assign(**{v: example[v].expand_dims("batch") for v in dynamic})
    return example.assign_coords(datetime=(("batch", "time"), times[None])), ds


def _predict_with_export(ckpt, sample):
    """graphcast.predict runs the exported model on a DeepMind-style file cut from the sample."""
    from graphcast import normalization, predict
    task = ckpt.task_config
    example, ds = sample_example(sample, task)
    stats = normalization.load_stats(f"{sample}/stats", task)
    out = predict.predict_dataset(ckpt, example, stats, steps=2)
    error = out["2m_temperature"].values - ds["2m_temperature"].values[None, 2:]
    assert np.isfinite(error).all() and np.sqrt(np.mean(error ** 2)) < 20.0


@pytest.mark.slow
def test_restart_continues_bit_exactly(sample_dir, tmp_path):
    steps = 6
    straight = tiny_config(sample_dir, str(tmp_path / "straight"), steps)
    straight.experiment_kwargs.config.optimizer.update(dict(decay_steps=2, steps_per_ar=2))
    train(straight)
    resumed = tiny_config(sample_dir, str(tmp_path / "resumed"), steps)
    resumed.experiment_kwargs.config.optimizer.update(dict(decay_steps=2, steps_per_ar=2))
    StopAt.STOP = 3  # crosses into the 2-step curriculum after the restart (step 4)
    train(resumed, StopAt)
    assert saved_params(str(tmp_path / "resumed"))[1]["step"] == 3
    writer, _ = train(resumed)  # a new Experiment resumes from the step-3 checkpoint
    assert min(writer.scalars) == 4 and writer.scalars[6]["ar_steps"] == 2
    a, meta_a = saved_params(str(tmp_path / "straight"))
    b, meta_b = saved_params(str(tmp_path / "resumed"))
    assert meta_a["step"] == meta_b["step"] == steps
    assert meta_a["plain"]["experiment/data_state"] == meta_b["plain"]["experiment/data_state"]
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _run_cli(args, env_extra=None, timeout=600):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "experiment.py", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _cli_overrides(sample, checkpoint_dir, steps, batch):
    return [f"--config=configs/sample.py:steps={steps}",
            f"--config.checkpoint_dir={checkpoint_dir}",
            "--config.experiment_kwargs.config.model.mesh_size=1",
            "--config.experiment_kwargs.config.model.latent_size=16",
            "--config.experiment_kwargs.config.model.gnn_msg_steps=1",
            "--config.experiment_kwargs.config.task.pressure_levels=(500,850)",
            f"--config.experiment_kwargs.config.data.source={sample}/era5_sample.zarr",
            f"--config.experiment_kwargs.config.data.stats_dir={sample}/stats",
            f"--config.experiment_kwargs.config.eval.climatology={sample}/climatology.zarr",
            "--config.experiment_kwargs.config.data.generate_sample_dir=",
            f"--config.experiment_kwargs.config.data.global_batch_size={batch}",
            "--config.experiment_kwargs.config.data.train_end=2020-01-13",
            "--config.experiment_kwargs.config.data.prefetch=2",
            "--config.experiment_kwargs.config.optimizer.warmup_steps=2",
            "--config.experiment_kwargs.config.optimizer.decay_steps=1000",
            "--config.experiment_kwargs.config.eval.at_end=False"]


def _wait(procs, timeout=600):
    outputs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outputs.append(out)
        assert p.returncode == 0, out[-4000:]
    return outputs


@pytest.mark.slow
def test_four_devices_match_one_device(sample_dir, tmp_path):
    steps, batch = 3, 4
    one = _run_cli(_cli_overrides(sample_dir, tmp_path / "one", steps, batch) + ["--cpu_devices=1"])
    four = _run_cli(_cli_overrides(sample_dir, tmp_path / "four", steps, batch) + ["--cpu_devices=4"])
    _wait([one, four])
    a, _ = saved_params(str(tmp_path / "one"))
    b, _ = saved_params(str(tmp_path / "four"))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6), a, b)


@pytest.mark.slow
def test_two_processes_match_one_process(sample_dir, tmp_path):
    from conftest import free_port
    steps, batch = 3, 2
    port = free_port()
    single = _run_cli(_cli_overrides(sample_dir, tmp_path / "single", steps, batch)
                      + ["--cpu_devices=2"])
    multi = [_run_cli(_cli_overrides(sample_dir, tmp_path / "multi", steps, batch)
                      + ["--cpu_devices=1", f"--coordinator_address=127.0.0.1:{port}",
                         f"--coordinator_bind_address=127.0.0.1:{port}", "--num_processes=2",
                         f"--process_id={i}"]) for i in range(2)]
    _wait([single] + multi)
    a, _ = saved_params(str(tmp_path / "single"))
    b, _ = saved_params(str(tmp_path / "multi"))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6), a, b)


@pytest.mark.slow
def test_host_batch_trains_like_a_device_batch(sample_dir, tmp_path):
    """training.host_batch (data-parallel jit instead of pmap; the batch of multi-step rollouts
    in host memory) trains the same parameters as the pmapped device batch, on two local
    devices, through a 1-step and a 2-step rollout."""
    steps, batch = 3, 2
    host_batch = "--config.experiment_kwargs.config.training.host_batch=True"
    curriculum = ["--config.experiment_kwargs.config.optimizer.warmup_steps=1",  # step 0
                  "--config.experiment_kwargs.config.optimizer.decay_steps=1",   # step 1
                  "--cpu_devices=2"]                                               # step 2: 2 AR
    device = _run_cli(_cli_overrides(sample_dir, tmp_path / "device", steps, batch) + curriculum)
    host = _run_cli(_cli_overrides(sample_dir, tmp_path / "host", steps, batch)
                    + curriculum + [host_batch])
    outputs = _wait([device, host])
    assert "Compiling the training step for 2 autoregressive step(s)" in outputs[1], \
        outputs[1][-3000:]
    a, _ = saved_params(str(tmp_path / "device"))
    b, _ = saved_params(str(tmp_path / "host"))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


@pytest.mark.slow
def test_host_batch_across_processes_matches_one_process(sample_dir, tmp_path):
    """training.host_batch over two processes with one device each: the jitted update runs on
    the mesh of both processes' devices (gradients averaged over both), so it trains the same
    parameters as one process with two devices, through a 1-step and a 2-step rollout, with the
    2-step batches in host memory; the checkpoint both processes write resumes."""
    from conftest import free_port
    batch = 2
    flags = ["--config.experiment_kwargs.config.training.host_batch=True",
             "--config.experiment_kwargs.config.optimizer.warmup_steps=1",  # step 0: 1 AR
             "--config.experiment_kwargs.config.optimizer.decay_steps=1",   # step 1: 1 AR
             "--config.experiment_kwargs.config.optimizer.ar_end=2"]        # steps 2, 3: 2 AR

    def two_processes(steps):
        port = free_port()
        return [_run_cli(_cli_overrides(sample_dir, tmp_path / "multi", steps, batch) + flags
                         + ["--cpu_devices=1", f"--coordinator_address=127.0.0.1:{port}",
                            f"--coordinator_bind_address=127.0.0.1:{port}", "--num_processes=2",
                            f"--process_id={i}"]) for i in range(2)]

    single = _run_cli(_cli_overrides(sample_dir, tmp_path / "single", 4, batch) + flags
                      + ["--cpu_devices=2"])
    outputs = _wait([single] + two_processes(3))
    for out in outputs[1:]:
        assert "Compiling the training step for 2 autoregressive step(s)" in out, out[-3000:]
        assert "Batches of 2-step rollouts: in pinned_host memory of 2 devices over 2 process(es)" \
            in out, out[-3000:]
    assert saved_params(str(tmp_path / "multi"))[1]["step"] == 3
    for out in _wait(two_processes(4)):  # resumes at step 3
        assert "Restored checkpoint latest step 3" in out, out[-3000:]
    a, meta_a = saved_params(str(tmp_path / "single"))
    b, meta_b = saved_params(str(tmp_path / "multi"))
    assert meta_a["step"] == meta_b["step"] == 4
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6), a, b)


def test_configs_keep_the_pinned_keys():
    from configs import era5_0p25deg, era5_1deg
    for module in (sample_config, era5_1deg, era5_0p25deg):
        config = module.get_config()
        exp = config.experiment_kwargs.config
        model = model_configs.model_config_from(exp)
        task = model_configs.task_config_from(exp)
        assert exp.data.global_batch_size > 0 and "source" in exp.data and "stats_dir" in exp.data
        assert config.training_steps > 0 and config.checkpoint_dir and config.random_seed == 42
        assert exp.training.run_steps == config.training_steps
        assert model.latent_size > 0 and task.target_variables
    assert era5_1deg.get_config().experiment_kwargs.config.model.mesh_size == 5
    full = era5_0p25deg.get_config().experiment_kwargs.config
    assert full.model.mesh_size == 6 and len(full.task.pressure_levels) == 37
    # The 0.25 deg memory levers (README, "Accelerator memory"); recompute_grid needs the others.
    assert full.training.recompute_grid and full.training.remat_blocks and full.training.block_size
    # 12 steps within 30 GiB on TPU v4 needs the host batch, on across processes too.
    assert full.training.host_batch and full.training.offload_windows


def test_recompute_grid_reaches_the_predictor(sample_dir, tmp_path):
    config = tiny_config(sample_dir, str(tmp_path / "run"), steps=1)
    exp = config.experiment_kwargs.config
    exp.training.update(dict(remat_blocks=True, block_size=64, recompute_grid=True))
    assert experiment.Experiment("train", config=exp).predictor.recompute_grid


def test_memory_settings_go_to_the_environment(monkeypatch):
    for key in ("XLA_PYTHON_CLIENT_ALLOCATOR", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                "XLA_PYTHON_CLIENT_PREALLOCATE"):
        monkeypatch.delenv(key, raising=False)
    memory = sample_config.get_config().experiment_kwargs.config.memory
    memory.update(dict(allocator="platform", mem_fraction=0.5, preallocate=False))
    launch.apply_memory_settings(memory)
    assert os.environ["XLA_PYTHON_CLIENT_ALLOCATOR"] == "platform"
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"


@pytest.mark.slow
def test_nonfinite_step_is_skipped_and_fine_tuning_checks_the_checkpoint(sample_dir, tmp_path):
    from graphcast import checkpoint as gc_checkpoint
    config = tiny_config(sample_dir, str(tmp_path / "run"), steps=2)
    exp = experiment.Experiment("train", jax.random.PRNGKey(0), config.experiment_kwargs.config)
    exp._initialize_train()  # pylint: disable=protected-access
    before = jax.tree.map(np.array, exp.snapshot_state())
    batch = exp._train_input.next()  # pylint: disable=protected-access
    batch.pop("init_time")
    batch["inputs"]["2m_temperature"][...] = np.nan  # a poisoned example
    update = exp._update_fn(1)  # pylint: disable=protected-access
    params, opt_state, scalars = update(exp._params, exp._opt_state, compat.shard_local(batch),
                                        np.full((1,), 1e-3, np.float32))
    assert int(np.asarray(scalars["update_skipped"])[0]) == 1
    jax.tree.map(np.testing.assert_array_equal, before["params"],
                 jax.tree.map(lambda x: np.asarray(x)[0], params))
    assert [np.asarray(x)[0].tolist() for x in jax.tree.leaves(opt_state)] == \
        [np.asarray(x).tolist() for x in before["opt_state"].values()]

    # Fine-tuning: an official-format file whose model differs from the config is a named error.
    model = model_configs.model_config_from(config.experiment_kwargs.config)
    task = model_configs.task_config_from(config.experiment_kwargs.config)
    wrong = gc_checkpoint.CheckPoint(params=before["params"], model_config=model.__class__(
        **{**model.__dict__, "latent_size": 64}), task_config=task)
    path = str(tmp_path / "other.npz")
    gc_checkpoint.save(path, wrong)
    config.experiment_kwargs.config.training.init_checkpoint = path
    tuned = experiment.Experiment("train", jax.random.PRNGKey(0), config.experiment_kwargs.config)
    with pytest.raises(gc_checkpoint.CheckpointError, match="latent_size"):
        tuned._initial_params()  # pylint: disable=protected-access
