"""Atomic graphs and batching.

A batch of B structures with N atoms and E directed edges in all is one :class:`AtomicGraph`.
Edge e goes from atom `edge_index[0, e]` (centre i) to atom `edge_index[1, e]` (neighbour j) with
vector `positions[j] - positions[i] + shifts[e] @ cell[batch[i]]` (Å).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import partial

import numpy as np
import torch

from e2ip.data.neighbors import neighbor_list
from e2ip.data.structures import Structure


@dataclass
class AtomicGraph:
    numbers: torch.Tensor  # (N,) long, atomic numbers
    positions: torch.Tensor  # (N, 3) Å
    cell: torch.Tensor  # (B, 3, 3) Å
    edge_index: torch.Tensor  # (2, E) long
    shifts: torch.Tensor  # (E, 3) integer lattice shifts, stored as float
    batch: torch.Tensor  # (N,) long, structure of each atom
    n_atoms: torch.Tensor  # (B,) long
    energy: torch.Tensor | None = None  # (B,) eV
    forces: torch.Tensor | None = None  # (N, 3) eV/Å
    frames: tuple[str, ...] = ()  # where each structure came from ("file, frame k"), for messages

    @property
    def num_graphs(self) -> int:
        return int(self.n_atoms.shape[0])

    def to(self, device=None, dtype=None) -> AtomicGraph:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, torch.Tensor):
                out[f.name] = v
            elif v.is_floating_point():
                out[f.name] = v.to(device=device, dtype=dtype or v.dtype)
            else:
                out[f.name] = v.to(device=device)
        return AtomicGraph(**out)

    def edge_vectors(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(E, 3) edge vectors r_j - r_i + shift (differentiable in `positions`)."""
        pos = self.positions if positions is None else positions
        i, j = self.edge_index
        vec = pos[j] - pos[i]
        if self.shifts.numel():
            cell_e = self.cell[self.batch[i]]
            vec = vec + torch.einsum("ek,ekl->el", self.shifts.to(pos.dtype), cell_e.to(pos.dtype))
        return vec


@dataclass
class _GraphRecord:
    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    edge_index: np.ndarray
    shifts: np.ndarray
    energy: float | None
    forces: np.ndarray | None
    where: str = ""


def frames_listing(frames: Sequence[str], limit: int) -> str:
    """The first `limit` of a batch's `frames` ("file, frame k") joined by '; ', then how many
    more, for messages ('?' when unknown)."""
    more = f" and {len(frames) - limit} more" if len(frames) > limit else ""
    return "; ".join(frames[:limit]) + more if frames else "?"


def structure_to_graph(s: Structure, cutoff: float) -> _GraphRecord:
    i, j, shifts = neighbor_list(s.positions, s.cell, s.pbc, cutoff)
    return _GraphRecord(
        numbers=s.numbers,
        positions=s.positions,
        cell=s.cell if np.any(s.pbc) else np.zeros((3, 3)),
        edge_index=np.stack([i, j]),
        shifts=shifts,
        energy=s.energy,
        forces=s.forces,
        where=s.where(),
    )


def collate(records: Sequence[_GraphRecord], dtype: torch.dtype | None = None) -> AtomicGraph:
    """Batch graph records into one :class:`AtomicGraph` (dtype: default dtype at call time)."""
    dtype = dtype or torch.get_default_dtype()
    offsets = np.cumsum([0] + [len(r.numbers) for r in records[:-1]])
    n_atoms = torch.tensor([len(r.numbers) for r in records], dtype=torch.long)
    has_energy = all(r.energy is not None for r in records)
    has_forces = all(r.forces is not None for r in records)
    return AtomicGraph(
        numbers=torch.from_numpy(np.concatenate([r.numbers for r in records])).long(),
        positions=torch.from_numpy(np.concatenate([r.positions for r in records])).to(dtype),
        cell=torch.from_numpy(np.stack([r.cell for r in records])).to(dtype),
        edge_index=torch.from_numpy(
            np.concatenate([r.edge_index + o for r, o in zip(records, offsets)], axis=1)
        ).long(),
        shifts=torch.from_numpy(np.concatenate([r.shifts for r in records])).to(dtype),
        batch=torch.repeat_interleave(torch.arange(len(records)), n_atoms),
        n_atoms=n_atoms,
        energy=torch.tensor([r.energy for r in records], dtype=dtype) if has_energy else None,
        forces=torch.from_numpy(np.concatenate([r.forces for r in records])).to(dtype)
        if has_forces else None,
        frames=tuple(r.where for r in records),
    )


class GraphDataset(torch.utils.data.Dataset):
    """Structures with their neighbour lists.

    In memory (a list of structures) the lists are computed once, here (positions are fixed
    in training). A lazy sequence (:class:`~e2ip.data.formats.hdf5.OnDiskStructures`, data larger
    than memory) is read and its neighbour lists built in :meth:`__getitem__`, i.e. in the
    DataLoader's workers, frame by frame; the records, and so the batches, are the same.
    `lazy`: force one way or the other (None: lazy exactly for lazy sequences)."""

    def __init__(self, structures: Sequence[Structure], cutoff: float,
                 lazy: bool | None = None):
        self.cutoff = cutoff
        self.lazy = getattr(structures, "lazy", False) is True if lazy is None else lazy
        self.structures = structures if self.lazy else list(structures)
        self.records = None if self.lazy else [structure_to_graph(s, cutoff)
                                               for s in self.structures]

    def __len__(self) -> int:
        return len(self.structures)

    def __getitem__(self, k: int) -> _GraphRecord:
        if self.records is None:
            return structure_to_graph(self.structures[k], self.cutoff)
        return self.records[k]

    def loader(self, batch_size: int, shuffle: bool = False, dtype=torch.float32, seed: int = 0,
               num_workers: int = 0):
        """A DataLoader of collated :class:`AtomicGraph` batches. The collate function is a
        `functools.partial` of a module-level function, so spawned workers can pickle it."""
        gen = torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(
            self, batch_size=batch_size, shuffle=shuffle, generator=gen if shuffle else None,
            collate_fn=partial(collate, dtype=dtype), num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )


def graph_from_structures(structures: Sequence[Structure], cutoff: float,
                          dtype: torch.dtype = torch.float32) -> AtomicGraph:
    return collate([structure_to_graph(s, cutoff) for s in structures], dtype)
