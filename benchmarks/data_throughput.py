"""Data throughput at 1 degree / 13 levels: printed figures, not a timed test.

An "example" is what one training step with 2 input frames and 1 target step needs: 3 consecutive
6-hourly states of every TASK_13 variable, read through `data.sources.open_source` (validation,
level selection, latitude flip, NaN check, progress features) into numpy float32. Next to it,
a plain read of the same chunks with zarr alone (no xarray/dask) gives the storage ceiling.
Both are measured from a local zarr and from gcp-storage-emulator (separate process, loopback).

    python benchmarks/data_throughput.py                 # synthetic 2-day zarr in a temp dir
    python benchmarks/data_throughput.py --path DIR.zarr # an existing WeatherBench2-layout zarr
    python benchmarks/data_throughput.py --strided       # 1-degree examples from a 0.25-degree
                                                         # zarr (every 4th point) vs a prepared copy
"""

import argparse
import contextlib
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

import dask  # noqa: E402
import pandas as pd  # noqa: E402
import xarray as xr  # noqa: E402
import zarr  # noqa: E402

from data import gcs, sources  # noqa: E402
from graphcast.config import PROGRESS_VARS, TASK_13, TIME_STEP, TIME_STEP_HOURS  # noqa: E402

STEPS_PER_EXAMPLE = 3
_EMULATOR = """
import http.server, sys
http.server.HTTPServer.request_queue_size = 1024
from gcp_storage_emulator.server import create_server
create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket="bench").run()
"""


def synthetic_zarr(path: str, days: int, seed: int = 0, resolution: float = 1.0) -> None:
    """WeatherBench2-layout 13-level zarr with every TASK_13 variable (incl. TOA), one time step
    per chunk (as WeatherBench2 stores it)."""
    rng = np.random.default_rng(seed)
    times = pd.date_range("2020-01-01", periods=days * (24 // TIME_STEP_HOURS),
                          freq=TIME_STEP)
    n_lat = int(round(180 / resolution))
    lat, lon = np.linspace(90, -90, n_lat + 1), np.arange(2 * n_lat) * resolution
    levels = np.asarray(TASK_13.pressure_levels)
    coords = {"time": times, "level": levels, "latitude": lat, "longitude": lon}
    ds = xr.Dataset(coords=coords)
    for name in sources.task_variables(TASK_13):
        if name in PROGRESS_VARS:
            continue
        dims = tuple({"lat": "latitude", "lon": "longitude"}.get(d, d)
                     for d in sources.validate.expected_dims(name))
        shape = tuple(len(coords[d]) for d in dims)
        ds[name] = (dims, rng.standard_normal(shape, dtype=np.float32))
    ds.chunk({"time": 1}).to_zarr(path, mode="w", zarr_format=2, consolidated=True)


def read_examples(url: str, opts, num: int, subsample_grid: bool = False) -> tuple:
    """Seconds and bytes (of 1-degree examples) to read `num` examples through open_source."""
    ds = sources.open_source(url, task_config=TASK_13, resolution=1.0, storage_options=opts,
                             subsample_grid=subsample_grid)
    start, nbytes = time.perf_counter(), 0
    for i in range(num):
        window = ds.isel(time=slice(i, i + STEPS_PER_EXAMPLE)).compute()
        arrays = {k: np.asarray(v.values, np.float32) for k, v in window.data_vars.items()}
        nbytes += sum(a.nbytes for a in arrays.values())
    return time.perf_counter() - start, nbytes


def read_plain(url: str, opts, num: int) -> tuple:
    """Seconds and bytes to read the same chunks with zarr alone."""
    group = zarr.open_group(url, mode="r", storage_options=opts) if opts else \
        zarr.open_group(url, mode="r")
    names = [n for n in sources.task_variables(TASK_13) if n in group]
    start, nbytes = time.perf_counter(), 0
    for i in range(num):
        for n in names:
            arr = group[n]
            data = arr[i:i + STEPS_PER_EXAMPLE] if "time" in arr.attrs.get(
                "_ARRAY_DIMENSIONS", ()) else arr[...]
            nbytes += data.nbytes
    return time.perf_counter() - start, nbytes


def report(label: str, seconds: float, nbytes: int, num: int) -> None:
    print(f"{label:<34s} {num / seconds:8.2f} examples/s {nbytes / seconds / 1e6:9.1f} MB/s "
          f"({num} examples, {nbytes / 1e6:.0f} MB, {seconds:.2f} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", help="existing 1-degree 13-level WeatherBench2-layout zarr")
    p.add_argument("--days", type=int, default=2, help="days of synthetic data (no --path)")
    p.add_argument("--examples", type=int, default=None, help="examples per measurement")
    p.add_argument("--no-emulator", action="store_true", help="local zarr only")
    p.add_argument("--strided", action="store_true",
                   help="0.25-degree synthetic zarr read at 1 degree vs its data.prepare copy")
    args = p.parse_args()
    if args.strided:
        strided(args.days, args.no_emulator)
        return
    tmp = tempfile.TemporaryDirectory()
    path = args.path
    if path is None:
        path = os.path.join(tmp.name, "bench.zarr")
        t0 = time.perf_counter()
        synthetic_zarr(path, args.days)
        print(f"synthetic zarr: {args.days} days in {time.perf_counter() - t0:.1f} s")
    n_times = xr.open_zarr(path).sizes["time"]
    num = args.examples or n_times - STEPS_PER_EXAMPLE + 1
    print(f"{path}: {n_times} times; dask threads={dask.system.CPU_COUNT}")
    report("local zarr, plain zarr read", *read_plain(path, None, num), num)
    report("local zarr, open_source examples", *read_examples(path, None, num), num)
    if args.no_emulator:
        return
    with emulator() as endpoint:
        opts = {"token": "anon", "endpoint_url": endpoint}
        t0 = time.perf_counter()
        gcs.filesystem("gs://bench", opts).put(path.rstrip("/"), "bench/era5.zarr",
                                               recursive=True)
        print(f"uploaded to the emulator in {time.perf_counter() - t0:.1f} s")
        url = "gs://bench/era5.zarr"
        report("emulator, plain zarr read", *read_plain(url, opts, num), num)
        report("emulator, open_source examples", *read_examples(url, opts, num), num)


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
