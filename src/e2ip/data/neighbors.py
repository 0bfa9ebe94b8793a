"""Neighbour lists (vesin, with a k-d tree for extreme geometries), with periodic shifts.

Convention: the edge vector from atom i to atom j is `positions[j] - positions[i] + shifts @ cell`,
`shifts` integer lattice translations. Lists are full (both i->j and j->i).

vesin's cell list sizes its bins from the periodic cell or, along open directions, from the
atoms' bounding box. For very large or very flat boxes (a 1e6 Å molecule, a 3 x 3 x 1e6 Å cell,
a 2000 x 2000 x 3 Å cell) vesin 0.6 rounds one bin count down to zero and the process dies of a
floating-point exception; with one periodic axis its time grows with the square of the open
extent (21 s at 5e4 Å). Such geometries go to an exact k-d tree search over lattice images
instead (:func:`_kdtree_neighbor_list`); ordinary ones keep vesin.
"""

from __future__ import annotations

import math

import numpy as np

from e2ip.errors import DataError

#: vesin is used when the product over the three axes of (box length / cutoff) is at most
#: VESIN_MAX_CELLS and no box length exceeds VESIN_MAX_RATIO cutoffs (vesin rescales its bins
#: above 1e5 cells, which is where its failures start), or for a fully periodic cell whose
#: widths differ by at most VESIN_MAX_ANISOTROPY (its rescaling keeps every bin count >= 1)
VESIN_MAX_CELLS = 2e4
VESIN_MAX_RATIO = 200.0
VESIN_MAX_ANISOTROPY = 4.0
#: with one periodic and two open axes vesin's time grows fast with the box (0.7 s for 3 atoms
#: 300 Å apart): a stricter limit there
VESIN_MAX_CELLS_ONE_PERIODIC = 400.0
#: refuse a search that would visit more lattice images per atom than this (a cell far thinner
#: than the cutoff): its output alone would exhaust the memory
MAX_IMAGES_PER_ATOM = 1e7
#: the k-d tree search holds at most this many atom images at once
_MAX_BATCH_IMAGES = 2e6


def _cross(a, b) -> tuple[float, float, float]:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _norm(a) -> float:
    return math.sqrt(a[0] * a[0] + a[1] * a[1] + a[2] * a[2])


def periodic_widths(cell: np.ndarray, pbc) -> np.ndarray:
    """For each periodic axis k (in order), the distance between the lattice planes spanned by
    the other periodic vectors, i.e. the length of the part of `cell[k]` orthogonal to them
    (its plain length with one periodic axis). 0 means the periodic vectors are linearly
    dependent (a singular cell); rows of open axes play no part. (Plain floats: this runs
    before every neighbour search, where numpy's per-call cost on 3-vectors dominated.)"""
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    rows = np.asarray(cell, dtype=np.float64)[pbc].tolist()
    if len(rows) == 1:
        return np.array([_norm(rows[0])])
    if len(rows) == 2:
        spanned = _norm(_cross(rows[0], rows[1]))  # parallelogram area
        others = [_norm(rows[1]), _norm(rows[0])]
    elif len(rows) == 3:
        a, b, c = rows
        bc = _cross(b, c)
        spanned = abs(a[0] * bc[0] + a[1] * bc[1] + a[2] * bc[2])  # volume
        others = [_norm(bc), _norm(_cross(c, a)), _norm(_cross(a, b))]
    else:
        return np.zeros(0)
    return np.array([spanned / o if o > 0 else 0.0 for o in others])


