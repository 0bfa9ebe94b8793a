"""Choosing frames to label: a cheap structural descriptor and uncertainty ranking mixed with
diversity.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms


# -- selection ------------------------------------------------------------------------------------
def distance_histogram(atoms: Atoms, cutoff: float = 6.0, bins: int = 48,
                       width: float = 0.1) -> np.ndarray:
    """A smooth, rotation- and permutation-invariant descriptor: Gaussian-smeared histogram of
    all interatomic distances below `cutoff` (Å), per atom (bins,)."""
    from e2ip.data.neighbors import neighbor_list

    _, _, _, d = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff,
                               return_distances=True)
    grid = np.linspace(0.5, cutoff, bins)
    return np.exp(-0.5 * ((d[:, None] - grid) / width) ** 2).sum(0) / len(atoms)


def select_diverse(scores: np.ndarray, descriptors: np.ndarray, k: int,
                   pool_factor: int) -> list[int]:
    """Indices of k structures: the pool_factor * k highest `scores`, then farthest-point
    sampling on `descriptors` within that pool starting from the highest score."""
    if k >= len(scores):
        return list(np.argsort(-scores))
    pool = np.argsort(-scores)[:pool_factor * k]
    chosen = [int(pool[0])]
    dist = np.linalg.norm(descriptors[pool] - descriptors[pool[0]], axis=1)
    dist[0] = -np.inf
    while len(chosen) < k:
        nxt = int(np.argmax(dist))
        chosen.append(int(pool[nxt]))
        dist = np.minimum(dist, np.linalg.norm(descriptors[pool] - descriptors[pool[nxt]], axis=1))
        dist[nxt] = -np.inf  # never the same frame twice (identical descriptors)
    return chosen
