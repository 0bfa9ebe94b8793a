"""Structure sets larger than memory: an HDF5 file written once by `e2ip data convert`
(:func:`e2ip.data.convert.convert`), read lazily frame by frame (:class:`OnDiskStructures`).

Layout (format ``e2ip-structures``, version 1; everything in eV, Å and eV/Å; F frames, A atoms
in all, Z elements). Per-atom arrays are concatenated over the frames, and frame k owns the atoms
``offsets[k]:offsets[k + 1]``::

    /                      attrs: format, format_version, energy_unit, length_unit,
                           forces_unit, n_frames, n_atoms, has_energy, duplicates_checked,
                           e2ip_version, created, inputs (JSON: file, units, frames per input)
    /atoms/numbers         (A,) uint8        atomic numbers
    /atoms/positions       (A, 3) float64    Å
    /atoms/forces          (A, 3) float64    eV/Å
    /frames/offsets        (F + 1,) int64    first atom of each frame, then A
    /frames/cell           (F, 3, 3) float64 Å, rows are lattice vectors (zeros if not periodic)
    /frames/pbc            (F, 3) uint8      periodic axes (0/1)
    /frames/energy         (F,) float64      eV (NaN when has_energy is false)
    /frames/source         (F,) int32        index into /sources
    /frames/frame          (F,) int64        frame number within that source
    /sources               (S,) str          the file each frame was read from (for messages)
    /summary/elements      (Z,) int64        sorted atomic numbers present
    /summary/composition   (F, Z) int32      atoms of each element per frame
    /summary/force_sq_sum  (F,) float64      sum over the frame's atoms of |F|^2, (eV/Å)^2

Every dataset is chunked and compressed (gzip with the shuffle filter, readable by any HDF5
tool). The summaries let training pick elements, fit reference energies and scale forces
without reading a single frame. The file is written to a temporary name beside the output and
renamed into place when complete, so a failed or interrupted conversion never leaves a partial
file under the output's name.

Reading: h5py file handles must not cross a fork, so each process opens the file on its first
access (handles are kept per process id); views and the DataLoader's worker copies carry only
the path and frame numbers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from e2ip.data.formats.common import check_path
from e2ip.data.structures import DataError, Structure
from e2ip.data.units import energy_factor, length_factor
from e2ip.errors import ConfigError, first_line, short_repr

FORMAT = "e2ip-structures"


FORMAT_VERSION = 1


#: atoms per HDF5 chunk of the per-atom arrays (96 KiB of float64 positions: a random frame
#: read decompresses little more than its own atoms)
ATOM_CHUNK = 4096


#: frames per HDF5 chunk of the per-frame arrays
FRAME_CHUNK = 4096


#: frames read per block when a contiguous run of frames (or a summary) is read
READ_BLOCK = 256


COMPRESSIONS = ("gzip", "lzf", "none")


_REQUIRED = ("atoms/numbers", "atoms/positions", "atoms/forces", "frames/offsets", "frames/cell",
             "frames/pbc", "frames/energy", "frames/source", "frames/frame", "sources",
             "summary/elements", "summary/composition", "summary/force_sq_sum")


def _h5py():
    try:
        import h5py
    except ImportError:  # a dependency of e2ip; only a broken install lacks it
        raise ConfigError("on-disk data (.h5) needs the h5py package (pip install h5py)") from None
    return h5py


def _identity(path: Path) -> tuple[int, int, int, int]:
    """What tells one file from a rewritten one at the same path."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class _Store:
    """One process's open handle of one file, with the small per-frame arrays in memory."""

    def __init__(self, path: Path, identity: tuple, inherited: _Store | None = None):
        self.path = path
        self.identity = identity
        self.pid = os.getpid()
        try:
            self.file = _h5py().File(path, "r")
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable HDF5 file ({first_line(exc)})") from None
        self._datasets: dict[str, Any] = {}
        if inherited is not None:  # a forked worker: the arrays are the parent's (shared pages)
            self.__dict__.update({k: v for k, v in inherited.__dict__.items()
                                  if k not in ("file", "pid", "_datasets")})
            return
        self._check_header()
        self.offsets = self._read("frames/offsets").astype(np.int64)
        self.cell = self._read("frames/cell").astype(np.float64)
        self.pbc = self._read("frames/pbc").astype(bool)
        self.energy = self._read("frames/energy").astype(np.float64)
        self.source = self._read("frames/source").astype(np.int64)
        self.frame = self._read("frames/frame").astype(np.int64)
        self.sources = [s.decode("utf-8", "replace") if isinstance(s, bytes) else str(s)
                        for s in self._read("sources")]
        self.elements = [int(z) for z in self._read("summary/elements")]
        self._check_shapes()

    def _check_header(self) -> None:
        attrs = self.file.attrs
        fmt = attrs.get("format")
        if isinstance(fmt, bytes):
            fmt = fmt.decode("utf-8", "replace")
        if fmt != FORMAT:
            raise DataError(f"{self.path}: not an e2ip structure file (an HDF5 file without "
                            f"format attribute {FORMAT!r}); write one with `e2ip data convert`")
        version = attrs.get("format_version")
        if isinstance(version, np.generic):
            version = version.item()
        if not isinstance(version, int) or version != FORMAT_VERSION:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            raise DataError(f"{self.path}: format version {short_repr(version)}, this e2ip "
                            f"reads version "
                            f"{FORMAT_VERSION}" + ("; update e2ip" if newer else
                                                   "; convert the data again"))
        for name in _REQUIRED:
            if name not in self.file:
                raise DataError(f"{self.path}: field '{name}' is missing (damaged file?); "
                                "convert the data again")
        self.n_frames = int(attrs.get("n_frames", -1))
        self.n_atoms = int(attrs.get("n_atoms", -1))
        self.has_energy = bool(attrs.get("has_energy", False))
        self.duplicates_checked = bool(attrs.get("duplicates_checked", False))

    def _read(self, name: str) -> np.ndarray:
        try:
            return self.file[name][()]
        except Exception as exc:  # noqa: BLE001 - h5py raises OSError, KeyError, RuntimeError
            raise DataError(f"{self.path}: field '{name}' cannot be read ({first_line(exc)}); "
                            "the file is damaged: convert the data again") from None

    def _check_shapes(self) -> None:
        f, a = self.n_frames, self.n_atoms
        expected = {"atoms/numbers": (a,), "atoms/positions": (a, 3), "atoms/forces": (a, 3),
                    "frames/offsets": (f + 1,), "frames/cell": (f, 3, 3), "frames/pbc": (f, 3),
                    "frames/energy": (f,), "frames/source": (f,), "frames/frame": (f,),
                    "summary/elements": (len(self.elements),),
                    "summary/composition": (f, len(self.elements)),
                    "summary/force_sq_sum": (f,)}
        for name, shape in expected.items():
            if self.file[name].shape != shape:
                raise DataError(f"{self.path}: field '{name}' has shape {self.file[name].shape}, "
                                f"expected {shape} for {f} frames of {a} atoms (damaged file?)")
        off = self.offsets
        if f < 1 or off[0] != 0 or off[-1] != a or np.any(np.diff(off) < 1):
            raise DataError(f"{self.path}: field 'frames/offsets' is inconsistent (frames must "
                            f"hold at least one atom and end at atom {a}); convert the data again")
        if len(self.sources) and not 0 <= self.source.min() <= self.source.max() < len(
                self.sources):
            raise DataError(f"{self.path}: field 'frames/source' points outside 'sources'")

    def dataset(self, name: str):
        """The h5py Dataset `name` (looked up once: a lookup costs more than a small read)."""
        ds = self._datasets.get(name)
        if ds is None:
            ds = self._datasets[name] = self.file[name]
        return ds


