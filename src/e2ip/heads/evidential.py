"""The e2IP head: Normal-Inverse-Wishart evidence with an equivariant SPD scale expm(A)
(docs/maths.md §1-5)."""

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from e2ip.backbones.base import BackboneOutput
from e2ip.constants import DIM as D
from e2ip.heads.base import FeatureDims, Head
from e2ip.heads.feature_distance import FeatureDistance
from e2ip.heads.spd import damp_norm, damp_scalar, expm_symmetric
from e2ip.nn.irreps import L2_BASIS, l2_to_matrix, sym_outer_l2
from e2ip.nn.mlp import mlp
from e2ip.stats.losses import niw_nll, niw_regularizer
from e2ip.stats.predictive import StudentT

Evidence = Literal["learned", "feature_distance"]
EVIDENCE = get_args(Evidence)


@dataclass
class E2IPHyperparameters:
    """The e2IP head (docs/maths.md §1-5). The scalar damping window (tau0, cmax0) is wider than
    the paper's 4/5 (docs/maths.md §2): measured on rMD17 aspirin, c0 saturated at -5, i.e. a
    predicted force std >= 0.08 sigma_F, while the errors were 0.05 sigma_F, giving Coverage@95
    0.99 and CE 0.35. The scalar sets only the overall scale; the condition number is bounded
    by the 2e damping (tau2, cmax2) alone."""

    #: Width of the hidden layer of the scalar MLP.
    hidden: int = 64
    #: Number of 2e channels mixed into c2 (outer products of vector mixes for PaiNN-like backbones).
    tensor_channels: int = 8
    #: Damp the scalar c0 and the 2e part c2 (bounds the scale's condition number; false: no damping).
    damping: bool = True
    #: Scalar damping: c0 is unchanged while |c0| <= tau0.
    tau0: float = 9.0
    #: Scalar damping: bound on |c0|.
    cmax0: float = 10.0
    #: Tensor damping: c2 is unchanged while its norm is <= tau2.
    tau2: float = 4.0
    #: Tensor damping: bound on the norm of c2.
    cmax2: float = 5.0
    #: Floor added to the evidence kappa (docs/maths.md §3).
    kappa_min: float = 1e-6
    #: nu > D + 1 + nu_margin, so the predictive covariance stays finite (docs/maths.md §3).
    nu_margin: float = 1.0
    #: Weight lambda of the evidence regulariser.
    reg_weight: float = 0.01
    #: Weight of the NIW negative log-likelihood.
    nll_weight: float = 1.0
    #: 'feature_distance' (kappa_i / r_i, r_i the distance of atom i's features from the training
    #: atoms'; docs/uncertainty_under_shift.md) or 'learned' (the paper's e2IP: kappa from the readout).
    evidence: Evidence = "feature_distance"
    #: Ridge lambda of the feature distance (relative to the mean feature variance).
    feature_ridge: float = 1e-3
    #: Feature distance from centred features plus an intercept (the ridge relative to their
    #: variance); false: the uncentred second moment of e2ip 0.2 (files written by it load so).
    feature_centred: bool = True
    #: One feature distance per element (its own mean, covariance and normalisation; an element
    #: with fewer training atoms than features uses the pooled one), so an atom's r ~ 1 in
    #: distribution whatever the composition; false: one for all atoms (as in e2ip 0.2).
    feature_per_element: bool = True
    #: With n >= 2 (and the feature-distance evidence), calibration also fits one variance factor
    #: per quantile bin of r over the calibration atoms (by the NLL, after the two scales); in
    #: the form 'cal' an atom's covariances are multiplied by its bin's factor (atoms beyond the
    #: last edge take the last bin's). 0: off (docs/uncertainty_under_shift.md). The factors
    #: are piecewise constant in r: an uncertainty bias in MD (`--bias-strength`) then has jumps
    #: its forces do not see. Single models only (an ensemble is calibrated on its members'
    #: spread: refused with ensemble.size > 1).
    calibration_r_bins: int = 0



def binned_factor(distance: torch.Tensor, edges: torch.Tensor,
                  factors: torch.Tensor) -> torch.Tensor:
    """(N,) the factor of the bin of each atom's feature distance r (N,): factors[b] for r in
    (edges[b-1], edges[b]] (as numpy.searchsorted; empty `edges`: factors[0] everywhere).
    A free function so the TorchScript export (e2ip.integrations.scripted) shares it."""
    which = torch.bucketize(distance.to(edges.dtype), edges)
    return factors[which].to(distance.dtype)


