"""Readers: extended XYZ (and anything ASE reads), rMD17 npz and sGDML/MD17/MD22 npz, and e2ip's
own HDF5 files (:mod:`e2ip.data.formats.hdf5`, written by `e2ip data convert`).

Every reader returns a list of :class:`Structure` in eV, Å and eV/Å, validated: a problem raises
:class:`DataError` naming the file, frame and field. An HDF5 file gives a lazy
:class:`~e2ip.data.formats.hdf5.OnDiskStructures` instead, which reads each frame when asked for it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from e2ip.data.formats.ase_files import iter_ase, read_ase
from e2ip.data.formats.common import check_path, index_to_slice
from e2ip.data.formats.npz import read_npz
from e2ip.data.structures import DataError, Structure
from e2ip.data.validate import validate_structure

if TYPE_CHECKING:
    from e2ip.data.formats.hdf5 import OnDiskStructures


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
    result is an :class:`~e2ip.data.formats.hdf5.OnDiskStructures` (a sequence that reads a frame
    when it is asked for), already in eV and Å; a unit other than those is refused, the keys
    are ignored (they were applied at conversion).

    npz files are recognised by their keys (rMD17: `nuclear_charges, coords, energies, forces`;
    sGDML: `z, R, E, F`, whose `e_unit`/`r_unit` entries are honoured). The default units are
    kcal/mol and Å for npz files (as published) and eV, Å for everything else.
    Energies and forces of other files come from `atoms.info[energy_key]` /
    `atoms.arrays[forces_key]`, or from an attached ASE calculator's results.
    """
    path = check_path(path)
    sel = index_to_slice(index)
    if is_ondisk_path(path, format):
        from e2ip.data.formats.hdf5 import open_structures

        return open_structures(path, index=sel, energy_unit=energy_unit, length_unit=length_unit,
                               require_energy=require_energy, require_forces=require_forces)
    if (format or path.suffix.lower().lstrip(".")) == "npz":
        structures = read_npz(path, energy_unit, length_unit, require_energy, require_forces)
        if isinstance(sel, int):
            if not -len(structures) <= sel < len(structures):
                raise DataError(f"{path}: frame {sel} asked for (index), but the file has "
                                f"{len(structures)} frames")
            structures = [structures[sel]]
        else:
            structures = structures[sel]
    else:
        structures = read_ase(
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
    (:mod:`e2ip.data.formats.hdf5`) is read piece by piece."""
    path = check_path(path)
    sel = index_to_slice(index)
    if is_ondisk_path(path, format) or (format or path.suffix.lower().lstrip(".")) == "npz":
        structures = read_structures(
            path, energy_key=energy_key, forces_key=forces_key, energy_unit=energy_unit,
            length_unit=length_unit, index=sel, require_energy=require_energy,
            require_forces=require_forces, format=format)
        for start in range(0, len(structures), chunk_size):
            yield list(structures[start:start + chunk_size])
        return
    yield from iter_ase(path, energy_key, forces_key,
                         "eV" if energy_unit is None else energy_unit,
                         "Å" if length_unit is None else length_unit, sel,
                         require_energy, require_forces, format, chunk_size)


#: file name endings of e2ip's on-disk (HDF5) structure files
ONDISK_SUFFIXES = ("h5", "hdf5")


def is_ondisk_path(path: str | os.PathLike, format: str | None = None) -> bool:
    """Whether `path` names an e2ip HDF5 structure file (by `format`, else by its ending)."""
    return (format or Path(path).suffix.lower().lstrip(".")) in ONDISK_SUFFIXES


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
