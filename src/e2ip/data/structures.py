"""The in-memory structure record every reader returns (eV, Å, eV/Å inside)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from e2ip.errors import DataError

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




def to_structures(inputs) -> list[Structure]:
    """Normalise ase.Atoms / Structure / lists of them into a list of Structures."""
    if isinstance(inputs, Structure):
        return [inputs]
    from ase import Atoms

    if isinstance(inputs, Atoms):
        return [Structure.from_atoms(inputs)]
    out = []
    for k, item in enumerate(inputs):
        if isinstance(item, Structure):
            out.append(item)
        elif isinstance(item, Atoms):
            out.append(Structure.from_atoms(item, frame=k))
        else:
            raise TypeError(f"cannot predict on {type(item).__name__}; pass ase.Atoms or Structure")
    return out
