"""Shared pytest fixtures.

`gcs_emulator`: a gcp-storage-emulator serving GCS on 127.0.0.1 (free port, in memory, in this
process) for the whole session. Yields (endpoint_url, bucket_name). While it runs, the
environment points every Google client at loopback: STORAGE_EMULATOR_HOST = the endpoint,
dummy auth token, metadata server at 127.0.0.1:1, and gcsfs's gRPC-probing "extended" filesystem
off. Use `storage_options={"token": "anon", "endpoint_url": endpoint_url}` with gcsfs/xarray.
"""

import http.server
import os
import socket
import urllib.parse
import urllib.request

import pytest

# The reference fixtures: GRAPHCAST_FIXTURE_DIR, else the set kept in this repository.
FIXTURE_DIR = os.environ.get("GRAPHCAST_FIXTURE_DIR", os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "fixtures", "graphcast_reference"))

_LOOPBACK_ENV = {
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
    "GCE_METADATA_HOST": "127.0.0.1:1",
    "GCE_METADATA_IP": "127.0.0.1:1",
    "NO_GCE_CHECK": "True",
}
EMULATOR_BUCKET = "test-bucket"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator():
    """(endpoint_url, bucket_name) of a loopback GCS emulator with one empty bucket."""
    from gcp_storage_emulator.server import create_server

    port = free_port()
    endpoint_url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in list(_LOOPBACK_ENV) + ["STORAGE_EMULATOR_HOST"]}
    os.environ.update(_LOOPBACK_ENV)
    os.environ["STORAGE_EMULATOR_HOST"] = endpoint_url
    # The emulator's HTTPServer keeps the default listen backlog of 5: concurrent clients stall.
    saved_queue = http.server.HTTPServer.request_queue_size
    http.server.HTTPServer.request_queue_size = 1024
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=EMULATOR_BUCKET)
    server.start()
    try:
        yield endpoint_url, EMULATOR_BUCKET
    finally:
        server.stop()
        http.server.HTTPServer.request_queue_size = saved_queue
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def synthetic_wb2(*, resolution: float = 5.625, levels=(500, 700, 850), start="2020-01-01",
                  periods: int = 12, freq: str = "6h", seed: int = 0, hourly_precip: bool = False):
    """Small WeatherBench2-layout ERA5-like Dataset (numpy-backed): dims time, level, latitude
    (descending, poles included when the resolution divides 180), longitude [0, 360)."""
    import numpy as np
    import pandas as pd
    import xarray as xr

    rng = np.random.default_rng(seed)
    if (180 / resolution).is_integer():  # grid with poles, like ERA5
        lat = np.linspace(90, -90, int(round(180 / resolution)) + 1)
    else:  # offset grid
        lat = np.arange(90 - resolution / 2, -90, -resolution)
    lon = np.arange(int(round(360 / resolution))) * resolution
    time = pd.date_range(start, periods=periods, freq=freq)
    t, lv, h, w = len(time), len(levels), len(lat), len(lon)

    def field(shape, loc, scale):
        return (loc + scale * rng.standard_normal(shape)).astype(np.float32)

    dims3, dims4 = ("time", "latitude", "longitude"), ("time", "level", "latitude", "longitude")
    data = {
        "2m_temperature": (dims3, field((t, h, w), 280, 10)),
        "mean_sea_level_pressure": (dims3, field((t, h, w), 101000, 500)),
        "10m_u_component_of_wind": (dims3, field((t, h, w), 0, 5)),
        "10m_v_component_of_wind": (dims3, field((t, h, w), 0, 5)),
        "temperature": (dims4, field((t, lv, h, w), 250, 10)),
        "geopotential": (dims4, field((t, lv, h, w), 50000, 1000)),
        "u_component_of_wind": (dims4, field((t, lv, h, w), 0, 10)),
        "v_component_of_wind": (dims4, field((t, lv, h, w), 0, 10)),
        "vertical_velocity": (dims4, field((t, lv, h, w), 0, 0.1)),
        "specific_humidity": (dims4, np.abs(field((t, lv, h, w), 0, 1e-3))),
        "geopotential_at_surface": (("latitude", "longitude"), field((h, w), 1000, 500)),
        "land_sea_mask": (("latitude", "longitude"),
                          rng.uniform(0, 1, (h, w)).astype(np.float32)),
    }
    precip = np.abs(field((t, h, w), 0, 1e-3))
    data["total_precipitation" if hourly_precip else "total_precipitation_6hr"] = (dims3, precip)
    return xr.Dataset(data, coords={"time": time, "level": np.asarray(levels, np.int64),
                                    "latitude": lat, "longitude": lon})


@pytest.fixture
def make_wb2():
    """Factory fixture: make_wb2(**kwargs) -> synthetic WeatherBench2-layout Dataset."""
    return synthetic_wb2


def upload_tree(endpoint: str, bucket: str, local_dir: str, prefix: str) -> None:
    """Copies a local folder (e.g. a zarr store) into the emulator, byte-exactly.

    gcp-storage-emulator's multipart upload parser drops a trailing b"\\r" from the object,
    which corrupts about 1 in 40 compressed zarr chunks; simple media uploads are exact.
    """
    for dirpath, _, filenames in os.walk(local_dir):
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            name = f"{prefix}/{os.path.relpath(path, local_dir)}"
            query = urllib.parse.urlencode({"uploadType": "media", "name": name})
            with open(path, "rb") as f:
                request = urllib.request.Request(
                    f"{endpoint}/upload/storage/v1/b/{bucket}/o?{query}", data=f.read(),
                    method="POST", headers={"Content-Type": "application/octet-stream"})
            urllib.request.urlopen(request, timeout=30).read()
