"""The Backbone interface: the only thing a head ever sees of a backbone.

A backbone maps a graph to per-atom features and (dimensionless) atomic energies:

=============  ==============  ======================================================
field          shape           meaning
=============  ==============  ======================================================
scalars        (N, F0)         invariant features (irrep ``0e``)
vectors        (N, F1, 3)      vector features (``1o``), Cartesian order (x, y, z); or None
tensors        (N, F2, 5)      rank-2 features (``2e``) in e3nn's basis; or None
atomic_energy  (N,)            per-atom energy in units of the model's energy scale
=============  ==============  ======================================================

Inputs are species indices (N,), the edge list (2, E) from centre i to neighbour j, the edge
vectors r_j - r_i (E, 3) in Å (differentiable: forces come from autograd), the structure index of
each atom (N,) and the number of structures. A backbone never knows about uncertainty.
"""

from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from e2ip.registry import Configurable


class BackboneOutput(NamedTuple):
    """What a backbone returns (a NamedTuple: TorchScript compiles it, unlike a dataclass)."""

    scalars: torch.Tensor
    atomic_energy: torch.Tensor
    vectors: torch.Tensor | None = None
    tensors: torch.Tensor | None = None
    #: (N,) element index of each atom: set by the model that holds the backbone (not by the
    #: backbone) for heads whose statistics are per element
    species: torch.Tensor | None = None


def with_species(features: BackboneOutput, species: torch.Tensor) -> BackboneOutput:
    """`features` with the atoms' element indices (N,) set (what the model adds for the head)."""
    return BackboneOutput(features.scalars, features.atomic_energy, features.vectors,
                          features.tensors, species)


class Backbone(Configurable, nn.Module, ABC):
    """Base class; subclasses set `name`, `Hyperparameters` and the three feature widths."""

    name: ClassVar[str] = ""
    num_scalars: int = 0
    num_vectors: int = 0
    num_tensors: int = 0
    #: in eval mode, graphs with more edges than this sum their messages in chunks of this many
    #: edges under activation checkpointing (:func:`sum_over_edges`); 0 turns chunking off.
    #: A runtime setting (not saved with the model): results are the same either way.
    #: 65,536 keeps glibc's heap unfragmented: with 16,384 a chunk's tensors (12.6 MB for
    #: PaiNN's default) fall below glibc's 32 MB mmap threshold and are reused from the heap,
    #: 2.5x faster on 12,288 atoms, but the heap fragments (2.7 instead of 1.3 GB there, out of
    #: memory at 98k atoms); with tcmalloc preloaded both are fast and small
    #: (docs/performance.md).
    edge_chunk_size: int = 2**16

    def edge_chunk(self) -> int:
        """The chunk size to use now: never while training (the double backward of a training
        step keeps its graph, and training batches are small), nor in TorchScript (chunking
        takes a Python function, so the compiled path sums over all edges at once)."""
        if torch.jit.is_scripting() or self.training:
            return 0
        return int(self.edge_chunk_size)

    def __init__(self, num_species: int, cutoff: float, hparams):
        super().__init__()
        self.num_species = num_species
        self.cutoff = float(cutoff)
        self.hparams = hparams

    def for_torchscript(self) -> "Backbone":
        """This backbone in a form ``torch.jit.script`` compiles (default: itself; a backbone
        built from modules that must be compiled their own way returns a compiled copy)."""
        return self

    @abstractmethod
    def forward(self, species: torch.Tensor, edge_index: torch.Tensor, edge_vectors: torch.Tensor,
                batch: torch.Tensor, num_graphs: int) -> BackboneOutput:
        """Per-atom features and atomic energies (see the module docstring)."""



def set_edge_chunk_size(module: nn.Module, size: int) -> None:
    """Set :attr:`Backbone.edge_chunk_size` of every backbone inside `module` (a model or an
    ensemble); 0 turns chunking off."""
    for sub in module.modules():
        if isinstance(sub, Backbone):
            sub.edge_chunk_size = int(size)