#: per process: (path, identity) -> its open store; stores inherited over a fork are kept
#: (never closed in the child) in _INHERITED
_STORES: dict[tuple[str, tuple], _Store] = {}


_INHERITED: list[_Store] = []


def _store(path: Path, identity: tuple | None) -> _Store:
    """This process's store of the file at `path` (an absolute path), opened and checked on first
    use. `identity` None: the file as it is now (opening a view); else the file the view was
    opened on, which must still be the one at `path` when this process opens it."""
    pid = os.getpid()
    if identity is not None:
        store = _STORES.get((str(path), identity))
        if store is not None and store.pid == pid:
            return store
    try:
        now = _identity(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({first_line(exc)})") from None
    if identity is not None and now != identity:
        raise DataError(f"{path}: changed on disk since it was opened (converted again?); "
                        "start over with the new file")
    key = (str(path), now)
    store = _STORES.get(key)
    if store is not None and store.pid == pid:
        return store
    if store is not None:  # inherited over a fork: never closed here, the parent still uses it
        _INHERITED.append(store)
    store = _Store(path, now, inherited=store)
    _STORES[key] = store
    return store


class OnDiskStructures(Sequence[Structure]):
    """A lazy sequence of the structures of an e2ip HDF5 file (eV, Å, eV/Å).

    `len`, an int index (a :class:`Structure`, read from the file), a slice or a list/array of
    indices (another lazy view, nothing read). Iterating reads contiguous frames in blocks.
    Summaries over the view (:meth:`elements_present`, :meth:`composition`, :meth:`energies`,
    :meth:`force_rms`, :meth:`n_atoms`) come from the per-frame arrays stored at conversion,
    without reading any frame. Pickling keeps the path and frame numbers only: each process
    opens the file on first access."""

    #: GraphDataset builds the neighbour lists of a lazy sequence when a batch asks for them
    lazy = True

    def __init__(self, path: str | os.PathLike, indices: Sequence[int] | np.ndarray | None = None,
                 *, energies: bool = True, _identity: tuple | None = None):
        self.path = Path(path)
        self._file = Path(os.path.abspath(path))
        store = _store(self._file, _identity)
        self._identity = store.identity
        self._indices = np.arange(store.n_frames, dtype=np.int64)
        self._energies = bool(energies) and store.has_energy
        if indices is not None:
            self._indices = self.subset(indices)._indices

    # -- the sequence --------------------------------------------------------------------------
    def _store(self) -> _Store:
        return _store(self._file, self._identity)

    def __len__(self) -> int:
        return len(self._indices)

    def __repr__(self) -> str:
        return f"OnDiskStructures({str(self.path)!r}, {len(self)} frames)"

    def __reduce__(self):
        return (_rebuild, (str(self.path), str(self._file), self._indices, self._energies,
                           self._identity))

    @overload
    def __getitem__(self, k: int) -> Structure: ...

    @overload
    def __getitem__(self, k: slice | Sequence[int] | np.ndarray) -> OnDiskStructures: ...

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self._view(self._indices[k])
        if isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_)):
            n = len(self._indices)
            if not -n <= k < n:
                raise IndexError(f"frame {k} of a set of {n}")
            return self._read([int(self._indices[k])])[0]
        return self.subset(k)

    def subset(self, positions: Sequence[int] | np.ndarray) -> OnDiskStructures:
        """The view of the structures at `positions` (of this view), in that order."""
        positions = np.asarray(positions)
        if positions.size and positions.dtype.kind not in "iu":
            raise TypeError(f"indices must be integers, got {positions.dtype}")
        positions = positions.astype(np.int64).reshape(-1)
        n = len(self._indices)
        if positions.size and (positions.min() < -n or positions.max() >= n):
            raise IndexError(f"index out of range for a set of {n}")
        return self._view(self._indices[positions])

    def _view(self, indices: np.ndarray) -> OnDiskStructures:
        return _rebuild(str(self.path), str(self._file), indices, self._energies, self._identity)

    def without_energies(self) -> OnDiskStructures:
        """The same structures with `energy` None (training on forces alone)."""
        view = self._view(self._indices)
        view._energies = False
        return view

    def __iter__(self) -> Iterator[Structure]:
        for start in range(0, len(self._indices), READ_BLOCK):
            yield from self._read(self._indices[start:start + READ_BLOCK].tolist())

    @property
    def frame_indices(self) -> np.ndarray:
        """(len,) the frame numbers in the file of this view's structures."""
        return self._indices.copy()

    def _read(self, frames: list[int]) -> list[Structure]:
        """The structures of file frames `frames`: contiguous runs are read with one call per
        array."""
        st = self._store()
        out: list[Structure] = []
        k = 0
        while k < len(frames):
            run = 1
            while k + run < len(frames) and frames[k + run] == frames[k] + run:
                run += 1
            out += self._read_run(st, frames[k], frames[k] + run)
            k += run
        return out

    def _read_run(self, st: _Store, first: int, stop: int) -> list[Structure]:
        a, b = int(st.offsets[first]), int(st.offsets[stop])
        try:
            numbers = st.dataset("atoms/numbers")[a:b].astype(np.int64)
            positions = st.dataset("atoms/positions")[a:b]
            forces = st.dataset("atoms/forces")[a:b]
        except Exception as exc:  # noqa: BLE001 - a damaged chunk: OSError, RuntimeError, ...
            where = (f"frame {first}" if stop == first + 1 else f"frames {first} to {stop - 1}")
            raise DataError(f"{self.path}, {where}: cannot be read ({first_line(exc)}); the file "
                            "is damaged: convert the data again") from None
        out = []
        for k in range(first, stop):
            lo, hi = int(st.offsets[k]) - a, int(st.offsets[k + 1]) - a
            out.append(Structure(
                numbers=numbers[lo:hi], positions=positions[lo:hi], cell=st.cell[k].copy(),
                pbc=st.pbc[k].copy(),
                energy=float(st.energy[k]) if self._energies else None,
                forces=forces[lo:hi], source=st.sources[st.source[k]] if st.sources else "",
                frame=int(st.frame[k])))
        return out

    # -- summaries (no frame is read) ----------------------------------------------------------
    @property
    def info(self) -> dict[str, Any]:
        """The file's attributes (format, units, frames, atoms, inputs, ...)."""
        attrs = dict(self._store().file.attrs)
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items()}

    @property
    def duplicates_checked(self) -> bool:
        """Whether `e2ip data convert` refused duplicate frames when it wrote the file."""
        return self._store().duplicates_checked

    @property
    def has_energy(self) -> bool:
        return self._energies

    @property
    def file_elements(self) -> list[int]:
        """The elements of the whole file (sorted atomic numbers)."""
        return list(self._store().elements)

    def n_atoms(self) -> np.ndarray:
        """(len,) atoms per structure."""
        off = self._store().offsets
        return off[self._indices + 1] - off[self._indices]

    def energies(self) -> np.ndarray:
        """(len,) energies in eV (NaN without energies)."""
        if not self._energies:
            return np.full(len(self), np.nan)
        return self._store().energy[self._indices]

    def composition(self, elements: Sequence[int] | None = None) -> np.ndarray:
        """(len, len(elements)) atoms of each element (default: the file's elements) in each
        structure of the view, as float64 (the least-squares fit of reference energies)."""
        st = self._store()
        counts = _rows(st.dataset("summary/composition"), self._indices, self.path)
        if elements is None:
            return counts.astype(np.float64)
        column = {z: c for c, z in enumerate(st.elements)}
        out = np.zeros((len(self), len(elements)))
        for k, z in enumerate(elements):
            if int(z) in column:
                out[:, k] = counts[:, column[int(z)]]
        return out

    def elements_present(self) -> list[int]:
        """The sorted atomic numbers that occur in the view."""
        counts = self.composition()
        return [z for z, n in zip(self._store().elements, counts.sum(axis=0)) if n > 0]

    def first_outside(self, known: Iterable[int]) -> int | None:
        """The position in the view of the first structure holding an element not in `known`,
        or None."""
        known = {int(z) for z in known}
        st = self._store()
        others = [c for c, z in enumerate(st.elements) if z not in known]
        if not others or not len(self):
            return None
        hit = np.flatnonzero(self.composition()[:, others].sum(axis=1) > 0)
        return int(hit[0]) if len(hit) else None

    def periodic(self) -> np.ndarray:
        """Whether each frame of the view is periodic along any axis, (F,) bool."""
        return self._store().pbc[self._indices].any(axis=1)

    def force_rms(self) -> float:
        """sqrt(mean of F_x^2, F_y^2, F_z^2 over every atom of the view), eV/Å."""
        sq = _rows(self._store().dataset("summary/force_sq_sum"), self._indices, self.path)
        return float(np.sqrt(np.sum(sq) / (3 * np.sum(self.n_atoms()))))


