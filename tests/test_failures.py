"""Every way a run can end: a correct recovery or one clear, early error (issue 14).

Pure checks run in this process (preflight, the checkpointer, the run lock on disk and on the
GCS emulator, export, predict); a few behaviours need a real process: SIGTERM, the one-line
errors and exit statuses of the command line, and two trainings on one directory.
"""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import xarray as xr

import experiment
from data import validate
from graphcast import checkpoint as gc_checkpoint
from graphcast import exit_status
from graphcast import normalization
from graphcast import predict
from test_experiment import ROOT, _cli_overrides, tiny_config
from test_experiment import sample_dir  # noqa: F401  (session fixture: the synthetic sample)
from test_reliability import (_arrays, _checkpoint, _good_config, _good_data, _plain_config,
                              _save, _set, _stats_copy, _write_zarr, no_model)  # noqa: F401
from training import checkpointer as ckpt_lib
from training import compat
from training import export as export_lib
from training import launch
from training import logging_setup
from training import model_configs
from training import preflight
from training import run_lock

_SECRET = "FAKE-SECRET-14b7"


# -- 4. every check, in every mode, before expensive work --------------------------------------

def _config_change(dotted, value):
    def apply(config, tmp, sample):
        del tmp, sample
        if dotted.startswith("."):
            config[dotted[1:]] = value
        else:
            _set(config, dotted, value)
    return apply


def _stats_value(variable, kind_file, value):
    """Statistics whose `variable` in `kind_file` holds `value` (at every level)."""
    def apply(config, tmp, sample):
        out = _stats_copy(sample, tmp / "stats", lambda ds: ds)
        path = os.path.join(out, kind_file)
        ds = xr.load_dataset(path)
        ds[variable] = ds[variable] * 0 + value
        ds.to_netcdf(path + ".new")
        os.replace(path + ".new", path)
        config.experiment_kwargs.config.data.stats_dir = out
    return apply


def _data_with(edit):
    def apply(config, tmp, sample):
        del sample
        ds = edit(_good_data())
        config.experiment_kwargs.config.data.source = _write_zarr(ds, tmp / "bad.zarr")
    return apply


def _inf_at_start(ds):
    values = ds["2m_temperature"].values.copy()
    values[1, 2, 3] = np.inf
    return ds.assign(**{"2m_temperature": (ds["2m_temperature"].dims, values)})


