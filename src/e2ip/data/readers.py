"""Readers: extended XYZ (and anything ASE reads), rMD17 npz and sGDML/MD17/MD22 npz, and e2ip's
own HDF5 files (:mod:`e2ip.data.ondisk`, written by `e2ip data convert`).

Every reader returns a list of :class:`Structure` in eV, Å and eV/Å, validated: a problem raises
:class:`DataError` naming the file, frame and field. An HDF5 file gives a lazy
:class:`~e2ip.data.ondisk.OnDiskStructures` instead, which reads each frame when asked for it.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError, first_line, shorten
from .neighbors import is_singular, periodic_widths
from .structures import DataError, Structure
from .units import energy_factor, length_factor

if TYPE_CHECKING:
    from .ondisk import OnDiskStructures

#: closest allowed distance between two atoms (Å)
MIN_DISTANCE = 0.1
#: largest allowed |coordinate| of a position or cell vector (Å): a float32 model resolves
#: positions near 1e6 Å to 0.06 Å only, and at 5e7 Å bonded atoms fall on the same float32 value
#: (NaN predictions)
MAX_COORDINATE = 1e6
#: bytes that are not UTF-8, as decoded with errors="surrogateescape"
_NOT_UTF8 = re.compile("[\udc80-\udcff]")

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
) -> list[Structure] | OnDiskStructures:
    """Read structures from `path` and convert them to eV, Å, eV/Å.

    An e2ip HDF5 file (`.h5`, `.hdf5`, written by `e2ip data convert`) is opened lazily: the
    result is an :class:`~e2ip.data.ondisk.OnDiskStructures` (a sequence that reads a frame
    when it is asked for), already in eV and Å; a unit other than those is refused, the keys
    are ignored (they were applied at conversion).

    npz files are recognised by their keys (rMD17: `nuclear_charges, coords, energies, forces`;
    sGDML: `z, R, E, F`, whose `e_unit`/`r_unit` entries are honoured). The default units are
    kcal/mol and Å for npz files (as published) and eV, Å for everything else.
    Energies and forces of other files come from `atoms.info[energy_key]` /
    `atoms.arrays[forces_key]`, or from an attached ASE calculator's results.
    """
    path = _check_path(path)
    sel = _index_to_slice(index)
    if is_ondisk_path(path, format):
        from .ondisk import open_structures

        return open_structures(path, index=sel, energy_unit=energy_unit, length_unit=length_unit,
                               require_energy=require_energy, require_forces=require_forces)
    if (format or path.suffix.lower().lstrip(".")) == "npz":
        structures = _read_npz(path, energy_unit, length_unit, require_energy, require_forces)
        if isinstance(sel, int):
            if not -len(structures) <= sel < len(structures):
                raise DataError(f"{path}: frame {sel} asked for (index), but the file has "
                                f"{len(structures)} frames")
            structures = [structures[sel]]
        else:
            structures = structures[sel]
    else:
        structures = _read_ase(
            path, energy_key, forces_key, "eV" if energy_unit is None else energy_unit,
            "Å" if length_unit is None else length_unit, sel,
            require_energy, require_forces, format,
        )
    if not structures:
        raise DataError(f"{path}: contains no structures")
    for s in structures:
        validate_structure(s, require_energy=require_energy, require_forces=require_forces)
    return structures


def iter_structures(
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
    chunk_size: int = 1000,
) -> Iterator[list[Structure]]:
    """:func:`read_structures` in pieces: the same validated structures (eV, Å, eV/Å), yielded
    in lists of at most `chunk_size`, so a large file never has to be held in memory at once.

    Files ASE reads are streamed frame by frame (`ase.io.iread`); an npz file is read whole
    (numpy cannot read part of an npz member) and handed out in pieces; an e2ip HDF5 file
    (:mod:`e2ip.data.ondisk`) is read piece by piece."""
    path = _check_path(path)
    sel = _index_to_slice(index)
    if is_ondisk_path(path, format) or (format or path.suffix.lower().lstrip(".")) == "npz":
        structures = read_structures(
            path, energy_key=energy_key, forces_key=forces_key, energy_unit=energy_unit,
            length_unit=length_unit, index=sel, require_energy=require_energy,
            require_forces=require_forces, format=format)
        for start in range(0, len(structures), chunk_size):
            yield list(structures[start:start + chunk_size])
        return
    yield from _iter_ase(path, energy_key, forces_key,
                         "eV" if energy_unit is None else energy_unit,
                         "Å" if length_unit is None else length_unit, sel,
                         require_energy, require_forces, format, chunk_size)


#: file name endings of e2ip's on-disk (HDF5) structure files
ONDISK_SUFFIXES = ("h5", "hdf5")


def is_ondisk_path(path: str | os.PathLike, format: str | None = None) -> bool:
    """Whether `path` names an e2ip HDF5 structure file (by `format`, else by its ending)."""
    return (format or Path(path).suffix.lower().lstrip(".")) in ONDISK_SUFFIXES


def _check_path(path: str | os.PathLike) -> Path:
    """`path` as a Path; DataError when it is missing, a directory, empty or unreadable."""
    path = Path(path)
    try:
        exists, is_dir = path.exists(), path.is_dir()
        empty = exists and not is_dir and path.stat().st_size == 0
    except (OSError, ValueError) as exc:  # permissions, a name the OS refuses, ...
        raise DataError(f"{path}: cannot be read ({exc})") from None
    if not exists:
        raise DataError(f"{path}: file not found")
    if is_dir:
        raise DataError(f"{path}: is a directory, expected a data file")
    if empty:
        raise DataError(f"{path}: file is empty")
    return path


def source_units(path: str | os.PathLike, energy_unit: str | None = None,
                 length_unit: str | None = None, format: str | None = None) -> tuple[str, str]:
    """The energy and length units :func:`read_structures` takes the file `path` to be in with
    these options (an npz file's own `e_unit`/`r_unit` entries included)."""
    path = Path(path)
    if is_ondisk_path(path, format):
        return "eV", "Å"
    if (format or path.suffix.lower().lstrip(".")) != "npz":
        return energy_unit or "eV", length_unit or "Å"
    energy, length = energy_unit or "kcal/mol", length_unit or "Å"
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            if energy_unit is None and "e_unit" in keys:  # as _npz_structures reads them
                energy = str(np.asarray(data["e_unit"]).tolist())
            if length_unit is None and "r_unit" in keys:
                length = str(np.asarray(data["r_unit"]).tolist())
    except Exception:  # noqa: BLE001 - the units are only recorded; reading reports problems
        pass
    return energy, length


def _index_to_slice(index: str | int | slice) -> int | slice:
    """The frame selection `index` (an int, a slice, or text such as '5', ':100', '::10') as an
    int or slice; a ConfigError for anything else."""
    problem = (f"index {index!r}: expected a frame number or a slice such as ':100', '10:20' "
               "or '::10'")
    if isinstance(index, str):
        parts = index.strip().split(":")
        if len(parts) > 3:
            raise ConfigError(problem)
        try:
            numbers = [int(p) if p.strip() else None for p in parts]
        except ValueError:
            raise ConfigError(problem) from None
        index = numbers[0] if len(parts) == 1 else slice(*numbers)
        if index is None:
            raise ConfigError(problem)
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer, slice)):
        raise ConfigError(problem)
    if isinstance(index, slice):
        for part in (index.start, index.stop, index.step):
            if part is not None and not isinstance(part, (int, np.integer)):
                raise ConfigError(problem)
        if index.step == 0:
            raise ConfigError(f"index {index!r}: the step of a slice cannot be 0")
        return index
    return int(index)


