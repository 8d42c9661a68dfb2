"""Grid <-> mesh connectivity: radius query (grid2mesh) and closest-face rule (mesh2grid).

Grid points and mesh vertices are float32 unit vectors; index arrays keep
the reference's dtypes (grid2mesh int64/int64, mesh2grid senders int32, receivers int64).
"""

import numpy as np
from scipy import spatial

from graphcast import icosahedral_mesh

# trimesh's tie rule (the reference finds mesh2grid faces with trimesh): two best squared
# distances closer than this, both above it, are decided by the face normals.
_TRIMESH_TOL = 1e-8
# trimesh's tolerance for snapping a closest point onto a triangle edge or vertex.
_SNAP = 1e-13
# Candidate faces come from the faces around this many nearest mesh vertices.
_NEAREST_VERTICES = 3


def grid2mesh_edges(grid_xyz: np.ndarray, mesh_vertices: np.ndarray, radius: float) -> tuple:
    """(grid indices, mesh indices), int64 [E] each: every mesh vertex within `radius`
    (inclusive) of each grid point; grid-major, mesh indices ascending per grid point.

    Same edge set as cKDTree.query_ball_point (squared float64 distance of the float32
    points, summed x, y, z in order, compared with radius**2), but via a vectorised
    k-nearest query, which avoids a million Python lists at 0.25 deg.
    """
    grid64 = np.asarray(grid_xyz, dtype=np.float64)
    mesh64 = np.asarray(mesh_vertices, dtype=np.float64)
    radius = float(radius)
    tree = spatial.cKDTree(mesh64)
    k = 4
    while True:
        _, idx = tree.query(grid64, k=k, distance_upper_bound=radius * (1 + 1e-6), workers=-1)
        if k >= mesh64.shape[0] or not (idx[:, -1] < mesh64.shape[0]).any():
            break
        k *= 2                                                          # some ball is fuller
    rows, cols = np.nonzero(idx < mesh64.shape[0])                      # candidate pairs
    delta = grid64[rows] - mesh64[idx[rows, cols]]                      # [P, 3]
    sq_dist = delta[:, 0] * delta[:, 0] + delta[:, 1] * delta[:, 1] + delta[:, 2] * delta[:, 2]
    outside = sq_dist > radius * radius
    idx[rows[outside], cols[outside]] = mesh64.shape[0]
    idx.sort(axis=1)                                                    # ascending, misses last
    keep = idx < mesh64.shape[0]
    mesh_idx = idx[keep].astype(np.int64)
    grid_idx = np.repeat(np.arange(grid64.shape[0], dtype=np.int64), keep.sum(axis=1))
    return grid_idx, mesh_idx


def grid2mesh_edges_ball_query(grid_xyz: np.ndarray, mesh_vertices: np.ndarray,
                               radius: float) -> tuple:
    """Reference-style radius query with cKDTree.query_ball_point; slower, used to check
    `grid2mesh_edges`."""
    tree = spatial.cKDTree(mesh_vertices)
    neighbours = tree.query_ball_point(grid_xyz, r=radius, workers=-1, return_sorted=True)
    counts = np.fromiter((len(n) for n in neighbours), dtype=np.int64, count=len(neighbours))
    mesh_idx = np.fromiter((i for n in neighbours for i in n), dtype=np.int64,
                           count=int(counts.sum()))
    grid_idx = np.repeat(np.arange(len(neighbours), dtype=np.int64), counts)
    return grid_idx, mesh_idx


def grid2mesh_counts(grid_xyz: np.ndarray, mesh_vertices: np.ndarray, radius: float) -> np.ndarray:
    """Number of grid2mesh edges per grid point, int64 [N] (same query, no index lists)."""
    tree = spatial.cKDTree(mesh_vertices)
    return np.asarray(tree.query_ball_point(grid_xyz, r=radius, workers=-1, return_length=True),
                      dtype=np.int64)


