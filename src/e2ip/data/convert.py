"""``e2ip data convert`` / ``describe``: write structure files once into e2ip's HDF5 format
(:mod:`e2ip.data.formats.hdf5`), atomically, and summarise such a file.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from e2ip._version import __version__
from e2ip.data.formats.common import check_path
from e2ip.data.formats.hdf5 import (
    ATOM_CHUNK,
    COMPRESSIONS,
    FORMAT,
    FORMAT_VERSION,
    FRAME_CHUNK,
    READ_BLOCK,
    _h5py,
    open_structures,
)
from e2ip.data.read import iter_structures, source_units
from e2ip.data.structures import Structure
from e2ip.data.units import energy_factor, length_factor
from e2ip.data.validate import DuplicateFinder
from e2ip.errors import ConfigError


@dataclass
class ConvertSummary:
    """What :func:`convert` wrote: frames, atoms, elements (atomic numbers) and the file size
    (bytes)."""

    path: Path
    n_frames: int
    n_atoms: int
    elements: list[int]
    size_bytes: int
    inputs: list[dict[str, Any]] = field(default_factory=list)


class _Writer:
    """Appends structures to the resizable datasets of an open, writable h5py File."""

    def __init__(self, f, has_energy: bool, compression: str):
        self.f = f
        self.has_energy = has_energy
        opts: dict[str, Any] = {}
        if compression == "gzip":
            opts = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
        elif compression == "lzf":
            opts = {"compression": "lzf", "shuffle": True}
        self.opts = opts
        atoms, frames = f.create_group("atoms"), f.create_group("frames")
        self.numbers = self._create(atoms, "numbers", (), np.uint8, ATOM_CHUNK)
        self.positions = self._create(atoms, "positions", (3,), np.float64, ATOM_CHUNK)
        self.forces = self._create(atoms, "forces", (3,), np.float64, ATOM_CHUNK)
        self.offsets = frames.create_dataset("offsets", data=np.zeros(1, np.int64),
                                             maxshape=(None,), chunks=(FRAME_CHUNK,), **opts)
        self.cell = self._create(frames, "cell", (3, 3), np.float64, FRAME_CHUNK)
        self.pbc = self._create(frames, "pbc", (3,), np.uint8, FRAME_CHUNK)
        self.energy = self._create(frames, "energy", (), np.float64, FRAME_CHUNK)
        self.source = self._create(frames, "source", (), np.int32, FRAME_CHUNK)
        self.frame = self._create(frames, "frame", (), np.int64, FRAME_CHUNK)
        summary = f.create_group("summary")
        self.force_sq = self._create(summary, "force_sq_sum", (), np.float64, FRAME_CHUNK)
        self.n_frames = 0
        self.n_atoms = 0
        self.element_counts = np.zeros(119, dtype=np.int64)
        self.sources: dict[str, int] = {}

    def _create(self, group, name: str, tail: tuple[int, ...], dtype, chunk: int):
        return group.create_dataset(name, shape=(0, *tail), maxshape=(None, *tail), dtype=dtype,
                                    chunks=(chunk, *tail), **self.opts)

    @staticmethod
    def _append(ds, values: np.ndarray, start: int) -> None:
        ds.resize(start + len(values), axis=0)
        ds[start:start + len(values)] = values

    def append(self, structures: Sequence[Structure]) -> None:
        """Write `structures` (validated, eV and Å) after those written so far."""
        if not structures:
            return
        counts = np.array([s.n_atoms for s in structures], dtype=np.int64)
        numbers = np.concatenate([np.asarray(s.numbers, dtype=np.int64) for s in structures])
        a, f = self.n_atoms, self.n_frames
        self._append(self.numbers, numbers.astype(np.uint8), a)
        self._append(self.positions, np.concatenate([s.positions for s in structures]), a)
        forces = [np.asarray(s.forces, dtype=np.float64) for s in structures]
        self._append(self.forces, np.concatenate(forces), a)
        self._append(self.offsets, a + np.cumsum(counts), f + 1)
        self._append(self.cell, np.stack([np.asarray(s.cell, dtype=np.float64)
                                          for s in structures]), f)
        self._append(self.pbc, np.stack([np.asarray(s.pbc, dtype=bool)
                                         for s in structures]).astype(np.uint8), f)
        self._append(self.energy, np.array([np.nan if s.energy is None or not self.has_energy
                                            else s.energy for s in structures]), f)
        self._append(self.source, np.array([self.sources.setdefault(s.source, len(self.sources))
                                            for s in structures], dtype=np.int32), f)
        self._append(self.frame, np.array([s.frame for s in structures], dtype=np.int64), f)
        self._append(self.force_sq, np.array([float(np.sum(x * x)) for x in forces]), f)
        self.element_counts += np.bincount(numbers, minlength=119)
        self.n_atoms += int(counts.sum())
        self.n_frames += len(structures)

    def finish(self) -> list[int]:
        """Write the sources and the per-frame composition (a second pass over the atomic
        numbers, block by block); return the elements."""
        h5py = _h5py()
        names = sorted(self.sources, key=self.sources.__getitem__)
        self.f.create_dataset("sources", data=np.array(names, dtype=object),
                              dtype=h5py.string_dtype())
        elements = [int(z) for z in np.flatnonzero(self.element_counts)]
        self.f.create_dataset("summary/elements", data=np.array(elements, dtype=np.int64))
        column = np.full(256, -1, dtype=np.int64)
        column[elements] = np.arange(len(elements))
        n_el = max(len(elements), 1)
        comp = self.f.create_dataset("summary/composition", shape=(self.n_frames, len(elements)),
                                     dtype=np.int32, chunks=(max(1, min(FRAME_CHUNK,
                                                                        self.n_frames)), n_el),
                                     **self.opts)
        offsets = self.offsets
        block = 64 * READ_BLOCK
        for start in range(0, self.n_frames, block):
            stop = min(start + block, self.n_frames)
            off = offsets[start:stop + 1]
            numbers = self.numbers[off[0]:off[-1]].astype(np.int64)
            frame = np.repeat(np.arange(stop - start), np.diff(off))
            counts = np.bincount(frame * n_el + column[numbers], minlength=(stop - start) * n_el)
            comp[start:stop] = counts.reshape(stop - start, n_el)[:, :len(elements)]
        return elements


def _resolve_out(out: str | os.PathLike, inputs: Sequence[Path], overwrite: bool) -> Path:
    out = Path(out)
    if out.suffix.lower().lstrip(".") not in ("h5", "hdf5"):
        raise ConfigError(f"--out {out}: the output must end in .h5 or .hdf5")
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a directory, expected a file name ending in .h5")
    for path in inputs:
        if out.exists() and path.exists() and os.path.samefile(out, path):
            raise ConfigError(f"--out {out}: is also an input; write to another file")
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out}: exists; pass --overwrite to replace it (the old file "
                          "stays intact until the new one is complete)")
    return out


def convert(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
            energy_key: str | None = "energy", forces_key: str = "forces",
            energy_unit: str | None = None, length_unit: str | None = None,
            index: str | int | slice = ":", format: str | None = None,
            allow_duplicates: bool = False, overwrite: bool = False,
            compression: str = "gzip", chunk_frames: int = 1000,
            progress: bool = False) -> ConvertSummary:
    """Write the structures of `inputs` (read as :func:`~e2ip.data.read.read_structures`
    reads them, with these keys, units and frame selection `index`, applied to each input) into
    one HDF5 file `out`, in eV, Å and eV/Å.

    The inputs are streamed: at most `chunk_frames` frames are in memory at once (an npz input
    is read whole, as numpy reads it). Every frame is validated on the way, forces are required,
    energies too unless `energy_key` is None (or 'none'). Unless `allow_duplicates`, a frame
    that repeats an earlier one (of any input) is a DataError naming both. The file is written
    under a temporary name and renamed into place when complete; an existing `out` is replaced
    only with `overwrite`. compression: 'gzip' (default, readable by any HDF5 tool), 'lzf'
    (faster, h5py only) or 'none'. progress: a progress bar on stderr (when it is a terminal)."""
    h5py = _h5py()
    if isinstance(energy_key, str) and energy_key.strip().lower() in ("none", "null", ""):
        energy_key = None
    if compression not in COMPRESSIONS:
        raise ConfigError(f"compression {compression!r}: choose from {', '.join(COMPRESSIONS)}")
    if not inputs:
        raise ConfigError("no input files to convert")
    paths = [check_path(p) for p in inputs]  # every input readable before anything is written
    out = _resolve_out(out, paths, overwrite)
    for unit, factor in ((energy_unit, energy_factor), (length_unit, length_factor)):
        if unit is not None:
            factor(unit)  # ConfigError for an unknown unit, before any reading
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    duplicates = None if allow_duplicates else DuplicateFinder(
        advice="convert with --allow-duplicates")
    from tqdm import tqdm

    bar = tqdm(desc=f"converting to {out.name}", unit=" frames", disable=None if progress else True,
               file=sys.stderr, dynamic_ncols=True)
    records: list[dict[str, Any]] = []
    try:
        with h5py.File(tmp, "w", libver="earliest") as f:
            writer = _Writer(f, has_energy=energy_key is not None, compression=compression)
            for path in paths:
                before = writer.n_frames
                chunks = iter_structures(path, energy_key=energy_key or "energy",
                                         forces_key=forces_key, energy_unit=energy_unit,
                                         length_unit=length_unit, index=index,
                                         require_energy=energy_key is not None,
                                         require_forces=True, format=format,
                                         chunk_size=chunk_frames)
                for chunk in chunks:
                    for s in chunk if duplicates is not None else ():
                        duplicates.add(s)
                    writer.append(chunk)
                    bar.update(len(chunk))
                e_unit, l_unit = source_units(path, energy_unit, length_unit, format)
                records.append({"path": str(path), "frames": writer.n_frames - before,
                                "energy_unit": e_unit if energy_key is not None else None,
                                "length_unit": l_unit})
            elements = writer.finish()
            f.attrs.update({
                "format": FORMAT, "format_version": FORMAT_VERSION, "energy_unit": "eV",
                "length_unit": "Å", "forces_unit": "eV/Å", "n_frames": writer.n_frames,
                "n_atoms": writer.n_atoms, "has_energy": energy_key is not None,
                "duplicates_checked": not allow_duplicates, "e2ip_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "inputs": json.dumps(records, ensure_ascii=False),
                "options": json.dumps({"energy_key": energy_key, "forces_key": forces_key,
                                       "energy_unit": energy_unit, "length_unit": length_unit,
                                       "index": str(index)}, ensure_ascii=False),
            })
            n_frames, n_atoms = writer.n_frames, writer.n_atoms
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return ConvertSummary(path=out, n_frames=n_frames, n_atoms=n_atoms, elements=elements,
                          size_bytes=out.stat().st_size, inputs=records)


def describe(path: str | os.PathLike) -> str:
    """A few lines about an e2ip HDF5 file: frames, atoms, elements, units, inputs, size."""
    from ase.data import chemical_symbols

    s = open_structures(path, require_energy=False)
    info = s.info
    counts = s.composition().sum(axis=0)
    n_atoms = s.n_atoms()
    periodic = int(np.count_nonzero(s.periodic()))
    elements = ", ".join(f"{chemical_symbols[z]} {int(c)}" for z, c in
                         zip(s.file_elements, counts))
    low, high = int(n_atoms.min()), int(n_atoms.max())
    lines = [
        f"file        {path} ({human_size(Path(path).stat().st_size)}, format {info['format']} "
        f"version {info['format_version']}, e2ip {info.get('e2ip_version', '?')}, "
        f"written {info.get('created', '?')})",
        f"frames      {len(s)} ({periodic} periodic), atoms {int(n_atoms.sum())} "
        f"({low if low == high else f'{low} to {high}'} per frame)",
        f"elements    {elements}",
        f"units       {info['energy_unit']}, {info['length_unit']}, {info['forces_unit']}; "
        f"energies {'yes' if info.get('has_energy') else 'no (forces only)'}; duplicates "
        f"{'refused' if info.get('duplicates_checked') else 'not checked'} at conversion",
    ]
    if s.has_energy:
        e = s.energies()
        lines.append(f"energy      {e.min():.6g} to {e.max():.6g} eV; force RMS "
                     f"{s.force_rms():.4g} eV/Å")
    else:
        lines.append(f"force RMS   {s.force_rms():.4g} eV/Å")
    try:
        inputs = json.loads(info.get("inputs", "[]"))
    except ValueError:
        inputs = []
    for k, item in enumerate(inputs):
        units = ", ".join(u for u in (item.get("energy_unit"), item.get("length_unit")) if u)
        lines.append(f"{'source' if k == 0 else '':<12}{item.get('path')}: {item.get('frames')} "
                     f"frames, converted from {units}")
    return "\n".join(lines)


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