def _truncated_chunk(config, tmp, sample):
    """A zarr store (one time per chunk) whose first 2m_temperature chunk is cut short."""
    del sample
    path = _write_zarr(_good_data().chunk({"time": 1}), tmp / "cut.zarr")
    chunks = sorted(os.path.join(d, f) for d, _, files in os.walk(f"{path}/2m_temperature")
                    for f in files if not f.startswith(".") and f != "zarr.json")
    with open(chunks[0], "r+b") as f:
        f.truncate(max(os.path.getsize(chunks[0]) // 3, 1))
    config.experiment_kwargs.config.data.source = path


def _empty_netcdf(config, tmp, sample):
    del sample
    (tmp / "empty.nc").write_bytes(b"")
    config.experiment_kwargs.config.data.source = str(tmp / "empty.nc")


def _not_a_zip(config, tmp, sample):
    del sample
    (tmp / "init.npz").write_text("this is not a zip file")
    config.experiment_kwargs.config.training.init_checkpoint = str(tmp / "init.npz")


def _nan_init_checkpoint(config, tmp, sample):
    del sample
    path = _checkpoint(tmp / "init.npz", config)
    ckpt = gc_checkpoint.load(path)
    ckpt.params["mesh"]["w"][0, 0] = np.nan
    gc_checkpoint.save(path, ckpt)
    config.experiment_kwargs.config.training.init_checkpoint = path


def _two_devices(monkeypatch):
    monkeypatch.setattr(preflight.jax, "device_count", lambda: 2)


CHECKS = [  # (id, apply(config, tmp, sample), error class, message pattern, monkeypatch)
    ("max_checkpoints_to_keep=0", _config_change(".max_checkpoints_to_keep", 0),
     preflight.ConfigError, "max_checkpoints_to_keep=0.*at least 1", None),
    ("training_steps=0", _config_change(".training_steps", 0), preflight.ConfigError,
     "training_steps=0", None),
    ("resolution=0", _config_change("model.resolution", 0.0), preflight.ConfigError,
     "model.resolution=0.0", None),
    ("workers=0", _config_change("data.workers", 0), preflight.ConfigError,
     "data.workers=0.*positive integer", None),
    ("eval.rollout_steps=0", _config_change("eval.rollout_steps", 0), preflight.ConfigError,
     "eval.rollout_steps=0", None),
    ("mesh_size=12", _config_change("model.mesh_size", 12), preflight.ConfigError,
     r"mesh_size=12 is too large.*167,772,162 nodes.*GiB", None),
    ("eval batch not divisible", _config_change("eval.batch_size", 3), preflight.BatchSizeError,
     "eval.batch_size=3 does not divide over the 2 devices", _two_devices),
    ("credential in a URL query", _config_change(
        "data.source", f"https://host/x.zarr?X-Goog-Signature={_SECRET}"),
     preflight.ConfigError, "data.source looks like a credential", None),
    ("NaN in statistics", _stats_value("temperature", "mean_by_level.nc", np.nan),
     normalization.StatsError, "mean_by_level.nc: 'temperature' has \\[nan, nan\\]", None),
    ("zero stddev", _stats_value("2m_temperature", "stddev_by_level.nc", 0.0),
     normalization.StatsError, "'2m_temperature' has \\[0.0\\].*finite and positive", None),
    ("negative diffs stddev", _stats_value("temperature", "diffs_stddev_by_level.nc", -1.0),
     normalization.StatsError, "diffs_stddev_by_level.nc: 'temperature'.*levels \\[500, 850\\]",
     None),
    ("Inf in the data", _data_with(_inf_at_start), validate.NaNDataError,
     "Inf found in variable '2m_temperature' at time.*2020-01-01 06:00", None),
    ("truncated zarr chunk", _truncated_chunk, validate.CorruptDataError,
     "variable '2m_temperature' at time 2020-01-01T00.*cut.zarr", None),
    ("empty netCDF", _empty_netcdf, validate.CorruptDataError, "empty.nc is not a readable", None),
    ("init checkpoint not a zip", _not_a_zip, gc_checkpoint.CheckpointError,
     "init.npz is not a readable", None),
    ("init checkpoint with NaN", _nan_init_checkpoint, gc_checkpoint.CheckpointError,
     "non-finite.*mesh/w", None),
    ("climatology typo", _config_change("eval.climatology", "/no/such/climatology.zarr"),
     preflight.ClimatologyError, "eval.climatology=/no/such/climatology.zarr", None),
]


@pytest.mark.parametrize("case", CHECKS, ids=[c[0] for c in CHECKS])
def test_each_check_is_a_named_error_before_compile_or_write(case, sample_dir, tmp_path,  # noqa: F811
                                                             monkeypatch, no_model):  # noqa: F811
    _, apply, error, pattern, patch = case
    config = _good_config(sample_dir, tmp_path)
    apply(config, tmp_path, sample_dir)
    if patch:
        patch(monkeypatch)
    with pytest.raises(error, match=pattern) as info:
        preflight.check_before_start(config)
    assert not os.path.exists(config.checkpoint_dir)
    assert _SECRET not in str(info.value)


def test_statistics_of_data_with_an_inf_are_refused(tmp_path):
    from data import stats
    from graphcast import config as gc_config
    source = _write_zarr(_inf_at_start(_good_data(levels=gc_config.PRESSURE_LEVELS[13],
                                                  periods=20)), tmp_path / "inf.zarr")
    with pytest.raises(validate.NaNDataError, match="Inf found in variable '2m_temperature'"):
        stats.run(source, "2020-01-01", "2020-01-05", str(tmp_path / "stats"))
    assert not (tmp_path / "stats").exists()


@pytest.mark.parametrize("mode", ["eval", "export"])
def test_eval_and_export_run_the_config_checks(mode, sample_dir, tmp_path, no_model):  # noqa: F811
    config = _good_config(sample_dir, tmp_path)
    config.max_checkpoints_to_keep = 0
    with pytest.raises(preflight.ConfigError, match="max_checkpoints_to_keep"):
        preflight.check_before_start(config, mode, export_path=str(tmp_path / "m.npz"))
    config.max_checkpoints_to_keep = 2
    config.experiment_kwargs.config.data.source = f"gs://u:{_SECRET}@bucket/x.zarr"
    with pytest.raises(preflight.ConfigError) as info:
        preflight.check_before_start(config, mode, export_path=str(tmp_path / "m.npz"))
    assert _SECRET not in str(info.value)


def test_eval_mode_checks_that_it_can_write_best(sample_dir, tmp_path, gcs_emulator):  # noqa: F811
    """The eval job writes best/ into the checkpoint directory: an existing one that cannot be
    written is named at start; one that does not exist yet is waited for, not created."""
    config = _good_config(sample_dir, tmp_path)
    config.checkpoint_dir = "gs://no-such-bucket-eval/run"
    with pytest.raises(preflight.LocationError, match="checkpoint_dir .*gs://no-such-bucket-eval"):
        preflight.check_before_start(config, "eval")
    config.checkpoint_dir = str(tmp_path / "not_yet")
    preflight.check_before_start(config, "eval")
    assert not (tmp_path / "not_yet").exists()


def test_eval_mode_checks_the_eval_batch_and_the_data(sample_dir, tmp_path, monkeypatch):  # noqa: F811
    config = _good_config(sample_dir, tmp_path)
    config.experiment_kwargs.config.eval.batch_size = 3
    _two_devices(monkeypatch)
    with pytest.raises(preflight.BatchSizeError, match="eval.batch_size=3"):
        preflight.check_before_start(config, "eval")
    config.experiment_kwargs.config.eval.batch_size = 2
    _stats_value("temperature", "stddev_by_level.nc", np.inf)(config, tmp_path, sample_dir)
    with pytest.raises(normalization.StatsError, match="'temperature' has \\[inf, inf\\]"):
        preflight.check_before_start(config, "eval")


def test_unwritable_or_unreachable_locations_are_named_within_the_time_limit(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(preflight.LocationError, match="checkpoint_dir .*a_file/run is not "
                                                      "writable"):
        preflight.check_writable(str(tmp_path / "a_file" / "run"), "config.checkpoint_dir")
    with pytest.raises(preflight.LocationError, match="missing is not writable.*does not exist"):
        preflight.check_writable(str(tmp_path / "missing"), "the directory of --export_path",
                                 create=False)
    # Storage that accepts connections but never answers: the probe gives up in time.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        began = time.monotonic()
        with pytest.raises(preflight.LocationError, match="gs://bucket/run is not writable.*"
                                                          "no answer within 3 s"):
            preflight.check_writable("gs://bucket/run", "config.checkpoint_dir", timeout_s=3,
                                     storage_options={"endpoint_url": "http://127.0.0.1:"
                                                      f"{silent.getsockname()[1]}"})
        assert time.monotonic() - began < 10
    finally:
        silent.close()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(preflight.LocationError, match="gs://bucket/run is not writable.*"
                                                      f"127.0.0.1:{port}"):
        preflight.check_writable("gs://bucket/run", "config.checkpoint_dir",
                                 storage_options={"endpoint_url": f"http://127.0.0.1:{port}"})


def test_gs_checkpoint_dir_in_a_missing_bucket_is_named(gcs_emulator):
    endpoint, bucket = gcs_emulator
    preflight.check_writable(f"gs://{bucket}/run", "config.checkpoint_dir")  # writable
    with pytest.raises(preflight.LocationError, match="gs://no-such-bucket-14/run"):
        preflight.check_writable("gs://no-such-bucket-14/run", "config.checkpoint_dir",
                                 timeout_s=30)


# -- 2. an unreadable newest step is moved aside; resumes name a changed model ---------------

def test_unreadable_newest_step_is_moved_aside_and_saved_again(tmp_path, caplog):
    config = _plain_config(tmp_path / "c")
    checkpointer = ckpt_lib.Checkpointer(config, "train")
    _save(checkpointer, 1, _arrays(1.0))
    _save(checkpointer, 2, _arrays(2.0))
    series = os.path.join(config.checkpoint_dir, "latest")
    os.remove(os.path.join(series, "2", "meta", "metadata"))
    fresh = ckpt_lib.Checkpointer(config, "train")
    state = fresh.get_experiment_state("latest")
    state.global_step = 0
    state.experiment_module = _Module()
    with caplog.at_level(logging.ERROR):
        fresh.restore("latest")
    assert state.global_step == 1
    aside = [n for n in os.listdir(series) if n.startswith("unreadable-2-")]
    assert len(aside) == 1 and any(aside[0] in r.getMessage() for r in caplog.records)
    _save(fresh, 2, _arrays(3.0))  # the retrained step 2 is written, not skipped
    again = ckpt_lib.Checkpointer(config, "train")
    assert again.all_steps("latest") == [1, 2]
    arrays, _ = again.read("latest")
    jax.tree.map(np.testing.assert_array_equal, arrays["experiment/params"], _arrays(3.0))


class _Module:
    def restore_from_snapshot(self, snapshot):
        self.snapshot = snapshot


def test_resuming_with_another_model_names_the_fields(tmp_path):
    config = _plain_config(tmp_path / "c")
    _save(ckpt_lib.Checkpointer(config, "train"), 1, _arrays(1.0))
    config.experiment_kwargs.config.model.latent_size = 64
    config.experiment_kwargs.config.task.pressure_levels = (500,)
    other = ckpt_lib.Checkpointer(config, "train")
    other.get_experiment_state("latest").experiment_module = _Module()
    with pytest.raises(ckpt_lib.ConfigMismatchError,
                       match=r"model.latent_size: checkpoint has 32, config has 64.*"
                             r"task.pressure_levels"):
        other.restore("latest")


def test_max_checkpoints_to_keep_zero_is_refused_before_anything(tmp_path):
    config = _plain_config(tmp_path / "c")
    config.max_checkpoints_to_keep = 0
    with pytest.raises(preflight.ConfigError, match="0 would delete every checkpoint"):
        preflight.check_config(config)


# -- 7. eval on a directory without a checkpoint ----------------------------------------------

def test_eval_without_a_checkpoint_says_it_waits_then_gives_up(tmp_path, caplog):
    config = _plain_config(tmp_path / "typo")
    config.experiment_kwargs.config.eval.restore_wait_s = 2
    checkpointer = ckpt_lib.Checkpointer(config, "eval")
    began = time.monotonic()
    with caplog.at_level(logging.WARNING):
        with pytest.raises(ckpt_lib.NoCheckpointError, match=r"No checkpoint appeared in .*typo/"
                                                             r"latest within eval.restore_wait_s"):
            checkpointer.restore_path("latest")
    assert 2 <= time.monotonic() - began < 10
    waiting = [r for r in caplog.records if "waiting up to" in r.getMessage()]
    assert len(waiting) == 1 and "typo/latest" in waiting[0].getMessage()


# -- 3. the run lock ---------------------------------------------------------------------------

def _lock_refused(directory, **kwargs):
    with pytest.raises(run_lock.RunLockedError) as info:
        run_lock.RunLock(directory, **kwargs).acquire()
    return str(info.value)


def _check_lock_semantics(directory, read_holder, write_holder, caplog):
    """Refusal naming the holder, release, takeover of a dead or silent holder with a warning,
    and the heartbeat."""
    first = run_lock.RunLock(directory, stale_after_s=2)
    first.acquire()
    message = _lock_refused(directory, stale_after_s=2)
    assert socket.gethostname() in message and f"process {os.getpid()}" in message
    assert "started 20" in message and "UTC" in message
    before = read_holder()["heartbeat"]
    time.sleep(1.2)  # the heartbeat (every stale_after_s / 4) moves on
    assert read_holder()["heartbeat"] > before
    first.release()
    assert read_holder() is None

    # A holder whose process is gone (kill -9 on this host): taken over at once, with a warning.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    now = time.time()
    write_holder({"host": socket.gethostname(), "pid": dead.pid, "started": now - 60,
                  "heartbeat": now, "nonce": "x"})
    with caplog.at_level(logging.WARNING):
        taker = run_lock.RunLock(directory, stale_after_s=600)
        taker.acquire()
    assert any(f"process {dead.pid} no longer runs" in r.getMessage() for r in caplog.records)
    assert read_holder()["pid"] == os.getpid()
    taker.release()

    # A holder on another host whose heartbeat stopped: refused while fresh, taken over stale.
    write_holder({"host": "other-host", "pid": 1, "started": now - 60, "heartbeat": now - 30,
                  "nonce": "y"})
    assert "other-host" in _lock_refused(directory, stale_after_s=600)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        taker = run_lock.RunLock(directory, stale_after_s=10)
        taker.acquire()
    assert any("heartbeat is 30 s old" in r.getMessage() for r in caplog.records)
    taker.release()


def test_local_run_lock(tmp_path, caplog):
    path = tmp_path / "run" / run_lock.LOCK_NAME

    def read():
        return json.loads(path.read_text()) if path.exists() else None

    def write(holder):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(holder))

    _check_lock_semantics(str(tmp_path / "run"), read, write, caplog)


def test_gcs_run_lock_on_the_emulator(gcs_emulator, caplog):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    endpoint, bucket_name = gcs_emulator
    client = storage.Client(project="test", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": endpoint})
    bucket = client.bucket(bucket_name)
    name = f"lock-test-{os.getpid()}/{run_lock.LOCK_NAME}"

    def read():
        blob = bucket.get_blob(name)
        return json.loads(blob.download_as_text()) if blob else None

    def write(holder):
        bucket.blob(name).upload_from_string(json.dumps(holder))

    _check_lock_semantics(f"gs://{bucket_name}/{name.rsplit('/', 1)[0]}", read, write, caplog)


# -- 5. export and predict refuse non-finite or mismatched parameters -------------------------

def _export_config(sample, tmp):
    return tiny_config(sample, str(tmp / "run"), steps=2)


def _save_params(config, params, step=1):
    checkpointer = ckpt_lib.Checkpointer(config, "train")
    _save(checkpointer, step, params)


def _model_params(config):
    exp = config.experiment_kwargs.config
    model, task = model_configs.model_config_from(exp), model_configs.task_config_from(exp)
    from graphcast import memory, rollout
    res = model.resolution
    lat = np.linspace(-90, 90, int(round(180 / res)) + 1)
    lon = np.arange(int(round(360 / res))) * res
    predictor = rollout.Predictor(model, task, memory.unit_stats(task), lat, lon)
    shapes = jax.eval_shape(predictor.init, jax.random.PRNGKey(0),
                            memory.batch_shapes(task, 1, 1, lat.size, lon.size))
    return jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), shapes)


def test_export_refuses_mismatched_or_non_finite_parameters(sample_dir, tmp_path, monkeypatch):  # noqa: F811
    config = _export_config(sample_dir, tmp_path)
    params = _model_params(config)
    _save_params(config, params)
    out = tmp_path / "model.npz"
    export_lib.export(config, str(out), None)  # the good case exports
    assert gc_checkpoint.load(str(out)).model_config.latent_size == 16

    relabelled = _export_config(sample_dir, tmp_path)
    relabelled.experiment_kwargs.config.model.latent_size = 64
    with pytest.raises(ckpt_lib.ConfigMismatchError,
                       match="model.latent_size: checkpoint has 16, config has 64"):
        export_lib.export(relabelled, str(tmp_path / "relabelled.npz"), None)
    assert not (tmp_path / "relabelled.npz").exists()
    # Even when the recorded config agrees, the shapes tell the sizes apart.
    relabelled.checkpoint_dir = str(tmp_path / "relabelled_run")
    _save_params(relabelled, params)
    with pytest.raises(ckpt_lib.ConfigMismatchError,
                       match="model.latent_size: parameters have 16, config has 64"):
        export_lib.export(relabelled, str(tmp_path / "relabelled.npz"), None)

    with pytest.raises(preflight.LocationError, match="no/such/dir"):
        export_lib.export(config, str(tmp_path / "no" / "such" / "dir" / "m.npz"), None)

    wrong = jax.tree.map(lambda x: x, params)
    module = sorted(wrong)[0]
    name = sorted(wrong[module])[0]
    wrong[module][name] = np.zeros((3, 3), np.float32)
    _save_params(config, wrong, step=2)
    with pytest.raises(ckpt_lib.ConfigMismatchError, match=f"{module}/{name}: checkpoint "
                                                           r"\(3, 3\)"):
        export_lib.export(config, str(tmp_path / "wrong.npz"), None)

    bad = jax.tree.map(lambda x: x.copy(), params)
    bad[module][name].flat[0] = np.nan
    monkeypatch.setattr(ckpt_lib, "check_finite", lambda *a: None)  # as if written by a bug
    _save_params(config, bad, step=3)
    monkeypatch.undo()
    with pytest.raises(gc_checkpoint.CheckpointError, match=f"non-finite.*{module}/{name}"):
        export_lib.export(config, str(tmp_path / "nan.npz"), None)
    assert not (tmp_path / "nan.npz").exists()


def test_export_description_redacts_credentials(tmp_path):
    config = _plain_config(tmp_path / "c")
    config.experiment_kwargs.config.data.source = (
        f"https://user:{_SECRET}@host/x.zarr?X-Goog-Signature={_SECRET}&alt=media")
    text = export_lib.export_description(config, 5)
    assert _SECRET not in text and "https://<redacted>@host/x.zarr" in text and "alt=media" in text


_REFERENCE = os.path.join(os.path.dirname(__file__), "fixtures", "graphcast_reference")


def _predict(argv, capsys):
    with pytest.raises(SystemExit) as info:
        predict.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return info.value.code, err


def _predict_args(tmp, checkpoint=None, dataset=None, output=None):
    return ["--checkpoint", checkpoint or f"{_REFERENCE}/checkpoint.npz",
            "--dataset", dataset or f"{_REFERENCE}/example_batch.nc",
            "--stats-dir", f"{_REFERENCE}/stats", "--steps", "1",
            "--output", output or str(tmp / "out.nc")]


def test_predict_refuses_bad_inputs_with_one_line_and_a_status(tmp_path, capsys, monkeypatch):
    computed = []
    monkeypatch.setattr(predict.rollout, "Predictor",
                        lambda *a, **k: computed.append(1) or (_ for _ in ()).throw(
                            AssertionError("the forecast was started")))
    status, err = _predict(_predict_args(tmp_path, output=str(tmp_path / "nodir" / "o.nc")),
                           capsys)
    assert status == exit_status.LOCATION and len(err) == 1 and "nodir" in err[0]

    ckpt = gc_checkpoint.load(f"{_REFERENCE}/checkpoint.npz")
    module = sorted(ckpt.params)[0]
    name = sorted(ckpt.params[module])[0]
    ckpt.params[module][name].flat[0] = np.nan
    gc_checkpoint.save(str(tmp_path / "nan.npz"), ckpt)
    status, err = _predict(_predict_args(tmp_path, checkpoint=str(tmp_path / "nan.npz")), capsys)
    assert status == exit_status.CHECKPOINT and len(err) == 1
    assert "non-finite" in err[0] and f"{module}/{name}" in err[0]

    example = xr.load_dataset(f"{_REFERENCE}/example_batch.nc")
    values = example["2m_temperature"].values.copy()
    values[0, 3, 5, 5] = np.nan  # the last input frame (targets are anchored at the end)
    example["2m_temperature"] = (example["2m_temperature"].dims, values)
    example.to_netcdf(tmp_path / "nan_input.nc")
    status, err = _predict(_predict_args(tmp_path, dataset=str(tmp_path / "nan_input.nc")),
                           capsys)
    assert status == exit_status.DATA and len(err) == 1
    when = str(example["datetime"].values[0, 3])[:19]
    assert "'2m_temperature'" in err[0] and when in err[0], err

    (tmp_path / "empty.nc").write_bytes(b"")
    status, err = _predict(_predict_args(tmp_path, dataset=str(tmp_path / "empty.nc")), capsys)
    assert status == exit_status.DATA and "empty.nc" in err[0]
    assert not computed


# -- 6. credentials ----------------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    f"https://user:{_SECRET}@host/data.zarr",
    f"gs://bucket/x.zarr?token={_SECRET}",
    f"https://storage.googleapis.com/b/o?X-Goog-Algorithm=GOOG4&X-Goog-Credential={_SECRET}"
    f"&X-Goog-Signature={_SECRET}",
    f"https://host/o?alt=media&access_token={_SECRET}",
])
def test_credentials_in_urls_are_redacted_and_refused(url, tmp_path):
    assert _SECRET not in preflight.redact(f"opening {url} now")
    config = _plain_config(tmp_path / "c")
    config.experiment_kwargs.config.data.source = url
    with pytest.raises(preflight.ConfigError) as info:
        preflight.check_no_credentials(config)
    assert _SECRET not in str(info.value)
    assert _SECRET not in ckpt_lib.config_json(config)  # even when the checks were bypassed