def _rebuild(path: str, file: str, indices: np.ndarray, energies: bool,
             identity: tuple) -> OnDiskStructures:
    """A view of frames `indices` of the file opened as `path` (absolute: `file`), made without
    touching the file (unpickling; the file is opened in this process on first access)."""
    view = object.__new__(OnDiskStructures)
    view.path, view._file, view._identity = Path(path), Path(file), identity
    view._indices, view._energies = indices, energies
    return view


def _rows(ds, indices: np.ndarray, path: Path) -> np.ndarray:
    """Rows `indices` of an h5py dataset, in that order, read block by block (memory: the
    result plus one block)."""
    out = np.empty((len(indices), *ds.shape[1:]), dtype=ds.dtype)
    if not len(indices):
        return out
    order = np.argsort(indices, kind="stable")
    ordered = indices[order]
    block = 64 * READ_BLOCK
    try:
        lo = 0
        while lo < len(ordered):
            start = int(ordered[lo])
            hi = int(np.searchsorted(ordered, start + block))
            data = ds[start:int(ordered[hi - 1]) + 1]
            out[order[lo:hi]] = data[ordered[lo:hi] - start]
            lo = hi
    except Exception as exc:  # noqa: BLE001 - a damaged chunk
        raise DataError(f"{path}: field '{ds.name.lstrip('/')}' cannot be read "
                        f"({first_line(exc)}); the file is damaged: convert the data again") from None
    return out


