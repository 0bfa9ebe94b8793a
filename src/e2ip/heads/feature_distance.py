"""How far an atom's invariant features are from the training data, in one matrix-vector product.

r_i = h_i^T C^-1 h_i / mean_train(h^T C^-1 h), with h_i the backbone's invariant (0e) features of
atom i and C = H^T H / N + lambda (tr(H^T H / N) / F) I their (uncentred, ridge-regularised)
second moment over the N training atoms. r is about 1 on the training data and grows as an atom's
environment leaves it: the leverage of a linear readout on h, i.e. the local prediction rigidity /
last-layer Laplace estimate of Bigi et al. (LLPR, 2024) for an atomic quantity, up to a constant.
The constant is left to the calibration (:meth:`e2ip.models.single.PotentialModel.calibrate`).

Written by hand (no library offers it): the fit streams H^T H over batches, and the per-atom cost
is one (N, F) x (F, F) product, F the backbone's scalar width (64 for PaiNN's default).
"""

from collections.abc import Iterable

import torch
from torch import nn

MIN_DISTANCE = 1e-6  # keeps kappa / r finite for an atom whose features are all zero


class FeatureDistance(nn.Module):
    """r(h) = |W h|^2 (N,) for features h (N, F); W = C^-1/2 / sqrt(mean_train |C^-1/2 h|^2).

    Before :meth:`fit` it returns ones (a head that uses it then behaves as without it)."""

    def __init__(self, num_features: int, ridge: float = 1e-3):
        super().__init__()
        self.ridge = float(ridge)
        self.min_distance = MIN_DISTANCE
        self.register_buffer("whitening", torch.zeros(num_features, num_features,
                                                      dtype=torch.float64))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        w = self.whitening.to(features.dtype)
        r = (features @ w.T).square().sum(-1).clamp_min(self.min_distance)
        # torch.where, not `if self.fitted`: no host sync, one static graph for torch.compile
        return torch.where(self.fitted, r, torch.ones_like(r))

    @torch.no_grad()
    def fit(self, batches: Iterable[torch.Tensor]) -> int:
        """Fit on the training atoms' features (an iterable of (n, F) tensors); returns N."""
        f = self.whitening.shape[0]
        moment = torch.zeros(f, f, dtype=torch.float64, device=self.whitening.device)
        count = 0
        for h in batches:
            h = h.detach().to(moment)
            moment += h.T @ h
            count += h.shape[0]
        if count == 0:
            raise ValueError("no training atoms to fit the feature distance on")
        moment /= count
        ridge = self.ridge * float(moment.trace()) / f
        eigval, eigvec = torch.linalg.eigh(moment + ridge * torch.eye(f, dtype=moment.dtype,
                                                                       device=moment.device))
        eigval = eigval.clamp_min(1e-300)
        whitening = (eigvec / eigval.sqrt()).T  # W^T W = C^-1
        # mean_train h^T C^-1 h = tr(C^-1 M), M = C - ridge I the second moment: from the same
        # eigenvalues, sum (lambda - ridge) / lambda (no second pass, no second solve)
        mean_leverage = float(((eigval - ridge) / eigval).sum())
        self.whitening.copy_(whitening / mean_leverage**0.5)
        self.fitted.fill_(True)
        return count