class E2IPHead(Head):
    """Per atom: c0 (0e), c2 (2e), evidence kappa and nu; Sigma0 = expm((s_ref + c0') I + T(c2')).

    The 2e part is read from the backbone's native ``2e`` features when it has them, otherwise
    built from vector features as sym(sum_k a_k (x) b_k) with a = W1 v, b = W2 v (docs/maths.md §1).
    Channels are combined with invariant gates from the scalars, which keeps equivariance.
    """

    name = "e2ip"
    label = "e2IP"
    Hyperparameters = E2IPHyperparameters
    supports_feature_distance = True
    # settings fixed at construction: TorchScript compiles only the branch they select
    __constants__ = ["use_native_l2", "uses_feature_statistics", "damping"]

    @classmethod
    def feature_distance_options(cls, options: dict) -> dict:
        return {**options, "evidence": "feature_distance"}

    def describe(self) -> str:
        """'e2IP', 'e2IP w/o damping', with '-FD' for the feature-distance evidence."""
        label = self.label if self.hparams.damping else "e2IP w/o damping"
        return label + ("-FD" if self.uses_feature_statistics else "")

    def __init__(self, dims: FeatureDims, force_scale: float, hparams: E2IPHyperparameters):
        super().__init__(dims, force_scale, hparams)
        if hparams.evidence not in EVIDENCE:
            raise ValueError(f"e2ip head: evidence must be one of {', '.join(EVIDENCE)}, got "
                             f"{hparams.evidence!r}")
        self.uses_feature_statistics = self.scales_epistemic = hparams.evidence != "learned"
        if self.uses_feature_statistics:
            self.feature_distance = FeatureDistance(
                dims.num_scalars, hparams.feature_ridge, centred=hparams.feature_centred,
                num_groups=dims.num_species if hparams.feature_per_element else 1)
        self.r_bins = int(hparams.calibration_r_bins)
        if self.r_bins:
            if self.r_bins < 2 or not self.uses_feature_statistics:
                raise ValueError("e2ip head: calibration_r_bins must be 0 (off) or >= 2, with "
                                 f"evidence: feature_distance (got {self.r_bins}, evidence "
                                 f"{hparams.evidence!r})")
            # fitted by the model's calibration (set_r_bins); factors of 1 until then
            self.register_buffer("r_bin_edges", torch.zeros(self.r_bins - 1, dtype=torch.float64))
            self.register_buffer("r_bin_factors", torch.ones(self.r_bins, dtype=torch.float64))
        k = hparams.tensor_channels
        self.use_native_l2 = dims.num_tensors > 0
        if self.use_native_l2:
            self.mix_l2 = nn.Linear(dims.num_tensors, k, bias=False)
        elif dims.num_vectors > 0:
            self.mix_a = nn.Linear(dims.num_vectors, k, bias=False)
            self.mix_b = nn.Linear(dims.num_vectors, k, bias=False)
        else:
            raise ValueError("the e2IP head needs vector (1o) or tensor (2e) features from the backbone")
        self.scalar_mlp = mlp([dims.num_scalars, hparams.hidden, 3 + k])
        last = self.scalar_mlp[-1]
        with torch.no_grad():  # start at Sigma0 ~ sigma_F^2 I and moderate evidence
            last.weight.mul_(0.1)
            last.bias.zero_()
        self.s_ref = 2.0 * math.log(self.force_scale)
        # the damper bounds |B|_F = |c2'| <= cmax2 (T is an isometry), which fixes expm's squaring
        # count: no host sync in the hot path, a static graph for torch.compile
        self.expm_norm_bound = hparams.cmax2 if hparams.damping else None
        # the hyperparameters the forward pass reads, as plain attributes (TorchScript)
        self.damping = bool(hparams.damping)
        self.tau0, self.cmax0 = float(hparams.tau0), float(hparams.cmax0)
        self.tau2, self.cmax2 = float(hparams.tau2), float(hparams.cmax2)
        self.kappa_min = float(hparams.kappa_min)
        self.nu_floor = D + 1 + float(hparams.nu_margin)  # nu > D + 1 + nu_margin
        # the constant irreps -> matrix map T (not saved: rebuilt from its exact float64 values)
        self.register_buffer("l2_basis", torch.tensor(L2_BASIS, dtype=torch.float64),
                             persistent=False)

    def expm(self, a_mat: torch.Tensor) -> torch.Tensor:
        """expm of the head's A (or -A), (N, 3, 3)."""
        return expm_symmetric(a_mat, max_norm=self.expm_norm_bound)

    def forward(self, features: BackboneOutput) -> dict[str, torch.Tensor]:
        out = self.scalar_mlp(features.scalars)
        c0, z_kappa, z_nu = out[:, 0], out[:, 1], out[:, 2]
        gates = out[:, 3:]
        basis = self.l2_basis.to(features.scalars.dtype)
        if self.use_native_l2:
            tensors = features.tensors
            assert tensors is not None
            t = self.mix_l2(tensors.transpose(1, 2)).transpose(1, 2)  # (N, K, 5)
        else:
            vectors = features.vectors
            assert vectors is not None
            v = vectors.transpose(1, 2)  # (N, 3, F)
            a = self.mix_a(v).transpose(1, 2)  # (N, K, 3)
            b = self.mix_b(v).transpose(1, 2)
            t = sym_outer_l2(a, b, basis)  # (N, K, 5)
        c2 = (gates.unsqueeze(-1) * t).sum(1)
        if self.damping:
            c0 = damp_scalar(c0, self.tau0, self.cmax0)
            c2 = damp_norm(c2, self.tau2, self.cmax2)
        eye = torch.eye(3, dtype=c2.dtype, device=c2.device)
        a_mat = (self.s_ref + c0)[:, None, None] * eye + l2_to_matrix(c2, basis)
        kappa = nn.functional.softplus(z_kappa) + self.kappa_min
        nu = nn.functional.softplus(z_nu) + self.nu_floor
        params = {"A": a_mat, "c0": c0, "c2": c2, "kappa": kappa, "nu": nu}
        if self.uses_feature_statistics:  # a Python constant of the head: no branching on data
            distance = self.feature_distance(features.scalars, features.species)
            params["feature_distance"] = distance
            params["learned_kappa"] = kappa  # what the loss trains
            params["kappa"] = kappa / distance
        return params

    def fit_feature_statistics(self, batches) -> int:
        return self.feature_distance.fit((f.scalars, f.species) for f in batches)

    def feature_statistics_fitted(self) -> bool:
        return not self.uses_feature_statistics or bool(self.feature_distance.fitted)

    def r_bin_factor(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N,) each atom's variance factor from the bin of its feature distance r (bins
        (edge_{b-1}, edge_b], as numpy.searchsorted); needs `calibration_r_bins` >= 2."""
        return binned_factor(params["feature_distance"], self.r_bin_edges, self.r_bin_factors)

    def set_r_bins(self, edges: torch.Tensor, factors: torch.Tensor) -> None:
        self.r_bin_edges.copy_(edges)
        self.r_bin_factors.copy_(factors)

    def scale_epistemic(self, params: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
        # U_epi = U_ale / kappa: t U_epi is kappa / t; the aleatoric part keeps nu and Sigma0
        out = params.copy()
        out["kappa"] = params["kappa"] / factor
        return out

    def loss(self, params, forces, forces_ref):
        hp = self.hparams
        error = forces_ref - forces
        a_mat, nu = params["A"], params["nu"]
        kappa = params.get("learned_kappa", params["kappa"])
        trace_a = a_mat.diagonal(dim1=-2, dim2=-1).sum(-1)
        nll = niw_nll(error, trace_a, self.expm(-a_mat), kappa, nu)
        reg = niw_regularizer(error, kappa, nu, self.force_scale)
        return {"loss": hp.nll_weight * nll + hp.reg_weight * reg, "nll": nll, "reg": reg}

    def sigma0(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.expm(params["A"])

    def predictive(self, params, forces) -> StudentT:
        a_mat, kappa, nu = params["A"], params["kappa"], params["nu"]
        nu_pred = nu - D + 1
        factor = (kappa + 1) * nu / (kappa * nu_pred)
        scale = factor[:, None, None] * self.expm(a_mat)
        scale_inv = self.expm(-a_mat) / factor[:, None, None]
        logdet = a_mat.diagonal(dim1=-2, dim2=-1).sum(-1) + D * torch.log(factor)
        return StudentT(forces, scale, nu_pred, scale_inv=scale_inv, logdet=logdet)

    def covariances(self, params: dict[str, torch.Tensor],
                    forces: torch.Tensor | None) -> dict[str, torch.Tensor]:
        sigma0 = self.sigma0(params)
        kappa, nu = params["kappa"], params["nu"]
        aleatoric = (nu / (nu - 4.0))[:, None, None] * sigma0  # nu / (nu - D - 1)
        epistemic = aleatoric / kappa[:, None, None]
        return {"aleatoric": aleatoric, "epistemic": epistemic, "predictive": aleatoric + epistemic,
                "sigma0": sigma0}
