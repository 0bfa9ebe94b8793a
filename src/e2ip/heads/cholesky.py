"""Ablation "e2IP w/o equivariance" (docs/maths.md §6): the e2IP NIW model with a lab-frame Cholesky scale.

Sigma0 = sigma_F^2 (L L^T + eps I), with L lower-triangular (positive diagonal via softplus)
predicted by an MLP from the scalars concatenated with the flattened lab-frame Cartesian components
of the vector (and rank-2) features. Evidence (kappa, nu) and the losses are exactly those of
:class:`e2ip.heads.evidential.E2IPHead`; only the construction of Sigma0 differs, and it is not
equivariant: rotating the structure does not rotate Sigma0.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from e2ip.backbones.base import BackboneOutput
from e2ip.constants import DIM as D
from e2ip.heads.base import FeatureDims, Head
from e2ip.nn.mlp import mlp
from e2ip.stats.losses import niw_nll, niw_regularizer
from e2ip.stats.predictive import StudentT

_TRIL = torch.tril_indices(D, D)
_DIAG = (_TRIL[0] == _TRIL[1]).nonzero().squeeze(-1)  # positions of the diagonal in the 6 entries
_SOFTPLUS_INV_ONE = math.log(math.e - 1.0)  # softplus(x) = 1 at this x


@dataclass
class CholeskyHyperparameters:
    """The non-equivariant ablation of e2IP: NIW evidence with Sigma0 = sigma_F^2 (L L^T + eps I)."""

    #: Width of the hidden layer of both MLPs.
    hidden: int = 64
    #: eps of Sigma0 = sigma_F^2 (L L^T + eps I).
    jitter: float = 1e-6
    #: Floor added to the evidence kappa (as in the e2IP head).
    kappa_min: float = 1e-6
    #: nu > D + 1 + nu_margin (as in the e2IP head).
    nu_margin: float = 1.0
    #: Weight lambda of the evidence regulariser.
    reg_weight: float = 0.01
    #: Weight of the NIW negative log-likelihood.
    nll_weight: float = 1.0


class CholeskyHead(Head):
    """NIW evidence with Sigma0 = sigma_F^2 (L L^T + eps I), L from lab-frame features."""

    # feature widths fixed at construction: TorchScript compiles only the branches they select
    __constants__ = ["num_vectors", "num_tensors"]
    name = "cholesky"
    label = "e2IP w/o equiv."
    Hyperparameters = CholeskyHyperparameters
    equivariant = False

    def __init__(self, dims: FeatureDims, force_scale: float, hparams: CholeskyHyperparameters):
        super().__init__(dims, force_scale, hparams)
        width = dims.num_scalars + D * dims.num_vectors + 5 * dims.num_tensors
        # Evidence from the invariant scalars, as in E2IPHead (only Sigma0 loses equivariance).
        self.evidence_mlp = mlp([dims.num_scalars, hparams.hidden, 2])
        self.cholesky_mlp = mlp([width, hparams.hidden, 6])
        with torch.no_grad():  # start at Sigma0 ~ sigma_F^2 I and moderate evidence
            for last in (self.evidence_mlp[-1], self.cholesky_mlp[-1]):
                last.weight.mul_(0.1)
                last.bias.zero_()
            self.cholesky_mlp[-1].bias[_DIAG] = _SOFTPLUS_INV_ONE
        # integer index buffers follow the module's device (dtype casts leave them alone)
        self.register_buffer("tril_index", _TRIL.clone(), persistent=False)
        self.register_buffer("diag_index", _DIAG.clone(), persistent=False)
        self.num_vectors, self.num_tensors = dims.num_vectors, dims.num_tensors
        self.jitter, self.kappa_min = float(hparams.jitter), float(hparams.kappa_min)
        self.nu_floor = D + 1 + float(hparams.nu_margin)

    def lab_features(self, features: BackboneOutput) -> torch.Tensor:
        parts = [features.scalars]
        if self.num_vectors > 0:
            vectors = features.vectors
            assert vectors is not None
            parts.append(vectors.flatten(1))  # (N, F1 * 3), lab-frame components
        if self.num_tensors > 0:
            tensors = features.tensors
            assert tensors is not None
            parts.append(tensors.flatten(1))
        return torch.cat(parts, dim=-1)

    def forward(self, features: BackboneOutput) -> dict[str, torch.Tensor]:
        evidence = self.evidence_mlp(features.scalars)
        z_kappa, z_nu = evidence[:, 0], evidence[:, 1]
        entries = self.cholesky_mlp(self.lab_features(features))  # (N, 6)
        diag_index = self.diag_index
        rows, cols = self.tril_index[0], self.tril_index[1]
        entries = entries.index_copy(1, diag_index, nn.functional.softplus(entries[:, diag_index]))
        chol = entries.new_zeros(entries.shape[0], 3, 3)
        chol[:, rows, cols] = entries
        eye = torch.eye(3, dtype=entries.dtype, device=entries.device)
        sigma0 = self.force_scale**2 * (chol @ chol.transpose(-1, -2) + self.jitter * eye)
        kappa = nn.functional.softplus(z_kappa) + self.kappa_min
        nu = nn.functional.softplus(z_nu) + self.nu_floor
        return {"L": chol, "sigma0": sigma0, "kappa": kappa, "nu": nu}

    @staticmethod
    def logdet_and_inverse(sigma0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log det Sigma0 and Sigma0^-1 through the Cholesky factor of Sigma0 (jitter included).

        L L^T + eps I is SPD only in exact arithmetic: in float32, once its condition number
        passes ~1/eps_float32, the rounded matrix can have a negative eigenvalue and the
        factorisation fails (the ill-conditioning e2IP's expm avoids). Such atoms get NaN here
        instead of an exception, so a training step that meets one is skipped and logged."""
        factor, info = torch.linalg.cholesky_ex(sigma0)
        failed = (info != 0)[:, None, None]
        factor = torch.where(failed, torch.full_like(factor, math.nan), factor)
        logdet = 2.0 * torch.log(factor.diagonal(dim1=-2, dim2=-1)).sum(-1)
        return logdet, torch.cholesky_inverse(factor)

    def loss(self, params, forces, forces_ref):
        hp = self.hparams
        error = forces_ref - forces
        kappa, nu = params["kappa"], params["nu"]
        logdet, inverse = self.logdet_and_inverse(params["sigma0"])
        # niw_nll uses its `trace_a` only as log det Sigma0 (= tr A for Sigma0 = expm(A)) and its
        # `expm_neg_a` only as Sigma0^-1 (= expm(-A)); passing log det and the inverse of this
        # Sigma0 is therefore mathematically identical to the NIW Student-t NLL with this scale.
        nll = niw_nll(error, logdet, inverse, kappa, nu)
        reg = niw_regularizer(error, kappa, nu, self.force_scale)
        return {"loss": hp.nll_weight * nll + hp.reg_weight * reg, "nll": nll, "reg": reg}

    def sigma0(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return params["sigma0"]

    def predictive(self, params, forces) -> StudentT:
        sigma0, kappa, nu = params["sigma0"], params["kappa"], params["nu"]
        nu_pred = nu - D + 1
        factor = (kappa + 1) * nu / (kappa * nu_pred)
        logdet, inverse = self.logdet_and_inverse(sigma0)
        return StudentT(forces, factor[:, None, None] * sigma0, nu_pred,
                        scale_inv=inverse / factor[:, None, None],
                        logdet=logdet + D * torch.log(factor))

    def covariances(self, params: dict[str, torch.Tensor],
                    forces: torch.Tensor | None) -> dict[str, torch.Tensor]:
        sigma0, kappa, nu = params["sigma0"], params["kappa"], params["nu"]
        aleatoric = (nu / (nu - 4.0))[:, None, None] * sigma0  # nu / (nu - D - 1)
        epistemic = aleatoric / kappa[:, None, None]
        return {"aleatoric": aleatoric, "epistemic": epistemic, "predictive": aleatoric + epistemic,
                "sigma0": sigma0}