def _frame_numbers(index, count: int) -> list[int]:
    """Frame numbers in the file of the `count` frames selected by `index` (positions within the
    selection where the file's length would be needed, i.e. for negative indices)."""
    sel = _index_to_slice(index)
    return [_frame_number(sel, k) for k in range(count)]


def _frame_number(sel: int | slice, k: int) -> int:
    """The frame number in the file of the k-th frame selected by `sel` (its position k in the
    selection where the file's length would be needed, i.e. for negative indices)."""
    if isinstance(sel, int):
        return sel if sel >= 0 else k
    start, step = sel.start or 0, sel.step or 1
    if start >= 0 and step > 0:
        return start + k * step
    return k


def _npz_field(data, key: str, path, kinds: str = "iuf") -> np.ndarray:
    """Array `key` of an open npz file, checked to hold numbers of the dtype kinds `kinds`."""
    try:
        array = np.asarray(data[key])
    except Exception as exc:  # noqa: BLE001 - object arrays, corrupted members, ...
        raise DataError(f"{path}: field '{key}' cannot be read ({first_line(exc)})") from None
    if array.dtype.kind not in kinds:
        raise DataError(f"{path}: field '{key}' holds {array.dtype} values, expected numbers")
    return array


def _npz_unit(data, key: str, path, factor) -> float:
    """The conversion factor of the unit named by the npz entry `key` (e_unit, r_unit)."""
    array = _npz_field(data, key, path, kinds="USO")
    unit = array.item() if array.size == 1 else array.tolist()
    if isinstance(unit, bytes):
        unit = unit.decode("utf-8", errors="replace")
    if not isinstance(unit, str):
        raise DataError(f"{path}: field '{key}' must name a unit, got {unit!r}")
    try:
        return factor(unit)
    except ConfigError as exc:
        raise DataError(f"{path}: field '{key}': {exc}") from None


