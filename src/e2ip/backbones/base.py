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

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class BackboneOutput:
    scalars: torch.Tensor
    atomic_energy: torch.Tensor
    vectors: torch.Tensor | None = None
    tensors: torch.Tensor | None = None


class Backbone(nn.Module):
    """Base class; subclasses set `name`, `Hyperparameters` and the three feature widths."""

    name: ClassVar[str] = ""
    Hyperparameters: ClassVar[type] = object
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
        step keeps its graph, and training batches are small)."""
        return 0 if self.training else int(self.edge_chunk_size)

    def __init__(self, num_species: int, cutoff: float, hparams):
        super().__init__()
        self.num_species = num_species
        self.cutoff = float(cutoff)
        self.hparams = hparams

    def forward(self, species: torch.Tensor, edge_index: torch.Tensor, edge_vectors: torch.Tensor,
                batch: torch.Tensor, num_graphs: int) -> BackboneOutput:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def hparams_from_dict(cls, options: dict | None):
        return cls.Hyperparameters(**(options or {}))

    @classmethod
    def hparams_to_dict(cls, hparams) -> dict:
        return dataclasses.asdict(hparams)


def set_edge_chunk_size(module: nn.Module, size: int) -> None:
    """Set :attr:`Backbone.edge_chunk_size` of every backbone inside `module` (a model or an
    ensemble); 0 turns chunking off."""
    for sub in module.modules():
        if isinstance(sub, Backbone):
            sub.edge_chunk_size = int(size)


# --- building blocks shared by backbones -------------------------------------------------------

class BesselBasis(nn.Module):
    """sqrt(2/rc) sin(n pi r / rc) / r, n = 1..num_radial (Klicpera et al. 2020); (E,) -> (E, K)."""

    def __init__(self, num_radial: int, cutoff: float):
        super().__init__()
        self.cutoff = cutoff
        self.register_buffer("freq", torch.arange(1, num_radial + 1) * math.pi / cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        r = r.unsqueeze(-1)
        return math.sqrt(2.0 / self.cutoff) * torch.sin(self.freq.to(r.dtype) * r) / r


def cosine_cutoff(r: torch.Tensor, cutoff: float) -> torch.Tensor:
    """0.5 (cos(pi r / rc) + 1) inside the cutoff, 0 outside; smooth at rc."""
    return torch.where(r < cutoff, 0.5 * (torch.cos(math.pi * r / cutoff) + 1.0),
                       torch.zeros_like(r))


def polynomial_cutoff(r: torch.Tensor, cutoff: float, p: int = 6) -> torch.Tensor:
    """NequIP's polynomial envelope: smooth to order p at rc."""
    x = r / cutoff
    out = (1.0 - 0.5 * (p + 1) * (p + 2) * x**p + p * (p + 2) * x ** (p + 1)
           - 0.5 * p * (p + 1) * x ** (p + 2))
    return out * (x < 1.0)


