"""Preemption and eval-job isolation (issue 6, items 1 and 6): experiment.py in subprocesses,
killed with SIGKILL at chosen and random points, restarted, and compared bit for bit with an
uninterrupted run of the same tiny config (checkpoint every 2 steps, example init times logged).
"""

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import sample as sample_config
from test_experiment import ROOT, _cli_overrides
from test_experiment import sample_dir  # noqa: F401  (session fixture: the synthetic sample)
from training import checkpointer as ckpt_lib

STEPS = 10
_EVAL = ["--config.experiment_kwargs.config.data.eval_start=2020-01-14",
         "--config.experiment_kwargs.config.data.eval_end=2020-01-20",
         "--config.experiment_kwargs.config.eval.num_batches=1",
         "--config.experiment_kwargs.config.eval.batch_size=2",
         "--config.experiment_kwargs.config.eval.rollout_steps=2",
         "--config.experiment_kwargs.config.eval.figure_lead_step=2",
         "--config.experiment_kwargs.config.eval.headline_lead_step=2"]


def _train_args(sample, run, log):
    return _cli_overrides(sample, run, STEPS, 2) + _EVAL + [
        "--config.save_checkpoint_interval=2", "--config.log_train_data_interval=1",
        f"--config.experiment_kwargs.config.training.example_log={log}"]


def _start(args):
    return subprocess.Popen([sys.executable, "experiment.py", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _run_until(proc, pattern, nth, delay):
    """Reads the output until the nth line matching `pattern`, waits `delay` s, then SIGKILLs.
    Returns (output read, whether the kill happened before the process ended)."""
    seen, lines = 0, []
    for line in proc.stdout:
        lines.append(line)
        if re.search(pattern, line):
            seen += 1
            if seen == nth:
                time.sleep(delay)
                break
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    rest, _ = proc.communicate(timeout=60)
    return "".join(lines) + (rest or ""), killed


def _example_log(path):
    """{step: [line per attempt]} of a training.example_log file."""
    steps = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            step, times = line.split(" ", 1)
            steps.setdefault(int(step), []).append(times.strip())
    return steps


def _read(run):
    config = sample_config.get_config()
    config.checkpoint_dir = str(run)
    return ckpt_lib.Checkpointer(config, "read").read("latest")


@pytest.fixture(scope="module")
def reference(sample_dir, tmp_path_factory):  # noqa: F811
    """An uninterrupted run: (checkpoint arrays, meta, example log)."""
    base = tmp_path_factory.mktemp("reference")
    _finish(_start(_train_args(sample_dir, base / "run", base / "examples.txt")))
    arrays, meta = _read(base / "run")
    return arrays, meta, _example_log(base / "examples.txt")


def _assert_same_run(run, log, reference):
    ref_arrays, ref_meta, ref_log = reference
    arrays, meta = _read(run)
    assert meta["step"] == ref_meta["step"] == STEPS
    assert meta["plain"]["experiment/data_state"] == ref_meta["plain"]["experiment/data_state"]
    jax.tree.map(np.testing.assert_array_equal, arrays, ref_arrays)  # params, opt state, rng
    logged = _example_log(log)
    assert sorted(logged) == list(range(STEPS))
    for step, attempts in logged.items():  # a replayed step saw exactly the same examples
        assert set(attempts) == {ref_log[step][0]}, (step, attempts)


@pytest.mark.slow
def test_sigkill_at_random_points_resumes_bit_exactly(sample_dir, tmp_path, reference):  # noqa: F811
    ref_times = [t for step in range(STEPS) for t in reference[2][step][0].split()]
    assert len(ref_times) == len(set(ref_times)) == 2 * STEPS  # one epoch: no repeats
    rng = random.Random(6)
    # (what the kill interrupts, output pattern, occurrence, delay after it)
    kills = [("start-up", r"Process 0 of 1", 1, rng.uniform(0.0, 2.0)),
             ("first compile", r"Compiling the training step", 1, rng.uniform(0.5, 3.0)),
             ("between checkpoints", r"\[train\] step \d*[13579] ", 1, rng.uniform(0.0, 0.2)),
             ("checkpoint write", r"Saving checkpoint", 1, 0.0),
             ("random step", r"\[train\] step", rng.randint(1, 2), rng.uniform(0.0, 0.5)),
             ("restore", r"Restored checkpoint", 1, rng.uniform(0.0, 1.0))]
    run, log = tmp_path / "run", tmp_path / "examples.txt"
    outcomes = []
    for what, pattern, nth, delay in kills:
        out, killed = _run_until(_start(_train_args(sample_dir, run, log)), pattern, nth, delay)
        outcomes.append((what, killed))
        if what == "first compile":
            assert killed and "[train] step" not in out, out[-3000:]
    assert sum(killed for _, killed in outcomes) >= 5, outcomes
    _finish(_start(_train_args(sample_dir, run, log)))
    _assert_same_run(run, log, reference)


@pytest.mark.slow
def test_eval_job_crash_does_not_disturb_training(sample_dir, tmp_path, reference):  # noqa: F811
    run, log = tmp_path / "run", tmp_path / "examples.txt"
    training = _start(_train_args(sample_dir, run, log))
    evaluating = _start(_train_args(sample_dir, run, tmp_path / "unused.txt")
                        + ["--jaxline_mode=eval"])
    out, killed = _run_until(evaluating, r"\[eval\] step", 1, 0.0)
    assert killed, out[-3000:]  # the eval job crashed right after its first evaluation
    _finish(training)
    again = _finish(_start(_train_args(sample_dir, run, tmp_path / "unused.txt")
                           + ["--jaxline_mode=eval", "--config.one_off_evaluate=True"]))
    assert f"[eval] step {STEPS}" in again
    _assert_same_run(run, log, reference)


@pytest.mark.slow
def test_eval_job_waits_for_a_half_written_checkpoint(sample_dir, tmp_path, reference):  # noqa: F811
    del reference
    run = tmp_path / "run"
    _finish(_start(_train_args(sample_dir, run, tmp_path / "examples.txt")))
    newest = run / "latest" / str(STEPS) / "meta" / "metadata"
    shutil.move(newest, tmp_path / "held_back")  # the newest step is still being written
    evaluating = _start(_train_args(sample_dir, run, tmp_path / "unused.txt")
                        + ["--jaxline_mode=eval", "--config.one_off_evaluate=True"])
    lines = []
    for line in evaluating.stdout:
        lines.append(line)
        if "not readable yet" in line:
            break
    time.sleep(3)
    assert evaluating.poll() is None, "".join(lines)[-3000:]  # still waiting, not failed
    shutil.move(tmp_path / "held_back", newest)  # the writer finishes
    out = "".join(lines) + _finish(evaluating)
    assert f"[eval] step {STEPS}" in out, out[-3000:]
