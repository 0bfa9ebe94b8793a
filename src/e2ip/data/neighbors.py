"""Neighbour lists (vesin), with periodic shifts.

Convention: the edge vector from atom i to atom j is `positions[j] - positions[i] + shifts @ cell`,
`shifts` integer lattice translations. Lists are full (both i->j and j->i).
"""

from __future__ import annotations

import numpy as np


def neighbor_list(positions: np.ndarray, cell: np.ndarray, pbc, cutoff: float,
                  return_distances: bool = False):
    """Pairs closer than `cutoff` Å: returns (i, j, shifts[, distances]) as numpy arrays.

    positions: (N, 3) Å; cell: (3, 3) Å (ignored where pbc is False); pbc: bool or (3,) bools.
    """
    import vesin

    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    if not pbc.any():
        cell = np.zeros((3, 3))
    nl = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    periodic = bool(pbc.all()) if pbc.all() or not pbc.any() else pbc.tolist()
    i, j, shifts, d = nl.compute(positions, cell, periodic, "ijSd")
    i = i.astype(np.int64)
    j = j.astype(np.int64)
    shifts = shifts.astype(np.int64)
    if return_distances:
        return i, j, shifts, d
    return i, j, shifts


def brute_force_neighbor_list(positions, cell, pbc, cutoff, max_shift: int = 3):
    """O(N^2 * images) reference used in the tests: same convention as :func:`neighbor_list`."""
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    ranges = [range(-max_shift, max_shift + 1) if p else range(1) for p in pbc]
    out = []
    n = len(positions)
    for a in ranges[0]:
        for b in ranges[1]:
            for c in ranges[2]:
                s = np.array([a, b, c])
                t = s @ cell
                for i in range(n):
                    for j in range(n):
                        if i == j and not s.any():
                            continue
                        if np.linalg.norm(positions[j] - positions[i] + t) < cutoff:
                            out.append((i, j, a, b, c))
    return sorted(out)
