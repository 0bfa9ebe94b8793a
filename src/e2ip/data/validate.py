"""Checks of structures: finite values, coordinates, cells, close atoms, duplicates and elements;
every problem a :class:`DataError` naming the file, frame and field.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from e2ip.data.neighbors import is_singular, periodic_widths
from e2ip.data.structures import DataError, Structure

if TYPE_CHECKING:
    pass


#: closest allowed distance between two atoms (Å)
MIN_DISTANCE = 0.1


#: largest allowed |coordinate| of a position or cell vector (Å): a float32 model resolves
#: positions near 1e6 Å to 0.06 Å only, and at 5e7 Å bonded atoms fall on the same float32 value
#: (NaN predictions)
MAX_COORDINATE = 1e6


def validate_structure(s: Structure, *, require_energy: bool = True, require_forces: bool = True,
                       min_distance: float = MIN_DISTANCE) -> None:
    """Raise DataError if `s` has NaNs or infs, wrong shapes, unknown elements, a singular or
    too thin periodic cell, or overlapping atoms."""
    where = s.where()
    n = len(s.numbers)
    if n == 0:
        raise DataError(f"{where}: structure has no atoms")
    if s.positions.shape != (n, 3):
        raise DataError(f"{where}: field 'positions' has shape {s.positions.shape}, expected ({n}, 3)")
    _check_coordinates(s.positions, "positions", where)
    bad = (s.numbers < 1) | (s.numbers > 118)
    if bad.any():
        raise DataError(f"{where}: field 'numbers' has unknown element(s) {sorted(set(s.numbers[bad]))}")
    if s.energy is not None and not np.isfinite(s.energy):
        raise DataError(f"{where}: field 'energy' is NaN or inf")
    if s.energy is None and require_energy:
        raise DataError(f"{where}: field 'energy' is missing")
    if s.forces is not None:
        if s.forces.shape != (n, 3):
            raise DataError(f"{where}: field 'forces' has shape {s.forces.shape}, expected ({n}, 3)")
        if not np.all(np.isfinite(s.forces)):
            raise DataError(f"{where}: field 'forces' contains NaN or inf")
    elif require_forces:
        raise DataError(f"{where}: field 'forces' is missing")
    _validate_cell(s, where, min_distance)
    if n > 1:
        from e2ip.data.neighbors import neighbor_list

        # vesin's cell list is slow for tiny cutoffs (many bins): search within 1 Å and filter
        i, j, _, d = neighbor_list(s.positions, s.cell, s.pbc, max(min_distance, 1.0),
                                   return_distances=True)
        close = d < min_distance
        i, j, d = i[close], j[close], d[close]
        if len(i):
            k = int(np.argmin(d))
            raise DataError(
                f"{where}: field 'positions': atoms {int(i[k])} and {int(j[k])} are "
                f"{d[k]:.3f} Å apart "
                f"(closer than {min_distance} Å): overlapping atoms"
            )


def _check_coordinates(values: np.ndarray, field: str, where: str) -> None:
    """Lengths (Å) must be finite and at most MAX_COORDINATE in magnitude."""
    if not np.all(np.isfinite(values)):
        raise DataError(f"{where}: field '{field}' contains NaN or inf")
    if values.size and np.abs(values).max() > MAX_COORDINATE:
        raise DataError(f"{where}: field '{field}' has values up to {np.abs(values).max():.3g} Å "
                        f"(at most {MAX_COORDINATE:g} Å allowed)")


def _validate_cell(s: Structure, where: str, min_distance: float) -> None:
    """The cell and pbc of `s`: shapes, finite values and, along periodic axes, lattice
    vectors that span a cell at least `min_distance` wide (a narrower one puts every atom on
    top of its own periodic image, and makes the neighbour search explode)."""
    if np.shape(s.pbc) != (3,):
        raise DataError(f"{where}: field 'pbc' has shape {np.shape(s.pbc)}, expected (3,)")
    if np.shape(s.cell) != (3, 3):
        raise DataError(f"{where}: field 'cell' has shape {np.shape(s.cell)}, expected (3, 3)")
    _check_coordinates(s.cell, "cell", where)
    pbc = np.asarray(s.pbc, dtype=bool)
    if not pbc.any():
        return
    widths = periodic_widths(s.cell, pbc)
    axis = int(np.flatnonzero(pbc)[int(np.argmin(widths))])
    if is_singular(widths, np.asarray(s.cell, dtype=np.float64), pbc):
        raise DataError(f"{where}: field 'cell' is singular but pbc={pbc.tolist()} (the periodic "
                        f"lattice vectors are zero or linearly dependent, axis {axis})")
    if widths.min() < min_distance:
        raise DataError(f"{where}: field 'cell' is only {widths.min():.3g} Å wide along periodic "
                        f"axis {axis}: every atom is closer than {min_distance} Å to its own "
                        "periodic image")


def check_duplicates(structures: Iterable[Structure], decimals: int = 8) -> None:
    """Raise DataError if two structures have the same atomic numbers, positions (rounded to
    `decimals` places, Å), cell and pbc; the message names both frames. O(N) with a hash; one
    pass over `structures` (a lazy sequence is streamed)."""
    finder = DuplicateFinder(decimals)
    for s in structures:
        finder.add(s)


class DuplicateFinder:
    """The streaming form of :func:`check_duplicates`: :meth:`add` one structure at a time. It
    keeps a 16-byte digest and the file and frame of each structure, not the structure."""

    def __init__(self, decimals: int = 8, advice: str = "set data.allow_duplicates: true"):
        self.decimals = decimals
        self.advice = advice
        self.seen: dict[bytes, tuple[str, int]] = {}

    def add(self, s: Structure) -> None:
        """Remember `s`; DataError naming both frames if an earlier structure was the same."""
        decimals = self.decimals
        key = hashlib.blake2b(b"|".join((
            np.asarray(s.numbers, dtype=np.int64).tobytes(),
            (np.round(np.asarray(s.positions, dtype=np.float64), decimals) + 0.0).tobytes(),
            np.asarray(s.pbc, dtype=bool).tobytes(),
            (np.round(np.asarray(s.cell, dtype=np.float64), decimals) + 0.0).tobytes()
            if np.any(s.pbc) else b"",
        )), digest_size=16).digest()
        first = self.seen.get(key)
        if first is None:
            self.seen[key] = (s.source, s.frame)
            return
        source, frame = first
        other = (f"frame {frame}" if source == s.source
                 else f"{source or '<memory>'}, frame {frame}")
        raise DataError(f"{s.where()}: field 'positions' duplicates {other} (same atoms at "
                        f"the same positions); remove the copy or {self.advice}")


def without_energies(structures: Sequence[Structure]) -> Sequence[Structure]:
    """`structures` with their energies dropped (forces-only use): a list is changed in place
    and returned; a lazy on-disk sequence gives a view that reads no energies."""
    if getattr(structures, "lazy", False):
        return structures.without_energies()
    for s in structures:
        s.energy = None
    return structures


def check_elements(structures: Sequence[Structure], elements: Sequence[int],
                   model: str = "the model") -> None:
    """Raise DataError if a structure holds an element the model (described by `model` in the
    message) was not trained on."""
    known = set(int(z) for z in elements)
    from e2ip.data.formats.hdf5 import OnDiskStructures

    if isinstance(structures, OnDiskStructures):  # from the stored composition, no frame read
        k = structures.first_outside(known)
        structures = [] if k is None else [structures[k]]
    for s in structures:
        unknown = sorted(set(int(z) for z in s.numbers) - known)
        if unknown:
            from ase.data import chemical_symbols

            names = ", ".join(chemical_symbols[z] for z in unknown)
            trained = ", ".join(chemical_symbols[z] for z in sorted(known))
            raise DataError(
                f"{s.where()}: element(s) {names} unknown to {model} (trained on {trained})"
            )
