"""Write a training-ready zarr from an ERA5 source: `python -m data.prepare --help`.

Output layout (WeatherBench2-like, read back by `data.sources.open_source`): zarr v2,
consolidated; dims time, level, latitude (descending 90..-90), longitude [0, 360); the GraphCast
TASK variables at the chosen levels (atmospheric (time, level, latitude, longitude), surface and
forcings (time, latitude, longitude), statics (latitude, longitude)), with
`total_precipitation_6hr` accumulated to 6 h and `toa_incident_solar_radiation` computed when the
source lacks them; progress features are not stored (open_source derives them). One time step per
chunk. The grid is subsampled by taking every k-th point (k = resolution / source resolution), as
DeepMind made its 1-degree data from 0.25-degree ERA5.

Compression (`--compression`): `default` is zarr's for v2 (blosc lz4, level 5, byte shuffle), as
WeatherBench2 stores it; `none` stores the chunks uncompressed, so that reading a chunk is a file
read and a copy (data.windows decodes it straight into the batch), for the store's full float32
size on disk (README, "Preparing training data", has what it measured). Same chunks, same bytes
once read; the choice is recorded in the store and needs no configuration to read back.

Resumable and idempotent: time is split into blocks of `block_size` steps; each block is written
as a zarr region and then recorded by a marker object `_prepare/block-NNNNNN`. A re-run with the
same arguments skips recorded blocks; interrupted and uninterrupted runs give identical bytes.
"""

import argparse
import dataclasses
import json
import logging
from typing import Optional, Sequence

import dask
import xarray as xr

from data import gcs, sources
from graphcast.config import PRESSURE_LEVELS, PROGRESS_VARS, TISR, TaskConfig, task_on_levels

MARKER_DIR = "_prepare"
CONFIG_ATTR = "prepare_config"
COMPRESSIONS = ("default", "none")
# Arguments absent from the recorded config of stores written before they existed.
_LEGACY_DEFAULTS = {"compression": "default"}
log = logging.getLogger(__name__)


class PrepareError(ValueError):
    """Arguments or an existing output that do not fit; the message says which."""


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    source: str
    out: str
    resolution: float
    levels: int
    start: str
    end: str
    block_size: int = 8
    compression: str = "default"

    def __post_init__(self):
        if self.compression not in COMPRESSIONS:
            raise PrepareError(f"--compression {self.compression!r} is not one of "
                               f"{', '.join(COMPRESSIONS)}.")

    def task(self) -> TaskConfig:
        return task_on_levels(self.levels)

    def fingerprint(self) -> str:
        """What decides the output's content (not where it goes)."""
        keys = ("source", "resolution", "levels", "start", "end", "block_size", "compression")
        return json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)


def changed_arguments(recorded: Optional[str], wanted: str) -> list:
    """The arguments (as `--flag recorded -> wanted`) whose values differ between a store's
    recorded prepare config and this run's; [] when they match. A store without a recorded config
    (another tool's zarr) differs in everything."""
    if recorded is None:
        return ["(no data.prepare config recorded)"]
    try:
        found = {**_LEGACY_DEFAULTS, **json.loads(recorded)}
    except (TypeError, ValueError):
        return [f"(unreadable data.prepare config {recorded!r})"]
    want = json.loads(wanted)
    return [f"--{k.replace('_', '-')} {found.get(k)!r} -> {want.get(k)!r}"
            for k in sorted(set(found) | set(want)) if found.get(k) != want.get(k)]


def to_output_layout(ds: xr.Dataset) -> xr.Dataset:
    """Normalized layout -> WeatherBench2-like layout, one time step per chunk."""
    ds = ds.drop_vars([v for v in PROGRESS_VARS if v in ds.variables])
    ds = ds.isel(lat=slice(None, None, -1)).rename(lat="latitude", lon="longitude")
    return ds.chunk({"time": 1, "latitude": -1, "longitude": -1,
                     **({"level": -1} if "level" in ds.dims else {})})


def build(config: PrepareConfig, storage_options: Optional[dict] = None) -> xr.Dataset:
    """The lazy output dataset for `config`."""
    task = config.task()
    ds = sources.open_source(config.source, task_config=task, storage_options=storage_options,
                             derive_forcings=False)
    ds = ds.sel(time=slice(config.start, config.end))
    if ds.sizes["time"] == 0:
        raise PrepareError(f"No times of {config.source} fall in {config.start}..{config.end}.")
    ds = sources.subsample(ds, config.resolution, config.source)
    stored_forcings = [v for v in sources.task_variables(task) if v == TISR]
    out = to_output_layout(sources.add_derived_forcings(ds, stored_forcings))
    out.attrs = {"source": config.source, CONFIG_ATTR: config.fingerprint(),
                 "description": "GraphCast training data written by data.prepare"}
    return out


def _encoding(ds: xr.Dataset, compression: str) -> dict:
    enc = {"time": {"units": "hours since 1970-01-01", "dtype": "int64",
                    "calendar": "proleptic_gregorian"}}
    for name, var in ds.data_vars.items():
        enc[name] = {"chunks": tuple(c[0] for c in var.chunks) if var.chunks else var.shape}
        if compression == "none":
            enc[name]["compressors"] = None
    return enc


def blocks(num_times: int, block_size: int) -> list:
    return [slice(a, min(a + block_size, num_times)) for a in range(0, num_times, block_size)]


