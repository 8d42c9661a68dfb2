"""Throughput of the whole input path, from stored ERA5 chunks to the experiment's batches.

Three figures, measured side by side on the same store:
  raw_mb_s       plain zarr read (zarr alone, no xarray/dask) of exactly the chunks the examples
                 use: the storage's speed on one core;
  examples_mb_s  examples through the data layer (`open_source(use_dask=False)` + the frame
                 reader: level selection, latitude flip, NaN check, progress features), one at a
                 time, each written into the same example-sized buffer, as training writes them
                 into the slots of reused batch buffers (`FrameReader.read_into`);
                 examples_fresh_mb_s is the same through `FrameReader.read`, which returns new
                 arrays per example (their pages are faulted in afresh each time);
  pipeline_mb_s  the experiment's training input iterator, built as the experiment builds it
                 (`training.data_input.Source.train_iterator`: batches for the local devices,
                 `--workers` readers, processes unless `--threads`, each pinned to one core
                 unless `--no-pin`, prefetch 2; no frame cache, as in training, so stored frames
                 decode straight into the batch);
                 pipeline_cores is the CPU it used (seconds of the training process and its
                 worker processes per second): the workers a host needs follow from it.
An example is what a training step with 2 input frames and 1 target step needs; MB/s count the
bytes of the float32 arrays each path returns (example_bytes per example for the last two).

    python benchmarks/data_throughput.py --resolution 1.0 --levels 13 --no-emulator --json
    python benchmarks/data_throughput.py --resolution 0.25 --levels 37 --no-emulator --workers 2
    python benchmarks/data_throughput.py --path DIR.zarr   # an existing WeatherBench2-layout zarr
    python benchmarks/data_throughput.py --prepared none   # the store's data.prepare copy, chunks
                                                           # uncompressed (--compression none)
    python benchmarks/data_throughput.py --strided         # 1-degree examples from a 0.25-degree
                                                           # zarr (every 4th point) vs a prepared copy

The synthetic store has WeatherBench2's layout (one time step per chunk, whole grid, blosc lz4,
every variable of the task at exactly its levels, random float32): 8 time steps at 1 degree, 4 at
0.25 degrees (a 0.25-degree 37-level frame is 0.94 GB). With the emulator (default) the same
figures are measured again through gcp-storage-emulator on loopback (keys prefixed emulator_).
"""

import argparse
import contextlib
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for _key, _value in {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # keep clients on loopback
                     "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy", "GCE_METADATA_HOST": "127.0.0.1:1",
                     "GCE_METADATA_IP": "127.0.0.1:1", "NO_GCE_CHECK": "True"}.items():
    os.environ.setdefault(_key, _value)

import pandas as pd  # noqa: E402
import xarray as xr  # noqa: E402
import zarr  # noqa: E402

from data import gcs, sources, windows  # noqa: E402
from graphcast import config as gc_config  # noqa: E402
from graphcast.config import TASK_13  # noqa: E402

STEPS_PER_EXAMPLE = 3
# Timed pipeline batches at least: from the fifth batch on (prefetch 2) the batch files are
# reused, as through a training run, instead of paged in afresh (2.9 GB per 0.25-degree example).
STEADY_BATCHES = 8
_EMULATOR = """
import http.server, sys
http.server.HTTPServer.request_queue_size = 1024
from gcp_storage_emulator.server import create_server
create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket="bench").run()
"""


