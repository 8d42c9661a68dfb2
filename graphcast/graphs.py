"""The three static graphs of GraphCast (grid2mesh, multi-mesh, mesh2grid) and their cache.

`build_graphs` turns a ModelConfig and the data's lat/lon into index arrays and geometric
features, exactly in the reference's order and orientation: senders
are always the source node set. Building 0.25 deg / mesh 6 takes seconds, so an optional
npz cache (no pickle) keyed by everything the graphs depend on lets restarts skip it.
"""

import dataclasses
import hashlib
import io
import logging
import os
import tempfile
from typing import Optional

import numpy as np

from graphcast import config as config_lib
from graphcast import connectivity
from graphcast import features
from graphcast import files
from graphcast import icosahedral_mesh

# Bump when the construction or the stored fields change, so old caches are ignored.
CACHE_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class StaticGraphs:
    """Index arrays and structural features of the three graphs (numpy, host memory).

    Node features are float32 [N, 3]; edge features float64 [E, 4]. grid2mesh indices are
    int64 (grid -> mesh), mesh indices int32, mesh2grid senders int32 (mesh) and
    receivers int64 (grid), as in the reference.
    """
    grid_node_features: np.ndarray        # [Ng, 3] f32
    mesh_node_features: np.ndarray        # [Nm, 3] f32
    grid2mesh_senders: np.ndarray         # [E_g2m] grid index
    grid2mesh_receivers: np.ndarray       # [E_g2m] mesh index
    grid2mesh_edge_features: np.ndarray   # [E_g2m, 4] f64
    mesh_senders: np.ndarray              # [E_m] mesh index
    mesh_receivers: np.ndarray            # [E_m] mesh index
    mesh_edge_features: np.ndarray        # [E_m, 4] f64
    mesh2grid_senders: np.ndarray         # [E_m2g] mesh index
    mesh2grid_receivers: np.ndarray       # [E_m2g] grid index
    mesh2grid_edge_features: np.ndarray   # [E_m2g, 4] f64
    mesh_lat: np.ndarray                  # [Nm] f32
    mesh_lon: np.ndarray                  # [Nm] f32
    num_grid_nodes: int
    num_mesh_nodes: int
    grid2mesh_radius: float


@dataclasses.dataclass(frozen=True)
class GraphCounts:
    """Sizes of the three graphs."""
    grid_nodes: int
    mesh_nodes: int
    mesh_edges: int
    grid2mesh_edges: int
    mesh2grid_edges: int


def grid_lat_lon_flat(grid_lat: np.ndarray, grid_lon: np.ndarray) -> tuple:
    """Per-node (lat, lon) float32 [H*W], lat-major in the data's own order."""
    lat = np.asarray(grid_lat, dtype=np.float32)
    lon = np.asarray(grid_lon, dtype=np.float32)
    if lat.ndim != 1 or lon.ndim != 1:
        raise ValueError(f"grid_lat and grid_lon must be 1-D coordinate vectors, got shapes "
                         f"{lat.shape} and {lon.shape}.")
    return np.repeat(lat, lon.size), np.tile(lon, lat.size)


def _finest_and_multimesh(mesh_size: int) -> tuple:
    meshes = icosahedral_mesh.mesh_hierarchy(mesh_size)
    return meshes[-1], icosahedral_mesh.merge_meshes(meshes)


def grid2mesh_radius(model_config: config_lib.ModelConfig,
                     finest: Optional[icosahedral_mesh.TriangularMesh] = None) -> float:
    """Query radius: float32 longest finest-level edge times the configured fraction."""
    if finest is None:
        finest = icosahedral_mesh.mesh_hierarchy(model_config.mesh_size)[-1]
    return icosahedral_mesh.max_edge_length(finest) * np.float32(
        model_config.radius_query_fraction_edge_length)


