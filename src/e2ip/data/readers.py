"""Readers: extended XYZ (and anything ASE reads), rMD17 npz and sGDML/MD17/MD22 npz.

Every reader returns a list of :class:`Structure` in eV, Å and eV/Å, validated: a problem raises
:class:`DataError` naming the file, frame and field.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .structures import DataError, Structure
from .units import energy_factor, length_factor

#: closest allowed distance between two atoms (Å)
MIN_DISTANCE = 0.1

RMD17_KEYS = ("nuclear_charges", "coords", "energies", "forces")
SGDML_KEYS = ("z", "R", "E", "F")


def read_structures(
    path: str | os.PathLike,
    *,
    energy_key: str = "energy",
    forces_key: str = "forces",
    energy_unit: str | None = None,
    length_unit: str | None = None,
    index: str | int | slice = ":",
    require_energy: bool = True,
    require_forces: bool = True,
    format: str | None = None,
) -> list[Structure]:
    """Read structures from `path` and convert them to eV, Å, eV/Å.

    npz files are recognised by their keys (rMD17: `nuclear_charges, coords, energies, forces`;
    sGDML: `z, R, E, F`, whose `e_unit`/`r_unit` entries are honoured). The default units are
    kcal/mol and Å for npz files (as published) and eV, Å for everything else.
    Energies and forces of other files come from `atoms.info[energy_key]` /
    `atoms.arrays[forces_key]`, or from an attached ASE calculator's results.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a data file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    if (format or path.suffix.lower().lstrip(".")) == "npz":
        structures = _read_npz(path, energy_unit, length_unit, require_energy, require_forces)
        if index != ":":
            sel = _index_to_slice(index)
            structures = structures[sel] if isinstance(sel, slice) else [structures[sel]]
    else:
        structures = _read_ase(
            path, energy_key, forces_key, energy_unit or "eV", length_unit or "Å", index,
            require_energy, require_forces, format,
        )
    if not structures:
        raise DataError(f"{path}: contains no structures")
    for s in structures:
        validate_structure(s, require_energy=require_energy, require_forces=require_forces)
    return structures


def _index_to_slice(index):
    if isinstance(index, str):
        if ":" in index:
            parts = [int(p) if p else None for p in index.split(":")]
            return slice(*parts)
        return int(index)
    return index


def _frame_numbers(index, count: int) -> list[int]:
    """Frame numbers in the file of the `count` frames selected by `index` (positions within the
    selection where the file's length would be needed, i.e. for negative indices)."""
    sel = _index_to_slice(index)
    if isinstance(sel, int):
        return [sel] if sel >= 0 else list(range(count))
    start, step = sel.start or 0, sel.step or 1
    if start >= 0 and step > 0:
        return [start + k * step for k in range(count)]
    return list(range(count))


def _read_npz(path, energy_unit, length_unit, require_energy, require_forces):
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any failure to parse is a data error
        raise DataError(f"{path}: not a readable npz file ({exc})") from None
    keys = set(data.files)
    if set(RMD17_KEYS[:2]) <= keys:
        z_key, r_key, e_key, f_key = RMD17_KEYS
    elif set(SGDML_KEYS[:2]) <= keys:
        z_key, r_key, e_key, f_key = SGDML_KEYS
    else:
        raise DataError(
            f"{path}: unknown npz layout (keys {sorted(keys)}); expected rMD17 "
            f"{list(RMD17_KEYS)} or sGDML/MD17/MD22 {list(SGDML_KEYS)}"
        )
    if energy_unit is None:
        energy_unit = str(data["e_unit"]) if "e_unit" in keys else "kcal/mol"
    if length_unit is None:
        length_unit = str(data["r_unit"]) if "r_unit" in keys else "Å"
    ef, lf = energy_factor(energy_unit), length_factor(length_unit)
    numbers = np.asarray(data[z_key]).astype(np.int64).reshape(-1)
    coords = np.asarray(data[r_key], dtype=np.float64)
    if coords.ndim == 2:
        coords = coords[None]
    if coords.ndim != 3 or coords.shape[1:] != (len(numbers), 3):
        raise DataError(
            f"{path}: field '{r_key}' has shape {coords.shape}, expected (frames, {len(numbers)}, 3)"
        )
    n_frames = coords.shape[0]
    energies = forces = None
    if e_key in keys:
        energies = np.asarray(data[e_key], dtype=np.float64).reshape(-1)
        if len(energies) != n_frames:
            raise DataError(f"{path}: field '{e_key}' has {len(energies)} values for {n_frames} frames")
    elif require_energy:
        raise DataError(f"{path}: field '{e_key}' (energies) is missing")
    if f_key in keys:
        forces = np.asarray(data[f_key], dtype=np.float64)
        if forces.shape != coords.shape:
            raise DataError(f"{path}: field '{f_key}' has shape {forces.shape}, expected {coords.shape}")
    elif require_forces:
        raise DataError(f"{path}: field '{f_key}' (forces) is missing")
    out = []
    for k in range(n_frames):
        out.append(
            Structure(
                numbers=numbers.copy(),
                positions=coords[k] * lf,
                energy=None if energies is None else float(energies[k] * ef),
                forces=None if forces is None else forces[k] * (ef / lf),
                source=str(path),
                frame=k,
            )
        )
    return out


