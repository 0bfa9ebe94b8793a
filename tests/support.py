"""Paths and small settings the tests share."""

from pathlib import Path

import numpy as np

#: the repository root
REPO = Path(__file__).resolve().parents[1]
#: the shared data sets beside the repository (read-only; tests that need one skip without it)
SHARED = REPO.parent / "shared" / "data"


def brute_force_neighbor_list(positions, cell, pbc, cutoff, max_shift: int = 3):
    """O(N^2 * images) reference for :func:`e2ip.data.neighbors.neighbor_list` (same convention:
    sorted (i, j, shift_a, shift_b, shift_c) tuples of pairs closer than `cutoff`)."""
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
