"""Train/validation/test splits and per-element reference energies."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from e2ip.data.structures import DataError, Structure


def check_split(fractions: Sequence[float], name: str = "split fractions") -> None:
    """DataError unless every fraction is >= 0 and they sum to at most 1 (never renormalised)."""
    if any(f < 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise DataError(f"{name} must be >= 0 and sum to at most 1, got {list(fractions)} "
                        f"(sum {sum(fractions):g})")


def split_by_fractions(structures: Sequence[Structure], fractions: Sequence[float], seed: int = 0):
    """Shuffle with `seed` and cut into len(fractions) parts (fractions sum to <= 1). The parts
    of a lazy on-disk sequence are lazy views of it (the same frames as for a list)."""
    check_split(fractions)
    n = len(structures)
    perm = np.random.default_rng(seed).permutation(n)
    counts = [int(round(f * n)) for f in fractions]
    subset = getattr(structures, "subset", None) if getattr(structures, "lazy", False) else None
    out, start = [], 0
    for c in counts:
        part = perm[start:start + c]
        out.append(subset(part) if subset is not None else [structures[k] for k in part])
        start += c
    return out


def fit_reference_energies(structures: Sequence[Structure], elements: Sequence[int]) -> np.ndarray:
    """Least-squares per-element energies E0[z] (eV) with E ~ sum_i E0[z_i]; shape (len(elements),).

    When the composition does not vary (one molecule), the system is rank-deficient and the minimum
    norm solution is returned: it still removes the mean energy.
    """
    if getattr(structures, "lazy", False):  # on disk: the stored per-frame composition
        counts = structures.composition(elements)
        energies = structures.energies()
        return fit_reference_energies_from_counts(counts, energies)
    index = {int(z): k for k, z in enumerate(elements)}
    counts = np.zeros((len(structures), len(elements)))
    energies = np.zeros(len(structures))
    for r, s in enumerate(structures):
        for z in s.numbers:
            counts[r, index[int(z)]] += 1
        energies[r] = s.energy
    return fit_reference_energies_from_counts(counts, energies)


def fit_reference_energies_from_counts(counts: np.ndarray, energies: np.ndarray) -> np.ndarray:
    """The least-squares E0 (eV, shape (Z,)) of energies (B,) eV ~ counts (B, Z) @ E0, counts
    being the atoms of each element per structure (minimum norm when rank-deficient)."""
    sol, *_ = np.linalg.lstsq(np.asarray(counts, dtype=np.float64),
                              np.asarray(energies, dtype=np.float64), rcond=None)
    return sol


def reference_energies_from_file(path, elements: Sequence[int]) -> np.ndarray:
    """Per-element energies from a file of isolated atoms (one atom per frame, eV)."""
    from e2ip.data.read import read_structures

    atoms = read_structures(path, require_forces=False)
    table = {}
    for s in atoms:
        if s.n_atoms == 1:
            table[int(s.numbers[0])] = s.energy
    missing = [z for z in elements if int(z) not in table]
    if missing:
        raise DataError(f"{path}: no isolated-atom energy for element(s) {missing}")
    return np.array([table[int(z)] for z in elements])
