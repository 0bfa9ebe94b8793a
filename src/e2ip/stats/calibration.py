"""Post-hoc calibration, fitted on held-out data and applied as the form "cal".

Two methods behind one interface (``Potential.calibrate``):

- ``variance_scale`` (single models): every predictive covariance is multiplied by one scalar s,
  chosen to minimise the mean predictive NLL on the validation set; for a head whose epistemic
  part grows with the distance from the training data (e2IP with ``evidence:
  feature_distance``) the epistemic part gets its own factor t, fitted jointly with s
  (:func:`fit_variance_and_epistemic_scale`), so that one overall factor fitted in distribution
  cannot shrink the part that is meant to grow under shift;
- ``variance_floor`` (deep ensembles, the paper's "Ensemble (cal)", docs/maths.md §6): N(mu, U_epi + s^2 I)
  with s chosen by bisection so that Coverage@95 on the validation set is 0.95.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy import stats

from e2ip.constants import DIM as D
from e2ip.stats.metrics import as_float64_numpy
from e2ip.stats.predictive import Predictive

SCALE_BOUNDS = (1e-3, 1e3)


def fit_variance_scale(predictive: Predictive, forces_ref: torch.Tensor) -> float:
    """The factor s in [1e-3, 1e3] minimising the mean NLL of ``predictive.scaled(s)`` at the
    reference forces (N, 3); bounded scalar search over log s."""
    from scipy.optimize import minimize_scalar

    def mean_nll(log_s: float) -> float:
        return float(predictive.scaled(math.exp(log_s)).nll(forces_ref).mean())

    lo, hi = (math.log(b) for b in SCALE_BOUNDS)
    res = minimize_scalar(mean_nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    return math.exp(float(res.x))


def fit_variance_and_epistemic_scale(predictive_for: Callable[[float], Predictive],
                                     forces_ref: torch.Tensor) -> tuple[float, float]:
    """(s, t) in [1e-3, 1e3]^2 minimising the mean NLL of ``predictive_for(t).scaled(s)`` at the
    reference forces (N, 3); predictive_for(t) is the predictive with the epistemic covariance
    multiplied by t. Nested bounded scalar searches: over log t outside, log s inside."""
    from scipy.optimize import minimize_scalar

    lo, hi = (math.log(b) for b in SCALE_BOUNDS)
    best: dict[float, tuple[float, float]] = {}

    def profile_nll(log_t: float) -> float:
        pred = predictive_for(math.exp(log_t)).detached()
        s = fit_variance_scale(pred, forces_ref)
        nll = float(pred.scaled(s).nll(forces_ref).mean())
        best[log_t] = (s, nll)
        return nll

    res = minimize_scalar(profile_nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-3})
    log_t = float(res.x)
    if log_t not in best:
        profile_nll(log_t)
    return best[log_t][0], math.exp(log_t)


def fit_calibration_floor(errors, epistemic, target: float = 0.95, level: float = 0.95,
                          tol: float = 1e-6, max_iter: int = 200) -> float:
    """The isotropic floor s (eV/Å) such that N(0, U_epi + s^2 I) has Coverage(level) = target.

    errors: y - mu (N, 3); epistemic: U_epi (N, 3, 3) (numpy or torch). Coverage is computed from
    the chi2(3) PIT of the Mahalanobis distance, and is non-decreasing in s, so s is found by
    bisection on log s; returns the smallest s (to `tol` relative) with coverage >= target.
    """
    errors, epistemic = as_float64_numpy(errors), as_float64_numpy(epistemic)
    if errors.shape[0] == 0:
        raise ValueError("no atoms to calibrate on")
    # U = V diag(w) V^T once; then e^T (U + s^2 I)^-1 e = sum_k (V^T e)_k^2 / (w_k + s^2).
    w, v = np.linalg.eigh(0.5 * (epistemic + np.swapaxes(epistemic, -1, -2)))
    w = np.clip(w, 0.0, None)
    proj2 = np.einsum("nij,ni->nj", v, errors) ** 2
    threshold = stats.chi2.ppf(level, D)  # chi2.cdf(q) <= level  <=>  q <= threshold

    def coverage(s: float) -> float:
        return float(np.mean((proj2 / (w + s * s)).sum(-1) <= threshold))

    scale = float(np.sqrt(np.mean(errors**2))) or 1.0
    # At hi every e^T C^-1 e <= |e|^2 / hi^2 <= 0.03 < threshold: coverage(hi) = 1 >= target.
    lo, hi = 1e-8 * scale, 10.0 * float(np.abs(errors).max() + scale)
    if coverage(lo) >= target:
        return lo
    for _ in range(max_iter):
        mid = float(np.sqrt(lo * hi))
        if coverage(mid) >= target:
            hi = mid
        else:
            lo = mid
        if hi / lo - 1.0 < tol:
            break
    return hi