def is_singular(widths: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> bool:
    """Whether the periodic lattice vectors (widths from :func:`periodic_widths`) are zero or
    linearly dependent, relative to the size of the periodic rows of `cell`."""
    return bool(widths.min() <= 1e-8 * max(1.0, float(np.abs(cell[pbc]).max())))


def _check_inputs(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float):
    """Refuse what would crash or hang the search, with a DataError (no file or frame is known
    here: readers call validate_structure first, which names them)."""
    if not np.isfinite(cutoff) or cutoff <= 1e-6:
        raise ValueError(f"neighbour list: cutoff must be a finite number > 1e-6, got {cutoff}")
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise DataError(f"neighbour list: positions must have shape (N, 3), got {positions.shape}")
    if not np.isfinite(positions).all():
        raise DataError("neighbour list: positions contain NaN or inf")
    if not pbc.any():
        return None
    if cell.shape != (3, 3) or not np.isfinite(cell[pbc]).all():
        raise DataError(f"neighbour list: the cell must be a finite (3, 3) array, got {cell.tolist()}")
    widths = periodic_widths(cell, pbc)
    if is_singular(widths, cell, pbc):
        raise DataError(f"neighbour list: the cell is singular along a periodic axis "
                        f"(pbc={pbc.tolist()}, cell={cell.tolist()})")
    images = np.prod(2 * np.ceil(cutoff / widths) + 1)
    if images > MAX_IMAGES_PER_ATOM:
        raise DataError(f"neighbour list: the periodic cell is only {widths.min():.3g} Å wide "
                        f"for a cutoff of {cutoff} Å: each atom would need ~{images:.2g} "
                        "lattice images")
    return widths


def _box_lengths(positions: np.ndarray, pbc: np.ndarray, widths) -> np.ndarray:
    """Per axis: the periodic width, or the atoms' extent along an open axis (an upper bound of
    what vesin bins: the largest axis-aligned extent)."""
    if pbc.all():
        return widths
    extent = float(np.ptp(positions, axis=0).max()) if len(positions) else 0.0
    lengths = np.full(3, extent)
    if pbc.any():
        lengths[pbc] = widths
    return lengths


def _vesin_safe(ratios: np.ndarray, pbc: np.ndarray) -> bool:
    """Whether vesin handles a box of these (length / cutoff) ratios without failing."""
    limit = VESIN_MAX_CELLS_ONE_PERIODIC if pbc.sum() == 1 else VESIN_MAX_CELLS
    if ratios.max() <= VESIN_MAX_RATIO and np.prod(ratios) <= limit:
        return True
    return bool(pbc.all()) and ratios.max() <= VESIN_MAX_ANISOTROPY * ratios.min()


def neighbor_list(positions: np.ndarray, cell: np.ndarray, pbc, cutoff: float,
                  return_distances: bool = False):
    """Pairs closer than `cutoff` Å: returns (i, j, shifts[, distances]) as numpy arrays.

    positions: (N, 3) Å; cell: (3, 3) Å (ignored where pbc is False); pbc: bool or (3,) bools.
    Non-finite input, periodic vectors that are linearly dependent, or a cell so thin that the
    search would exhaust the memory raise :class:`DataError` (never a crash of the process).
    """
    import vesin

    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    if not pbc.any():
        cell = np.zeros((3, 3))
    widths = _check_inputs(positions, cell, pbc, float(cutoff))
    if len(positions) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return (empty, empty, np.zeros((0, 3), dtype=np.int64)) + ((np.zeros(0),) if
                                                                   return_distances else ())
    ratios = np.maximum(_box_lengths(positions, pbc, widths) / cutoff, 1.0)
    if not _vesin_safe(ratios, pbc):
        i, j, shifts, d = _kdtree_neighbor_list(positions, cell, pbc, float(cutoff))
    else:
        nl = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
        periodic = bool(pbc.all()) if pbc.all() or not pbc.any() else pbc.tolist()
        i, j, shifts, d = nl.compute(positions, cell, periodic, "ijSd")
    i = i.astype(np.int64)
    j = j.astype(np.int64)
    shifts = shifts.astype(np.int64)
    if return_distances:
        return i, j, shifts, d
    return i, j, shifts


def _kdtree_neighbor_list(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray,
                          cutoff: float):
    """Exact full neighbour list by a k-d tree over lattice images (any box size or shape):
    positions are wrapped into the cell along the periodic axes, the images that can come within
    the cutoff of the wrapped atoms are searched, and the shifts are translated back to the
    unwrapped positions."""
    from scipy.spatial import cKDTree

    n = len(positions)
    rows = cell[pbc]
    if len(rows):
        # fractional coordinates along the periodic vectors (least squares: open rows play no
        # part), wrapped to [0, 1)
        frac, *_ = np.linalg.lstsq(rows.T, positions.T, rcond=None)
        if np.abs(frac).max(initial=0.0) > 2**30:
            raise DataError("neighbour list: positions lie more than 2^30 cells outside the cell")
        offsets = np.floor(frac.T).astype(np.int64)
        wrapped = positions - offsets @ rows
        reach = np.ceil(cutoff / periodic_widths(cell, pbc)).astype(np.int64) + 1
        grids = np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij")
        image_shifts = np.stack([g.ravel() for g in grids], axis=1)
    else:
        offsets = np.zeros((n, 0), dtype=np.int64)
        wrapped = positions
        image_shifts = np.zeros((1, 0), dtype=np.int64)
    tree = cKDTree(wrapped)
    lo, hi = wrapped.min(axis=0) - cutoff, wrapped.max(axis=0) + cutoff
    per_batch = max(1, int(_MAX_BATCH_IMAGES // n))
    found = []
    for start in range(0, len(image_shifts), per_batch):
        batch = image_shifts[start:start + per_batch]
        images = (wrapped[None, :, :] + (batch @ rows)[:, None, :]).reshape(-1, 3)
        near = np.flatnonzero(np.all((images >= lo) & (images <= hi), axis=1))
        if not len(near):
            continue
        pairs = tree.sparse_distance_matrix(cKDTree(images[near]), cutoff, output_type="ndarray")
        img, j = np.divmod(near[pairs["j"]], n)
        found.append((pairs["i"].astype(np.int64), j, batch[img], pairs["v"]))
    if not found:
        return (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3), np.int64),
                np.zeros(0))
    i, j, image, d = (np.concatenate(parts) for parts in zip(*found))
    keep = (d < cutoff) & ~((i == j) & ~image.any(axis=1))
    i, j, image, d = i[keep], j[keep], image[keep], d[keep]
    shifts = np.zeros((len(i), 3), dtype=np.int64)
    shifts[:, pbc] = image + offsets[i] - offsets[j]
    order = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], j, i))
    return i[order], j[order], shifts[order], d[order]
