"""Storage faults (issue 6, item 4): training from a GCS emulator that goes away for ~10 s
mid-epoch, a missing bucket/object or a 403 at start-up, and checkpoints on gs:// during an
outage. The emulator runs in its own process with a disk store, so a restart keeps the objects.
"""

import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import xarray as xr

import experiment
from conftest import _LOOPBACK_ENV, free_port, upload_tree
from data import examples, sources, validate
from test_experiment import ROOT, _cli_overrides
from test_experiment import sample_dir  # noqa: F401  (session fixture: the synthetic sample)
from test_preemption import _example_log, _start
from test_reliability import _good_config
from test_sources import _forbidding_server

BUCKET = "era5"
STEPS = 10
_EMULATOR = textwrap.dedent("""
    import http.server, sys, time
    http.server.HTTPServer.request_queue_size = 1024  # the default backlog of 5 stalls clients
    from gcp_storage_emulator.server import create_server
    server = create_server("127.0.0.1", int(sys.argv[1]), in_memory=True,
                           default_bucket=sys.argv[2])
    server.start()
    print("READY", flush=True)
    while True:
        time.sleep(3600)
""")


def _port_outside_ephemeral_range() -> int:
    """A free port below the kernel's ephemeral range: while the relay is down, a client that
    keeps reconnecting to an ephemeral-range port can connect to itself (TCP simultaneous
    open) and hold the port, so the relay could not come back on it."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    for port in range(low - 1, 1024, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port below the ephemeral range")


class Outage:
    """The storage endpoint clients use: a TCP relay to the emulator that can go down (listening
    socket closed, open connections reset: clients see refused/reset connections) and come back
    on the same port with the same objects behind it."""

    def __init__(self, target_port: int):
        self.target, self.port = target_port, _port_outside_ephemeral_range()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener, self._open, self._lock = None, [], threading.Lock()

    def up(self):
        self._listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def down(self):
        # shutdown() wakes the thread blocked in accept(); close() alone would leave the
        # socket listening until that call returns.
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for sock in self._open:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))  # RST, not a clean close
                    sock.close()
                except OSError:
                    pass
            self._open.clear()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def emulator(sample_dir, monkeypatch):  # noqa: F811
    """Endpoint (an Outage relay) of an emulator holding the sample zarr at
    gs://era5/era5_sample.zarr; the environment points Google clients (this process and
    children) at it."""
    for key, value in _LOOPBACK_ENV.items():
        monkeypatch.setenv(key, value)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", _EMULATOR, str(port), BUCKET],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert server.stdout.readline().strip() == "READY"
    relay = Outage(port)
    relay.up()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", relay.url)
    upload_tree(f"http://127.0.0.1:{port}", BUCKET, os.path.realpath(f"{sample_dir}/era5_sample.zarr"),
                "era5_sample.zarr")
    yield relay
    os.kill(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


def _gcs_args(sample, run, log, source=f"gs://{BUCKET}/era5_sample.zarr"):
    return _cli_overrides(sample, run, STEPS, 2) + [
        f"--config.experiment_kwargs.config.data.source={source}",
        "--config.save_checkpoint_interval=2", "--config.log_train_data_interval=1",
        f"--config.experiment_kwargs.config.training.example_log={log}"]


def _expected_order(sample, batch=2):
    """Init times of the first STEPS batches of the same split and seed, over the local copy."""
    from configs import sample as sample_config
    cfg = sample_config.get_config().experiment_kwargs.config
    task = experiment.task_config_from(cfg)
    task = task.__class__(**{**task.__dict__, "pressure_levels": (500, 850)})
    ds = sources.open_source(f"{sample}/era5_sample.zarr", task_config=task)
    it = examples.TrainIterator(ds, task, split=(cfg.data.train_start, "2020-01-13"),
                                seed=cfg.data.seed, global_batch_size=batch, process_index=0,
                                process_count=1, local_device_count=1, prefetch=0)
    return [str(t.astype("datetime64[s]")) for t in it.epoch_order(0)[: STEPS * batch]]


@pytest.mark.slow
def test_outage_mid_epoch_is_retried_and_loses_no_example(sample_dir, tmp_path, emulator):  # noqa: F811
    run, log = tmp_path / "run", tmp_path / "examples.txt"
    training = _start(_gcs_args(sample_dir, run, log))
    lines = []
    for line in training.stdout:
        lines.append(line)
        if "[train] step 2 " in line:
            break
    else:
        raise AssertionError("".join(lines)[-4000:])
    emulator.down()
    down_at, steps_before = time.monotonic(), len(_example_log(log))
    time.sleep(10)
    emulator.up()
    out, _ = training.communicate(timeout=300)
    assert training.returncode == 0, ("".join(lines) + out)[-4000:]
    assert time.monotonic() - down_at > 10
    logged = _example_log(log)
    assert steps_before < STEPS and sorted(logged) == list(range(STEPS))
    seen = [t for step in range(STEPS) for t in logged[step][0].split()]
    assert seen == _expected_order(sample_dir)


def test_missing_bucket_object_and_403_name_the_url(sample_dir, tmp_path, emulator):  # noqa: F811
    config = _good_config(sample_dir, tmp_path)
    data = config.experiment_kwargs.config.data
    for url, error in ((f"gs://{BUCKET}/missing.zarr", validate.SourceNotFoundError),
                       ("gs://no-such-bucket/era5.zarr", validate.SourceNotFoundError)):
        data.source = url
        with pytest.raises(error, match=url):
            experiment.check_before_start(config)
    with _forbidding_server() as endpoint:
        data.source = "gs://private-bucket/era5.zarr"
        data.storage_options = {"endpoint_url": endpoint}
        with pytest.raises(validate.SourceAccessError, match="gs://private-bucket/era5.zarr"):
            experiment.check_before_start(config)
    assert not os.path.exists(config.checkpoint_dir)


@pytest.mark.xfail(run=False, reason=(
    "Known gap (issue 6, item 4): after a 10 s outage during an async orbax save to gs://, "
    "the training process hangs (> 5 min) instead of finishing or failing; orbax's "
    "AsyncOptions(timeout_secs) did not bound it. Not run: it would hang CI."))
@pytest.mark.slow
def test_gs_checkpoints_survive_an_outage_or_fail_loudly(sample_dir, tmp_path, emulator):  # noqa: F811
    """Smoke test (orbax on the emulator fails ~1 save in 30: one retry): checkpoints to gs://
    while the emulator is down for 10 s either complete or fail with an error, and the newest
    listed checkpoint always reads back."""
    from configs import sample as sample_config
    from training import checkpointer as ckpt_lib
    for attempt in range(2):
        ckpt_dir = f"gs://{BUCKET}/ckpt{attempt}"
        training = _start(_gcs_args(sample_dir, ckpt_dir, tmp_path / f"ex{attempt}.txt"))
        for line in training.stdout:
            if "Saving checkpoint latest step 2" in line:
                break
        time.sleep(1.0)  # let step 2 complete
        emulator.down()
        time.sleep(10)
        emulator.up()
        out, _ = training.communicate(timeout=300)
        config = sample_config.get_config()
        config.checkpoint_dir = ckpt_dir
        reader = ckpt_lib.Checkpointer(config, "read")
        try:
            arrays, meta = reader.read("latest")
        except Exception:  # noqa: BLE001 -- emulator flake: retry once
            if attempt == 0:
                continue
            raise
        assert meta["step"] >= 2 and "experiment/params" in arrays
        if training.returncode == 0:
            assert meta["step"] == STEPS
        else:
            assert "Traceback" in out or "Error" in out  # failed loudly
        return
