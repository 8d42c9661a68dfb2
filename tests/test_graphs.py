"""Static graphs: mesh, connectivity, features, cache and the describe CLI vs the reference.

Expectations come from the fixture folder (GRAPHCAST_FIXTURE_DIR, default
tests/fixtures/graphcast_reference: graph_structures.npz, graph_stats.json,
fixture_config.json) and from reference values written in this file (per-level mesh hashes,
first edges, sample coordinates and features, parameter counts), which do not depend on the
fixture set.
"""

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from graphcast import config as config_lib
from graphcast import connectivity
from graphcast import describe
from graphcast import features
from graphcast import graphs
from graphcast import icosahedral_mesh
from conftest import FIXTURE_DIR

FIXTURES = FIXTURE_DIR
REPO_ROOT = os.path.join(os.path.dirname(__file__), "..")
# NumPy's float32 arccos/arctan2/sin/cos differ by an ulp between SIMD paths (AVX2 vs AVX-512):
# a mesh latitude near 10.8 deg moves by up to 8 ulps (8e-6 deg), a longitude by an
# ulp (3e-5 deg near 300), and the sin/cos features derived from them by up to ~1e-6. Index
# arrays and mesh vertices are compared exactly.
FLOAT32_LAT_LON_ATOL = 5e-5    # degrees
FLOAT32_FEATURE_ATOL = 2e-6
FLOAT32_EDGE_FEATURE_ATOL = 2e-5  # also divided by the longest edge, which moves with its ends

# SHA-256 prefixes of the float32 vertex / int32 face bytes of each level.
LEVEL_HASHES = {
    0: ("7181d71d4e7a7775", "8dde75b41502a257"),
    1: ("2f1ef9d93d1d8b68", "4c3015592e1372b3"),
    2: ("1d2479fe3e3aa994", "1ec9e57785fcf0cd"),
    3: ("e743a1184b5ca72e", "98858b54c01813f8"),
    4: ("5bd5b5a9939d29b0", "c9b64ca426f753a1"),
    5: ("4909d8aef7a35b43", "ca6c0122b1e82849"),
}


