"""Unit tests of training/: compat, checkpointer, optimizer schedule, writer, evaluation metrics."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from graphcast import losses, update
from training import checkpointer as ckpt_lib
from training import compat, evaluation, optim, writer as writer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- compat ---------------------------------------------------------------------------------

def test_compat_patches_jaxline():
    compat.apply()
    from jaxline import utils
    assert utils.bcast_local_devices is compat.bcast_local_devices
    assert jax.tree_map(lambda x: x + 1, {"a": 1}) == {"a": 2}
    tree = utils.bcast_local_devices({"a": np.arange(3.0), "s": np.int32(4)})
    n = jax.local_device_count()
    assert tree["a"].shape == (n, 3) and tree["s"].shape == (n,)
    np.testing.assert_array_equal(utils.get_first(tree)["a"], np.arange(3.0))
    # The double buffer path (formerly jax.device_put_sharded).
    batches = [{"x": np.full((n, 2), i, np.float32)} for i in range(3)]
    out = list(utils.double_buffer(iter(batches)))
    assert [float(b["x"][0, 0]) for b in out] == [0.0, 1.0, 2.0]


def test_shard_local_rejects_wrong_leading_axis():
    with pytest.raises(ValueError, match="leading axis"):
        compat.shard_local({"x": np.zeros((jax.local_device_count() + 1, 2))})


def test_compat_works_on_four_devices_in_pmap():
    code = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import jax, numpy as np
        from training import compat
        compat.apply()
        x = compat.bcast_local_devices(np.float32(2.0))
        y = jax.pmap(lambda v: jax.lax.psum(v, "i"), axis_name="i")(x)
        print(x.shape, float(y[0]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)), check=True)
    assert "(4,) 8.0" in out.stdout


_GLOBAL_ARRAYS = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    jax.config.update("jax_num_cpu_devices", 2)
    address = sys.argv[1]
    jax.distributed.initialize(coordinator_address=address, num_processes=2,
                               process_id=int(sys.argv[2]), coordinator_bind_address=address,
                               initialization_timeout=60)
    from training import compat
    mesh = Mesh(np.asarray(compat.global_devices()), ("d",))
    on_device = NamedSharding(mesh, PartitionSpec("d"))
    in_host = NamedSharding(mesh, PartitionSpec("d"), memory_kind="pinned_host")
    p = jax.process_index()
    local = np.arange(2, dtype=np.float32)[:, None] + 10 * p   # [local devices, 1]
    batch = compat.shard_global({"x": local}, in_host)["x"]
    values = compat.shard_global(local, on_device)
    w = compat.bcast_global_devices(np.float32(1.0), on_device)
    step = jax.jit(jax.shard_map(lambda w, v: w + jax.lax.pmean(v[:, 0], "d"), mesh=mesh,
                                 in_specs=PartitionSpec("d"), out_specs=PartitionSpec("d")))
    out = step(w, values)
    print("RESULT", p, batch.shape, batch.sharding.memory_kind, batch.is_fully_addressable,
          [d.process_index for d in mesh.devices], float(compat.first_local(batch)[0]),
          out.shape, float(compat.first_local(out)), flush=True)
""")


def test_shard_global_rejects_wrong_leading_axis():
    sharding = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.asarray(compat.global_devices()), ("d",)),
        jax.sharding.PartitionSpec("d"))
    n = jax.local_device_count()
    for leaf in (np.zeros((n + 1, 2)), np.float32(1.0)):
        with pytest.raises(ValueError, match=f"leading axis of {n} local devices"):
            compat.shard_global({"x": leaf}, sharding)


def test_global_arrays_span_processes():
    """Two processes x 2 CPU devices: each process's [local_devices, ...] slices become one
    global array over the 4 devices (in host memory when asked), a jitted pmean over them sees
    every process's values, and first_local reads only this process's shard."""
    from conftest import free_port
    address = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", _GLOBAL_ARRAYS, address, str(i)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, out[-3000:]
        # mean of 0, 1, 10, 11 = 5.5, plus the broadcast 1.0
        assert (f"RESULT {i} (4, 1) pinned_host False [0, 0, 1, 1] {10.0 * i} (4,) 6.5"
                in out), out[-3000:]

# -- optimizer --------------------------------------------------------------------------------

