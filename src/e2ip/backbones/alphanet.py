"""AlphaNet-style local-frame message passing (after Yin et al., npj Comput. Mater. 11, 332 (2025)).

Equivariance through local frames instead of tensor products: every edge i -> j gets a frame
(e1, e2, e3) built from the geometry, vector features are *projected* into it (giving invariants),
ordinary MLPs run on the invariants, and equivariant outputs are *recombined* from the frame axes
with invariant coefficients. Everything is made of dot and cross products of equivariant vectors,
so the result is exactly equivariant under O(3) (rotations and reflections) with no Wigner matrices.

Frame of edge (i, j), with u_i = sum_k fc(r_ik) r_ik the cutoff-weighted neighbour sum of atom i:

    e1 = r_ij / |r_ij|
    w  = u_i - (u_i . e1) e1                       (the part of u_i orthogonal to the bond)
    e2 = w / sqrt(|w|^2 + eps^2)                   (eps = `frame_eps`, Å)
    e3 = e1 x e2

Degenerate environments: where u_i is (nearly) parallel to the bond or zero -- linear molecules,
a diatomic, an atom with one neighbour, or a symmetric site such as the centre of a tetrahedron --
there is no preferred second axis. The regularised normalisation makes e2 and e3 shrink smoothly
to zero there (|e2| = |w| / sqrt(|w|^2 + eps^2)) instead of jumping to an arbitrary direction, so
the model stays exactly equivariant, smooth and finite (no NaN in forces) for every geometry; it
just falls back to the information on the bond axis e1 (a PaiNN-like message) plus invariants. For
an exactly linear molecule this loses nothing: by symmetry all its vector features lie on the axis.
For generic geometries |w| >> eps and the frame is orthonormal. e1 and e2 are polar vectors, e3 is
axial, so projections on e3 are pseudoscalars: they enter the invariants only as squares or
products of two, and recombinations along e3 always carry an odd number of them (parity exact).

Unlike the reference code, which uses the plain mean over neighbours (it jumps when an atom
crosses the cutoff), u_i is weighted by the cutoff function, so the frame varies smoothly.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from e2ip.backbones.base import Backbone, BackboneOutput
from e2ip.backbones.painn import PaiNNUpdate
from e2ip.nn.irreps import l2_basis_tensor, sym_outer_l2
from e2ip.nn.mlp import mlp
from e2ip.nn.radial import BesselBasis, cosine_cutoff
from e2ip.nn.scatter import scatter_sum, sum_over_edges

NUM_GEOMETRY = 6  # per-edge geometric invariants of the frame (see `edge_frames`)
# (a, b) axis pairs of the symmetric tensors sym(e_a (x) e_b) used for the 2e output.
_PAIRS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


@dataclass
class AlphaNetHyperparameters:
    """AlphaNet-like backbone: scalar and vector channels with invariants from local edge frames,
    plus native 2e outputs."""

    #: Width of the scalar and vector channels.
    num_features: int = 64
    #: Number of 2e (rank-2 tensor) output channels.
    num_tensors: int = 8
    #: Number of message-passing blocks.
    num_layers: int = 3
    #: Number of Bessel radial basis functions.
    num_radial: int = 20
    #: Vector channels projected into the edge frames to make invariants.
    frame_channels: int = 16
    #: Width of the edge MLP on the invariants (0: num_features).
    edge_hidden: int = 0
    #: Regulariser of the second frame axis (Å).
    frame_eps: float = 0.25
    #: Messages are divided by this (set it to the data's mean neighbour count).
    avg_num_neighbors: float = 10.0
    #: Width of the hidden layer of the energy MLP (0: num_features // 2).
    readout_hidden: int = 0


def edge_frames(edge_index: torch.Tensor, edge_vectors: torch.Tensor, fcut: torch.Tensor,
                num_nodes: int, cutoff: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-edge frames (E, 3, 3) (rows e1, e2, e3) and geometric invariants (E, NUM_GEOMETRY)."""
    i, j = edge_index[0], edge_index[1]
    r = torch.linalg.norm(edge_vectors, dim=-1, keepdim=True)
    e1 = edge_vectors / r
    u = scatter_sum(fcut.unsqueeze(-1) * edge_vectors, i, num_nodes)  # (N, 3) Å
    ui, uj = u[i], u[j]
    ui1 = (ui * e1).sum(-1, keepdim=True)
    w = ui - ui1 * e1
    wn = torch.sqrt((w * w).sum(-1, keepdim=True) + eps * eps)
    e2 = w / wn
    e3 = torch.linalg.cross(e1, e2, dim=-1)
    frame = torch.stack([e1, e2, e3], dim=1)
    geometry = torch.cat([
        ui1 / cutoff,
        (wn - eps) / cutoff,  # smooth |w|
        (uj * e1).sum(-1, keepdim=True) / cutoff,
        (uj * e2).sum(-1, keepdim=True) / cutoff,
        ((uj * e3).sum(-1, keepdim=True) / cutoff) ** 2,  # pseudoscalar, squared
        (e2 * e2).sum(-1, keepdim=True),  # how complete the frame is, in [0, 1)
    ], dim=-1)
    return frame, geometry