def sha16(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def fixture_path(name: str) -> str:
    return os.path.join(FIXTURES, name)


def model_config_from(entry: dict, **overrides) -> config_lib.ModelConfig:
    """ModelConfig from a fixture/graph_stats entry; network sizes are irrelevant to graphs."""
    values = dict(resolution=entry["resolution"], mesh_size=entry["mesh_size"], latent_size=8,
                  gnn_msg_steps=1, hidden_layers=1,
                  radius_query_fraction_edge_length=entry["radius_query_fraction_edge_length"],
                  mesh2grid_edge_normalization_factor=entry.get(
                      "mesh2grid_edge_normalization_factor"))
    values.update(overrides)
    return config_lib.ModelConfig(**values)


@pytest.fixture(scope="module")
def fixture_config():
    with open(fixture_path("fixture_config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def graph_stats():
    with open(fixture_path("graph_stats.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def reference_graphs():
    with np.load(fixture_path("graph_structures.npz"), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def fixture_grid(fixture_config):
    g = fixture_config["grid"]
    return (np.linspace(g["lat_first"], g["lat_last"], g["n_lat"]),
            np.linspace(g["lon_first"], g["lon_last"], g["n_lon"]))


@pytest.fixture(scope="module")
def fixture_graphs(fixture_config):
    model_config = config_lib.ModelConfig(**fixture_config["model_config"])
    return graphs.build_graphs(model_config, *fixture_grid(fixture_config))


@pytest.fixture(scope="module")
def graphs_1deg_mesh5():
    lat, lon = describe.regular_grid(1.0)
    model_config = model_config_from(
        {"resolution": 1.0, "mesh_size": 5, "radius_query_fraction_edge_length": 0.6},
        mesh2grid_edge_normalization_factor=0.6180338738074472)
    return graphs.build_graphs(model_config, lat, lon)


# ----------------------------------------------------------------------------- mesh

@pytest.mark.parametrize("level", sorted(LEVEL_HASHES))
def test_level_vertex_and_face_hashes(level):
    mesh = icosahedral_mesh.mesh_hierarchy(level)[-1]
    assert mesh.vertices.dtype == np.float32 and mesh.faces.dtype == np.int32
    assert (sha16(mesh.vertices), sha16(mesh.faces)) == LEVEL_HASHES[level]


def test_mesh_counts_and_edge_lengths_match_graph_stats(graph_stats):
    table = [row for row in graph_stats["mesh_size_table"] if row["mesh_size"] <= 5]
    meshes = icosahedral_mesh.mesh_hierarchy(max(row["mesh_size"] for row in table))
    for row in table:
        r = row["mesh_size"]
        finest = meshes[r]
        multi = icosahedral_mesh.merge_meshes(meshes[:r + 1])
        senders, receivers = icosahedral_mesh.faces_to_edges(finest.faces)
        lengths = np.linalg.norm(finest.vertices[senders] - finest.vertices[receivers], axis=-1)
        assert finest.vertices.shape[0] == row["num_vertices"] == icosahedral_mesh.num_vertices(r)
        assert finest.faces.shape[0] == row["num_faces_finest"]
        assert senders.size == row["num_directed_edges_finest_mesh"]
        assert (icosahedral_mesh.faces_to_edges(multi.faces)[0].size
                == row["num_directed_edges_merged_multimesh"]
                == icosahedral_mesh.num_multimesh_edges(r))
        assert float(lengths.max()) == row["max_finest_edge_length_unit_sphere"]
        assert float(lengths.min()) == row["min_finest_edge_length_unit_sphere"]


def test_multimesh_edges_are_unique_and_bidirectional():
    multi = icosahedral_mesh.merge_meshes(icosahedral_mesh.mesh_hierarchy(3))
    senders, receivers = icosahedral_mesh.faces_to_edges(multi.faces)
    pairs = set(zip(senders.tolist(), receivers.tolist()))
    assert len(pairs) == senders.size
    assert all((r, s) in pairs for s, r in pairs)


def test_first_multimesh_edges_match_reference():
    multi = icosahedral_mesh.merge_meshes(icosahedral_mesh.mesh_hierarchy(5))
    senders, receivers = icosahedral_mesh.faces_to_edges(multi.faces)
    assert list(zip(senders[:6], receivers[:6])) == [(0, 1), (0, 6), (8, 0), (8, 4), (3, 8), (3, 2)]
    assert list(zip(senders[20:23], receivers[20:23])) == [(0, 12), (12, 1), (14, 13)]


def test_mesh_lat_lon_and_features_match_reference():
    vertices = icosahedral_mesh.mesh_hierarchy(2)[-1].vertices
    lat, lon = features.xyz_to_lat_lon(vertices)
    expected = np.array([(10.812325, 60), (52.62263, 120), (52.62263, 0), (10.812325, 300),
                         (-52.62262, 60), (10.812325, 180), (-10.812317, 120), (52.62263, 240),
                         (-10.812317, 0), (-10.812317, 240), (-52.62262, 300), (-52.62262, 180)],
                        dtype=np.float32)
    assert lat.dtype == lon.dtype == np.float32
    np.testing.assert_allclose(lat[:12], expected[:, 0], rtol=0, atol=FLOAT32_LAT_LON_ATOL)
    np.testing.assert_allclose(lon[:12], expected[:, 1], rtol=0, atol=FLOAT32_LAT_LON_ATOL)
    np.testing.assert_allclose(features.node_features(lat[:1], lon[:1])[0],
                               np.float32([0.18759258, 0.49999997, 0.86602545]), rtol=0,
                               atol=FLOAT32_FEATURE_ATOL)
    multi = icosahedral_mesh.merge_meshes(icosahedral_mesh.mesh_hierarchy(2))
    senders, receivers = icosahedral_mesh.faces_to_edges(multi.faces)
    edge = features.edge_features(lat, lon, lat, lon, senders, receivers)
    np.testing.assert_allclose(edge[0], [0.999999412, -0.5257307595, -0.8090165839, -0.2628652875],
                               rtol=0, atol=FLOAT32_FEATURE_ATOL)
    np.testing.assert_allclose(edge[1], [0.9999995251, -0.5257308396, -0.8090165914, 0.2628655346],
                               rtol=0, atol=FLOAT32_FEATURE_ATOL)


# ---------------------------------------------------------------- fixture graphs

def test_fixture_index_arrays_are_identical(fixture_graphs, reference_graphs):
    g, ref = fixture_graphs, reference_graphs
    for name in ("grid2mesh_senders", "grid2mesh_receivers", "mesh_senders", "mesh_receivers",
                 "mesh2grid_senders", "mesh2grid_receivers"):
        ours = getattr(g, name)
        assert ours.dtype == ref[name].dtype, name
        np.testing.assert_array_equal(ours, ref[name], err_msg=name)


def test_fixture_features_match(fixture_graphs, reference_graphs):
    g, ref = fixture_graphs, reference_graphs
    for graph in ("grid2mesh", "mesh2grid"):
        np.testing.assert_allclose(g.grid_node_features,
                                   ref[f"{graph}_grid_nodes_structural_features"], rtol=0,
                                   atol=FLOAT32_FEATURE_ATOL)
    for graph in ("grid2mesh", "mesh", "mesh2grid"):
        np.testing.assert_allclose(g.mesh_node_features,
                                   ref[f"{graph}_mesh_nodes_structural_features"], rtol=0,
                                   atol=FLOAT32_FEATURE_ATOL)
        ours = getattr(g, f"{graph}_edge_features")
        assert ours.dtype == np.float64
        np.testing.assert_allclose(ours, ref[f"{graph}_edge_features"], rtol=0,
                                   atol=FLOAT32_EDGE_FEATURE_ATOL, err_msg=graph)
    np.testing.assert_allclose(g.mesh_lat, ref["mesh_node_lat"], rtol=0, atol=FLOAT32_LAT_LON_ATOL)
    np.testing.assert_allclose(g.mesh_lon, ref["mesh_node_lon"], rtol=0, atol=FLOAT32_LAT_LON_ATOL)


def test_fixture_mesh_and_radius(fixture_config, reference_graphs):
    model_config = config_lib.ModelConfig(**fixture_config["model_config"])
    finest = icosahedral_mesh.mesh_hierarchy(model_config.mesh_size)[-1]
    np.testing.assert_array_equal(finest.vertices, reference_graphs["finest_mesh_vertices"])
    np.testing.assert_array_equal(finest.faces, reference_graphs["finest_mesh_faces"])
    radius = graphs.grid2mesh_radius(model_config, finest)
    assert np.float32(radius) == reference_graphs["grid2mesh_query_radius"]
    assert np.float32(radius) == np.float32(fixture_config["grid2mesh_query_radius"])


def test_fixture_counts(fixture_graphs, fixture_config):
    sizes = fixture_config["graphs"]
    g = fixture_graphs
    assert g.num_grid_nodes == sizes["grid2mesh"]["n_node"]["grid_nodes"]
    assert g.num_mesh_nodes == sizes["mesh"]["n_node"]["mesh_nodes"]
    for name in ("grid2mesh", "mesh", "mesh2grid"):
        assert getattr(g, f"{name}_senders").size == sizes[name]["n_edge"], name


def test_grid2mesh_matches_ball_query(fixture_config):
    lat, lon = graphs.grid_lat_lon_flat(*fixture_grid(fixture_config))
    xyz = features.lat_lon_to_xyz(lat, lon)
    finest = icosahedral_mesh.mesh_hierarchy(4)[-1]
    for fraction in (0.6, 1.0, 2.5):
        radius = icosahedral_mesh.max_edge_length(finest) * np.float32(fraction)
        fast = connectivity.grid2mesh_edges(xyz, finest.vertices, radius)
        slow = connectivity.grid2mesh_edges_ball_query(xyz, finest.vertices, radius)
        for a, b in zip(fast, slow):
            np.testing.assert_array_equal(a, b)


def test_mesh2grid_without_trimesh_differs_only_at_ties(fixture_config):
    """The pure-numpy rule may only disagree where two faces are equally close."""
    lat, lon = graphs.grid_lat_lon_flat(*fixture_grid(fixture_config))
    xyz = features.lat_lon_to_xyz(lat, lon)
    mesh = icosahedral_mesh.mesh_hierarchy(fixture_config["model_config"]["mesh_size"])[-1]
    full = connectivity.closest_faces(xyz, mesh)
    pure = connectivity.closest_faces(xyz, mesh, use_trimesh_for_ties=False)
    verts = mesh.vertices.astype(np.float64)
    for i in np.nonzero(full != pure)[0]:
        d2 = [connectivity._closest_point_sq_dist(xyz[i].astype(np.float64),
                                                  *verts[mesh.faces[f]])[1] for f in
              (full[i], pure[i])]
        assert abs(d2[0] - d2[1]) <= 1e-12 * max(d2), (i, d2)


# --------------------------------------------------------------- 1 deg, mesh 5

def test_1deg_mesh5_counts(graphs_1deg_mesh5, graph_stats):
    entry = next(c for c in graph_stats["configs"] if c["resolution"] == 1.0
                 and c["mesh_size"] == 5 and c["radius_query_fraction_edge_length"] == 0.6)
    g = graphs_1deg_mesh5
    assert g.num_grid_nodes == entry["num_grid_nodes"]
    assert g.num_mesh_nodes == entry["num_mesh_nodes"]
    assert g.mesh_senders.size == entry["num_multimesh_edges"]
    assert g.grid2mesh_senders.size == entry["num_grid2mesh_edges"]
    assert g.mesh2grid_senders.size == entry["num_mesh2grid_edges"]
    assert np.float32(g.grid2mesh_radius) == np.float32(entry["grid2mesh_query_radius"])
    in_degree = np.bincount(g.grid2mesh_receivers, minlength=g.num_mesh_nodes)
    assert in_degree.max() == entry["max_grid2mesh_in_degree_of_mesh_node"]
    assert (in_degree == 0).sum() == entry["mesh_nodes_without_grid2mesh_edge"]


def test_1deg_mesh5_sample_values_match_reference(graphs_1deg_mesh5):
    g = graphs_1deg_mesh5
    np.testing.assert_array_equal(g.grid_node_features[0], np.float32([-1, 1, 0]))
    np.testing.assert_array_equal(g.grid_node_features[32445],
                                  np.float32([-4.3711388e-08, 0.70710677, 0.70710677]))
    assert list(zip(g.grid2mesh_senders[:7], g.grid2mesh_receivers[:7])) == [
        (0, 7247), (0, 7248), (0, 7249), (1, 7247), (1, 7248), (1, 7249), (2, 7247)]
    np.testing.assert_allclose(g.grid2mesh_edge_features[0],
                               [0.96250120710, -0.011487009558, -3.0281834965e-06,
                                -0.96243265857], rtol=1e-10, atol=1e-15)
    assert list(zip(g.mesh2grid_senders[:4], g.mesh2grid_receivers[:4])) == [
        (7248, 0), (7249, 0), (7247, 0), (7248, 1)]
    np.testing.assert_allclose(g.mesh2grid_edge_features[0],
                               [0.0386201777, -0.0004608972, 0.0334437328, -0.0193086104],
                               atol=1e-10)
    assert sha16(g.mesh_senders.astype(np.int32)) == "6111b7792373e10d"
    assert sha16(g.mesh_receivers.astype(np.int32)) == "3b8b7b6c2b7c0619"
    assert sha16(g.grid2mesh_senders.astype(np.int64)) == "a272f1cdd98ce651"
    assert sha16(g.grid2mesh_receivers.astype(np.int64)) == "f21a8adfaabef29d"
    assert sha16(g.mesh2grid_receivers.astype(np.int64)) == "857b2efea63212ec"


def test_1deg_mesh5_mesh2grid_hash_with_trimesh(graphs_1deg_mesh5):
    pytest.importorskip("trimesh")  # exact ties follow the reference only with trimesh
    assert sha16(graphs_1deg_mesh5.mesh2grid_senders.astype(np.int64)) == "2e1824e53eefabf1"


# --------------------------------------------------------------------- counts

def test_count_graphs_matches_graph_stats(graph_stats):
    for entry in graph_stats["configs"]:
        if entry["resolution"] < 1.0:
            continue  # 0.25 deg: see the slow test
        counts = graphs.count_graphs(model_config_from(entry),
                                     *describe.regular_grid(entry["resolution"]))
        assert (counts.grid_nodes, counts.mesh_nodes, counts.mesh_edges, counts.grid2mesh_edges,
                counts.mesh2grid_edges) == (
            entry["num_grid_nodes"], entry["num_mesh_nodes"], entry["num_multimesh_edges"],
            entry["num_grid2mesh_edges"], entry["num_mesh2grid_edges"]), entry


def test_count_parameters(fixture_config):
    task = config_lib.TaskConfig(**fixture_config["task_config"])
    model_config = config_lib.ModelConfig(**fixture_config["model_config"])
    assert describe.count_parameters(model_config, task) == fixture_config["num_params"]
    # A small model on the TASK_13 variables and full GraphCast (L=512, S=16, all variables).
    small = config_lib.ModelConfig(1.0, 2, 32, 2, 1, 0.6)
    assert describe.count_parameters(small, config_lib.TASK_13) == 55891
    full = config_lib.ModelConfig(0.25, 6, 512, 16, 1, 0.6)
    assert describe.count_parameters(full, config_lib.TASK) == 3645440 + 29691904 + 3010787


def test_describe_checkpoint_json(fixture_config):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        describe.main(["--checkpoint", fixture_path("checkpoint.npz"), "--json"])
    info = json.loads(out.getvalue())
    sizes = fixture_config["graphs"]
    assert info["grid_nodes"] == sizes["grid2mesh"]["n_node"]["grid_nodes"]
    assert info["mesh_nodes"] == sizes["mesh"]["n_node"]["mesh_nodes"]
    assert info["mesh_edges"] == sizes["mesh"]["n_edge"]
    assert info["grid2mesh_edges"] == sizes["grid2mesh"]["n_edge"]
    assert info["mesh2grid_edges"] == sizes["mesh2grid"]["n_edge"]
    assert info["params"] == fixture_config["num_params"]


def test_describe_memory_estimate_shrinks_with_blocks():
    def estimate(*extra):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            describe.main(["--checkpoint", fixture_path("checkpoint.npz"), "--json", "--memory",
                           *extra])
        return json.loads(out.getvalue())

    plain, blocked = estimate(), estimate("--remat-blocks", "--block-size", "1000")
    for info in (plain, blocked):
        assert info["total_bytes"] == (info["temp_bytes"] + info["argument_bytes"]
                                       + info["output_bytes"] - info["alias_bytes"])
        assert info["argument_bytes"] > 3 * 4 * info["params"]  # params + two Adam moments
    assert blocked["temp_bytes"] < plain["temp_bytes"]


def test_describe_cli_json(graph_stats):
    entry = next(c for c in graph_stats["configs"] if c["resolution"] == 1.0
                 and c["mesh_size"] == 5)
    result = subprocess.run(
        [sys.executable, "-m", "graphcast.describe", "--mesh-size", str(entry["mesh_size"]),
         "--resolution", str(entry["resolution"]), "--radius-fraction",
         str(entry["radius_query_fraction_edge_length"]), "--latent", "32", "--msg-steps", "2",
         "--levels", "13", "--json"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    info = json.loads(result.stdout)
    assert (info["grid_nodes"], info["mesh_nodes"], info["mesh_edges"], info["grid2mesh_edges"],
            info["mesh2grid_edges"]) == (
        entry["num_grid_nodes"], entry["num_mesh_nodes"], entry["num_multimesh_edges"],
        entry["num_grid2mesh_edges"], entry["num_mesh2grid_edges"])
    assert info["params"] == 55891  # L=32, H=1, S=2 on the TASK_13 variables


def test_describe_cli_rejects_missing_arguments():
    with pytest.raises(SystemExit):
        with contextlib.redirect_stderr(io.StringIO()):
            describe.main(["--mesh-size", "3"])


@pytest.mark.slow
def test_quarter_degree_mesh6_counts(graph_stats):
    entry = next(c for c in graph_stats["configs"] if c["resolution"] == 0.25)
    counts = graphs.count_graphs(model_config_from(entry), *describe.regular_grid(0.25))
    assert (counts.grid2mesh_edges, counts.mesh2grid_edges, counts.mesh_nodes,
            counts.mesh_edges) == (entry["num_grid2mesh_edges"], entry["num_mesh2grid_edges"],
                                   entry["num_mesh_nodes"], entry["num_multimesh_edges"])


# ---------------------------------------------------------------------- cache

def test_an_unwritable_cache_warns_and_builds(tmp_path, fixture_config, fixture_graphs, caplog):
    """A cache directory that cannot be created costs a rebuild next time, not the run."""
    model_config = config_lib.ModelConfig(**fixture_config["model_config"])
    (tmp_path / "a_file").write_text("")
    cache_dir = str(tmp_path / "a_file" / "cache")  # below a regular file: not creatable
    with caplog.at_level("WARNING"):
        built = graphs.build_graphs(model_config, *fixture_grid(fixture_config),
                                    cache_dir=cache_dir)
    np.testing.assert_array_equal(built.grid2mesh_senders, fixture_graphs.grid2mesh_senders)
    assert any("Graph cache" in r.message and cache_dir in r.message for r in caplog.records)


def test_cache_round_trip(tmp_path, fixture_config, fixture_graphs, monkeypatch):
    model_config = config_lib.ModelConfig(**fixture_config["model_config"])
    lat, lon = fixture_grid(fixture_config)
    graphs.build_graphs(model_config, lat, lon, cache_dir=str(tmp_path))
    cached = list(tmp_path.glob("graphs_*.npz"))
    assert len(cached) == 1

    def fail(*args, **kwargs):
        raise AssertionError("graphs were rebuilt although a cache file exists")
    monkeypatch.setattr(graphs, "_build", fail)
    second = graphs.build_graphs(model_config, lat, lon, cache_dir=str(tmp_path))
    for field in dataclasses.fields(graphs.StaticGraphs):
        a, b = getattr(second, field.name), getattr(fixture_graphs, field.name)
        if isinstance(b, np.ndarray):
            assert a.dtype == b.dtype, field.name
            np.testing.assert_array_equal(a, b, err_msg=field.name)
        else:
            assert a == b and type(a) is type(b), field.name


def test_cache_key_depends_on_inputs(fixture_config):
    model_config = config_lib.ModelConfig(**fixture_config["model_config"])
    lat, lon = fixture_grid(fixture_config)
    key = graphs.cache_key(model_config, lat, lon)
    assert key == graphs.cache_key(model_config, lat.astype(np.float32), lon)
    variants = [
        graphs.cache_key(dataclasses.replace(model_config, mesh_size=2), lat, lon),
        graphs.cache_key(dataclasses.replace(
            model_config, radius_query_fraction_edge_length=0.7), lat, lon),
        graphs.cache_key(dataclasses.replace(
            model_config, mesh2grid_edge_normalization_factor=0.6), lat, lon),
        graphs.cache_key(model_config, lat[::-1], lon),
        graphs.cache_key(model_config, lat, lon[:-1]),
    ]
    assert key not in variants and len(set(variants)) == len(variants)
