"""Reliability under bad input, non-finite values, failed checkpoint writes and secrets (issue 6).

The bad-input catalogue runs `preflight.check_before_start` (what `run()` calls before the
writers, the checkpointer and jaxline start) and asserts a named error, no XLA compile and no
file under the checkpoint directory. The other tests drive jaxline in this process on the tiny
config of test_experiment, or experiment.py in a subprocess where a real process must die.
"""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import xarray as xr

import experiment
from conftest import synthetic_wb2
from data import validate
from graphcast import checkpoint as gc_checkpoint
from graphcast import normalization
from graphcast import rollout
from test_experiment import ROOT, saved_params, tiny_config, train
from test_experiment import sample_dir  # noqa: F401  (session fixture: the synthetic sample)
from training import checkpointer as ckpt_lib
from training import model_configs
from training import nonfinite
from training import preflight

_LEVELS = (500, 850)


# -- 5. bad input catalogue ----------------------------------------------------------------------

def _write_zarr(ds: xr.Dataset, path) -> str:
    ds.to_zarr(str(path), mode="w", consolidated=True)
    return str(path)


def _good_data(**kwargs) -> xr.Dataset:
    """12 days of 6-hourly 5.625-degree data with the task's variables and levels."""
    return synthetic_wb2(**{"levels": _LEVELS, "periods": 48, **kwargs})


def _with_times(ds: xr.Dataset, times) -> xr.Dataset:
    return ds.assign_coords(time=np.asarray(times, "datetime64[ns]"))


def _stats_copy(sample, out, edit) -> str:
    """A copy of the sample statistics with `edit(dataset) -> dataset` applied to each file."""
    os.makedirs(out, exist_ok=True)
    for name in normalization.STATS_FILES.values():
        edit(xr.load_dataset(os.path.join(sample, "stats", name))).to_netcdf(os.path.join(out, name))
    return str(out)


def _checkpoint(path, config, **task_changes) -> str:
    exp = config.experiment_kwargs.config
    task = model_configs.task_config_from(exp)
    task = task.__class__(**{**task.__dict__, **task_changes})
    ckpt = gc_checkpoint.CheckPoint(params={"mesh": {"w": np.zeros((2, 2), np.float32)}},
                                    model_config=model_configs.model_config_from(exp), task_config=task)
    gc_checkpoint.save(str(path), ckpt)
    return str(path)


def _object_npz(path) -> str:
    np.savez(str(path), **{"params:mesh:w": np.array([{"evil": 1}], dtype=object)})
    return str(path)