def scatter_sum(src: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Sum rows of `src` into `size` bins given by `index` (first dimension)."""
    out = src.new_zeros((size,) + src.shape[1:])
    return out.index_add_(0, index, src)


def sum_over_edges(message, centers: torch.Tensor, num_nodes: int,
                   node_inputs: tuple[torch.Tensor, ...], edge_inputs: tuple[torch.Tensor, ...],
                   chunk_size: int = 0) -> tuple[torch.Tensor, ...]:
    """Per-atom sums of per-edge messages: out_k[n] = sum over edges e with centers[e] = n of
    ``message(*node_inputs, *edge_inputs[e])[k]``.

    message: a function of the node inputs (whole) and the edge inputs (rows of one set of edges)
    returning one tensor or a tuple of tensors with one row per edge.
    With `chunk_size` > 0 and more edges than that, edges are processed `chunk_size` at a time
    and each chunk is checkpointed (``torch.utils.checkpoint``, non-reentrant): its per-edge
    intermediates, which dominate the memory of a forward + force backward pass, are recomputed
    in the backward pass instead of being kept, so memory is O(atoms + chunk) rather than
    O(edges) at the price of evaluating the messages twice. The sums are the same up to the
    order of floating-point additions. (Written here because PyTorch offers checkpointing but
    not a chunked scatter; every backbone's message passing goes through this one function.)
    """

    def summed(chunk_centers, *inputs):
        out = message(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        return tuple(scatter_sum(o, chunk_centers, num_nodes) for o in out)

    num_edges = centers.shape[0]
    if chunk_size <= 0 or num_edges <= chunk_size:
        return summed(centers, *node_inputs, *edge_inputs)
    # torch.split, not slicing: the backward of one split is one concatenation of the chunks'
    # gradients, where each slice's backward would write a zero-filled edge-sized tensor
    chunks = zip(torch.split(centers, chunk_size),
                 *(torch.split(x, chunk_size) for x in edge_inputs))
    total: tuple[torch.Tensor, ...] | None = None
    for chunk_centers, *chunk_inputs in chunks:
        part = checkpoint(summed, chunk_centers, *node_inputs, *chunk_inputs, use_reentrant=False)
        total = part if total is None else tuple(a + b for a, b in zip(total, part))
    assert total is not None
    return total


def mlp(sizes: list[int], activation=nn.SiLU, last_bias: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k in range(len(sizes) - 1):
        last = k == len(sizes) - 2
        layers.append(nn.Linear(sizes[k], sizes[k + 1], bias=(last_bias or not last)))
        if not last:
            layers.append(activation())
    return nn.Sequential(*layers)


# --- rank-2 (2e) helpers -----------------------------------------------------------------------
# The same constant orthonormal basis as :mod:`e2ip.heads.spd` (kept here so that backbones never
# import heads): e3nn 0.6's ``2e`` of ``CartesianTensor("ij=ji")``, polar axis y,
# [(xz+zx)/sqrt2, (xy+yx)/sqrt2, (2yy-xx-zz)/sqrt6, (yz+zy)/sqrt2, (zz-xx)/sqrt2].
_S2 = 1.0 / math.sqrt(2.0)
_S6 = 1.0 / math.sqrt(6.0)
L2_BASIS = (
    ((0.0, 0.0, _S2), (0.0, 0.0, 0.0), (_S2, 0.0, 0.0)),
    ((0.0, _S2, 0.0), (_S2, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ((-_S6, 0.0, 0.0), (0.0, 2 * _S6, 0.0), (0.0, 0.0, -_S6)),
    ((0.0, 0.0, 0.0), (0.0, 0.0, _S2), (0.0, _S2, 0.0)),
    ((-_S2, 0.0, 0.0), (0.0, 0.0, 0.0), (0.0, 0.0, _S2)),
)


@functools.lru_cache(maxsize=16)
def _cached_l2_basis(dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
    return torch.tensor(L2_BASIS, dtype=torch.float64).to(dtype=dtype, device=device)


def l2_basis_tensor(dtype=None, device=None) -> torch.Tensor:
    """The (5, 3, 3) basis E_k of traceless symmetric matrices (T(c) = sum_k c_k E_k), built once
    per dtype and device from float64 values (exact to the dtype's precision; do not modify)."""
    return _cached_l2_basis(dtype or torch.get_default_dtype(),
                            torch.device(device) if device is not None else None)


def traceless_sym_to_l2(m: torch.Tensor, basis: torch.Tensor | None = None) -> torch.Tensor:
    """``2e`` coefficients tr(E_k M) of a 3x3 matrix (..., 3, 3) -> (..., 5).

    Only the symmetric traceless part of M contributes (E_k is symmetric and traceless), so this
    is the projection M -> sym(M) - tr(M)/3 I expressed in e3nn's ``2e`` basis; for a rotation or
    reflection R, ``M -> R M R^T`` maps the result to ``D2(R) c``.
    """
    basis = l2_basis_tensor(m.dtype, m.device) if basis is None else basis
    return torch.einsum("...ij,kij->...k", m, basis)


def sym_outer_l2(a: torch.Tensor, b: torch.Tensor, basis: torch.Tensor | None = None) -> torch.Tensor:
    """2e coefficients of sym(a (x) b) - tr/3 I for vectors (..., 3): a^T E_k b, shape (..., 5).

    The outer product then one matmul with the flattened basis (9 -> 5): a three-operand einsum
    ran opt_einsum's path search on every call (~0.4 ms, 5 % of a 21-atom forward pass)."""
    basis = l2_basis_tensor(a.dtype, a.device) if basis is None else basis
    outer = (a.unsqueeze(-1) * b.unsqueeze(-2)).flatten(-2)  # (..., 9)
    return outer @ basis.reshape(5, 9).T
