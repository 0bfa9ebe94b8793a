"""PaiNN: polarizable atom interaction neural network (Schütt, Unke, Gastegger, ICML 2021)."""

from dataclasses import dataclass

import torch
from torch import nn

from e2ip.backbones.base import Backbone, BackboneOutput
from e2ip.nn.mlp import mlp
from e2ip.nn.radial import BesselBasis, cosine_cutoff
from e2ip.nn.scatter import scatter_sum, sum_over_edges


@dataclass
class PaiNNHyperparameters:
    """PaiNN: scalar and vector (1o) channels updated by equivariant message passing."""

    #: Width of the scalar and vector channels.
    num_features: int = 64
    #: Number of message-passing blocks.
    num_layers: int = 3
    #: Number of Bessel radial basis functions.
    num_radial: int = 20
    #: Width of the hidden layer of the energy MLP (0: num_features // 2).
    readout_hidden: int = 0
    #: Messages are divided by this (1: the plain PaiNN sum).
    avg_num_neighbors: float = 1.0


class PaiNNMessage(nn.Module):
    def __init__(self, f: int, num_radial: int, cutoff: float):
        super().__init__()
        self.f = f
        self.cutoff = cutoff
        self.phi = mlp([f, f, 3 * f])
        self.filter = nn.Linear(num_radial, 3 * f)

    def forward(self, s: torch.Tensor, v: torch.Tensor, edge_index: torch.Tensor,
                unit: torch.Tensor, rbf: torch.Tensor, fcut: torch.Tensor, norm: float,
                chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        i, j = edge_index[0], edge_index[1]
        phi_s = self.phi(s)
        if chunk > 0 and i.shape[0] > chunk and not torch.jit.is_scripting():
            ds, dv = self._chunked(phi_s, v, i, j, unit, rbf, fcut, chunk)
        else:
            a_s, a_v = self.edge_messages(phi_s, v, j, unit, rbf, fcut)
            ds, dv = scatter_sum(a_s, i, s.shape[0]), scatter_sum(a_v, i, s.shape[0])
        return s + ds / norm, v + dv / norm

    @torch.jit.unused
    def _chunked(self, phi_s, v, i, j, unit, rbf, fcut, chunk: int):
        """The sums over edges in checkpointed chunks (eager inference on large graphs)."""
        return sum_over_edges(self.edge_messages, i, phi_s.shape[0], (phi_s, v),
                              (j, unit, rbf, fcut), chunk)

    def edge_messages(self, phi_s: torch.Tensor, v: torch.Tensor, j: torch.Tensor,
                      unit: torch.Tensor, rbf: torch.Tensor,
                      fcut: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scalar (E, F) and vector (E, 3, F) messages of edges to neighbours j."""
        x = phi_s[j] * self.filter(rbf) * fcut.unsqueeze(-1)
        a_vv, a_s, a_vs = torch.split(x, self.f, dim=-1)
        return a_s, v[j] * a_vv.unsqueeze(1) + a_vs.unsqueeze(1) * unit.unsqueeze(-1)


class PaiNNUpdate(nn.Module):
    def __init__(self, f: int):
        super().__init__()
        self.f = f
        self.U = nn.Linear(f, f, bias=False)
        self.V = nn.Linear(f, f, bias=False)
        self.a = mlp([2 * f, f, 3 * f])

    def forward(self, s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        uv, vv = self.U(v), self.V(v)  # (N, 3, F)
        vnorm = torch.sqrt((vv * vv).sum(dim=1) + 1e-8)
        a_vv, a_sv, a_ss = torch.split(self.a(torch.cat([s, vnorm], dim=-1)), self.f, dim=-1)
        return s + a_sv * (uv * vv).sum(dim=1) + a_ss, v + a_vv.unsqueeze(1) * uv


class PaiNN(Backbone):
    """Scalar features (N, F) and vector features (N, F, 3); energy from an MLP on the scalars."""

    name = "painn"
    Hyperparameters = PaiNNHyperparameters

    def __init__(self, num_species: int, cutoff: float, hparams: PaiNNHyperparameters):
        super().__init__(num_species, cutoff, hparams)
        f = hparams.num_features
        self.num_scalars = self.num_vectors = f
        self.embedding = nn.Embedding(num_species, f)
        self.rbf = BesselBasis(hparams.num_radial, cutoff)
        self.messages = nn.ModuleList(
            PaiNNMessage(f, hparams.num_radial, cutoff) for _ in range(hparams.num_layers)
        )
        self.updates = nn.ModuleList(PaiNNUpdate(f) for _ in range(hparams.num_layers))
        h = hparams.readout_hidden or max(f // 2, 1)
        self.readout = mlp([f, h, 1])
        self.avg_num_neighbors = float(hparams.avg_num_neighbors)

    def forward(self, species: torch.Tensor, edge_index: torch.Tensor, edge_vectors: torch.Tensor,
                batch: torch.Tensor, num_graphs: int) -> BackboneOutput:
        r = torch.linalg.norm(edge_vectors, dim=-1)
        unit = edge_vectors / r.unsqueeze(-1)
        rbf = self.rbf(r)
        fcut = cosine_cutoff(r, self.cutoff)
        s = self.embedding(species)
        v = s.new_zeros(s.shape[0], 3, s.shape[1])
        norm = self.avg_num_neighbors
        chunk = self.edge_chunk()
        for message, update in zip(self.messages, self.updates):
            s, v = message(s, v, edge_index, unit, rbf, fcut, norm, chunk)
            s, v = update(s, v)
        return BackboneOutput(
            scalars=s, vectors=v.transpose(1, 2), atomic_energy=self.readout(s).squeeze(-1)
        )