def _truncated_npz(path, config) -> str:
    good = _checkpoint(str(path) + ".good.npz", config)
    with open(good, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return str(path)


def _set(config, dotted: str, value):
    node = config.experiment_kwargs.config
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    return config


def _data_case(make):
    """A case whose data source is `make(tmp) -> Dataset`, written as zarr."""
    def apply(config, tmp, sample):
        del sample
        config.experiment_kwargs.config.data.source = _write_zarr(make(), tmp / "bad.zarr")
    return apply


def _nan_first_frame():
    ds = _good_data()
    values = ds["2m_temperature"].values.copy()
    values[0, 3, 4] = np.nan
    return ds.assign(**{"2m_temperature": (ds["2m_temperature"].dims, values)})


def _extra_dim():
    ds = _good_data()
    bad = ds["temperature"].isel(level=0, drop=True).expand_dims(member=2, axis=1)
    return ds.assign(**{"2m_temperature": bad})


def _uneven_lat():
    ds = _good_data()
    lat = ds["latitude"].values.copy()
    lat[5] += 1.0
    return ds.assign_coords(latitude=lat)


def _lat_out_of_range():
    ds = _good_data()
    return ds.assign_coords(latitude=ds["latitude"].values * 1.5)


def _gap_in_times():
    ds = _good_data()
    times = ds["time"].values.copy()
    times[20:] += np.timedelta64(6, "h")
    return _with_times(ds, times)


def _duplicate_times():
    ds = _good_data()
    times = ds["time"].values.copy()
    times[10] = times[9]
    return _with_times(ds, times)


def _bad_longitudes():
    ds = _good_data()
    return ds.assign_coords(longitude=ds["longitude"].values + 400.0)


def _config_case(dotted, value):
    def apply(config, tmp, sample):
        del tmp, sample
        _set(config, dotted, value)
    return apply


def _stats_case(edit):
    def apply(config, tmp, sample):
        config.experiment_kwargs.config.data.stats_dir = _stats_copy(sample, tmp / "stats", edit)
    return apply


def _ckpt_case(make):
    def apply(config, tmp, sample):
        del sample
        config.experiment_kwargs.config.training.init_checkpoint = make(tmp / "init.npz", config)
    return apply


def _two_devices(monkeypatch):
    monkeypatch.setattr(preflight.jax, "device_count", lambda: 2)


BAD_INPUTS = [  # (id, apply(config, tmp, sample), error class, message pattern, monkeypatch)
    ("missing variable", _data_case(lambda: _good_data().drop_vars("2m_temperature")),
     validate.MissingVariablesError, "2m_temperature", None),
    ("missing level", _data_case(lambda: _good_data(levels=(500, 700))),
     validate.MissingLevelsError, "850", None),
    ("wrong dims", _data_case(_extra_dim), validate.DimensionError, "2m_temperature", None),
    ("non-uniform latitude", _data_case(_uneven_lat), validate.LatitudeError, "uniformly", None),
    ("latitude outside [-90, 90]", _data_case(_lat_out_of_range), validate.LatitudeError,
     "outside", None),
    ("longitude convention", _data_case(_bad_longitudes), validate.LongitudeConventionError,
     "360", None),
    ("grid not matching the resolution", _data_case(lambda: _good_data(resolution=2.8125)),
     validate.GridMismatchError, "5.625", None),
    ("12-hourly times", _data_case(lambda: _good_data(freq="12h")), validate.TimeSpacingError,
     "12:00:00", None),
    ("gap in times", _data_case(_gap_in_times), validate.TimeSpacingError, "Irregular", None),
    ("duplicate times", _data_case(_duplicate_times), validate.DuplicateTimesError,
     "2020-01-03 06:00", None),
    ("NaN in a chunk", _data_case(_nan_first_frame), validate.NaNDataError,
     "2m_temperature.*2020-01-01", None),
    ("missing source", _config_case("data.source", "/nonexistent/era5.zarr"),
     validate.SourceNotFoundError, "/nonexistent/era5.zarr", None),
    ("stats missing a variable", _stats_case(lambda d: d.drop_vars("2m_temperature")),
     normalization.StatsError, "2m_temperature", None),
    ("stats for other levels", _stats_case(lambda d: d.sel(level=[250, 1000])),
     normalization.StatsError, r"\[500, 850\]", None),
    ("checkpoint task differs", _ckpt_case(lambda p, c: _checkpoint(p, c,
                                                                    pressure_levels=(500, 700))),
     gc_checkpoint.CheckpointError, "task.pressure_levels", None),
    ("truncated npz", _ckpt_case(_truncated_npz), gc_checkpoint.CheckpointError,
     "truncated or corrupt", None),
    ("npz with object arrays", _ckpt_case(lambda p, c: _object_npz(p)),
     gc_checkpoint.CheckpointError, "refusing to unpickle", None),
    ("unknown config field", _config_case("data.batch_size", 4), preflight.ConfigError,
     "data.batch_size", None),
    ("batch not divisible by devices", _config_case("data.global_batch_size", 3),
     preflight.BatchSizeError, "2 devices", _two_devices),
    ("eval rollout beyond the split", _config_case("eval.rollout_steps", 40),
     preflight.RolloutTooLongError, "eval split", None),
    ("credential in config", _config_case("data.storage_options", {"token": "ya29.fake"}),
     preflight.ConfigError, "storage_options.token", None),
]


@pytest.fixture
def no_model(monkeypatch):
    """Building the model (the first step towards compiling it) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the input error was found")

    monkeypatch.setattr(rollout, "Predictor", refuse)


def test_the_catalogue_is_large_enough():
    assert len({case[2] for case in BAD_INPUTS}) >= 12 and len(BAD_INPUTS) >= 15


def _good_config(sample, tmp):
    config = tiny_config(sample, str(tmp / "run"), steps=4)
    data = config.experiment_kwargs.config.data
    data.update(dict(source=_write_zarr(_good_data(), tmp / "good.zarr"),
                     train_start="2020-01-01", train_end="2020-01-08",
                     eval_start="2020-01-09", eval_end="2020-01-12"))
    config.experiment_kwargs.config.eval.at_end = True
    return config


def test_good_inputs_pass_the_checks(sample_dir, tmp_path):  # noqa: F811
    preflight.check_before_start(_good_config(sample_dir, tmp_path))


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_named_error_before_compile_or_write(case, sample_dir, tmp_path,  # noqa: F811
                                                            monkeypatch, no_model):
    _, apply, error, pattern, patch = case
    config = _good_config(sample_dir, tmp_path)
    apply(config, tmp_path, sample_dir)
    if patch:
        patch(monkeypatch)
    with pytest.raises(error, match=pattern) as info:
        preflight.check_before_start(config)
    assert type(info.value).__name__ != "ValueError"  # a named subclass, not a bare ValueError
    assert not os.path.exists(config.checkpoint_dir)
    assert "ya29.fake" not in str(info.value)


@pytest.mark.slow
def test_cli_stops_before_writing_anything(sample_dir, tmp_path):  # noqa: F811
    """experiment.py itself: a bad statistics folder fails with the named error, and neither a
    checkpoint nor a TensorBoard file is written."""
    from test_experiment import _cli_overrides
    stats = _stats_copy(sample_dir, tmp_path / "stats", lambda d: d.drop_vars("temperature"))
    args = _cli_overrides(sample_dir, tmp_path / "run", 2, 2) + [
        f"--config.experiment_kwargs.config.data.stats_dir={stats}"]
    out = subprocess.run([sys.executable, "experiment.py", *args], cwd=ROOT, text=True,
                         capture_output=True, timeout=300)
    assert out.returncode != 0
    assert "StatsError" in out.stderr and "'temperature'" in out.stderr
    assert "Compiling" not in out.stderr + out.stdout
    assert not (tmp_path / "run").exists()


# -- 3. non-finite values ------------------------------------------------------------------------

class Poisoned(experiment.Experiment):
    """Puts a NaN into the batches of steps POISON (as a corrupt example would) and records the
    host state around each poisoned step."""
    POISON = ()
    records = []

    def _next_batch(self):
        batch = super()._next_batch()
        if self._step_now in self.POISON:
            batch["inputs"]["2m_temperature"][0, 0, 0, 0, 0] = np.nan
        return batch

    def step(self, *, global_step, rng, writer):
        self._step_now = int(np.asarray(global_step).ravel()[0])
        poisoned = self._step_now in self.POISON
        before = jax.tree.map(np.array, self.snapshot_state()) \
            if poisoned and self._params is not None else None
        out = super().step(global_step=global_step, rng=rng, writer=writer)
        if before is not None:
            after = jax.tree.map(np.array, self.snapshot_state())
            Poisoned.records.append((self._step_now, before, after))
        return out


@pytest.mark.slow
def test_poisoned_example_skips_its_update_and_k_bad_steps_stop(sample_dir, tmp_path,  # noqa: F811
                                                                 caplog):
    caplog.set_level("WARNING")
    config = tiny_config(sample_dir, str(tmp_path / "run"), steps=5)
    config.save_checkpoint_interval = 1
    config.experiment_kwargs.config.training.max_consecutive_nonfinite = 3
    Poisoned.POISON, Poisoned.records = (2,), []
    writer, _ = train(config, Poisoned)
    step, before, after = Poisoned.records[0]
    assert step == 2
    jax.tree.map(np.testing.assert_array_equal, before["params"], after["params"])
    jax.tree.map(np.testing.assert_array_equal, before["opt_state"], after["opt_state"])
    assert after["data_state"] != before["data_state"]  # the example was consumed, not retried
    assert writer.scalars[5]["nonfinite_skipped"] == 1
    assert all(np.isfinite(writer.scalars[s]["loss"]) for s in (1, 2, 4, 5))
    warned = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
    assert len(warned) == 1 and "Step 2" in warned[0] and "2020-01" in warned[0], warned
    steps = ckpt_lib.Checkpointer(config, "read").all_steps("latest")
    assert steps[-1] == 5
    for s in steps:  # every saved checkpoint is finite
        params, _ = saved_params(config.checkpoint_dir, s)
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))

    stop = tiny_config(sample_dir, str(tmp_path / "stop"), steps=8)
    stop.save_checkpoint_interval = 1
    stop.experiment_kwargs.config.training.max_consecutive_nonfinite = 3
    Poisoned.POISON = (3, 4, 5, 6, 7, 8)
    with pytest.raises(nonfinite.NonFiniteError, match=r"3 consecutive steps \(steps \[3, 4, 5\]\)"):
        train(stop, Poisoned)
    params, meta = saved_params(str(tmp_path / "stop"))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    assert meta["plain"]["experiment/counters"]["nonfinite_skipped"] <= 2


class _Module:
    def __init__(self, arrays):
        self.arrays = arrays

    def snapshot_state(self):
        return {"params": self.arrays, "data_state": {"epoch": 0, "position": 2}}


def _save(checkpointer, step, arrays):
    state = checkpointer.get_experiment_state("latest")
    state.global_step = step
    state.experiment_module = _Module(arrays)
    checkpointer.save("latest")
    checkpointer.wait_for_checkpointing_to_finish()


def _plain_config(directory):
    from configs import sample as sample_config
    config = sample_config.get_config()
    config.checkpoint_dir = str(directory)
    return config


def test_a_non_finite_checkpoint_is_refused(tmp_path):
    checkpointer = ckpt_lib.Checkpointer(_plain_config(tmp_path / "c"), "train")
    _save(checkpointer, 1, {"layer": {"w": np.ones((3, 2), np.float32)}})
    bad = {"layer": {"w": np.array([[1.0, np.inf]], np.float32)}}
    with pytest.raises(ckpt_lib.NonFiniteCheckpointError, match=r"\['layer'\]\['w'\]"):
        _save(checkpointer, 2, bad)
    assert checkpointer.all_steps("latest") == [1]


# -- 2. crash or failure during a checkpoint write -----------------------------------------------

class DiskFull(OSError):
    pass


def _failing_json_save(monkeypatch):
    """Makes orbax's JSON item writer write a partial file, then fail as a full disk would."""
    import orbax.checkpoint as ocp
    original = ocp.JsonCheckpointHandler.async_save

    async def broken(self, directory, *args, **kwargs):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "metadata").write_text('{"plain": {"experi')
        raise DiskFull(28, "No space left on device")

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", broken)
    return original


