"""What a data.prepare copy costs to read per core, by `--compression`, and its size on disk.

A synthetic store (random float32 as data_throughput.py writes it, or with `--data smooth` the
smooth fields of data.sample, which compress far better) is copied by `data.prepare` once per
compression; then, interleaved and best of `--repeat`:
  raw      a plain zarr read of exactly the chunks of the examples (fresh arrays);
  examples what one worker process does per example: the data layer (`open_source(use_dask=False)`
           and the frame reader, NaN check included) decoding into the same destination arrays
           each time, as into a slot of a worker's shared-memory batch.
Rates are MB per CPU-second of this process (all its threads: zarr's event loop and decoders),
which a shared machine disturbs far less than wall-clock rates; wall-clock MB/s are given too.
An example is 2 input frames and 1 target step.

    python benchmarks/prepared_compression.py --resolution 1.0 --levels 13 --days 8 --json
    python benchmarks/prepared_compression.py --data smooth --days 8
    python benchmarks/prepared_compression.py --resolution 0.25 --levels 37 --days 1 --repeat 2
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import data_throughput  # noqa: E402
from data import prepare, sample, sources, windows  # noqa: E402
from graphcast import config as gc_config  # noqa: E402


def source_store(path: str, args) -> None:
    if args.data == "random":
        data_throughput.synthetic_zarr(path, args.days, resolution=args.resolution,
                                       levels=args.levels)
        return
    if args.levels != 13:
        raise SystemExit("--data smooth has data.sample's 13 levels; use --levels 13.")
    sample.write(sample.generate(seed=0, resolution=args.resolution, start="2020-01-01",
                                 days=args.days), path)


def disk_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(path)
               for f in names)


def timed(fn) -> tuple:
    """(fn(), CPU seconds, wall seconds)."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def measure(path: str, task, resolution: float) -> dict:
    """MB per CPU-second and MB/s wall of the raw read and of examples into reused arrays."""
    ds = sources.open_source(path, task_config=task, resolution=resolution, use_dask=False)
    reader = windows.FrameReader(ds, task, cache_bytes=0)
    inits = reader.times[task.num_input_frames - 1:-1]
    slot = {part: {n: np.empty(s, np.float32) for n, s in shapes.items()}
            for part, shapes in reader.layout(1).items()}
    (_, raw_bytes), raw_cpu, raw_wall = timed(
        lambda: data_throughput.read_plain(path, None, len(inits), task))
    _, ex_cpu, ex_wall = timed(lambda: [reader.read_into(t, 1, slot) for t in inits])
    ex_bytes = windows.example_bytes(reader, 1) * len(inits)
    return {"raw_cpu_mb_s": raw_bytes / raw_cpu / 1e6, "raw_mb_s": raw_bytes / raw_wall / 1e6,
            "examples_cpu_mb_s": ex_bytes / ex_cpu / 1e6, "examples_mb_s": ex_bytes / ex_wall / 1e6,
            "examples": len(inits)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=float, default=1.0, choices=(1.0, 0.25))
    p.add_argument("--levels", type=int, default=13, choices=(13, 37))
    p.add_argument("--data", choices=("random", "smooth"), default="random")
    p.add_argument("--days", type=float, default=2, help="days of synthetic data (4 steps each)")
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds; best is reported")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = p.parse_args()
    task = gc_config.task_on_levels(args.levels)
    tmp = tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP"))
    src = os.path.join(tmp.name, "source.zarr")
    source_store(src, args)
    copies, result = {}, {"resolution": args.resolution, "levels": args.levels,
                          "data": args.data, "cores": os.cpu_count()}
    for compression in prepare.COMPRESSIONS:
        copies[compression] = data_throughput.prepared_copy(
            src, os.path.join(tmp.name, f"{compression}.zarr"), args.resolution, args.levels,
            compression)
        result[compression] = {"store_bytes": disk_bytes(copies[compression])}
    for _ in range(args.repeat):
        for compression, path in copies.items():
            best = result[compression]
            for key, value in measure(path, task, args.resolution).items():
                best[key] = max(best.get(key, 0), round(value, 1))
    for compression in prepare.COMPRESSIONS:
        r = result[compression]
        print(f"--compression {compression:7s} store {r['store_bytes'] / 1e6:8.0f} MB  raw "
              f"{r['raw_cpu_mb_s']:6.0f} MB/CPU-s ({r['raw_mb_s']:6.0f} MB/s)  examples "
              f"{r['examples_cpu_mb_s']:6.0f} MB/CPU-s ({r['examples_mb_s']:6.0f} MB/s)  "
              f"{r['examples']} examples", flush=True)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
