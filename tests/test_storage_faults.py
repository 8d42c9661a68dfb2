"""Storage faults (issue 6, item 4): training from a GCS emulator that goes away for ~10 s
mid-epoch, a missing bucket/object or a 403 at start-up, and checkpoints on gs:// during an
outage. The emulator runs in its own process with a disk store, so a restart keeps the objects.
"""

import os
import re
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

from conftest import _LOOPBACK_ENV, free_port, upload_tree
from data import examples, sources, validate
from graphcast import exit_status
from test_experiment import ROOT, _cli_overrides
from test_experiment import sample_dir  # noqa: F401  (session fixture: the synthetic sample)
from test_preemption import _example_log, _start
from test_reliability import _good_config
from test_sources import _forbidding_server
from training import model_configs, preflight

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
    socket closed, open connections reset: clients see refused/reset connections), come back on
    the same port with the same objects behind it, or stall (a black hole: connections are
    accepted, nothing is answered)."""

    def __init__(self, target_port: int):
        self.target, self.port = target_port, _port_outside_ephemeral_range()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener, self._open, self._lock = None, [], threading.Lock()
        self._stalled = False

    def up(self):
        self._stalled = False
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
                    # shutdown() also wakes the pump blocked in recv() on this socket (close()
                    # alone would not): the emulator, which serves one request at a time, must
                    # see its half of the connection end, or it waits for that request forever.
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
                except OSError:
                    pass
            self._open.clear()

    def stall(self):
        """From now on, requests on new and open connections go unanswered (responses to
        requests the emulator already has still arrive whole: a cut response would be a
        different fault)."""
        self._stalled = True

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if self._stalled:
                with self._lock:
                    self._open.append(client)  # held open, never answered
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._open += [client, upstream]
            for a, b, is_request in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(a, b, is_request), daemon=True).start()

    def _pump(self, src, dst, is_request):
        try:
            while data := src.recv(65536):
                if not (is_request and self._stalled):
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
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", relay.url)  # else set (and kept) by orbax use
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
    task = model_configs.task_config_from(cfg)
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
            preflight.check_before_start(config)
    with _forbidding_server() as endpoint:
        data.source = "gs://private-bucket/era5.zarr"
        data.storage_options = {"endpoint_url": endpoint}
        with pytest.raises(validate.SourceAccessError, match="gs://private-bucket/era5.zarr"):
            preflight.check_before_start(config)
    assert not os.path.exists(config.checkpoint_dir)


def _reader(ckpt_dir):
    from configs import sample as sample_config
    from training import checkpointer as ckpt_lib
    config = sample_config.get_config()
    config.checkpoint_dir = ckpt_dir
    return ckpt_lib.Checkpointer(config, "read")


# gcp-storage-emulator sends no generation headers, which tensorstore's OCDBT manifest writes rely
# on, so a gs:// save sometimes fails with this error (1 in 30 per ECOSYSTEM.md; more often in
# some runs here; three attempts in a row met it once in CI): a run that meets it tests nothing
# of ours and is redone.
_EMULATOR_FLAKE = "Malformed StorageGeneration"


class _EmulatorFlake(Exception):
    pass


def _start_logged(args, log_path):
    """The training process, its output going to a file: a pipe that nobody reads while the
    test polls the storage would fill up and block the process's logging."""
    with open(log_path, "w") as log:
        training = subprocess.Popen([sys.executable, "experiment.py", *args], cwd=ROOT,
                                    stdout=log, stderr=subprocess.STDOUT)
    training.log_path = log_path
    return training


def _finish(training, timeout):
    """(exit status, output) once the process has ended."""
    training.wait(timeout=timeout)
    with open(training.log_path) as f:
        return training.returncode, f.read()


def _wait_until_saved(ckpt_dir, step, training, timeout=180):
    """Returns once `step` is a complete checkpoint on storage (the run still going)."""
    deadline = time.monotonic() + timeout
    while step not in _reader(ckpt_dir).all_steps("latest"):
        if training.poll() is not None or time.monotonic() > deadline:
            training.kill()
            _, out = _finish(training, 60)
            if _EMULATOR_FLAKE in out:
                raise _EmulatorFlake()
            raise AssertionError(f"step {step} never saved:\n" + out[-4000:])
        time.sleep(1.0)  # the emulator serves one request at a time: poll gently