class _Output:
    """The output store: zarr URL plus the marker objects beside its arrays."""

    def __init__(self, url: str, storage_options: Optional[dict]):
        self.url = url.rstrip("/")
        self.storage_options = gcs.gcs_storage_options(storage_options) if gcs.is_gcs(url) \
            else storage_options
        self.fs = gcs.filesystem(url, storage_options)
        self.root = self.url.split("://", 1)[1] if gcs.is_gcs(url) else self.url

    def marker(self, index: int) -> str:
        return f"{self.root}/{MARKER_DIR}/block-{index:06d}"

    def done(self) -> set:
        pattern = f"{self.root}/{MARKER_DIR}/block-*"
        found = gcs.with_retries(lambda: self.fs.glob(pattern), url=self.url)
        return {int(p.rsplit("-", 1)[1]) for p in found}

    def mark(self, index: int, block: slice) -> None:
        body = json.dumps({"time_index": [block.start, block.stop]}).encode()
        gcs.with_retries(lambda: self.fs.pipe_file(self.marker(index), body), url=self.url)

    def existing_config(self) -> Optional[str]:
        """The fingerprint of a fully initialised output (template and statics written)."""
        init = f"{self.root}/{MARKER_DIR}/initialised"
        if not gcs.with_retries(lambda: self.fs.exists(init), url=self.url):
            return None
        return xr.open_zarr(self.url, storage_options=self.storage_options).attrs.get(CONFIG_ATTR)

    def initialise(self, out: xr.Dataset, compression: str) -> None:
        """Writes metadata, coordinates and the static fields, then the `initialised` marker.
        Refuses to overwrite a zarr that a run with other arguments (or another tool) wrote."""
        if gcs.with_retries(lambda: self.fs.exists(f"{self.root}/.zgroup"), url=self.url):
            found = xr.open_zarr(self.url, storage_options=self.storage_options,
                                 consolidated=False).attrs.get(CONFIG_ATTR)
            if changed := changed_arguments(found, out.attrs[CONFIG_ATTR]):
                raise PrepareError(f"{self.url} already holds a zarr not written by an "
                                   "interrupted data.prepare run with these arguments "
                                   f"({'; '.join(changed)}); use another --out or delete it.")
        out.to_zarr(self.url, mode="w", compute=False, consolidated=True, zarr_format=2,
                    encoding=_encoding(out, compression), storage_options=self.storage_options)
        statics = [v for v in out.data_vars if "time" not in out[v].dims]
        out[statics].drop_vars(list(out[statics].coords)).to_zarr(
            self.url, mode="r+", storage_options=self.storage_options)
        self.fs.makedirs(f"{self.root}/{MARKER_DIR}", exist_ok=True)  # local paths only
        gcs.with_retries(lambda: self.fs.pipe_file(f"{self.root}/{MARKER_DIR}/initialised",
                                                   b"{}"), url=self.url)


def _write_block(out: xr.Dataset, output: _Output, block: slice) -> None:
    part = out.isel(time=block)
    part = part.drop_vars([v for v in part.variables if "time" not in part[v].dims])
    part.to_zarr(output.url, region={"time": block}, storage_options=output.storage_options)


def prepare(config: PrepareConfig, storage_options: Optional[dict] = None,
            out_storage_options: Optional[dict] = None) -> xr.Dataset:
    """Writes (or completes) the output zarr for `config`; returns it opened lazily."""
    out = build(config, storage_options)
    output = _Output(config.out, out_storage_options)
    existing = output.existing_config()
    if existing is None:
        output.initialise(out, config.compression)
        done = set()
    elif changed := changed_arguments(existing, config.fingerprint()):
        raise PrepareError(f"{config.out} was prepared with other arguments: "
                           f"{'; '.join(changed)}. Rerun with the recorded values, or use another "
                           "--out or delete it.")
    else:
        done = output.done()
    todo = [(i, b) for i, b in enumerate(blocks(out.sizes["time"], config.block_size))
            if i not in done]
    log.info("%s: %d blocks done, %d to write", config.out, len(done), len(todo))
    for i, block in todo:
        _write_block(out, output, block)
        output.mark(i, block)
        log.info("block %d (time %d..%d) written", i, block.start, block.stop - 1)
    return xr.open_zarr(output.url, storage_options=output.storage_options)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="zarr dir, gs:// zarr, or netCDF")
    p.add_argument("--out", required=True, help="output zarr: local path or gs:// URL")
    p.add_argument("--resolution", type=float, required=True, help="output grid spacing, deg")
    p.add_argument("--levels", type=int, required=True, choices=sorted(PRESSURE_LEVELS),
                   help="pressure-level set (graphcast.config.PRESSURE_LEVELS)")
    p.add_argument("--start", required=True, help="first date/time, e.g. 2016-01-01")
    p.add_argument("--end", required=True, help="last date/time (a date includes its day)")
    p.add_argument("--block-size", type=int, default=8, help="time steps per resumable block")
    p.add_argument("--compression", choices=COMPRESSIONS, default="default",
                   help="chunk compression: default = zarr's (blosc lz4, as WeatherBench2); "
                        "none = uncompressed, faster to read, the full float32 size on disk")
    p.add_argument("--workers", type=int, default=None, help="dask threads (default: cores)")
    p.add_argument("--storage-options", type=json.loads, default=None,
                   help='JSON gcsfs options for the source, e.g. \'{"token": "anon"}\'')
    p.add_argument("--out-storage-options", type=json.loads, default=None,
                   help="JSON gcsfs options for the output")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = PrepareConfig(args.source, args.out, args.resolution, args.levels, args.start,
                           args.end, args.block_size, args.compression)
    with dask.config.set(scheduler="threads", num_workers=args.workers):
        ds = prepare(config, args.storage_options, args.out_storage_options)
    print(f"{config.out}: {ds.sizes['time']} times, {ds.sizes['latitude']}x"
          f"{ds.sizes['longitude']} grid, {len(ds.data_vars)} variables")


if __name__ == "__main__":
    main()