def test_schedule_paper_defaults():
    cfg = optim.OptimConfig()
    assert optim.schedule(0, cfg) == (0.0, 1)
    assert optim.schedule(500, cfg)[0] == pytest.approx(5e-4)
    assert optim.schedule(1000, cfg) == (pytest.approx(1e-3), 1)
    assert optim.schedule(1000 + 149_500, cfg)[0] == pytest.approx(5e-4)
    assert optim.schedule(299_999, cfg)[0] < 1e-9
    assert optim.schedule(300_000, cfg) == (3e-7, 2)
    assert optim.schedule(300_999, cfg)[1] == 2
    assert optim.schedule(301_000, cfg)[1] == 3
    assert optim.schedule(310_999, cfg)[1] == 12
    assert optim.schedule(400_000, cfg)[1] == 12
    assert cfg.total_steps == 311_000
    assert optim.distinct_ar_steps(cfg, 311_000) == list(range(1, 13))
    assert optim.distinct_ar_steps(cfg, 1000) == [1]


def test_optim_config_rejects_unknown_field():
    with pytest.raises(ValueError, match="learning_rate"):
        optim.OptimConfig.from_mapping({"learning_rate": 1.0})


def test_weight_decay_only_on_w_and_matches_optax_adamw():
    params = {"mlp/linear_0": {"w": jnp.ones((2, 3)), "b": jnp.ones((3,))},
              "norm": {"scale": jnp.ones((3,)), "offset": jnp.zeros((3,))}}
    mask = update.weight_decay_mask(params)
    assert mask["mlp/linear_0"] == {"w": True, "b": False}
    assert mask["norm"] == {"scale": False, "offset": False}
    cfg = optim.OptimConfig(clip_global_norm=1e9)
    grads = jax.tree.map(lambda p: 0.3 * p + 0.1, params)
    direction = optim.make_direction(cfg)
    d, _ = direction.update(grads, direction.init(params), params)
    ours = update.apply_update(params, d, 1e-2)
    import optax
    ref = optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=mask)
    u, _ = ref.update(grads, ref.init(params), params)
    jax.tree.map(np.testing.assert_allclose, ours, optax.apply_updates(params, u))


def test_clipping_at_global_norm():
    cfg = optim.OptimConfig(clip_global_norm=1.0, weight_decay=0.0, b1=0.0, b2=0.0, eps=0.0)
    params = {"m": {"w": jnp.zeros((4,))}}
    grads = {"m": {"w": jnp.full((4,), 10.0)}}
    direction = optim.make_direction(cfg)
    d, _ = direction.update(grads, direction.init(params), params)
    # b1=b2=0: Adam direction is sign-like (g/|g|): clipping does not change it, but must not fail.
    np.testing.assert_allclose(d["m"]["w"], 1.0, rtol=1e-5)


# -- checkpointer -----------------------------------------------------------------------------

class _ToyExperiment:
    def __init__(self):
        self.params = {"a/b": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}
        self.data_state = {"epoch": 1, "position": 7}
        self.restored = None

    def snapshot_state(self):
        return {"params": self.params, "data_state": self.data_state}

    def restore_from_snapshot(self, snapshot):
        self.restored = snapshot


class _Config(dict):
    def __getattr__(self, k):
        return self[k]

    def to_json_best_effort(self):
        return json.dumps(self)


def _toy_checkpointer(tmp_path, **kw):
    config = _Config(checkpoint_dir=str(tmp_path / "ckpt"), max_checkpoints_to_keep=2)
    return ckpt_lib.Checkpointer(config, "train", **kw)


def test_checkpointer_roundtrip_and_keep_last(tmp_path):
    compat.apply()
    ck = _toy_checkpointer(tmp_path)
    assert not ck.can_be_restored("latest") and ck.restore_path("latest") is None
    state = ck.get_experiment_state("latest")
    exp = _ToyExperiment()
    state.global_step, state.experiment_module = 0, exp
    state.train_step_rng = compat.bcast_local_devices(jax.random.PRNGKey(3))
    for step in (5, 10, 15):
        state.global_step = step
        exp.params["a/b"]["w"] = exp.params["a/b"]["w"] + 1
        ck.save("latest")
    ck.wait_for_checkpointing_to_finish()
    assert ck.all_steps("latest") == [10, 15]
    assert ck.restore_path("latest").endswith("/latest/15")
    # A fresh checkpointer (new process) restores into a fresh state.
    ck2 = _toy_checkpointer(tmp_path)
    state2 = ck2.get_experiment_state("latest")
    exp2 = _ToyExperiment()
    state2.global_step, state2.experiment_module, state2.train_step_rng = 0, exp2, None
    state2.train_step_rng = compat.bcast_local_devices(jax.random.PRNGKey(0))
    ck2.restore("latest")
    assert state2.global_step == 15
    np.testing.assert_array_equal(exp2.restored["params"]["a/b"]["w"], exp.params["a/b"]["w"])
    assert exp2.restored["data_state"] == {"epoch": 1, "position": 7}
    np.testing.assert_array_equal(state2.train_step_rng[0], jax.random.PRNGKey(3))
    arrays, meta = ck2.read("latest", step=10)
    assert json.loads(meta["config"])["max_checkpoints_to_keep"] == 2
    with pytest.raises(FileNotFoundError, match="step 5"):
        ck2.read("latest", step=5)


