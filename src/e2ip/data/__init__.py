"""Data: readers, units, neighbour lists, graphs and batching, splits, reference energies, and
on-disk (HDF5) structure sets read lazily."""

from .graph import AtomicGraph, GraphDataset, collate, structure_to_graph
from .ondisk import OnDiskStructures
from .readers import check_duplicates, check_elements, read_structures, validate_structure
from .structures import DataError, Structure
from .units import energy_factor, force_factor, length_factor

__all__ = [
    "AtomicGraph", "DataError", "GraphDataset", "OnDiskStructures", "Structure", "check_duplicates",
    "check_elements", "collate", "energy_factor", "force_factor", "length_factor",
    "read_structures", "structure_to_graph", "validate_structure",
]
