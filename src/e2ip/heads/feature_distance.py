"""How far an atom's invariant features are from the training data, in one matrix-vector product.

With h_i the backbone's invariant (0e) features of atom i, mu and S their mean and covariance over
the N training atoms and C = S + lambda (tr S / F) I (lambda = ``ridge``), the distance is

    r_i = (1 + (h_i - mu)^T C^-1 (h_i - mu)) / (1 + mean_train (h - mu)^T C^-1 (h - mu)),

the leverage of a linear readout on h *with an intercept* (centred features plus an offset
column), normalised to mean 1 on the training atoms: the local prediction rigidity / last-layer
Laplace estimate of Bigi et al. (LLPR, 2024) for an atomic quantity, up to a constant the
calibration fits (:meth:`e2ip.models.single.PotentialModel.calibrate`). The ridge is relative to
the *centred* spread: a common offset of all features no longer inflates it and swamps the
low-variance directions (``centred=False``, the 0.2 design kept for files that have it: the
uncentred second moment HᵀH / N for S, mu = 0 and no intercept).

With ``num_groups`` > 1 (one group per element, ``head.feature_per_element``) every element has
its own mu, C and normalisation, so r ~ 1 on each element's training atoms whatever the
composition; an element with fewer training atoms than features gets the pooled statistics.

Written by hand (no library offers it): the fit streams the per-group sums over batches, and the
per-atom cost is one (N, F) x (F, F) product per group, F the backbone's scalar width (64 for
PaiNN's default).
"""

from collections.abc import Iterable

import torch
from torch import nn

MIN_DISTANCE = 1e-6  # keeps kappa / r finite for an atom whose features are all zero


class FeatureDistance(nn.Module):
    """r(h) = offset_g + |W_g (h - mu_g)|^2 (N,) for features h (N, F) in group g (N,) (element
    index; ignored with one group). W_g = C_g^-1/2 / sqrt(n_g), offset_g = 1 / n_g, n_g the
    training mean of 1 + (h - mu)ᵀ C^-1 (h - mu) (offset 0 and mu 0 when not ``centred``).

    Before :meth:`fit` it returns ones (a head that uses it then behaves as without it)."""

    __constants__ = ["num_groups"]

    def __init__(self, num_features: int, ridge: float = 1e-3, centred: bool = True,
                 num_groups: int = 1):
        super().__init__()
        self.ridge = float(ridge)
        self.centred = bool(centred)
        self.num_groups = int(num_groups)
        self.min_distance = MIN_DISTANCE
        g, f = self.num_groups, num_features
        self.register_buffer("center", torch.zeros(g, f, dtype=torch.float64))
        self.register_buffer("whitening", torch.zeros(g, f, f, dtype=torch.float64))
        self.register_buffer("offset", torch.zeros(g, dtype=torch.float64))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def forward(self, features: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        w = self.whitening.to(features.dtype)
        center = self.center.to(features.dtype)
        offset = self.offset.to(features.dtype)
        if self.num_groups == 1:
            r = offset[0] + ((features - center[0]) @ w[0].T).square().sum(-1)
        else:
            assert groups is not None
            # every group's distance, then each atom's own: G small products, no gather of (F, F)
            z = torch.einsum("nf,gkf->ngk", features, w) - torch.einsum("gf,gkf->gk", center, w)
            r = (offset + z.square().sum(-1)).gather(1, groups[:, None]).squeeze(1)
        r = r.clamp_min(self.min_distance)
        # torch.where, not `if self.fitted`: no host sync, one static graph for torch.compile
        return torch.where(self.fitted, r, torch.ones_like(r))

    @torch.no_grad()
    def fit(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]]) -> int:
        """Fit on the training atoms: an iterable of (features (n, F), groups (n,) or None).
        Returns the number of atoms N. A group with fewer training atoms than features (its
        covariance would be singular: the ridge alone would set the distance along the missing
        directions) gets the pooled fit."""
        g, f = self.whitening.shape[0], self.whitening.shape[1]
        opts = {"dtype": torch.float64, "device": self.whitening.device}
        counts = torch.zeros(g, **opts)
        sums = torch.zeros(g, f, **opts)
        moments = torch.zeros(g, f, f, **opts)
        for h, groups in batches:
            h = h.detach().to(**opts)
            index = (torch.zeros(h.shape[0], dtype=torch.long, device=h.device) if g == 1
                     else groups.to(h.device))
            counts.index_add_(0, index, torch.ones_like(h[:, 0]))
            sums.index_add_(0, index, h)
            moments.index_add_(0, index, h[:, :, None] * h[:, None, :])
        total = int(counts.sum())
        if total == 0:
            raise ValueError("no training atoms to fit the feature distance on")
        for k in range(g):
            n, s, m = counts[k], sums[k], moments[k]
            if n < f:  # an element the training atoms lack or barely have: pooled statistics
                n, s, m = counts.sum(), sums.sum(0), moments.sum(0)
            self._fit_group(k, n, s, m)
        self.fitted.fill_(True)
        return total

    def _fit_group(self, k: int, count: torch.Tensor, total: torch.Tensor,
                   moment: torch.Tensor) -> None:
        f = moment.shape[0]
        mean = total / count if self.centred else torch.zeros_like(total)
        spread = moment / count - mean[:, None] * mean[None, :]
        ridge = self.ridge * float(spread.trace()) / f
        eigval, eigvec = torch.linalg.eigh(spread + ridge * torch.eye(f, dtype=spread.dtype,
                                                                      device=spread.device))
        eigval = eigval.clamp_min(1e-300)
        whitening = (eigvec / eigval.sqrt()).T  # W^T W = C^-1
        # mean_train (h - mu)^T C^-1 (h - mu) = tr(C^-1 S), S = C - ridge I: from the same
        # eigenvalues, sum (lambda - ridge) / lambda (no second pass, no second solve)
        intercept = 1.0 if self.centred else 0.0
        norm = intercept + float(((eigval - ridge) / eigval).sum())
        self.center[k] = mean
        self.whitening[k] = whitening / norm**0.5
        self.offset[k] = intercept / norm