def _closest_point_sq_dist(points: np.ndarray, a: np.ndarray, b: np.ndarray,
                           c: np.ndarray) -> tuple:
    """Closest point on triangles (a, b, c) to `points`, all [..., 3] float64.

    Returns (closest points [..., 3], squared distances [...]). Voronoi-region case analysis
    (vertex, edge or interior) with trimesh's region order and its `_SNAP` tolerance, so a
    point within that tolerance of an edge lands on the edge as in the reference.
    """
    ab, ac = b - a, c - a
    ap, bp, cp = points - a, points - b, points - c
    d1, d2 = (ab * ap).sum(-1), (ac * ap).sum(-1)
    d3, d4 = (ab * bp).sum(-1), (ac * bp).sum(-1)
    d5, d6 = (ab * cp).sum(-1), (ac * cp).sum(-1)
    va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = 1.0 / (va + vb + vc)
        regions = [  # (condition, weight of b, weight of c), first match wins
            ((d1 < _SNAP) & (d2 < _SNAP), 0.0, 0.0),
            ((d3 > -_SNAP) & (d4 <= d3), 1.0, 0.0),
            ((vc < _SNAP) & (d1 > -_SNAP) & (d3 < _SNAP), d1 / (d1 - d3), 0.0),
            ((d6 > -_SNAP) & (d5 <= d6), 0.0, 1.0),
            ((vb < _SNAP) & (d2 > -_SNAP) & (d6 < _SNAP), 0.0, d2 / (d2 - d6)),
            ((va < _SNAP) & (d4 - d3 > -_SNAP) & (d5 - d6 > -_SNAP),
             None, (d4 - d3) / ((d4 - d3) + (d5 - d6))),
        ]
        v, w = vb * denom, vc * denom
        use_bc = np.zeros(v.shape, dtype=bool)
        decided = np.zeros(v.shape, dtype=bool)
        for cond, wb, wc in regions:
            take = cond & ~decided
            if wb is None:
                use_bc, w = take, np.where(take, wc, w)
            else:
                v, w = np.where(take, wb, v), np.where(take, wc, w)
            decided |= take
    closest = a + ab * v[..., None] + ac * w[..., None]
    closest = np.where(use_bc[..., None], b + (c - b) * w[..., None], closest)
    diff = points - closest
    return closest, (diff * diff).sum(-1)


def _rounding_gap(d2: np.ndarray) -> np.ndarray:
    """Largest difference of squared distances that may be rounding noise: |p - q|^2 with
    |p|, |q| ~ 1 carries an absolute error of a few ulp(1) times |p - q|."""
    return 1e-13 * np.sqrt(d2) + 1e-24


def _vertex_faces(faces: np.ndarray, num_vertices: int) -> np.ndarray:
    """Faces around each vertex, [V, max valence] int64, short rows padded with their first face."""
    vertex = faces.ravel().astype(np.int64)
    face = np.repeat(np.arange(faces.shape[0], dtype=np.int64), 3)
    order = np.argsort(vertex, kind="stable")
    vertex, face = vertex[order], face[order]
    counts = np.bincount(vertex, minlength=num_vertices)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(vertex.size) - starts[vertex]
    table = np.repeat(face[starts][:, None], counts.max(), axis=1)
    table[vertex, slot] = face
    return table


def _trimesh_faces(vertices: np.ndarray, faces: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Faces trimesh.proximity.closest_point picks (the reference's choice, ties included)."""
    import trimesh  # pylint: disable=import-outside-toplevel
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces)
    _, _, face_ids = trimesh.proximity.closest_point(mesh, points)
    return np.asarray(face_ids, dtype=np.int64)


def _face_frames(vertices: np.ndarray, faces: np.ndarray) -> tuple:
    """Per face: first vertex a, gradients of the barycentric weights of b and c (of the
    orthogonal projection onto the face plane), outward unit normal, each [F, 3] float64;
    and the barycentric margin [F] beyond which no edge snapping (`_SNAP`) can happen.

    The snapping test compares the unnormalised weights (weight x Gram determinant) with
    `_SNAP`; the margin keeps a factor 1000 away from that, and at least 1e-6."""
    v = vertices.astype(np.float64)[faces]                              # [F, 3, 3]
    a, e1, e2 = v[:, 0], v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]
    g11, g12, g22 = (e1 * e1).sum(-1), (e1 * e2).sum(-1), (e2 * e2).sum(-1)
    det = g11 * g22 - g12 * g12
    grad_b = (g22[:, None] * e1 - g12[:, None] * e2) / det[:, None]
    grad_c = (g11[:, None] * e2 - g12[:, None] * e1) / det[:, None]
    normal = np.cross(e1, e2)
    margin = np.maximum(1e-6, 1e3 * _SNAP / det)
    return a, grad_b, grad_c, normal / np.linalg.norm(normal, axis=-1, keepdims=True), margin


def _interior_faces(points: np.ndarray, candidates: np.ndarray, frames: tuple) -> np.ndarray:
    """Face [n] whose interior (with a safety margin) holds the orthogonal projection of the
    point, the point lying above the face; -1 where none does.

    For a point outside the convex mesh such a face holds the unique closest surface point,
    with every other face clearly farther, so any closest-face rule picks it.
    """
    a, grad_b, grad_c, normal, margin = frames
    rel = points[:, None, :] - a[candidates]                            # [n, K, 3]
    wb = np.einsum("nki,nki->nk", rel, grad_b[candidates])
    wc = np.einsum("nki,nki->nk", rel, grad_c[candidates])
    height = np.einsum("nki,nki->nk", rel, normal[candidates])
    margin = margin[candidates]
    inside = (wb > margin) & (wc > margin) & (1.0 - wb - wc > margin) & (height > 0)
    hits = inside.sum(axis=1)
    face = candidates[np.arange(points.shape[0]), inside.argmax(axis=1)]
    return np.where(hits == 1, face, -1)