def _arrays(value):
    return {"layer": {"w": np.full((4, 3), value, np.float32), "b": np.arange(3, dtype=np.float32)}}


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    config = _plain_config(tmp_path / "c")
    checkpointer = ckpt_lib.Checkpointer(config, "train")
    _save(checkpointer, 1, _arrays(1.0))
    _failing_json_save(monkeypatch)
    with pytest.raises(Exception) as info:
        _save(checkpointer, 2, _arrays(2.0))
    assert "No space left" in repr(info.value) or isinstance(info.value, DiskFull)
    monkeypatch.undo()
    fresh = ckpt_lib.Checkpointer(config, "train")  # a restarted job
    assert fresh.latest_step("latest") == 1
    arrays, meta = fresh.read("latest")
    jax.tree.map(np.testing.assert_array_equal, arrays["experiment/params"], _arrays(1.0))
    assert meta["plain"]["experiment/data_state"] == {"epoch": 0, "position": 2}
    # Once the disk has space again, saving works. The next save is step 3: in this process the
    # failed save's array writes may still be landing in step 2's temporary directory (a
    # restarted job is a new process; its rewrite of step 2 is the killed-writer test's).
    _save(fresh, 3, _arrays(3.0))
    assert fresh.all_steps("latest") == [1, 3]