def synthetic_zarr(path: str, days: float, seed: int = 0, resolution: float = 1.0,
                   levels: int = 13) -> None:
    """WeatherBench2-layout zarr with every variable of the task on `levels` (incl. TOA), one
    time step per chunk holding the whole grid (as WeatherBench2 stores it); written one time
    step at a time so that 0.25-degree frames never sit in memory together."""
    rng = np.random.default_rng(seed)
    times = pd.date_range("2020-01-01", periods=int(round(days * 24 / gc_config.TIME_STEP_HOURS)),
                          freq=gc_config.TIME_STEP)
    n_lat = int(round(180 / resolution))
    lat, lon = np.linspace(90, -90, n_lat + 1), np.arange(2 * n_lat) * resolution
    task = gc_config.task_on_levels(levels)
    coords = {"time": times, "level": np.asarray(task.pressure_levels), "latitude": lat,
              "longitude": lon}
    template, dynamic = xr.Dataset(coords=coords), []
    for name in sources.task_variables(task):
        if name in gc_config.PROGRESS_VARS:
            continue
        dims = tuple({"lat": "latitude", "lon": "longitude"}.get(d, d)
                     for d in sources.validate.expected_dims(name))
        shape = tuple(len(coords[d]) for d in dims)
        if "time" in dims:
            import dask.array as da  # pylint: disable=import-outside-toplevel
            chunks = (1,) + shape[1:]
            template[name] = (dims, da.zeros(shape, dtype=np.float32, chunks=chunks))
            dynamic.append(name)
        else:
            template[name] = (dims, rng.standard_normal(shape, dtype=np.float32))
            template[name].encoding["chunks"] = shape   # one chunk, as WeatherBench2
    template.to_zarr(path, mode="w", zarr_format=2, consolidated=True, compute=False)
    xr.Dataset({n: template[n] for n in template.data_vars if n not in dynamic}).to_zarr(
        path, mode="r+", zarr_format=2)
    for t in range(len(times)):
        step = xr.Dataset({n: (template[n].dims, rng.standard_normal(
            (1,) + template[n].shape[1:], dtype=np.float32)) for n in dynamic})
        step.to_zarr(path, region={"time": slice(t, t + 1)}, zarr_format=2)


def read_plain(url: str, opts, num: int, task=TASK_13) -> tuple:
    """Seconds and bytes to read, with zarr alone, the chunks of `num` examples."""
    group = zarr.open_group(url, mode="r", storage_options=opts) if opts else \
        zarr.open_group(url, mode="r")
    names = [n for n in sources.task_variables(task) if n in group]
    start, nbytes = time.perf_counter(), 0
    for i in range(num):
        for n in names:
            arr = group[n]
            data = arr[i:i + STEPS_PER_EXAMPLE] if "time" in arr.attrs.get(
                "_ARRAY_DIMENSIONS", ()) else arr[...]
            nbytes += data.nbytes
    return time.perf_counter() - start, nbytes


def read_examples(url: str, opts, num: int, subsample_grid: bool = False, task=TASK_13,
                  resolution: float = 1.0, fresh: bool = False) -> tuple:
    """Seconds and bytes to read `num` examples one at a time through the data layer, into one
    reused example buffer (as into batch slots in training), or as new arrays if `fresh`."""
    ds = sources.open_source(url, task_config=task, resolution=resolution, storage_options=opts,
                             subsample_grid=subsample_grid, use_dask=False)
    reader = windows.FrameReader(ds, task, cache_bytes=0)
    init_times = reader.times[task.num_input_frames - 1:][:num]
    buffer = {part: {n: np.empty(shape, np.float32) for n, shape in shapes.items()}
              for part, shapes in reader.layout(1).items()}
    start, nbytes = time.perf_counter(), 0
    for t in init_times:
        if fresh:
            example = reader.read(t, 1)
        else:
            reader.read_into(t, 1, buffer)
            example = buffer
        nbytes += sum(a.nbytes for part in example.values() for a in part.values())
    return time.perf_counter() - start, nbytes


