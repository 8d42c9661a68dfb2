"""The mission's command on public data: gs:// for every path a user keeps on GCS, the public
defaults of the ERA5 configs, and what the bare command does without a route to the internet.

The public buckets are stood in for by gcp-storage-emulator buckets with the same names
(`dm_graphcast`, `weatherbench2`), filled with the synthetic sample; nothing leaves loopback.
"""

import io
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import jax
import numpy as np
import pytest
import xarray as xr

import experiment
from configs import era5_0p25deg, era5_1deg
from data import examples, gcs, sources, validate
from graphcast import checkpoint as gc_checkpoint
from graphcast import exit_status, files, normalization
from conftest import upload_tree
from test_evaluation import numpy_acc
from test_experiment import ROOT, sample_example, saved_params, tiny_config
from test_experiment import sample_dir  # noqa: F401  (session fixture: the synthetic sample)
from test_sources import SMALL_TASK
from test_sources import _forbidding_server  # noqa: E402
from training import compat, data_input, evaluation, launch, preflight
from training import export as export_lib, model_configs

WB2_DATA = "weatherbench2/datasets/era5/sample.zarr"
WB2_CLIM = "weatherbench2/datasets/era5-hourly-climatology/sample_6h.zarr"
PARAMS = "dm_graphcast/params/GraphCast_tiny - sample 5.625 - mesh 1.npz"


def test_era5_configs_default_to_public_gcs():
    for module, resolution in ((era5_1deg, 1.0), (era5_0p25deg, 0.25)):
        exp = module.get_config().experiment_kwargs.config
        assert exp.model.resolution == resolution
        assert exp.data.source.startswith(("gs://weatherbench2/", "gs://gcp-public-data-arco-era5/"))
        assert exp.data.stats_dir == "gs://dm_graphcast/stats"
        assert exp.eval.climatology.startswith("gs://weatherbench2/datasets/era5-hourly-climatology/")
        assert not dict(exp.data.storage_options)  # no credentials: anonymous unless the env has some
    exp = era5_1deg.get_config().experiment_kwargs.config
    assert exp.data.source == ("gs://weatherbench2/datasets/era5/"
                               "1959-2023_01_10-wb13-6h-1440x721_with_derived_variables.zarr")
    assert exp.data.subsample_grid  # the 0.25-degree store at every 4th point


