"""Mean-variance estimation: the member head of a heteroskedastic deep ensemble.

Per atom an isotropic Gaussian N(mu, sigma^2 I) (Nix & Weigend 1994; Lakshminarayanan et al.
2017 for its ensembles): mu is the conservative force, sigma^2 = sigma_F^2 exp(s) with s from an
MLP on the invariant features (so rotation-invariant), trained with the Gaussian NLL. A single
such model has aleatoric uncertainty only (its epistemic covariance is zero); in an
:class:`~e2ip.models.ensemble.Ensemble` the members' variances give the aleatoric part and their spread
the epistemic part.
"""

from dataclasses import dataclass

import torch

from e2ip.backbones.base import BackboneOutput
from e2ip.constants import DIM as D
from e2ip.heads.base import FeatureDims, Head
from e2ip.nn.mlp import mlp
from e2ip.stats.predictive import Gaussian


@dataclass
class MVEHyperparameters:
    """Mean-variance estimation: a Gaussian with an isotropic per-atom force variance."""

    #: Width of the hidden layer of the variance MLP.
    hidden: int = 64
    #: |s| <= this (a tanh bound, so sigma^2 stays within exp(+-bound) sigma_F^2).
    log_variance_bound: float = 10.0
    #: Weight of the Gaussian negative log-likelihood.
    nll_weight: float = 1.0


class MVEHead(Head):
    name = "mve"
    label = "MVE"
    Hyperparameters = MVEHyperparameters
    has_epistemic = False

    def __init__(self, dims: FeatureDims, force_scale: float, hparams: MVEHyperparameters):
        super().__init__(dims, force_scale, hparams)
        self.variance_mlp = mlp([dims.num_scalars, hparams.hidden, 1])
        with torch.no_grad():  # start at sigma^2 ~ sigma_F^2
            self.variance_mlp[-1].weight.mul_(0.1)
            self.variance_mlp[-1].bias.zero_()
        self.log_variance_bound = float(hparams.log_variance_bound)

    def forward(self, features: BackboneOutput) -> dict[str, torch.Tensor]:
        bound = self.log_variance_bound
        raw = self.variance_mlp(features.scalars).squeeze(-1)
        return {"log_variance": bound * torch.tanh(raw / bound)}  # s, (N,)

    def variance(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """sigma^2 (N,) in (eV/Å)^2."""
        return self.force_scale**2 * torch.exp(params["log_variance"])

    def loss(self, params, forces, forces_ref):
        s = params["log_variance"]
        # Gaussian NLL in units of sigma_F (constants dropped): (|e|^2 / sigma^2 + 3 log sigma^2) / 2
        scaled = ((forces_ref - forces) ** 2).sum(-1) / self.force_scale**2
        nll = 0.5 * (scaled * torch.exp(-s) + D * s)
        return {"loss": self.hparams.nll_weight * nll, "nll": nll}

    def predictive(self, params, forces) -> Gaussian:
        return Gaussian(forces, self.covariances(params, forces)["predictive"])

    def covariances(self, params: dict[str, torch.Tensor],
                    forces: torch.Tensor | None) -> dict[str, torch.Tensor]:
        eye = torch.eye(3, dtype=params["log_variance"].dtype, device=params["log_variance"].device)
        aleatoric = self.variance(params)[:, None, None] * eye
        return {"aleatoric": aleatoric, "epistemic": torch.zeros_like(aleatoric),
                "predictive": aleatoric}
