"""One-to-one matching of centroids (truth ↔ detections), shared by the comparisons.

Every true point has a gate of ``gate · r`` around it (``r`` its radius); a detection inside
the gate is a candidate. Candidates are assigned one-to-one minimising total centroid distance
(``scipy.optimize.linear_sum_assignment`` per connected group of candidates, so a million
cells never make one dense matrix).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

__all__ = ["GATE", "match_centroids"]

GATE = 0.5


def match_centroids(
    tx: NDArray[np.float64],
    ty: NDArray[np.float64],
    tr: NDArray[np.float64],
    px: NDArray[np.float64],
    py: NDArray[np.float64],
    gate: float = GATE,
) -> NDArray[np.int64]:
    """One-to-one matches (true index, detection index) within ``gate · r`` of each true centroid."""
    nt, npred = len(tx), len(px)
    if nt == 0 or npred == 0:
        return np.zeros((0, 2), np.int64)
    tree = cKDTree(np.column_stack([px, py]))
    lists = tree.query_ball_point(np.column_stack([tx, ty]), r=gate * np.asarray(tr))
    ti = np.repeat(np.arange(nt), [len(v) for v in lists])
    if len(ti) == 0:
        return np.zeros((0, 2), np.int64)
    pi = np.concatenate([np.asarray(v, np.int64) for v in lists if len(v)])
    dist = np.hypot(tx[ti] - px[pi], ty[ti] - py[pi])
    # connected groups of the bipartite candidate graph (true nodes 0..nt-1, detections nt..)
    g = coo_matrix((np.ones(len(ti)), (ti, pi + nt)), shape=(nt + npred, nt + npred))
    _, label = connected_components(g, directed=False)
    comp = label[ti]
    order = np.argsort(comp, kind="stable")
    bounds = np.flatnonzero(np.diff(comp[order])) + 1
    out: list[tuple[int, int]] = []
    for grp in np.split(order, bounds):
        if len(grp) == 1:
            out.append((int(ti[grp[0]]), int(pi[grp[0]])))
            continue
        ut, it = np.unique(ti[grp], return_inverse=True)
        up, ip = np.unique(pi[grp], return_inverse=True)
        big = float(dist[grp].max()) * 10 + 1e6
        cost = np.full((len(ut), len(up)), big)
        cost[it, ip] = dist[grp]
        rows, cols = linear_sum_assignment(cost)
        for r, c in zip(rows, cols, strict=True):
            if cost[r, c] < big:
                out.append((int(ut[r]), int(up[c])))
    pairs = np.array(sorted(out), np.int64).reshape(-1, 2)
    return pairs
