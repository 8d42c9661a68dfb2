"""Icosahedral multi-mesh: base icosahedron, split refinement, hierarchy, faces -> edges.

Everything is float32 and follows the reference's operation order so that the vertex
arrays are bit-identical to the reference; graph parity depends on it.
"""

import dataclasses

import numpy as np

# Rotation about y that puts the poles at face centres.
_PHI = (1.0 + np.sqrt(5.0)) / 2.0
_TILT = (np.pi - 2.0 * np.arcsin(_PHI / np.sqrt(3.0))) / 2.0

_BASE_FACES = np.array([
    (0, 1, 2), (0, 6, 1), (8, 0, 2), (8, 4, 0), (3, 8, 2),
    (3, 2, 7), (7, 2, 1), (0, 4, 6), (4, 11, 6), (6, 11, 5),
    (1, 5, 7), (4, 10, 11), (4, 8, 10), (10, 8, 3), (10, 3, 9),
    (11, 10, 9), (11, 9, 5), (5, 9, 7), (9, 3, 7), (1, 6, 5),
], dtype=np.int32)


@dataclasses.dataclass(frozen=True)
class TriangularMesh:
    """A triangulated sphere: vertices [V, 3] float32 on the unit sphere, faces [F, 3] int32
    (counter-clockwise seen from outside)."""
    vertices: np.ndarray
    faces: np.ndarray


def base_icosahedron() -> TriangularMesh:
    """Level 0: the 12-vertex icosahedron in the reference's vertex order, tilted by `_TILT`."""
    raw = []
    for c1 in (1.0, -1.0):
        for c2 in (_PHI, -_PHI):
            raw.extend([(c1, c2, 0.0), (0.0, c1, c2), (c2, 0.0, c1)])
    vertices = np.array(raw, dtype=np.float32)                       # [12, 3]
    vertices = (vertices / np.sqrt(1.0 + _PHI ** 2)).astype(np.float32)
    cos_a, sin_a = np.cos(_TILT), np.sin(_TILT)
    rot_y = np.array([[cos_a, 0.0, sin_a], [0.0, 1.0, 0.0], [-sin_a, 0.0, cos_a]])
    # Row vectors times the matrix (not matrix times column vectors): a reference quirk.
    vertices = (vertices.astype(np.float64) @ rot_y).astype(np.float32)
    return TriangularMesh(vertices=vertices, faces=_BASE_FACES.copy())


def _unit_float32(points: np.ndarray) -> np.ndarray:
    """Normalise float32 rows [N, 3] exactly like numpy's float32 `linalg.norm` on x86-64:
    squares rounded to float32, summed in float64, rounded to float32, float32 sqrt."""
    squares = (points * points).astype(np.float64)                     # [N, 3]
    sum_sq = ((squares[:, 0] + squares[:, 1]) + squares[:, 2]).astype(np.float32)
    return points / np.sqrt(sum_sq)[:, None]


def split_mesh(mesh: TriangularMesh) -> TriangularMesh:
    """One refinement round: every face becomes 4; midpoints are appended in the order
    their parent edges are first met (faces in order, edges 12, 23, 31 within a face)."""
    faces = mesh.faces
    num_old = mesh.vertices.shape[0]
    # Parent pairs per face in request order: [F, 3, 2] -> keys [F*3].
    pairs = np.stack([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], axis=1)
    low = pairs.min(axis=-1).astype(np.int64).ravel()
    high = pairs.max(axis=-1).astype(np.int64).ravel()
    keys = low * num_old + high
    unique_keys, first_seen, inverse = np.unique(keys, return_index=True, return_inverse=True)
    creation_rank = np.empty(unique_keys.size, dtype=np.int64)
    creation_rank[np.argsort(first_seen, kind="stable")] = np.arange(unique_keys.size)
    child = (num_old + creation_rank[inverse]).astype(np.int32).reshape(-1, 3)  # [F, 3]

    order = np.argsort(first_seen, kind="stable")
    parent_a = (unique_keys[order] // num_old)
    parent_b = (unique_keys[order] % num_old)
    midpoints = (mesh.vertices[parent_a] + mesh.vertices[parent_b]) / np.float32(2.0)
    vertices = np.concatenate([mesh.vertices, _unit_float32(midpoints)], axis=0)

    i1, i2, i3 = faces[:, 0], faces[:, 1], faces[:, 2]
    c12, c23, c31 = child[:, 0], child[:, 1], child[:, 2]
    new_faces = np.stack([
        np.stack([i1, c12, c31], axis=1), np.stack([c12, i2, c23], axis=1),
        np.stack([c31, c23, i3], axis=1), np.stack([c12, c23, c31], axis=1)],
        axis=1).reshape(-1, 3)                                          # [4F, 3]
    return TriangularMesh(vertices=vertices, faces=new_faces.astype(np.int32))


def mesh_hierarchy(mesh_size: int) -> list:
    """Meshes of levels 0..mesh_size; each level's vertices are a prefix of the next."""
    if mesh_size < 0:
        raise ValueError(f"mesh_size must be >= 0, got {mesh_size}.")
    meshes = [base_icosahedron()]
    for _ in range(mesh_size):
        meshes.append(split_mesh(meshes[-1]))
    return meshes


def merge_meshes(meshes: list) -> TriangularMesh:
    """Multi-mesh: vertices of the finest mesh, faces of all levels, coarse first."""
    return TriangularMesh(vertices=meshes[-1].vertices,
                          faces=np.concatenate([m.faces for m in meshes], axis=0))


def faces_to_edges(faces: np.ndarray) -> tuple:
    """Directed edges of a face array [K, 3] in three column blocks: (senders, receivers),
    each [3K] with the faces' dtype; edge k is F[k,0]->F[k,1], K+k is F[k,1]->F[k,2], ..."""
    senders = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2]])
    receivers = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0]])
    return senders, receivers


def max_edge_length(mesh: TriangularMesh) -> np.float32:
    """Longest chord over the directed edges of one mesh (float32 vertices)."""
    senders, receivers = faces_to_edges(mesh.faces)
    lengths = np.linalg.norm(mesh.vertices[senders] - mesh.vertices[receivers], axis=-1)
    return lengths.max()


def num_vertices(mesh_size: int) -> int:
    """Vertices of the mesh of level `mesh_size`: 10*4^R + 2."""
    return 10 * 4 ** mesh_size + 2


def num_multimesh_edges(mesh_size: int) -> int:
    """Directed edges of the multi-mesh of levels 0..R: 20*(4^(R+1) - 1)."""
    return 20 * (4 ** (mesh_size + 1) - 1)