def test_log_lines_are_redacted():
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Keep()
    handler.addFilter(logging_setup.Redacting())
    logger = logging.getLogger("test_failures.redaction")
    logger.addHandler(handler)
    try:
        logger.warning("config:\n source: %s", f"https://u:{_SECRET}@h/x?sig={_SECRET}")
    finally:
        logger.removeHandler(handler)
    assert records and _SECRET not in records[0] and "<redacted>" in records[0]


# -- 7. user errors vs bugs --------------------------------------------------------------------

def test_only_user_errors_are_shortened():
    with pytest.raises(SystemExit) as info:
        exit_status.run_reporting(lambda: (_ for _ in ()).throw(
            preflight.ConfigError("bad\nfield")), launch.USER_ERRORS)
    assert info.value.code == exit_status.CONFIG
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        exit_status.run_reporting(lambda: 1 / 0, launch.USER_ERRORS)
    statuses = [status for _, status in launch.USER_ERRORS]
    kinds = {exit_status.CONFIG, exit_status.DATA, exit_status.STATS, exit_status.CHECKPOINT,
             exit_status.LOCATION, exit_status.LOCKED, exit_status.DIVERGED,
             exit_status.TERMINATED, exit_status.INTERRUPTED}
    assert kinds <= set(statuses)


# -- 1. whatever ends a run, the pending save completes and the real error is shown ------------