def cpu_seconds() -> float:
    """CPU seconds so far of this process and its live worker processes (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = time.process_time()
    for child in multiprocessing.active_children():
        try:
            with open(f"/proc/{child.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks   # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def read_pipeline(url: str, opts, task, resolution: float, *, workers: int, processes: bool,
                  pin: bool, batch: int, batches: int, repeat: int = 1,
                  prefetch_memory_gb: float = 1.0) -> tuple:
    """(seconds, bytes, cores, example bytes) of `batches` batches (after one warm-up batch,
    which starts the workers) from the experiment's training iterator over `url`; the fastest
    of `repeat` such runs. cores = CPU seconds of this process and its workers per second."""
    from configs import base  # pylint: disable=import-outside-toplevel
    from training import data_input  # pylint: disable=import-outside-toplevel
    data_cfg = base.get_base_config(task).experiment_kwargs.config.data
    data_cfg.update(dict(source=url, workers=workers, worker_processes=processes, pin_workers=pin,
                         prefetch_memory_gb=prefetch_memory_gb,
                         train_start="2000", train_end="2100", global_batch_size=batch,
                         storage_options=dict(opts or {})))
    source = data_input.Source(data_cfg, task, resolution)
    with source.train_iterator(global_batch_size=batch, num_steps=1,
                               max_num_steps=1) as iterator:
        iterator.next()
        timings = []
        for _ in range(repeat):
            start, cpu, nbytes = time.perf_counter(), cpu_seconds(), 0
            for _ in range(batches):
                out = iterator.next()
                nbytes += sum(a.nbytes for part in ("inputs", "targets", "forcings")
                              for a in out[part].values())
            seconds = time.perf_counter() - start
            timings.append((seconds, nbytes, (cpu_seconds() - cpu) / seconds))
        example = windows.example_bytes(iterator.reader, 1)
    return min(timings) + (example,)


def report(label: str, seconds: float, nbytes: int, num: int) -> float:
    rate = nbytes / seconds / 1e6
    print(f"{label:<34s} {num / seconds:8.2f} examples/s {rate:9.1f} MB/s "
          f"({num} examples, {nbytes / 1e6:.0f} MB, {seconds:.2f} s)", flush=True)
    return rate


def measure(url: str, opts, args, task, prefix: str = "") -> dict:
    """The three figures for one store; keys prefixed with `prefix`."""
    n_times = (zarr.open_group(url, mode="r", storage_options=opts) if opts else
               zarr.open_group(url, mode="r"))["time"].shape[0]
    num = args.examples or n_times - STEPS_PER_EXAMPLE + 1
    where = prefix.rstrip("_") or "local"
    raw = report(f"{where}, plain zarr read",
                 *min(read_plain(url, opts, num, task) for _ in range(args.repeat)), num)
    ex = report(f"{where}, examples", *min(
        read_examples(url, opts, num, task=task, resolution=args.resolution)
        for _ in range(args.repeat)), num)
    fresh = report(f"{where}, examples as new arrays", *min(
        read_examples(url, opts, num, task=task, resolution=args.resolution, fresh=True)
        for _ in range(args.repeat)), num)
    batches = args.batches or max(STEADY_BATCHES, -(-num // args.batch))
    seconds, nbytes, cores, example = read_pipeline(
        url, opts, task, args.resolution, workers=args.workers, processes=not args.threads,
        pin=not args.no_pin, prefetch_memory_gb=args.prefetch_memory_gb,
        batch=args.batch, batches=batches, repeat=args.repeat)
    pipe = report(f"{where}, pipeline ({args.workers} "
                  f"{'threads' if args.threads else 'processes'})", seconds, nbytes,
                  batches * args.batch)
    return {f"{prefix}raw_mb_s": round(raw, 1), f"{prefix}examples_mb_s": round(ex, 1),
            f"{prefix}examples_fresh_mb_s": round(fresh, 1),
            f"{prefix}pipeline_cores": round(cores, 2),
            f"{prefix}pipeline_mb_s": round(pipe, 1), f"{prefix}example_bytes": example,
            f"{prefix}examples_per_s": round(batches * args.batch / seconds, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=float, default=1.0, choices=(1.0, 0.25))
    p.add_argument("--levels", type=int, default=13, choices=(13, 37))
    p.add_argument("--path", help="existing WeatherBench2-layout zarr at --resolution")
    p.add_argument("--days", type=float, default=None,
                   help="days of synthetic data (default 2 at 1 degree, 1 at 0.25)")
    p.add_argument("--examples", type=int, default=None, help="examples per raw/examples pass")
    p.add_argument("--workers", type=int, default=2, help="pipeline readers (data.workers)")
    p.add_argument("--threads", action="store_true",
                   help="pipeline readers are threads (default: worker processes)")
    p.add_argument("--prefetch-memory-gb", type=float, default=1.0,
                   help="data.prefetch_memory_gb: cap on prefetched batches (GiB). A 0.25-degree "
                        "example is 2.7 GiB: raise it to 6 for two batches of 1 in flight, so "
                        "that two workers read at once")
    p.add_argument("--no-pin", action="store_true",
                   help="worker processes not pinned to a core each (data.pin_workers=False)")
    p.add_argument("--batch", type=int, default=2, help="pipeline global batch (1 host)")
    p.add_argument("--batches", type=int, default=None,
                   help="pipeline batches per timed run (default: one pass over the examples, "
                        f"at least {STEADY_BATCHES})")
    p.add_argument("--repeat", type=int, default=3,
                   help="each figure is the fastest of this many runs (shared machines)")
    p.add_argument("--prepared", choices=("default", "none"), default=None,
                   help="measure the store's data.prepare copy, written with this --compression")
    p.add_argument("--no-emulator", action="store_true", help="local zarr only")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.add_argument("--strided", action="store_true",
                   help="0.25-degree synthetic zarr read at 1 degree vs its data.prepare copy")
    args = p.parse_args()
    if args.strided:
        strided(args.days or 2, args.no_emulator)
        return
    task = gc_config.task_on_levels(args.levels)
    tmp = tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP"))
    path = args.path
    if path is None:
        path = os.path.join(tmp.name, "bench.zarr")
        days = args.days or (2 if args.resolution == 1.0 else 1)
        t0 = time.perf_counter()
        synthetic_zarr(path, days, resolution=args.resolution, levels=args.levels)
        print(f"synthetic zarr: {args.resolution:g} deg, {args.levels} levels, {days:g} days in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    result = {"resolution": args.resolution, "levels": args.levels, "workers": args.workers,
              "worker_processes": not args.threads,
              "pinned_workers": not args.threads and not args.no_pin,
              "prefetch_memory_gb": args.prefetch_memory_gb, "cores": os.cpu_count()}
    if args.prepared:
        path = prepared_copy(path, os.path.join(tmp.name, "prepared.zarr"), args.resolution,
                             args.levels, args.prepared)
        result["prepared"] = args.prepared
    result.update(measure(path, None, args, task))
    if not args.no_emulator:
        with emulator() as endpoint:
            opts = {"token": "anon", "endpoint_url": endpoint}
            t0 = time.perf_counter()
            gcs.filesystem("gs://bench", opts).put(path.rstrip("/"), "bench/era5.zarr",
                                                   recursive=True)
            print(f"uploaded to the emulator in {time.perf_counter() - t0:.1f} s", flush=True)
            result.update(measure("gs://bench/era5.zarr", opts, args, task, "emulator_"))
    for key in ("examples", "pipeline"):
        result[f"{key}_vs_raw"] = round(result[f"{key}_mb_s"] / result["raw_mb_s"], 2)
    if args.json:
        print(json.dumps(result))


def prepared_copy(source: str, out: str, resolution: float, levels: int,
                  compression: str) -> str:
    """`python -m data.prepare --compression COMPRESSION` of all of `source` into `out`."""
    from data import prepare  # pylint: disable=import-outside-toplevel
    times = xr.open_zarr(source)["time"].values
    t0 = time.perf_counter()
    prepare.prepare(prepare.PrepareConfig(source, out, resolution, levels, str(times[0]),
                                          str(times[-1]), compression=compression))
    print(f"data.prepare copy (--compression {compression}) in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return out


def strided(days: int, no_emulator: bool) -> None:
    """1-degree examples read from a 0.25-degree zarr (every 4th point; each chunk is read whole)
    and from the 1-degree copy `python -m data.prepare --resolution 1.0` writes of it."""
    from data import prepare  # pylint: disable=import-outside-toplevel
    tmp = tempfile.TemporaryDirectory()
    fine, coarse = os.path.join(tmp.name, "era5_0p25.zarr"), os.path.join(tmp.name, "era5_1.zarr")
    t0 = time.perf_counter()
    synthetic_zarr(fine, days, resolution=0.25)
    times = xr.open_zarr(fine)["time"].values
    prepare.prepare(prepare.PrepareConfig(fine, coarse, 1.0, 13, str(times[0]), str(times[-1])))
    print(f"synthetic 0.25-degree zarr ({days} days) and its prepared 1-degree copy in "
          f"{time.perf_counter() - t0:.1f} s")
    num = len(times) - STEPS_PER_EXAMPLE + 1
    report("local, 0.25 deg read every 4th point", *read_examples(fine, None, num, True), num)
    report("local, prepared 1 deg copy", *read_examples(coarse, None, num), num)
    if no_emulator:
        return
    with emulator() as endpoint:
        opts = {"token": "anon", "endpoint_url": endpoint}
        fs = gcs.filesystem("gs://bench", opts)
        for local, name in ((fine, "era5_0p25.zarr"), (coarse, "era5_1.zarr")):
            fs.put(local, f"bench/{name}", recursive=True)
        report("emulator, 0.25 deg every 4th point",
               *read_examples("gs://bench/era5_0p25.zarr", opts, num, True), num)
        report("emulator, prepared 1 deg copy",
               *read_examples("gs://bench/era5_1.zarr", opts, num), num)


@contextlib.contextmanager
def emulator():
    """gcp-storage-emulator in a child process on a free loopback port (listen backlog raised)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    child = subprocess.Popen([sys.executable, "-c", _EMULATOR, str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or child.poll() is not None:
                    raise RuntimeError("gcp-storage-emulator did not start")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        child.terminate()
        child.wait(timeout=10)


if __name__ == "__main__":
    main()
