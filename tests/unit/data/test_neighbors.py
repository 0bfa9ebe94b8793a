"""The vesin neighbour list against an O(N^2 x images) brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from e2ip.data.neighbors import neighbor_list
from tests.support import brute_force_neighbor_list


def as_set(i, j, shifts) -> set[tuple[int, int, int, int, int]]:
    return {(int(a), int(b), *map(int, s)) for a, b, s in zip(i, j, shifts)}


def max_shift_for(cell: np.ndarray, cutoff: float) -> int:
    """Enough lattice images for the brute force: cutoff over the smallest plane spacing."""
    volume = abs(np.linalg.det(cell))
    heights = [volume / np.linalg.norm(np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3]))
               for k in range(3)]
    return int(math.ceil(cutoff / min(heights))) + 1


def check(positions, cell, pbc, cutoff, extra_images: int = 0):
    i, j, shifts, d = neighbor_list(positions, cell, pbc, cutoff, return_distances=True)
    assert i.dtype == j.dtype == shifts.dtype == np.int64
    got = as_set(i, j, shifts)
    assert len(got) == len(i), "duplicate pairs"
    ref_cell = cell if np.any(pbc) else np.zeros((3, 3))
    ms = max_shift_for(cell, cutoff) + extra_images if np.any(pbc) else 0
    ref = set(brute_force_neighbor_list(positions, ref_cell, pbc, cutoff, max_shift=ms))
    assert got == ref
    # distances follow the documented convention r_j - r_i + shift @ cell
    vec = positions[j] - positions[i] + shifts @ (cell if np.any(pbc) else np.zeros((3, 3)))
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), d, atol=1e-10)
    # a full list: j -> i with the opposite shift is present for every i -> j
    assert {(b, a, -x, -y, -z) for a, b, x, y, z in got} == got
    return got


@pytest.mark.parametrize("seed", range(4))
def test_molecule_no_pbc(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 12))
    positions = rng.uniform(-2.5, 2.5, (n, 3))
    got = check(positions, np.zeros((3, 3)), False, 3.0)
    assert got and all(p[2:] == (0, 0, 0) for p in got)
    # a cell given together with pbc=False is ignored
    i, j, s = neighbor_list(positions, np.eye(3) * 2.0, [False] * 3, 3.0)
    assert as_set(i, j, s) == got


@pytest.mark.parametrize("seed", range(3))
def test_cubic_periodic(seed):
    rng = np.random.default_rng(10 + seed)
    cell = np.eye(3) * 6.0
    positions = rng.uniform(0, 6.0, (8, 3))
    check(positions, cell, True, 3.5)


@pytest.mark.parametrize("seed", range(3))
def test_triclinic_periodic(seed):
    rng = np.random.default_rng(20 + seed)
    cell = np.array([[5.5, 0.0, 0.0], [1.7, 5.0, 0.0], [-1.2, 0.9, 6.1]])
    frac = rng.uniform(0, 1, (7, 3))
    positions = frac @ cell
    got = check(positions, cell, [True, True, True], 3.6)
    # atoms outside the unit cell (unwrapped) give the same pairs up to shifts: same count
    shifted = positions.copy()
    shifted[0] += 2 * cell[0] - cell[2]
    i, j, s = neighbor_list(shifted, cell, True, 3.6)
    assert len(i) == len(got)
    check(shifted, cell, True, 3.6, extra_images=2)


@pytest.mark.parametrize("seed", range(3))
def test_mixed_pbc(seed):
    rng = np.random.default_rng(30 + seed)
    cell = np.array([[4.5, 0.0, 0.0], [0.3, 5.0, 0.0], [0.6, -0.4, 4.8]])
    positions = rng.uniform(0, 1, (7, 3)) @ cell
    got = check(positions, cell, [True, False, True], 3.5)
    assert all(p[3] == 0 for p in got)  # no shift along the non-periodic direction


@pytest.mark.parametrize("seed", range(3))
def test_small_cell_multiple_images(seed):
    """Cutoff larger than half (even the whole) cell: an atom sees several images of each
    neighbour, and its own images."""
    rng = np.random.default_rng(40 + seed)
    cell = np.array([[2.6, 0.0, 0.0], [0.5, 2.4, 0.0], [0.2, 0.4, 2.8]])
    positions = rng.uniform(0, 1, (3, 3)) @ cell
    cutoff = 4.0
    got = check(positions, cell, True, cutoff)
    pairs = [p[:2] for p in got]
    assert max(pairs.count(p) for p in set(pairs)) >= 4  # several images of one neighbour
    assert any(p[0] == p[1] for p in got)  # self images
    # a single atom in a small box: only its own images, all lattice vectors shorter than cutoff
    got1 = check(positions[:1], cell, True, cutoff)
    assert got1 and all(p[0] == p[1] == 0 for p in got1)


def test_no_pairs_and_single_atom():
    i, j, s = neighbor_list(np.zeros((1, 3)), np.zeros((3, 3)), False, 5.0)
    assert len(i) == len(j) == len(s) == 0
    i, j, s = neighbor_list(np.array([[0.0, 0, 0], [10.0, 0, 0]]), np.zeros((3, 3)), False, 5.0)
    assert len(i) == 0
