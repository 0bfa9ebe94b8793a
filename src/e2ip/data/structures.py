"""The in-memory structure record every reader returns (eV, Å, eV/Å inside)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError

__all__ = ["DataError", "Structure"]


@dataclass
class Structure:
    """One atomic configuration.

    numbers: (N,) atomic numbers; positions: (N, 3) Å; cell: (3, 3) Å rows are lattice vectors
    (zeros when not periodic); pbc: (3,) bool; energy: eV or None; forces: (N, 3) eV/Å or None.
    """

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))
    pbc: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=bool))
    energy: float | None = None
    forces: np.ndarray | None = None
    source: str = ""
    frame: int = 0

    @property
    def n_atoms(self) -> int:
        return len(self.numbers)

    def where(self) -> str:
        return f"{self.source or '<memory>'}, frame {self.frame}"

    @classmethod
    def from_atoms(cls, atoms, energy: float | None = None, forces=None, source="", frame=0):
        return cls(
            numbers=np.asarray(atoms.numbers, dtype=np.int64),
            positions=np.asarray(atoms.positions, dtype=np.float64),
            cell=np.asarray(atoms.cell.array, dtype=np.float64),
            pbc=np.asarray(atoms.pbc, dtype=bool),
            energy=energy,
            forces=None if forces is None else np.asarray(forces, dtype=np.float64),
            source=source,
            frame=frame,
        )

    def to_atoms(self):
        from ase import Atoms

        return Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)
