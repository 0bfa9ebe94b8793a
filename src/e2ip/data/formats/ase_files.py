"""Structures from anything ASE reads (extended XYZ: energy and forces keys, units), validated."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from e2ip.data.formats.common import frame_number, frame_numbers
from e2ip.data.structures import DataError, Structure
from e2ip.data.units import energy_factor, length_factor
from e2ip.data.validate import validate_structure
from e2ip.errors import first_line

if TYPE_CHECKING:
    pass


#: bytes that are not UTF-8, as decoded with errors="surrogateescape"
_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def _ase_format(path: Path, format: str | None) -> str | None:
    """The ASE format name of `path` (`format`, else ASE's guess; None if it cannot tell)."""
    if format is not None:
        return format
    from ase.io.formats import filetype

    try:
        return filetype(str(path), guess=True)
    except Exception:  # noqa: BLE001 - ASE's own read reports unknown types
        return None


def _check_xyz_counts(path: Path) -> None:
    """Walk the atom-count lines of an (extended) XYZ file as ASE does, and raise DataError
    naming the frame when a line is not UTF-8 text, or a count is not a whole number >= 0 or
    promises more lines than the file has: ASE itself loops over a count such as 10^12 (a
    corrupted file) for hours."""
    with open(path, encoding="utf-8", errors="surrogateescape") as stream:
        frame, lineno = 0, 0

        def next_line() -> str | None:
            nonlocal lineno
            line = next(stream, None)
            if line is not None:
                lineno += 1
                if not line.isascii() and _NOT_UTF8.search(line):
                    raise DataError(f"{path}, frame {frame}: line {lineno} is not UTF-8 text")
            return line

        line = next_line()
        while line is not None and line.strip():
            try:
                natoms = int(line)
            except ValueError:
                raise DataError(f"{path}, frame {frame}: line {lineno} should give the number of "
                                f"atoms, got {line.strip()[:40]!r}") from None
            if natoms < 0:
                raise DataError(f"{path}, frame {frame}: line {lineno} gives {natoms} atoms")
            count_line = lineno
            for _ in range(natoms + 1):  # the comment line, then one line per atom
                if next_line() is None:
                    raise DataError(f"{path}, frame {frame}: line {count_line} announces {natoms} "
                                    "atoms, but the file ends before them (truncated?)")
            line = next_line()
            while line is not None and line.lstrip().startswith("VEC"):
                line = next_line()
            frame += 1


def _failing_frame(path: Path, format: str | None) -> int | None:
    """The number of the first frame ASE cannot read (reading frame by frame), or None."""
    import ase.io

    count = 0
    try:
        for _ in ase.io.iread(str(path), index=":", format=format):
            count += 1
    except Exception:  # noqa: BLE001 - this is the frame that fails
        return count
    return None


def read_ase(path, energy_key, forces_key, energy_unit, length_unit, index, require_energy,
              require_forces, format):
    import ase.io

    if _ase_format(path, format) in ("extxyz", "xyz"):
        _check_xyz_counts(path)
    try:
        frames = ase.io.read(str(path), index=index, format=format)
    except StopIteration:
        raise DataError(f"{path}: contains no structures") from None
    except Exception as exc:  # noqa: BLE001
        frame = _failing_frame(path, format)
        where = f"{path}" if frame is None else f"{path}, frame {frame}"
        raise DataError(f"{where}: could not be read by ASE "
                    f"({first_line(exc, 200, with_type=True)})") from None
    if not isinstance(frames, list):
        frames = [frames]
    ef, lf = energy_factor(energy_unit), length_factor(length_unit)
    return [_ase_structure(atoms, path, k, energy_key, forces_key, ef, lf, require_energy,
                           require_forces)
            for k, atoms in zip(frame_numbers(index, len(frames)), frames)]


def iter_ase(path: Path, energy_key, forces_key, energy_unit, length_unit, sel, require_energy,
              require_forces, format, chunk_size: int) -> Iterator[list[Structure]]:
    """:func:`read_ase` frame by frame (`ase.io.iread`, the reader `ase.io.read` uses too),
    validated and yielded in lists of at most `chunk_size`."""
    import ase.io

    if _ase_format(path, format) in ("extxyz", "xyz"):
        _check_xyz_counts(path)
    ef, lf = energy_factor(energy_unit), length_factor(length_unit)
    frames = ase.io.iread(str(path), index=sel, format=format)
    chunk: list[Structure] = []
    count = 0
    while True:
        try:
            atoms = next(frames)
        except StopIteration:
            break
        except Exception as exc:  # noqa: BLE001
            frame = _failing_frame(path, format)
            where = f"{path}" if frame is None else f"{path}, frame {frame}"
            raise DataError(f"{where}: could not be read by ASE "
                    f"({first_line(exc, 200, with_type=True)})") from None
        s = _ase_structure(atoms, path, frame_number(sel, count), energy_key, forces_key, ef,
                           lf, require_energy, require_forces)
        validate_structure(s, require_energy=require_energy, require_forces=require_forces)
        chunk.append(s)
        count += 1
        if len(chunk) >= chunk_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
    if not count:
        raise DataError(f"{path}: contains no structures")


def _ase_structure(atoms, path: Path, k: int, energy_key: str, forces_key: str, ef: float,
                   lf: float, require_energy: bool, require_forces: bool) -> Structure:
    """Frame `k` of `path` (ASE Atoms) as a Structure in eV and Å (`ef`, `lf`: the factors of
    the file's energy and length units)."""
    energy = _get_energy(atoms, energy_key, f"{path}, frame {k}")
    forces = _get_forces(atoms, forces_key, f"{path}, frame {k}")
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
    return s


def _get_energy(atoms, key: str, where: str) -> float | None:
    value = None
    if key in atoms.info:
        value = atoms.info[key]
    elif atoms.calc is not None and key in ("energy", "free_energy") and key in atoms.calc.results:
        value = atoms.calc.results[key]
    if value is None:
        return None
    array = np.asarray(value)
    problem = DataError(f"{where}: field '{key}' must be one number, got {str(value)[:80]!r}")
    if array.size != 1 or array.dtype.kind not in "iufUS":
        raise problem
    try:
        return float(array.reshape(()))  # a number, or text that reads as one
    except (TypeError, ValueError):
        raise problem from None


def _get_forces(atoms, key: str, where: str) -> np.ndarray | None:
    value = None
    if key in atoms.arrays:
        value = atoms.arrays[key]
    elif atoms.calc is not None and key == "forces" and "forces" in atoms.calc.results:
        value = atoms.calc.results["forces"]
    if value is None:
        return None
    array = np.asarray(value)
    if array.dtype.kind not in "iuf":
        raise DataError(f"{where}: field '{key}' holds {array.dtype} values, expected numbers")
    return array.astype(np.float64)