def _no_network_prefix():
    """`unshare -rn` (a new, empty network namespace: no packet can leave), where allowed."""
    try:
        ok = subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10)
        return ["unshare", "-rn"] if ok.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def test_bare_command_without_internet_stops_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "STORAGE_EMULATOR_HOST"}
    env["PYTHONPATH"] = ROOT
    prefix = _no_network_prefix()
    if prefix is None:  # fallback: the same code path against a loopback port nobody listens on
        env["STORAGE_EMULATOR_HOST"] = "http://127.0.0.1:9"
        prefix = []
    began = time.monotonic()
    out = subprocess.run(prefix + [sys.executable, "experiment.py", "--config=configs/era5_1deg.py",
                                   f"--config.checkpoint_dir={tmp_path / 'run'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - began
    assert out.returncode == exit_status.DATA, out.stderr[-3000:]
    assert seconds < 120, seconds
    assert "Traceback" not in out.stderr + out.stdout
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert era5_1deg.WB2_ERA5_0P25 in errors[0] and "reach" in errors[0], errors[0]
    assert f"Data: {era5_1deg.WB2_ERA5_0P25}" in out.stderr  # the first lines say what is read
    assert "Normalization statistics: gs://dm_graphcast/stats" in out.stderr
    assert not (tmp_path / "run").exists()


def test_finer_source_is_read_at_every_kth_point(tmp_path, make_wb2, caplog):
    fine = make_wb2(resolution=2.8125, levels=(500, 850), periods=8)  # 2x finer than the model
    path = str(tmp_path / "fine.zarr")
    fine.to_zarr(path, consolidated=True)
    with pytest.raises(validate.GridMismatchError, match="fine.zarr"):
        sources.open_source(path, task_config=SMALL_TASK, resolution=5.625)
    ds = sources.open_source(path, task_config=SMALL_TASK, resolution=5.625, subsample_grid=True)
    expected = fine["temperature"].sel(level=850).values[:, ::-1][:, ::2, ::2]  # lat ascending
    np.testing.assert_array_equal(ds["temperature"].sel(level=850).values, expected)
    assert ds.sizes["lat"] == 33 and ds.sizes["lon"] == 64
    # The experiment says that this reads 4x the bytes, with the command for a prepared copy.
    config = tiny_config(str(tmp_path), str(tmp_path / "run"), steps=1)
    data = config.experiment_kwargs.config.data
    data.update(dict(source=path, subsample_grid=True))
    with caplog.at_level("WARNING"):
        data_input.Source(data, SMALL_TASK, 5.625)
    advice = " ".join(r.getMessage() for r in caplog.records)
    assert "2 times finer" in advice and f"python -m data.prepare --source {path}" in advice
    assert "--resolution 5.625" in advice and "examples/s" in advice


def test_month_end_includes_the_whole_month(sample_dir):  # noqa: F811
    ds = xr.open_zarr(f"{sample_dir}/era5_sample.zarr")
    times = ds["time"].values
    lo, hi = examples.split_bounds(("2020-01-01", "2020-01"))
    inside = times[(times >= lo) & (times < hi)]
    # The same times as xarray's partial-string selection used by data.stats and data.prepare.
    np.testing.assert_array_equal(inside, ds.sel(time=slice("2020-01-01", "2020-01"))["time"].values)
    assert str(inside[-1])[:13] == "2020-01-20T18"  # the sample's last time in January
    lo, hi = examples.split_bounds(("2020-01-01", "2020-01-05"))
    assert hi == np.datetime64("2020-01-06")


def test_overridden_source_never_generates_the_sample(tmp_path):
    config = tiny_config(str(tmp_path), str(tmp_path / "run"), steps=1)
    data = config.experiment_kwargs.config.data
    data.generate_sample_dir = str(tmp_path / "sample_data")
    for source in ("gs://bucket/era5_sample.zarr", str(tmp_path / "elsewhere.zarr")):
        data.source = source
        data_input.ensure_sample_data(data, str(tmp_path / "sample_data" / "climatology.zarr"))
        assert not (tmp_path / "sample_data").exists()


def test_eval_mode_checks_the_eval_split_only(sample_dir, tmp_path):  # noqa: F811
    config = tiny_config(sample_dir, str(tmp_path / "run"), steps=2)
    data = config.experiment_kwargs.config.data
    data.update(dict(train_start="2020-01-01T00", train_end="2020-01-01T06"))  # inputs, no target
    with pytest.raises(preflight.RolloutTooLongError, match="train split"):
        preflight.check_before_start(config, "train")
    preflight.check_before_start(config, "eval")
    data.update(dict(eval_start="2020-01-20T06", eval_end="2020-01-20T18"))
    with pytest.raises(preflight.RolloutTooLongError, match="eval split"):
        preflight.check_before_start(config, "eval")


# -- gs:// everywhere, on the emulator -----------------------------------------------------------

def _bucket(endpoint, name):
    """Creates a bucket in the emulator (any name, e.g. one of the public buckets')."""
    request = urllib.request.Request(
        f"{endpoint}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
        method="POST", headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=30).read()
    except urllib.error.HTTPError as e:
        if e.code != 409:  # already there (session-wide emulator)
            raise


def _put(endpoint, local, url):
    """Uploads a file or folder with simple media uploads (the emulator's multipart parser can
    corrupt objects: conftest.upload_tree)."""
    bucket, _, name = url.split("://", 1)[1].partition("/")
    if os.path.isdir(local):
        upload_tree(endpoint, bucket, local, name)
        return
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    with open(local, "rb") as f:
        request = urllib.request.Request(f"{endpoint}/upload/storage/v1/b/{bucket}/o?{query}",
                                         data=f.read(), method="POST")
    urllib.request.urlopen(request, timeout=30).read()


@pytest.fixture(scope="module")
def public_buckets(gcs_emulator, sample_dir, tmp_path_factory):  # noqa: F811
    """dm_graphcast and weatherbench2 on the emulator, holding the sample's data, statistics,
    climatology and a fine-tuning checkpoint (a name with spaces) for the tiny test model."""
    endpoint, _ = gcs_emulator
    for name in ("dm_graphcast", "weatherbench2"):
        _bucket(endpoint, name)
    _put(endpoint, f"{sample_dir}/era5_sample.zarr", f"gs://{WB2_DATA}")
    _put(endpoint, f"{sample_dir}/climatology.zarr", f"gs://{WB2_CLIM}")
    for name in normalization.STATS_FILES.values():
        _put(endpoint, f"{sample_dir}/stats/{name}", f"gs://dm_graphcast/stats/{name}")
    config = tiny_config(sample_dir, str(tmp_path_factory.mktemp("init") / "run"), steps=1)
    exp = experiment.Experiment("train", init_rng=jax.random.PRNGKey(7),
                                config=config.experiment_kwargs.config)
    params, _ = exp._initial_params()  # pylint: disable=protected-access
    ckpt = gc_checkpoint.CheckPoint(
        params=jax.tree.map(np.asarray, params),
        model_config=model_configs.model_config_from(config.experiment_kwargs.config),
        task_config=model_configs.task_config_from(config.experiment_kwargs.config))
    gc_checkpoint.save(f"gs://{PARAMS}", ckpt)
    return endpoint, ckpt


@pytest.mark.slow
def test_stats_checkpoint_and_outputs_accept_gs_urls(public_buckets, sample_dir,  # noqa: F811
                                                     tmp_path):
    _, ckpt = public_buckets
    task = ckpt.task_config
    local = normalization.load_stats(f"{sample_dir}/stats", task)
    remote = normalization.load_stats("gs://dm_graphcast/stats", task)
    jax.tree.map(np.testing.assert_array_equal, remote.mean, local.mean)
    loaded = gc_checkpoint.load(f"gs://{PARAMS}")
    jax.tree.map(np.testing.assert_array_equal, loaded.params, ckpt.params)
    with pytest.raises(normalization.StatsError, match="gs://dm_graphcast/nothing/mean_by_level.nc"):
        normalization.load_stats("gs://dm_graphcast/nothing", task)
    with pytest.raises(gc_checkpoint.CheckpointError, match="gs://dm_graphcast/params/no such.npz"):
        gc_checkpoint.load("gs://dm_graphcast/params/no such.npz")
    # data.stats writes its three files to a gs:// prefix.
    subprocess.run([sys.executable, "-m", "data.stats", "--source", f"gs://{WB2_DATA}",
                    "--start", "2020-01-01", "--end", "2020-01-03", "--out",
                    "gs://dm_graphcast/stats_new"], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": ROOT})
    for name in normalization.STATS_FILES.values():
        assert files.exists(f"gs://dm_graphcast/stats_new/{name}")
    assert "geopotential" in normalization.load_stats("gs://dm_graphcast/stats_new", task).mean


def test_forbidden_stats_and_checkpoint_name_the_url():
    task = normalization.config_lib.TASK
    with _forbidding_server() as endpoint:
        opts = {"token": "anon", "endpoint_url": endpoint}
        with pytest.raises(normalization.StatsError,
                           match="denied.*gs://private/stats/mean_by_level.nc|"
                                 "gs://private/stats/mean_by_level.nc.*denied"):
            normalization.load_stats("gs://private/stats", task, opts)
        with pytest.raises(gc_checkpoint.CheckpointError, match="denied.*gs://private/p q.npz|"
                                                                "gs://private/p q.npz.*denied"):
            gc_checkpoint.load("gs://private/p q.npz", opts)


@pytest.mark.slow
def test_sample_trains_and_evaluates_from_public_style_gcs(public_buckets, sample_dir,  # noqa: F811
                                                           tmp_path, monkeypatch):
    """Data, statistics, fine-tuning checkpoint, climatology and graph cache all on gs://; the
    run's ACC equals the independent numpy computation; export and predict go through gs://."""
    endpoint, ckpt = public_buckets
    config = tiny_config(sample_dir, str(tmp_path / "run"), steps=2)
    exp = config.experiment_kwargs.config
    exp.data.update(dict(source=f"gs://{WB2_DATA}", stats_dir="gs://dm_graphcast/stats",
                         generate_sample_dir=str(tmp_path / "never"),
                         graph_cache_dir="gs://weatherbench2/graph_cache"))
    exp.training.init_checkpoint = f"gs://{PARAMS}"
    exp.eval.update(dict(climatology=f"gs://{WB2_CLIM}", at_end=True, num_batches=2))
    exp.optimizer.update(dict(peak_lr=0.0))  # the saved parameters must be the fine-tuning ones

    recorded = {"batches": [], "init_times": [], "metrics": None}
    add, at, table = (evaluation.MetricsAccumulator.add, evaluation.Climatology.at,
                      evaluation.summary_table)

    def record_add(self, predictions, targets, last_inputs=None, climatology=None):
        recorded["batches"].append((dict(predictions), dict(targets)))
        return add(self, predictions, targets, last_inputs, climatology)

    def record_at(self, init_times, lead_hours):
        recorded["init_times"].append(np.asarray(init_times))
        return at(self, init_times, lead_hours)

    def record_table(metrics, step, lead_hours):
        recorded["metrics"] = dict(metrics)
        return table(metrics, step, lead_hours)

    monkeypatch.setattr(evaluation.MetricsAccumulator, "add", record_add)
    monkeypatch.setattr(evaluation.Climatology, "at", record_at)
    monkeypatch.setattr(evaluation, "summary_table", record_table)
    compat.apply()
    launch.run(config, "train", experiment.Experiment)

    assert not (tmp_path / "never").exists()
    assert any(p.startswith("weatherbench2/graph_cache/graphs_")
               for p in gcs.filesystem("gs://x").ls("weatherbench2/graph_cache"))
    saved, _ = saved_params(str(tmp_path / "run"))
    jax.tree.map(np.testing.assert_array_equal, saved, ckpt.params)

    metrics = recorded["metrics"]
    lead_hours = [6 * (k + 1) for k in range(exp.eval.rollout_steps)]
    clim_store = xr.open_zarr(f"{sample_dir}/climatology.zarr")
    lat = np.linspace(-90, 90, 33)
    init_times = np.concatenate(recorded["init_times"])
    levels = tuple(exp.task.pressure_levels)
    checked = 0
    for var, level in (("geopotential", 500), ("temperature", 850), ("2m_temperature", None)):
        pred = np.concatenate([np.asarray(p[var], np.float64) for p, _ in recorded["batches"]])
        truth = np.concatenate([np.asarray(t[var], np.float64) for _, t in recorded["batches"]])
        expected = numpy_acc(pred, truth, init_times, lead_hours, clim_store, var, level, lat,
                             levels)
        for lead, value in zip(lead_hours, expected):
            got = metrics[f"acc/{var}{'' if level is None else f'/{level}'}/{lead}h"]
            assert np.isfinite(got) and -1 <= got <= 1
            np.testing.assert_allclose(got, value, rtol=1e-6, atol=1e-9)
            checked += 1
    assert checked == 3 * len(lead_hours) and len(init_times) == 4

    # Export to gs:// and predict from gs:// (checkpoint, statistics, output).
    print(export_lib.export(config, "gs://weatherbench2/exports/tiny model.npz", None))
    dataset = tmp_path / "example.nc"
    sample_example(sample_dir, ckpt.task_config)[0].to_netcdf(dataset)
    from graphcast import predict
    predict.main(["--checkpoint", "gs://weatherbench2/exports/tiny model.npz", "--dataset",
                  str(dataset), "--stats-dir", "gs://dm_graphcast/stats", "--steps", "2",
                  "--output", "gs://weatherbench2/exports/predictions.nc"])
    out = xr.load_dataset(io.BytesIO(
        files.read_bytes("gs://weatherbench2/exports/predictions.nc")))
    assert out.sizes["time"] == 2 and np.isfinite(out["2m_temperature"].values).all()