def _closest_faces_by_distance(points: np.ndarray, candidates: np.ndarray, vertices64: np.ndarray,
                               faces: np.ndarray, normals: np.ndarray) -> tuple:
    """trimesh's rule on explicit candidates [n, K]: (face [n], ambiguous mask [n]).

    Ambiguous: the two best faces tie up to rounding, or the rule's normal comparison is
    too close to call; there only the reference's own tie order can decide.
    """
    cand = np.sort(candidates, axis=1)
    tri = vertices64[faces[cand]]                                       # [n, K, 3, 3]
    closest, d2 = _closest_point_sq_dist(points[:, None, :], tri[..., 0, :], tri[..., 1, :],
                                         tri[..., 2, :])
    # Repeated candidates (shared by several nearest vertices) must not tie with themselves.
    d2[:, 1:][cand[:, 1:] == cand[:, :-1]] = np.inf
    order = np.argsort(d2, axis=1, kind="stable")[:, :3]                # [n, 3]
    rows = np.arange(points.shape[0])[:, None]
    best_d2, best_face = d2[rows, order], cand[rows, order]             # [n, 3]
    pick = best_face[:, 0].copy()
    ambiguous = np.zeros(points.shape[0], dtype=bool)
    gap = best_d2[:, 1] - best_d2[:, 0]
    by_normal = (gap < _TRIMESH_TOL) & (best_d2[:, 0] > _TRIMESH_TOL)
    if by_normal.any():
        sel = np.nonzero(by_normal)[0]
        direction = points[sel, None, :] - closest[sel[:, None], order[sel, :2]]  # [m, 2, 3]
        direction /= np.sqrt(best_d2[sel, :2])[..., None]
        dots = np.einsum("nki,nki->nk", normals[best_face[sel, :2]], direction)  # [m, 2]
        pick[sel] = np.where(dots[:, 1] > dots[:, 0], best_face[sel, 1], best_face[sel, 0])
        # Unclear for us: equal angles, or a third face competing for second place.
        ambiguous[sel] = ((np.abs(dots[:, 1] - dots[:, 0]) <= 1e-12)
                          | (best_d2[sel, 2] - best_d2[sel, 1] <= _rounding_gap(best_d2[sel, 2])))
    tied = ~by_normal & (gap <= _rounding_gap(best_d2[:, 1]))
    pick[tied] = best_face[tied, :2].min(axis=1)
    return pick, ambiguous | tied


def closest_faces(grid_xyz: np.ndarray, mesh: icosahedral_mesh.TriangularMesh,
                  chunk_size: int = 1 << 18, use_trimesh_for_ties: bool = True) -> np.ndarray:
    """Face index [N] int64 of the flat finest mesh whose closest point to each grid point
    is nearest, following trimesh's rule (as the reference, which uses trimesh).

    Fast path: the face around the nearest vertex into whose interior the point projects.
    Points near edges/vertices get the full rule on the faces around their 3 nearest
    vertices. Where two faces tie up to rounding, trimesh (if installed and
    `use_trimesh_for_ties`) decides, reproducing the reference's environment-dependent tie
    order; otherwise the lowest tied face index is taken.
    """
    vertices64 = mesh.vertices.astype(np.float64)
    table = _vertex_faces(mesh.faces, mesh.vertices.shape[0])          # [V, 6]
    frames = _face_frames(mesh.vertices, mesh.faces)
    tree = spatial.cKDTree(vertices64)
    points64 = np.asarray(grid_xyz, dtype=np.float64)
    chosen = np.empty(points64.shape[0], dtype=np.int64)
    for start in range(0, points64.shape[0], chunk_size):
        p = points64[start:start + chunk_size]                          # [n, 3]
        _, nearest = tree.query(p, k=1, workers=-1)                     # [n]
        chosen[start:start + chunk_size] = _interior_faces(p, table[nearest], frames)
    slow = np.nonzero(chosen < 0)[0]
    if slow.size:
        p = points64[slow]
        _, nearest = tree.query(p, k=_NEAREST_VERTICES, workers=-1)     # [m, k]
        pick, ambiguous = _closest_faces_by_distance(
            p, table[nearest].reshape(slow.size, -1), vertices64, mesh.faces, frames[3])
        chosen[slow] = pick
        ambiguous = slow[ambiguous]
        if use_trimesh_for_ties and ambiguous.size:
            try:
                chosen[ambiguous] = _trimesh_faces(mesh.vertices, mesh.faces,
                                                   np.asarray(grid_xyz)[ambiguous])
            except ImportError:
                pass
    return chosen


def mesh2grid_edges(grid_xyz: np.ndarray, mesh: icosahedral_mesh.TriangularMesh,
                    use_trimesh_for_ties: bool = True) -> tuple:
    """(mesh indices int32 [3N], grid indices int64 [3N]): each grid point receives from the
    three vertices of its closest face, in face order; grid-major."""
    faces = closest_faces(grid_xyz, mesh, use_trimesh_for_ties=use_trimesh_for_ties)
    mesh_idx = mesh.faces[faces].reshape(-1)
    grid_idx = np.repeat(np.arange(grid_xyz.shape[0], dtype=np.int64), 3)
    return mesh_idx, grid_idx