class _EvalFails(experiment.Experiment):
    def evaluate(self, *, global_step, rng, writer):
        raise RuntimeError("the final evaluation exploded")


def _slow_json_saves(monkeypatch, seconds):
    """Every checkpoint save stays in flight for `seconds` (its metadata item writes slowly)."""
    original = ocp.JsonCheckpointHandler.async_save

    async def slow(self, *args, **kwargs):
        time.sleep(seconds)
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", slow)


@pytest.mark.slow
def test_failing_final_evaluation_keeps_the_last_step_and_its_error(sample_dir, tmp_path,  # noqa: F811
                                                                     monkeypatch):
    config = tiny_config(sample_dir, str(tmp_path / "run"), steps=3)
    config.save_checkpoint_interval = 1
    config.experiment_kwargs.config.eval.at_end = True
    _slow_json_saves(monkeypatch, 1.0)
    compat.apply()
    with pytest.raises(RuntimeError, match="the final evaluation exploded"):
        launch.run(config, "train", _EvalFails)
    monkeypatch.undo()
    reader = ckpt_lib.Checkpointer(config, "read")
    assert reader.all_steps("latest")[-1] == 3  # saved before the evaluation, and waited for
    _, meta = reader.read("latest")
    assert meta["step"] == 3
    assert not os.path.exists(os.path.join(config.checkpoint_dir, run_lock.LOCK_NAME))