def test_checkpointer_ignores_half_written_steps(tmp_path):
    ck = _toy_checkpointer(tmp_path, enable_async=False)
    state = ck.get_experiment_state("latest")
    state.global_step, state.experiment_module = 3, _ToyExperiment()
    ck.save("latest")
    # Simulate a crash mid-save: a temporary step directory orbax never finalized.
    os.makedirs(tmp_path / "ckpt" / "latest" / "7.orbax-checkpoint-tmp-123" / "arrays")
    ck2 = _toy_checkpointer(tmp_path)
    assert ck2.all_steps("latest") == [3]
    assert ck2.restore_path("latest").endswith("/3")


def test_checkpointer_best_series_is_separate(tmp_path):
    ck = _toy_checkpointer(tmp_path)
    best = ck.get_experiment_state("best")
    best.global_step, best.experiment_module = 4, _ToyExperiment()
    best.best_eval_metric_value, best.best_model_eval_metric = np.float32(0.5), "skill_mean"
    best.train_step_rng = None
    ck.save("best")
    ck.wait_for_checkpointing_to_finish()
    assert not ck.can_be_restored("latest") and ck.can_be_restored("best")
    ck2 = _toy_checkpointer(tmp_path)
    best2 = ck2.get_experiment_state("best")
    best2.best_eval_metric_value, best2.experiment_module = float("-inf"), _ToyExperiment()
    ck2.restore("best")
    assert best2.best_eval_metric_value == pytest.approx(0.5)


# -- writer -------------------------------------------------------------------------------------

def test_writer_tensorboard_and_console(tmp_path, capsys):
    w = writer_lib.Writer(str(tmp_path), total_steps=100)
    w.write_scalars(10, {"loss": np.float32(1.5), "steps_per_sec": 2.0, "examples_per_sec": 4.0,
                         "data_wait_fraction": 0.25, "learning_rate": 1e-3, "ar_steps": 1})
    w.write_images(10, {"fig": np.zeros((8, 8, 4), np.uint8)})
    w.close()
    line = capsys.readouterr().out
    for part in ("step 10", "loss 1.5", "2 steps/s", "4 ex/s", "data-wait 25.0%", "ETA 0m45s"):
        assert part in line
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(str(tmp_path / "train"))
    acc.Reload()
    assert acc.Scalars("loss")[0].value == pytest.approx(1.5)
    assert acc.Tags()["images"] == ["fig"]
    assert "tensorflow" not in sys.modules


def test_format_eta():
    assert writer_lib.format_eta(59) == "0m59s"
    assert writer_lib.format_eta(3 * 3600 + 61) == "3h01m01s"
    assert writer_lib.format_eta(2 * 86400 + 3600) == "2d01h00m"
    assert writer_lib.format_eta(float("inf")) == "?"


# -- evaluation -----------------------------------------------------------------------------------

def test_latitude_weights_are_cell_areas():
    """One latitude weighting for the loss and the metrics: cell areas, mean 1."""
    lat = np.linspace(-90, 90, 5)
    w = losses.latitude_weights(lat)
    assert w.mean() == pytest.approx(1.0)
    # Poles are half-cells (sin(d/4)^2 where other rows have cos(lat) sin(d/2)), symmetric.
    np.testing.assert_allclose(w, w[::-1])
    d = np.deg2rad(45.0)
    ref = np.cos(np.deg2rad(lat)) * np.sin(d / 2)
    ref[[0, -1]] = np.sin(d / 4) ** 2
    np.testing.assert_allclose(w, ref / ref.mean())
    offset = losses.latitude_weights(np.array([-67.5, -22.5, 22.5, 67.5]))
    cosines = np.cos(np.deg2rad([67.5, 22.5, 22.5, 67.5]))
    np.testing.assert_allclose(offset, cosines / cosines.mean(), rtol=1e-12)
    # The area between each row's cell edges (half-way to its neighbours, clipped to the poles).
    for lat in (np.linspace(-90, 90, 181), np.arange(-89.5, 90, 1.0)):
        edges = np.clip(np.concatenate([lat - 0.5, lat[-1:] + 0.5]), -90, 90)
        area = np.diff(np.sin(np.deg2rad(edges)))
        np.testing.assert_allclose(losses.latitude_weights(lat), area / area.mean(), rtol=1e-10)