def frame_invariants(frame: torch.Tensor, vm: torch.Tensor, i: torch.Tensor,
                     j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project mixed vectors vm (N, 3, K) of both ends i, j (E,) into the edge frames.

    Returns the projections p_i, p_j (E, 3, K) and the O(3) invariants (E, 7K):
    p_i1, p_i2, p_i3^2, p_j1, p_j2, p_j3^2, p_i3 p_j3 (axis 3 is axial, so only even products)."""
    pi = torch.matmul(frame, vm[i])
    pj = torch.matmul(frame, vm[j])
    inv = torch.cat([pi[:, 0], pi[:, 1], pi[:, 2] ** 2, pj[:, 0], pj[:, 1], pj[:, 2] ** 2,
                     pi[:, 2] * pj[:, 2]], dim=-1)
    return pi, pj, inv


class FrameMessage(nn.Module):
    """Scalar and vector messages from frame invariants.

    Scalars: ds_i = sum_j phi(s_j) * g(invariants, rbf) * fc.
    Vectors: dv_i = sum_j [a1 e1 + a2 e2 + sum_a b_a (e_a . v_j) e_a] with invariant a, b: constant
    vectors along the frame axes plus an anisotropic (frame-diagonal) filter of v_j.
    """

    def __init__(self, f: int, k: int, num_radial: int, hidden: int):
        super().__init__()
        self.f = f
        self.mix = nn.Linear(f, k, bias=False)
        self.edge_net = mlp([7 * k + NUM_GEOMETRY + num_radial, hidden, 6 * f])
        self.phi = mlp([f, f, 6 * f])

    def forward(self, s: torch.Tensor, v: torch.Tensor, edge_index: torch.Tensor,
                frame: torch.Tensor, edge_attr: torch.Tensor, fcut: torch.Tensor, norm: float,
                chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        i, j = edge_index[0], edge_index[1]
        phi_s, vm = self.phi(s), self.mix(v)
        if chunk > 0 and i.shape[0] > chunk and not torch.jit.is_scripting():
            ds, dv = self._chunked(phi_s, v, vm, i, j, frame, edge_attr, fcut, chunk)
        else:
            a_s, a_v = self.edge_messages(phi_s, v, vm, i, j, frame, edge_attr, fcut)
            ds, dv = scatter_sum(a_s, i, s.shape[0]), scatter_sum(a_v, i, s.shape[0])
        return s + ds / norm, v + dv / norm

    @torch.jit.unused
    def _chunked(self, phi_s, v, vm, i, j, frame, edge_attr, fcut, chunk: int):
        """The sums over edges in checkpointed chunks (eager inference on large graphs)."""
        return sum_over_edges(self.edge_messages, i, phi_s.shape[0], (phi_s, v, vm),
                              (i, j, frame, edge_attr, fcut), chunk)

    def edge_messages(self, phi_s: torch.Tensor, v: torch.Tensor, vm: torch.Tensor,
                      i: torch.Tensor, j: torch.Tensor, frame: torch.Tensor,
                      edge_attr: torch.Tensor,
                      fcut: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scalar (E, F) and vector (E, 3, F) messages of edges i <- j."""
        _, _, inv = frame_invariants(frame, vm, i, j)
        x = phi_s[j] * self.edge_net(torch.cat([inv, edge_attr], dim=-1))
        x = x * fcut.unsqueeze(-1)
        parts = torch.split(x, self.f, dim=-1)
        ds, a1, a2, b1, b2, b3 = parts[0], parts[1], parts[2], parts[3], parts[4], parts[5]
        p = torch.matmul(frame, v[j])  # (E, 3, F): v_j in the frame
        coef = torch.stack([a1 + b1 * p[:, 0], a2 + b2 * p[:, 1], b3 * p[:, 2]], dim=1)
        return ds, torch.matmul(frame.transpose(1, 2), coef)  # dv = sum_a e_a coef_a


class FrameTensorReadout(nn.Module):
    """2e features t_i = sum_j sum_{a<=b} G_ab sym(e_a (x) e_b), traceless part in e3nn's basis.

    G_ab are invariant for the pairs without e3 or with e3 twice; for (e1, e3) and (e2, e3) they
    are an invariant times a pseudoscalar (a linear map of the e3 projections), so t is ``2e``."""

    def __init__(self, f: int, k: int, f2: int, num_radial: int, hidden: int):
        super().__init__()
        self.f2 = f2
        self.mix = nn.Linear(f, k, bias=False)
        self.edge_net = mlp([7 * k + NUM_GEOMETRY + num_radial, hidden, 6 * f2])
        self.phi = nn.Linear(f, 6 * f2)
        self.pseudo = nn.Linear(2 * k, f2, bias=False)
        self.register_buffer("basis", l2_basis_tensor(), persistent=False)
        self.pair_a = [a for a, _ in _PAIRS]
        self.pair_b = [b for _, b in _PAIRS]

    def _apply(self, fn, recurse=True):  # rebuild the constant basis exactly in the new dtype
        out = super()._apply(fn, recurse)
        self.basis = l2_basis_tensor(self.basis.dtype, self.basis.device)
        return out

    def forward(self, s: torch.Tensor, v: torch.Tensor, edge_index: torch.Tensor,
                frame: torch.Tensor, edge_attr: torch.Tensor, fcut: torch.Tensor, norm: float,
                chunk: int = 0) -> torch.Tensor:
        i, j = edge_index[0], edge_index[1]
        phi_s, vm = self.phi(s), self.mix(v)
        if chunk > 0 and i.shape[0] > chunk and not torch.jit.is_scripting():
            t = self._chunked(phi_s, vm, i, j, frame, edge_attr, fcut, chunk)
        else:
            t = scatter_sum(self.edge_tensors(phi_s, vm, i, j, frame, edge_attr, fcut), i,
                            s.shape[0])
        return t / norm

    @torch.jit.unused
    def _chunked(self, phi_s, vm, i, j, frame, edge_attr, fcut, chunk: int):
        (t,) = sum_over_edges(self.edge_tensors, i, phi_s.shape[0], (phi_s, vm),
                              (i, j, frame, edge_attr, fcut), chunk)
        return t

    def edge_tensors(self, phi_s: torch.Tensor, vm: torch.Tensor, i: torch.Tensor,
                     j: torch.Tensor, frame: torch.Tensor, edge_attr: torch.Tensor,
                     fcut: torch.Tensor) -> torch.Tensor:
        """2e messages (E, F2, 5) of edges i <- j."""
        pi, pj, inv = frame_invariants(frame, vm, i, j)
        g = phi_s[j] * self.edge_net(torch.cat([inv, edge_attr], dim=-1))
        g = (g * fcut.unsqueeze(-1)).view(-1, self.f2, 6)
        sigma = self.pseudo(torch.cat([pi[:, 2], pj[:, 2]], dim=-1))  # (E, F2) pseudoscalars
        g = torch.cat([g[..., :4], g[..., 4:] * sigma.unsqueeze(-1)], dim=-1)
        # 2e coefficients of e_a e_b^T + e_b e_a^T (the factor 2 off the diagonal is absorbed in G)
        ea, eb = frame[:, self.pair_a], frame[:, self.pair_b]  # (E, 6, 3)
        pairs = sym_outer_l2(ea, eb, self.basis)  # (E, 6, 5)
        return torch.matmul(g, pairs)  # (E, F2, 5)


class AlphaNetBackbone(Backbone):
    """Scalars (N, F), vectors (N, F, 3), frame-built 2e tensors (N, F2, 5); energy from an MLP
    on the scalars."""

    name = "alphanet"
    Hyperparameters = AlphaNetHyperparameters

    def __init__(self, num_species: int, cutoff: float, hparams: AlphaNetHyperparameters):
        super().__init__(num_species, cutoff, hparams)
        hp = hparams
        f, k, f2 = hp.num_features, hp.frame_channels, hp.num_tensors
        hidden = hp.edge_hidden or f
        self.num_scalars = self.num_vectors = f
        self.num_tensors = f2
        self.embedding = nn.Embedding(num_species, f)
        self.rbf = BesselBasis(hp.num_radial, cutoff)
        # initial vectors (AlphaNet's neighbour "S vectors"): sum_j W(rbf) emb(z_j) r_ij / r_ij
        self.init_filter = nn.Linear(hp.num_radial, f)
        self.init_embedding = nn.Embedding(num_species, f)
        self.messages = nn.ModuleList(
            FrameMessage(f, k, hp.num_radial, hidden) for _ in range(hp.num_layers))
        self.updates = nn.ModuleList(PaiNNUpdate(f) for _ in range(hp.num_layers))
        self.tensor_readout = FrameTensorReadout(f, k, f2, hp.num_radial, hidden) if f2 else None
        h = hp.readout_hidden or max(f // 2, 1)
        self.readout = mlp([f, h, 1])
        self.frame_eps, self.avg_num_neighbors = float(hp.frame_eps), float(hp.avg_num_neighbors)

    def forward(self, species: torch.Tensor, edge_index: torch.Tensor, edge_vectors: torch.Tensor,
                batch: torch.Tensor, num_graphs: int) -> BackboneOutput:
        n = species.shape[0]
        i, j = edge_index[0], edge_index[1]
        r = torch.linalg.norm(edge_vectors, dim=-1)
        rbf = self.rbf(r)
        fcut = cosine_cutoff(r, self.cutoff)
        frame, geometry = edge_frames(edge_index, edge_vectors, fcut, n, self.cutoff,
                                      self.frame_eps)
        edge_attr = torch.cat([geometry, rbf], dim=-1)
        norm = self.avg_num_neighbors

        s = self.embedding(species)
        embedded = self.init_embedding(species)
        chunk = self.edge_chunk()
        if chunk > 0 and i.shape[0] > chunk and not torch.jit.is_scripting():
            v = self._chunked_initial_vectors(embedded, i, j, frame, rbf, fcut, chunk)
        else:
            v = scatter_sum(self.initial_vectors(embedded, j, frame, rbf, fcut), i, n)
        v = v / math.sqrt(norm)
        for message, update in zip(self.messages, self.updates):
            s, v = message(s, v, edge_index, frame, edge_attr, fcut, norm, chunk)
            s, v = update(s, v)
        tensors = None
        if self.tensor_readout is not None:
            tensors = self.tensor_readout(s, v, edge_index, frame, edge_attr, fcut, norm, chunk)
        return BackboneOutput(scalars=s, vectors=v.transpose(1, 2), tensors=tensors,
                              atomic_energy=self.readout(s).squeeze(-1))

    @torch.jit.unused
    def _chunked_initial_vectors(self, embedded, i, j, frame, rbf, fcut, chunk: int):
        (v,) = sum_over_edges(self.initial_vectors, i, embedded.shape[0], (embedded,),
                              (j, frame, rbf, fcut), chunk)
        return v

    def initial_vectors(self, embedded: torch.Tensor, j: torch.Tensor, frame: torch.Tensor,
                        rbf: torch.Tensor, fcut: torch.Tensor) -> torch.Tensor:
        """Initial vector messages (E, 3, F): the bond axis e1 times a radial, species filter."""
        w0 = self.init_filter(rbf) * embedded[j] * fcut.unsqueeze(-1)
        return frame[:, 0, :, None] * w0[:, None, :]