class _InterruptedAt3(experiment.Experiment):
    def step(self, *, global_step, rng, writer):
        if int(np.asarray(global_step).ravel()[0]) == 3:  # the 4th step (jaxline counts from 0)
            raise KeyboardInterrupt  # Ctrl-C while step 3's save is still being written
        return super().step(global_step=global_step, rng=rng, writer=writer)


@pytest.mark.slow
def test_ctrl_c_waits_for_the_save_in_flight(sample_dir, tmp_path, monkeypatch):  # noqa: F811
    config = tiny_config(sample_dir, str(tmp_path / "run"), steps=5)
    config.save_checkpoint_interval = 1
    _slow_json_saves(monkeypatch, 2.0)
    compat.apply()
    with pytest.raises(KeyboardInterrupt):
        launch.run(config, "train", _InterruptedAt3)
    monkeypatch.undo()
    reader = ckpt_lib.Checkpointer(config, "read")
    assert reader.all_steps("latest") == [1, 2, 3]
    assert reader.read("latest")[1]["step"] == 3
    assert not os.path.exists(os.path.join(config.checkpoint_dir, run_lock.LOCK_NAME))


def test_the_eval_job_takes_no_lock_and_names_a_missing_checkpoint(sample_dir, tmp_path):  # noqa: F811
    config = _good_config(sample_dir, tmp_path)
    config.experiment_kwargs.config.eval.restore_wait_s = 1
    holder = run_lock.RunLock(config.checkpoint_dir)
    holder.acquire()  # a live training run holds the directory
    compat.apply()
    try:
        with pytest.raises(ckpt_lib.NoCheckpointError, match="run/latest"):
            launch.run(config, "eval", experiment.Experiment)
    finally:
        holder.release()