def _read_ase(path, energy_key, forces_key, energy_unit, length_unit, index, require_energy,
              require_forces, format):
    import ase.io

    try:
        frames = ase.io.read(str(path), index=index, format=format)
    except StopIteration:
        raise DataError(f"{path}: contains no structures") from None
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: could not be read by ASE ({type(exc).__name__}: {exc})") from None
    if not isinstance(frames, list):
        frames = [frames]
    ef, lf = energy_factor(energy_unit), length_factor(length_unit)
    out = []
    for k, atoms in zip(_frame_numbers(index, len(frames)), frames):
        energy = _get_energy(atoms, energy_key)
        forces = _get_forces(atoms, forces_key)
        if energy is None and require_energy:
            raise DataError(
                f"{path}, frame {k}: no energy under key '{energy_key}' "
                f"(info keys: {sorted(atoms.info)}); set data.energy_key in the config "
                "or --energy-key on the command line"
            )
        if forces is None and require_forces:
            raise DataError(
                f"{path}, frame {k}: no forces under key '{forces_key}' "
                f"(per-atom arrays: {sorted(atoms.arrays)}); set data.forces_key in the config "
                "or --forces-key on the command line"
            )
        s = Structure.from_atoms(atoms, source=str(path), frame=k)
        s.positions = s.positions * lf
        s.cell = s.cell * lf
        s.energy = None if energy is None else energy * ef
        s.forces = None if forces is None else forces * (ef / lf)
        out.append(s)
    return out


def _get_energy(atoms, key: str) -> float | None:
    if key in atoms.info:
        return float(atoms.info[key])
    calc = atoms.calc
    if calc is not None and key in ("energy", "free_energy") and key in calc.results:
        return float(calc.results[key])
    return None


def _get_forces(atoms, key: str) -> np.ndarray | None:
    if key in atoms.arrays:
        return np.asarray(atoms.arrays[key], dtype=np.float64)
    calc = atoms.calc
    if calc is not None and key == "forces" and "forces" in calc.results:
        return np.asarray(calc.results["forces"], dtype=np.float64)
    return None


def validate_structure(s: Structure, *, require_energy: bool = True, require_forces: bool = True,
                       min_distance: float = MIN_DISTANCE) -> None:
    """Raise DataError if `s` has NaNs, wrong shapes, unknown elements or overlapping atoms."""
    where = s.where()
    n = len(s.numbers)
    if n == 0:
        raise DataError(f"{where}: structure has no atoms")
    if s.positions.shape != (n, 3):
        raise DataError(f"{where}: field 'positions' has shape {s.positions.shape}, expected ({n}, 3)")
    if not np.all(np.isfinite(s.positions)):
        raise DataError(f"{where}: field 'positions' contains NaN or inf")
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
    if np.any(s.pbc) and abs(np.linalg.det(s.cell)) < 1e-8:
        raise DataError(f"{where}: field 'cell' is singular but pbc={s.pbc.tolist()}")
    if n > 1:
        from .neighbors import neighbor_list

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


def check_elements(structures: Sequence[Structure], elements: Sequence[int],
                   model: str = "the model") -> None:
    """Raise DataError if a structure holds an element the model (described by `model` in the
    message) was not trained on."""
    known = set(int(z) for z in elements)
    for s in structures:
        unknown = sorted(set(int(z) for z in s.numbers) - known)
        if unknown:
            from ase.data import chemical_symbols

            names = ", ".join(chemical_symbols[z] for z in unknown)
            trained = ", ".join(chemical_symbols[z] for z in sorted(known))
            raise DataError(
                f"{s.where()}: element(s) {names} unknown to {model} (trained on {trained})"
            )