def _redone_on_emulator_flakes(attempt_fn, attempts=5):
    """attempt_fn(ckpt_dir), on a fresh gs:// directory each time the emulator's flake spoils it."""
    for attempt in range(attempts):
        try:
            return attempt_fn(f"gs://{BUCKET}/run{attempt}")
        except _EmulatorFlake:
            continue
    raise AssertionError(f"{attempts} attempts all met the emulator's {_EMULATOR_FLAKE!r} flake.")


@pytest.mark.slow
def test_gs_checkpoints_survive_an_outage_or_fail_loudly(sample_dir, tmp_path, emulator):  # noqa: F811
    """Checkpoints to gs:// while the storage is down for 10 s either complete or the run fails
    with an error; the checkpoint saved before the outage (or a newer one) always reads back."""

    def attempt(ckpt_dir):
        training = _start_logged(_gcs_args(sample_dir, ckpt_dir, tmp_path / "examples.txt") + [
            "--config.experiment_kwargs.config.training.checkpoint_save_timeout_s=90"],
            tmp_path / "train.log")
        _wait_until_saved(ckpt_dir, 2, training)
        emulator.down()
        time.sleep(10)
        emulator.up()
        status, out = _finish(training, 400)
        arrays, meta = _reader(ckpt_dir).read("latest")
        assert meta["step"] >= 2 and "experiment/params" in arrays
        if status == 0:
            assert meta["step"] == STEPS, out[-4000:]
        else:
            assert "Error" in out, out[-4000:]  # failed loudly

    _redone_on_emulator_flakes(attempt)


def _wait_for_log_line(training, text, timeout=180):
    """Returns once the run's log has a line containing `text` (the run still going)."""
    deadline = time.monotonic() + timeout
    while True:
        with open(training.log_path) as f:
            if text in f.read():
                return
        if training.poll() is not None or time.monotonic() > deadline:
            training.kill()
            raise AssertionError(f"never logged {text!r}:\n" + _finish(training, 60)[1][-4000:])
        time.sleep(0.2)


@pytest.mark.slow
def test_stalled_checkpoint_storage_stops_the_run_naming_the_step(sample_dir, tmp_path,  # noqa: F811
                                                                  emulator):
    """Checkpoint storage that accepts connections but never answers (from the first step on,
    before the first save): the run stops with CheckpointTimeoutError naming the stuck step
    instead of hanging, and the stuck step is never listed. Should a save still have got through
    before the stall, it reads back."""

    def attempt(ckpt_dir):
        training = _start_logged(_cli_overrides(sample_dir, ckpt_dir, STEPS, 2) + [
            "--config.save_checkpoint_interval=2", "--config.log_train_data_interval=1",
            "--config.experiment_kwargs.config.training.checkpoint_save_timeout_s=15"],
            tmp_path / "train.log")
        _wait_for_log_line(training, "[train] step 1 ")
        emulator.stall()
        status, out = _finish(training, 300)
        emulator.down()  # unstall: the storage answers again
        emulator.up()
        if status != exit_status.SAVE_TIMEOUT and _EMULATOR_FLAKE in out:
            raise _EmulatorFlake()  # a save that began before the stall met the flake
        assert status == exit_status.SAVE_TIMEOUT, out[-4000:]
        match = re.search(r"CheckpointTimeoutError: Saving checkpoint latest step (\d+) to "
                          + re.escape(f"{ckpt_dir}/latest") + r" has not finished", out)
        assert match, out[-4000:]
        reader = _reader(ckpt_dir)
        saved = reader.all_steps("latest")
        assert int(match.group(1)) not in saved
        if saved:
            arrays, meta = reader.read("latest")
            assert meta["step"] == saved[-1] and "experiment/params" in arrays

    _redone_on_emulator_flakes(attempt)
