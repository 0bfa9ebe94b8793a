"""Splits and per-element reference energies."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.io import write

from e2ip.data.splits import (
    fit_reference_energies,
    reference_energies_from_file,
    split_by_fractions,
)
from e2ip.data.structures import DataError, Structure
from tests.support import SHARED


def _mol(numbers, energy):
    n = len(numbers)
    return Structure(numbers=np.array(numbers), positions=np.arange(3 * n).reshape(n, 3) * 1.0,
                     energy=energy, forces=np.zeros((n, 3)))


def test_split_fractions_are_disjoint_and_seeded():
    pool = [_mol([1], float(k)) for k in range(100)]
    a, b, c = split_by_fractions(pool, [0.7, 0.2, 0.1], seed=3)
    assert (len(a), len(b), len(c)) == (70, 20, 10)
    ids = [s.energy for s in a + b + c]
    assert len(set(ids)) == 100
    a2, _, _ = split_by_fractions(pool, [0.7, 0.2, 0.1], seed=3)
    assert [s.energy for s in a2] == [s.energy for s in a]
    a3, _, _ = split_by_fractions(pool, [0.7, 0.2, 0.1], seed=4)
    assert [s.energy for s in a3] != [s.energy for s in a]
    with pytest.raises(DataError, match="fractions"):
        split_by_fractions(pool, [0.7, 0.5, 0.1])


def test_least_squares_reference_energies_recover_known_values():
    rng = np.random.default_rng(0)
    e0 = {1: -13.6, 6: -1029.5, 8: -2041.1}
    structures = []
    for _ in range(30):
        numbers = rng.choice([1, 6, 8], size=rng.integers(2, 9))
        structures.append(_mol(numbers, float(sum(e0[int(z)] for z in numbers))))
    fitted = fit_reference_energies(structures, [1, 6, 8])
    np.testing.assert_allclose(fitted, [e0[1], e0[6], e0[8]], atol=1e-8)


def test_reference_energies_from_isolated_atoms_file(tmp_path):
    path = tmp_path / "iso.xyz"
    frames = []
    for z, e in [(1, -13.5), (8, -2035.0)]:
        a = Atoms(numbers=[z], positions=[[0, 0, 0]])
        a.info["energy"] = e
        frames.append(a)
    write(path, frames, format="extxyz")
    np.testing.assert_allclose(reference_energies_from_file(path, [8, 1]), [-2035.0, -13.5])
    with pytest.raises(DataError, match="no isolated-atom energy for element"):
        reference_energies_from_file(path, [1, 6, 8])


def test_real_isolated_atoms_file():

    path = SHARED / "ethanol_botnet/isolated_atoms.xyz"
    if not path.exists():
        pytest.skip("shared data not present")
    ref = reference_energies_from_file(path, [1, 6, 8])
    assert ref[0] == pytest.approx(-13.568422383046626)
