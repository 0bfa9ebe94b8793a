"""Data: readers, units, neighbour lists, graphs and batching, splits, reference energies, and
on-disk (HDF5) structure sets read lazily."""

from e2ip.data.formats.hdf5 import OnDiskStructures
from e2ip.data.graph import AtomicGraph, GraphDataset, collate, structure_to_graph
from e2ip.data.read import read_structures
from e2ip.data.structures import DataError, Structure
from e2ip.data.units import energy_factor, force_factor, length_factor
from e2ip.data.validate import check_duplicates, check_elements, validate_structure

__all__ = [
    "AtomicGraph", "DataError", "GraphDataset", "OnDiskStructures", "Structure", "check_duplicates",
    "check_elements", "collate", "energy_factor", "force_factor", "length_factor",
    "read_structures", "structure_to_graph", "validate_structure",
]