# -- command line: one line per user error, SIGTERM, two runs on one directory ------------------

def _cli(args, timeout=300):
    return subprocess.run([sys.executable, "experiment.py", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout)


def _error_lines(text):
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_user_errors_are_one_line_with_their_status(sample_dir, tmp_path):  # noqa: F811
    base = _cli_overrides(sample_dir, tmp_path / "run", 2, 2)
    out = _cli(base + ["--config.experiment_kwargs.config.data.bogus_field=3"])
    assert out.returncode == exit_status.CONFIG, out.stderr[-2000:]
    assert _error_lines(out.stderr) == [line for line in out.stderr.splitlines() if line.strip()]
    assert "data.bogus_field" in out.stderr and "Traceback" not in out.stderr

    # A credential in data.source, with the sample generator on: refused before anything reads
    # or prints the source.
    out = _cli(base + [f"--config.experiment_kwargs.config.data.source="
                       f"https://user:{_SECRET}@host/era5.zarr?token={_SECRET}",
                       f"--config.experiment_kwargs.config.data.generate_sample_dir={tmp_path}/s",
                       "--verbosity=1"])
    assert out.returncode == exit_status.CONFIG, out.stderr[-2000:]
    assert _SECRET not in out.stdout + out.stderr and "Traceback" not in out.stderr
    assert len(_error_lines(out.stderr)) == 1 and "data.source" in out.stderr
    assert not (tmp_path / "s").exists() and not (tmp_path / "run").exists()


def _read_until(proc, pattern, timeout=240):
    """Lines of proc's output up to the first matching `pattern` (a background reader)."""
    lines, found = [], threading.Event()

    def pump():
        for line in proc.stdout:
            lines.append(line)
            if re.search(pattern, line):
                found.set()
        found.set()

    threading.Thread(target=pump, daemon=True).start()
    assert found.wait(timeout) and any(re.search(pattern, x) for x in lines), "".join(lines)[-3000:]
    return lines


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_a_second_run_is_refused(sample_dir, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    args = _cli_overrides(sample_dir, run, 100000, 2) + [
        "--config.save_checkpoint_interval=100000", "--config.log_train_data_interval=1"]
    training = subprocess.Popen([sys.executable, "experiment.py", *args], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        lines = _read_until(training, r"\[train\] step 3\b")

        second = _cli(args)  # the same directory, while the first run trains
        assert second.returncode == exit_status.LOCKED, second.stderr[-2000:]
        assert len(_error_lines(second.stderr)) == 1 and "Traceback" not in second.stderr
        assert f"process {training.pid}" in second.stderr
        assert socket.gethostname() in second.stderr and "started" in second.stderr

        began = time.monotonic()
        training.send_signal(signal.SIGTERM)
        training.wait(timeout=120)
        took = time.monotonic() - began
    finally:
        if training.poll() is None:
            training.kill()
    output = "".join(lines)
    assert training.returncode == exit_status.TERMINATED, output[-3000:]
    assert took < 60, took
    print(f"SIGTERM to exit: {took:.1f} s")
    saved = re.search(r"Stopped by SIGTERM; saved checkpoint step (\d+)", output)
    assert saved, output[-3000:]
    step = int(saved.group(1))
    reader = ckpt_lib.Checkpointer(_plain_config(run), "read")
    assert reader.all_steps("latest") == [step] and step >= 3
    arrays, meta = reader.read("latest")
    assert meta["step"] == step
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(arrays["experiment/params"]))
    assert not (run / run_lock.LOCK_NAME).exists()