def _read_npz(path, energy_unit, length_unit, require_energy, require_forces):
    try:
        data = np.load(path, allow_pickle=False)
        keys = set(data.files)
    except Exception as exc:  # noqa: BLE001 - any failure to parse is a data error
        raise DataError(f"{path}: not a readable npz file ({exc})") from None
    with data:
        return _npz_structures(data, keys, path, energy_unit, length_unit, require_energy,
                               require_forces)


def _npz_structures(data, keys: set[str], path, energy_unit, length_unit, require_energy,
                    require_forces) -> list[Structure]:
    """The structures of an open npz file (rMD17 or sGDML layout), unit-converted."""
    if set(RMD17_KEYS[:2]) <= keys:
        z_key, r_key, e_key, f_key = RMD17_KEYS
    elif set(SGDML_KEYS[:2]) <= keys:
        z_key, r_key, e_key, f_key = SGDML_KEYS
    else:
        raise DataError(
            f"{path}: unknown npz layout (keys {sorted(keys)}); expected rMD17 "
            f"{list(RMD17_KEYS)} or sGDML/MD17/MD22 {list(SGDML_KEYS)}"
        )
    if energy_unit is None and "e_unit" in keys:
        ef = _npz_unit(data, "e_unit", path, energy_factor)
    else:
        ef = energy_factor("kcal/mol" if energy_unit is None else energy_unit)
    if length_unit is None and "r_unit" in keys:
        lf = _npz_unit(data, "r_unit", path, length_factor)
    else:
        lf = length_factor("Å" if length_unit is None else length_unit)
    z = _npz_field(data, z_key, path).reshape(-1)
    known = np.isfinite(z) & (z == np.round(z)) & (z >= 1) & (z <= 118)
    if not known.all():
        bad = sorted({float(v) if z.dtype.kind == "f" else int(v) for v in z[~known]})
        raise DataError(f"{path}: field '{z_key}' has unknown element(s) {bad[:5]} "
                        "(atomic numbers 1 to 118 expected)")
    numbers = z.astype(np.int64)
    coords = _npz_field(data, r_key, path).astype(np.float64)
    if coords.ndim == 2:
        coords = coords[None]
    if coords.ndim != 3 or coords.shape[1:] != (len(numbers), 3):
        raise DataError(
            f"{path}: field '{r_key}' has shape {coords.shape}, expected (frames, {len(numbers)}, 3) "
            f"for the {len(numbers)} atoms of field '{z_key}'"
        )
    n_frames = coords.shape[0]
    energies = forces = None
    if e_key in keys:
        energies = _npz_field(data, e_key, path).astype(np.float64).reshape(-1)
        if len(energies) != n_frames:
            raise DataError(f"{path}: field '{e_key}' has {len(energies)} values for {n_frames} frames")
    elif require_energy:
        raise DataError(f"{path}: field '{e_key}' (energies) is missing")
    if f_key in keys:
        forces = _npz_field(data, f_key, path).astype(np.float64)
        if forces.shape != coords.shape:
            raise DataError(f"{path}: field '{f_key}' has shape {forces.shape}, expected {coords.shape}")
    elif require_forces:
        raise DataError(f"{path}: field '{f_key}' (forces) is missing")
    out = []
    with np.errstate(over="ignore", invalid="ignore"):  # overflow becomes inf: validated below
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


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, at most `limit` characters."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return shorten(f"{type(exc).__name__}: {first}" if first else type(exc).__name__, limit)


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


def _read_ase(path, energy_key, forces_key, energy_unit, length_unit, index, require_energy,
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
        raise DataError(f"{where}: could not be read by ASE ({_one_line(exc)})") from None
    if not isinstance(frames, list):
        frames = [frames]
    ef, lf = energy_factor(energy_unit), length_factor(length_unit)
    return [_ase_structure(atoms, path, k, energy_key, forces_key, ef, lf, require_energy,
                           require_forces)
            for k, atoms in zip(_frame_numbers(index, len(frames)), frames)]


def _iter_ase(path: Path, energy_key, forces_key, energy_unit, length_unit, sel, require_energy,
              require_forces, format, chunk_size: int) -> Iterator[list[Structure]]:
    """:func:`_read_ase` frame by frame (`ase.io.iread`, the reader `ase.io.read` uses too),
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
            raise DataError(f"{where}: could not be read by ASE ({_one_line(exc)})") from None
        s = _ase_structure(atoms, path, _frame_number(sel, count), energy_key, forces_key, ef,
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
    from .ondisk import OnDiskStructures

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