_KILLED_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    import orbax.checkpoint as ocp
    sys.path.insert(0, {tests!r})
    from test_reliability import _arrays, _plain_config, _save
    from training import checkpointer as ckpt_lib
    checkpointer = ckpt_lib.Checkpointer(_plain_config({directory!r}), "train")
    _save(checkpointer, 1, _arrays(1.0))

    async def slow(self, directory, *args, **kwargs):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "metadata").write_text('{{"plain": {{"experi')
        print("SAVING", flush=True)
        time.sleep(120)

    ocp.JsonCheckpointHandler.async_save = slow
    _save(checkpointer, 2, _arrays(2.0))
""")


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    directory = str(tmp_path / "c")
    script = _KILLED_WRITER.format(tests=os.path.dirname(__file__), directory=directory)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        seen = []
        for line in proc.stdout:
            if line.startswith("SAVING"):
                break
            seen.append(line)
        else:
            raise AssertionError("the writer never reached step 2; its output:\n"
                                 + "".join(seen)[-4000:])
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    leftovers = sorted(os.listdir(os.path.join(directory, "latest")))
    assert any("tmp" in name for name in leftovers), leftovers  # the half-written step 2
    fresh = ckpt_lib.Checkpointer(_plain_config(directory), "train")
    assert fresh.all_steps("latest") == [1]
    arrays, _ = fresh.read("latest")
    jax.tree.map(np.testing.assert_array_equal, arrays["experiment/params"], _arrays(1.0))
    _save(fresh, 2, _arrays(2.0))  # the restarted job writes step 2 over the leftovers
    assert fresh.all_steps("latest") == [1, 2]


def test_training_restore_skips_an_unreadable_newest_step(tmp_path):
    config = _plain_config(tmp_path / "c")
    checkpointer = ckpt_lib.Checkpointer(config, "train")
    _save(checkpointer, 1, _arrays(1.0))
    _save(checkpointer, 2, _arrays(2.0))
    os.remove(os.path.join(config.checkpoint_dir, "latest", "2", "meta", "metadata"))
    fresh = ckpt_lib.Checkpointer(config, "train")
    state = fresh.get_experiment_state("latest")
    state.global_step = 0
    fresh.restore("latest")
    assert state.global_step == 1


# -- 7. secrets ------------------------------------------------------------------------------------

_SECRET = "FAKE-SECRET-7c1e0d"


def test_credentials_in_the_config_are_refused_and_redacted(tmp_path):
    config = _plain_config(tmp_path / "c")
    config.experiment_kwargs.config.data.storage_options = {"token": _SECRET}
    with pytest.raises(preflight.ConfigError, match="storage_options.token") as info:
        preflight.check_no_credentials(config)
    assert _SECRET not in str(info.value)
    config.experiment_kwargs.config.data.storage_options = {"token": "anon"}
    preflight.check_no_credentials(config)  # anonymous access is not a credential
    config.experiment_kwargs.config.data.source = f"gs://user:{_SECRET}@bucket/x.zarr"
    with pytest.raises(preflight.ConfigError, match="data.source"):
        preflight.check_no_credentials(config)
    # Even when the checks are bypassed, a checkpoint's saved config holds no credential.
    config.experiment_kwargs.config.data.source = "gs://bucket/x.zarr"
    config.experiment_kwargs.config.data.storage_options = {"token": _SECRET}
    assert _SECRET not in ckpt_lib.config_json(config)
    assert "<redacted>" in ckpt_lib.config_json(config)


@pytest.mark.slow
def test_secrets_in_the_environment_never_reach_outputs(sample_dir, tmp_path):  # noqa: F811
    from test_experiment import _cli_overrides
    key = tmp_path / "adc.json"
    key.write_text('{"type": "service_account", "private_key": "%s"}' % _SECRET)
    env = {**os.environ, "GOOGLE_APPLICATION_CREDENTIALS": str(key),
           "GOOGLE_OAUTH_ACCESS_TOKEN": _SECRET, "AWS_SECRET_ACCESS_KEY": _SECRET,
           "GCS_HMAC_SECRET": _SECRET}
    run = tmp_path / "run"
    args = _cli_overrides(sample_dir, run, 2, 2) + [
        "--config.save_checkpoint_interval=1", "--verbosity=1"]
    out = subprocess.run([sys.executable, "experiment.py", *args], cwd=ROOT, env=env, text=True,
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _SECRET not in out.stdout and _SECRET not in out.stderr
    written = [os.path.join(d, f) for d, _, files in os.walk(run) for f in files]
    assert any("tfevents" in f for f in written) and any("_CHECKPOINT_METADATA" in f
                                                          for f in written)
    for path in written:
        with open(path, "rb") as f:
            assert _SECRET.encode() not in f.read(), path