def test_metrics_rmse_bias_acc_persistence():
    rng = np.random.default_rng(0)
    lat, levels = np.linspace(-90, 90, 5), (500, 850)
    truth = {"geopotential": rng.normal(size=(3, 2, 2, 5, 8)), "2m_temperature": rng.normal(size=(3, 2, 5, 8))}
    pred = {k: v + 0.5 for k, v in truth.items()}
    last = {"geopotential": truth["geopotential"][:, 0] + 2.0}
    clim = {k: np.zeros_like(v) for k, v in truth.items()}
    acc = evaluation.MetricsAccumulator(lat, levels, lead_hours=(6, 12))
    acc.add({k: v[:2] for k, v in pred.items()}, {k: v[:2] for k, v in truth.items()},
            {k: v[:2] for k, v in last.items()}, {k: v[:2] for k, v in clim.items()})
    acc.add({k: v[2:] for k, v in pred.items()}, {k: v[2:] for k, v in truth.items()},
            {k: v[2:] for k, v in last.items()}, {k: v[2:] for k, v in clim.items()})
    m = acc.result()
    assert acc.num_examples == 3
    assert m["rmse/geopotential/500/6h"] == pytest.approx(0.5)
    assert m["bias/2m_temperature/12h"] == pytest.approx(0.5)
    w = losses.latitude_weights(lat)[:, None]
    err = (last["geopotential"][:, 1] - truth["geopotential"][:, 1, 1]) ** 2  # level 850, lead 12h
    expected = np.sqrt(np.mean([(e * w).mean() for e in err]))  # sqrt after the time average
    assert m["persistence_rmse/geopotential/850/12h"] == pytest.approx(expected)
    assert m["skill/geopotential/850/12h"] == pytest.approx(1 - 0.5 / expected)
    assert "persistence_rmse/2m_temperature/6h" not in m
    assert -1 <= m["acc/2m_temperature/6h"] <= 1
    heads = evaluation.headline(m, 12)
    assert heads["headline/z500_rmse_12h"] == pytest.approx(0.5)
    assert "headline/t2m_rmse_12h" in heads


def test_forecast_figure_png(tmp_path):
    lat, lon = np.linspace(-90, 90, 9), np.arange(16) * 22.5
    arrays = {"geopotential": np.random.rand(1, 2, 2, 9, 16), "2m_temperature": np.random.rand(1, 2, 9, 16)}
    png = evaluation.forecast_figure(arrays, arrays, lat, lon, (500, 850), lead_index=1,
                                     lead_hours=12, title="t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = evaluation.png_to_array(png)
    assert image.ndim == 3 and image.dtype == np.uint8
    with pytest.raises(ValueError, match="geopotential"):
        evaluation.forecast_figure({"x": arrays["2m_temperature"]}, {"x": arrays["2m_temperature"]},
                                   lat, lon, (), 0, 6)


_SAVE_IN_ANOTHER_PROCESS = """
import sys
import numpy as np
from training import checkpointer as ckpt_lib
from ml_collections import config_dict

class Toy:
    def snapshot_state(self):
        return {"params": {"w": np.full(3, float(sys.argv[2]), np.float32)}}

config = config_dict.ConfigDict({"checkpoint_dir": sys.argv[1], "max_checkpoints_to_keep": 2})
for attempt in range(3):  # the emulator occasionally fails a write (ECOSYSTEM.md)
    try:
        ck = ckpt_lib.Checkpointer(config, "train", enable_async=False)
        state = ck.get_experiment_state("latest")
        state.global_step, state.experiment_module = int(sys.argv[2]), Toy()
        ck.save("latest")
        break
    except Exception:
        if attempt == 2:
            raise
"""


def test_checkpointer_on_gcs_emulator(gcs_emulator, monkeypatch):
    """Checkpoints on gs:// written by another process (the trainer) are seen by a reader that
    keeps polling (the eval job): no stale listing cache; orbax's array writes (tensorstore) go
    to the emulator named by STORAGE_EMULATOR_HOST."""
    endpoint, bucket = gcs_emulator
    # Unset, but restored after the test (delenv alone records nothing when the variable is
    # absent): the checkpointer derives it from STORAGE_EMULATOR_HOST.
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", "unset")
    monkeypatch.delenv("TENSORSTORE_GCS_HTTP_URL")
    ckpt_dir = f"gs://{bucket}/ckpt-test"
    reader = ckpt_lib.Checkpointer(_Config(checkpoint_dir=ckpt_dir), "read")
    assert reader.latest_step("latest") is None
    assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == endpoint
    for step in (7, 8):
        subprocess.run([sys.executable, "-c", _SAVE_IN_ANOTHER_PROCESS, ckpt_dir, str(step)],
                       check=True, cwd=ROOT, capture_output=True, timeout=120)
        assert reader.latest_step("latest") == step
        arrays, meta = reader.read("latest")
        np.testing.assert_array_equal(arrays["experiment/params"]["w"], np.full(3, step))
        assert meta["step"] == step