def open_structures(path: str | os.PathLike, *, index: int | slice = slice(None),
                    energy_unit: str | None = None, length_unit: str | None = None,
                    require_energy: bool = True, require_forces: bool = True
                    ) -> OnDiskStructures:
    """The lazy structures of an e2ip HDF5 file, frames `index` (an int or slice) of it.

    The file holds eV and Å: a unit other than those is a DataError (the conversion applied
    the units already). With `require_energy`, a file converted without energies is one too."""
    path = Path(path)
    for unit, factor, kind, stored in ((energy_unit, energy_factor, "energy", "eV"),
                                       (length_unit, length_factor, "length", "Å")):
        if unit is not None and factor(unit) != 1.0:
            plural = "energies" if kind == "energy" else "lengths"
            raise DataError(f"{path}: holds {plural} in {stored} already (e2ip data convert "
                            f"applied the units); the {kind} unit {unit!r} does not apply to "
                            f"it: leave data.{kind}_unit / --{kind}-unit unset")
    structures = OnDiskStructures(check_path(path))
    if require_energy and not structures.has_energy:
        raise DataError(f"{path}: has no energies (converted with --energy-key none); train on "
                        "forces alone with data.energy_key: null (--energy-key none)")
    del require_forces  # forces are always stored
    n = len(structures)
    if isinstance(index, slice):
        structures = structures[index]
    else:
        if not -n <= index < n:
            raise DataError(f"{path}: frame {index} asked for (index), but the file has {n} frames")
        structures = structures[[index]]
    if not len(structures):
        raise DataError(f"{path}: contains no structures (index {index})")
    return structures


def is_lazy(structures: object) -> bool:
    """Whether `structures` is a lazy on-disk sequence (read frame by frame)."""
    return getattr(structures, "lazy", False) is True
