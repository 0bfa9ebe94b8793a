"""eIP baseline (Xu et al., Nat. Commun. 2025): a normal-inverse-gamma head per Cartesian axis.

Deep evidential regression (Amini et al. 2020) applied to each force component k independently:
gamma_k = mu_k (the conservative force mean from autograd, as in e2IP), and v_k, alpha_k, beta_k
from a per-axis readout that sees the lab-frame k-th Cartesian component of the vector features.
The readout is deliberately NOT equivariant (docs/maths.md §6): the covariance is diagonal in the lab frame
and does not rotate with the structure.

Marginal predictive per axis: Student-t with dof 2 alpha, location gamma and scale^2
beta (1 + v) / (v alpha). Aleatoric variance beta / (alpha - 1), epistemic beta / (v (alpha - 1)).
"""

from dataclasses import dataclass

import torch
from torch import nn

from e2ip.backbones.base import BackboneOutput
from e2ip.constants import DIM as D
from e2ip.heads.base import FeatureDims, Head
from e2ip.nn.irreps import L2_BASIS, l2_to_matrix
from e2ip.nn.mlp import mlp
from e2ip.stats.losses import nig_nll, nig_regularizer
from e2ip.stats.predictive import IndependentStudentT


@dataclass
class EIPHyperparameters:
    """The eIP head: independent Normal-Inverse-Gamma evidence per Cartesian axis."""

    #: Width of the hidden layer of the per-axis MLP.
    hidden: int = 64
    #: Floor of the NIG parameter v.
    v_min: float = 1e-6
    #: alpha > 1 + alpha_margin.
    alpha_margin: float = 1e-6
    #: Floor of the NIG parameter beta (in units of sigma_F^2).
    beta_min: float = 1e-6
    #: Weight of the |e_k| (2 v + alpha) regulariser.
    reg_weight: float = 0.01
    #: Weight of the NIG negative log-likelihood.
    nll_weight: float = 1.0


class EIPHead(Head):
    """Per atom and axis k: (v, alpha, beta) = softplus(MLP([scalars, x_k])) with x_k the k-th
    Cartesian component of every vector channel (and the k-th row of every 2e channel's matrix when
    the backbone has native rank-2 features). One MLP is shared by the three axes."""

    name = "eip"
    label = "eIP"
    Hyperparameters = EIPHyperparameters
    equivariant = False
    # feature widths fixed at construction: TorchScript compiles only the branches they select
    __constants__ = ["num_vectors", "num_tensors"]

    def __init__(self, dims: FeatureDims, force_scale: float, hparams: EIPHyperparameters):
        super().__init__(dims, force_scale, hparams)
        if dims.num_vectors == 0 and dims.num_tensors == 0:
            raise ValueError("the eIP head needs vector (1o) or tensor (2e) backbone features")
        width = dims.num_scalars + dims.num_vectors + D * dims.num_tensors
        self.axis_mlp = mlp([width, hparams.hidden, 3])
        last = self.axis_mlp[-1]
        with torch.no_grad():  # start near v = alpha - 1 = ln 2, beta / (alpha - 1) ~ sigma_F^2
            last.weight.mul_(0.1)
            last.bias.zero_()
        self.num_vectors, self.num_tensors = dims.num_vectors, dims.num_tensors
        self.v_min, self.beta_min = float(hparams.v_min), float(hparams.beta_min)
        self.alpha_floor = 1.0 + float(hparams.alpha_margin)
        self.register_buffer("l2_basis", torch.tensor(L2_BASIS, dtype=torch.float64),
                             persistent=False)

    def axis_features(self, features: BackboneOutput) -> torch.Tensor:
        """(N, 3, F): for each lab axis k, the scalars and the k-th Cartesian components."""
        s = features.scalars
        parts = [s.unsqueeze(1).expand(-1, 3, -1)]
        if self.num_vectors > 0:
            vectors = features.vectors
            assert vectors is not None
            parts.append(vectors.transpose(1, 2))  # (N, F1, 3) -> (N, 3, F1)
        if self.num_tensors > 0:
            tensors = features.tensors
            assert tensors is not None
            mats = l2_to_matrix(tensors, self.l2_basis.to(tensors.dtype))  # (N, F2, 3, 3)
            parts.append(mats.permute(0, 2, 1, 3).flatten(2))  # row k of every channel
        return torch.cat(parts, dim=-1)

    def forward(self, features: BackboneOutput) -> dict[str, torch.Tensor]:
        out = self.axis_mlp(self.axis_features(features))  # (N, 3, 3): axis, (v, alpha, beta)
        softplus = nn.functional.softplus
        v = softplus(out[..., 0]) + self.v_min
        alpha = softplus(out[..., 1]) + self.alpha_floor
        beta = (softplus(out[..., 2]) + self.beta_min) * self.force_scale**2
        return {"v": v, "alpha": alpha, "beta": beta}

    def loss(self, params, forces, forces_ref):
        hp = self.hparams
        error = forces_ref - forces
        v, alpha, beta = params["v"], params["alpha"], params["beta"]
        nll = nig_nll(error, v, alpha, beta)
        reg = nig_regularizer(error, v, alpha, self.force_scale)
        return {"loss": hp.nll_weight * nll + hp.reg_weight * reg, "nll": nll, "reg": reg}

    def predictive(self, params, forces) -> IndependentStudentT:
        v, alpha, beta = params["v"], params["alpha"], params["beta"]
        scale = torch.sqrt(beta * (1 + v) / (v * alpha))
        return IndependentStudentT(forces, scale, 2 * alpha)

    def covariances(self, params: dict[str, torch.Tensor],
                    forces: torch.Tensor | None) -> dict[str, torch.Tensor]:
        v, alpha, beta = params["v"], params["alpha"], params["beta"]
        ale = beta / (alpha - 1)
        epi = ale / v
        aleatoric, epistemic = torch.diag_embed(ale), torch.diag_embed(epi)
        return {"aleatoric": aleatoric, "epistemic": epistemic, "predictive": aleatoric + epistemic}