def _build(model_config: config_lib.ModelConfig, grid_lat: np.ndarray,
           grid_lon: np.ndarray) -> StaticGraphs:
    finest, multimesh = _finest_and_multimesh(model_config.mesh_size)
    mesh_lat, mesh_lon = features.xyz_to_lat_lon(multimesh.vertices)
    node_lat, node_lon = grid_lat_lon_flat(grid_lat, grid_lon)
    grid_xyz = features.lat_lon_to_xyz(node_lat, node_lon)             # [Ng, 3] f32
    radius = grid2mesh_radius(model_config, finest)

    g2m_s, g2m_r = connectivity.grid2mesh_edges(grid_xyz, finest.vertices, radius)
    mesh_s, mesh_r = icosahedral_mesh.faces_to_edges(multimesh.faces)
    m2g_s, m2g_r = connectivity.mesh2grid_edges(grid_xyz, finest)
    return StaticGraphs(
        grid_node_features=features.node_features(node_lat, node_lon),
        mesh_node_features=features.node_features(mesh_lat, mesh_lon),
        grid2mesh_senders=g2m_s, grid2mesh_receivers=g2m_r,
        grid2mesh_edge_features=features.edge_features(
            node_lat, node_lon, mesh_lat, mesh_lon, g2m_s, g2m_r),
        mesh_senders=mesh_s, mesh_receivers=mesh_r,
        mesh_edge_features=features.edge_features(
            mesh_lat, mesh_lon, mesh_lat, mesh_lon, mesh_s, mesh_r),
        mesh2grid_senders=m2g_s, mesh2grid_receivers=m2g_r,
        mesh2grid_edge_features=features.edge_features(
            mesh_lat, mesh_lon, node_lat, node_lon, m2g_s, m2g_r,
            normalizer=model_config.mesh2grid_edge_normalization_factor),
        mesh_lat=mesh_lat, mesh_lon=mesh_lon,
        num_grid_nodes=int(node_lat.size), num_mesh_nodes=int(mesh_lat.size),
        grid2mesh_radius=float(radius))


def cache_key(model_config: config_lib.ModelConfig, grid_lat: np.ndarray,
              grid_lon: np.ndarray) -> str:
    """Hex digest of everything the graphs depend on (and the cache format version)."""
    h = hashlib.sha256()
    factor = model_config.mesh2grid_edge_normalization_factor
    h.update(repr((CACHE_FORMAT_VERSION, int(model_config.mesh_size),
                   float(model_config.radius_query_fraction_edge_length),
                   None if factor is None else float(factor))).encode())
    for coord in (grid_lat, grid_lon):
        arr = np.ascontiguousarray(coord, dtype=np.float32)
        h.update(repr(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:32]


def _save(path: str, graphs: StaticGraphs) -> None:
    """Write atomically (temp file + rename, or one object upload) so a crash never leaves a
    half-written cache."""
    if files.is_url(path):
        buffer = io.BytesIO()
        np.savez(buffer, **{k: np.asarray(v) for k, v in dataclasses.asdict(graphs).items()})
        files.write_bytes(path, buffer.getvalue())
        return
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in dataclasses.asdict(graphs).items()})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _load(path: str) -> StaticGraphs:
    source = io.BytesIO(files.read_bytes(path)) if files.is_url(path) else path
    with np.load(source, allow_pickle=False) as z:
        values = {}
        for field in dataclasses.fields(StaticGraphs):
            if field.name not in z.files:
                raise ValueError(f"Graph cache {path} lacks {field.name!r}; delete the file.")
            values[field.name] = z[field.name]
    for name in ("num_grid_nodes", "num_mesh_nodes"):
        values[name] = int(values[name])
    values["grid2mesh_radius"] = float(values["grid2mesh_radius"])
    return StaticGraphs(**values)


def build_graphs(model_config: config_lib.ModelConfig, grid_lat: np.ndarray,
                 grid_lon: np.ndarray, cache_dir: Optional[str] = None) -> StaticGraphs:
    """Build (or load from `cache_dir`) the three graphs for this config and grid.

    grid_lat [H], grid_lon [W] are the data's coordinates in the data's order (degrees);
    grid node g = i_lat * W + i_lon.
    """
    if cache_dir is None:
        return _build(model_config, grid_lat, grid_lon)
    path = files.join(cache_dir, f"graphs_{cache_key(model_config, grid_lat, grid_lon)}.npz")
    if files.exists(path):
        return _load(path)
    graphs = _build(model_config, grid_lat, grid_lon)
    try:
        _save(path, graphs)
    except OSError as e:  # a cache that cannot be written only costs the next run a rebuild
        logging.warning("Graph cache %s not written (%s: %s); the graphs will be rebuilt at "
                        "the next start.", path, type(e).__name__, e)
    return graphs


def count_graphs(model_config: config_lib.ModelConfig, grid_lat: np.ndarray,
                 grid_lon: np.ndarray) -> GraphCounts:
    """Graph sizes without computing features or mesh2grid faces (only the radius query
    needs real work; mesh2grid always has 3 edges per grid node)."""
    finest, _ = _finest_and_multimesh(model_config.mesh_size)
    node_lat, node_lon = grid_lat_lon_flat(grid_lat, grid_lon)
    tree_counts = connectivity.grid2mesh_counts(
        features.lat_lon_to_xyz(node_lat, node_lon), finest.vertices,
        grid2mesh_radius(model_config, finest))
    return GraphCounts(
        grid_nodes=int(node_lat.size),
        mesh_nodes=icosahedral_mesh.num_vertices(model_config.mesh_size),
        mesh_edges=icosahedral_mesh.num_multimesh_edges(model_config.mesh_size),
        grid2mesh_edges=int(tree_counts.sum()),
        mesh2grid_edges=3 * int(node_lat.size))
