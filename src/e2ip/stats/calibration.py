"""Post-hoc calibration, fitted on held-out data and applied as the form "cal".

Two methods behind one interface (``Potential.calibrate``):

- ``variance_scale`` (single models): every predictive covariance is multiplied by one scalar s,
  chosen to minimise the mean predictive NLL on the validation set; for a head whose epistemic
  part grows with the distance from the training data (e2IP with ``evidence:
  feature_distance``) the epistemic part gets its own factor t, fitted jointly with s
  (:func:`fit_variance_and_epistemic_scale`), so that one overall factor fitted in distribution
  cannot shrink the part that is meant to grow under shift;
- ``nll`` (deep ensembles, the default): N(mu, t U_epi + a A), A the aleatoric part (I for a
  plain ensemble, then a = s^2 is a floor; the members' mean predictive covariance for a
  heteroskedastic one), with (a, t) minimising the mean Gaussian NLL on the validation set
  (:func:`fit_aleatoric_and_epistemic_scales`): as strong as the single models' two scales;
- ``paper_floor`` (the paper's "Ensemble (cal)", docs/maths.md §6): N(mu, U_epi + s^2 I) with s
  chosen by bisection so that Coverage@95 on the validation set is 0.95
  (:func:`fit_calibration_floor`); it fixes one quantile, not the shape.
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


def fit_r_bin_factors(predictive, forces_ref: torch.Tensor, distance: torch.Tensor,
                      bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(edges (bins-1,), factors (bins,)) float64: the quantiles of the feature distance r (N,)
    that split the atoms into `bins` equal bins (bins (edge_{b-1}, edge_b], torch.bucketize), and
    per bin the variance factor minimising the bin's mean NLL (:func:`fit_variance_scale`; 1 for
    an empty bin). `predictive` (N atoms, on the CPU like the detached predictives the
    calibration fits) must offer ``select(mask)``."""
    r = distance.detach().double().cpu()
    forces_ref = forces_ref.detach().double().cpu()
    edges = torch.quantile(r, torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1])
    which = torch.bucketize(r, edges)
    factors = torch.ones(bins, dtype=torch.float64)
    for b in range(bins):
        mask = which == b
        if mask.any():
            factors[b] = fit_variance_scale(predictive.select(mask), forces_ref[mask])
    return edges, factors


def gaussian_nll_of_scales(errors: np.ndarray, epistemic: np.ndarray, aleatoric: np.ndarray,
                           a: float, t: float) -> float:
    """Mean over atoms of -log N(e; 0, t E + a A) for errors e (N, 3), E, A (N, 3, 3)."""
    cov = t * epistemic + a * aleatoric
    sign, logdet = np.linalg.slogdet(cov)
    if np.any(sign <= 0):
        return float("inf")
    quad = np.einsum("ni,ni->n", errors, np.linalg.solve(cov, errors[..., None])[..., 0])
    return float(np.mean(0.5 * (quad + logdet + D * math.log(2 * math.pi))))


def fit_aleatoric_and_epistemic_scales(errors, epistemic, aleatoric=None) -> tuple[float, float]:
    """(a, t) minimising the mean NLL of N(0, t U_epi + a A) at the errors y - mu (N, 3); A the
    aleatoric covariances (N, 3, 3), None: the identity (then a is a variance floor in the
    errors' units squared). t in [1e-3, 1e3]; a within 1e-6..1e6 of its natural size
    mean(e^2) / mean(tr A / 3). A coarse grid over (log a, log t), then Nelder-Mead from its
    best point: the NLL is smooth but not convex in (log a, log t)."""
    from scipy.optimize import minimize

    errors, epistemic = as_float64_numpy(errors), as_float64_numpy(epistemic)
    if errors.shape[0] == 0:
        raise ValueError("no atoms to calibrate on")
    epistemic = 0.5 * (epistemic + np.swapaxes(epistemic, -1, -2))
    aleatoric = (np.broadcast_to(np.eye(D), epistemic.shape) if aleatoric is None
                 else as_float64_numpy(aleatoric))
    natural = float(np.mean(errors**2)) / max(float(np.mean(np.trace(aleatoric, axis1=1,
                                                                        axis2=2))) / D, 1e-300)
    log_t_bounds = tuple(math.log(b) for b in SCALE_BOUNDS)
    log_a_bounds = (math.log(natural * 1e-6), math.log(natural * 1e6))

    def nll(x) -> float:
        log_a = min(max(x[0], log_a_bounds[0]), log_a_bounds[1])
        log_t = min(max(x[1], log_t_bounds[0]), log_t_bounds[1])
        return gaussian_nll_of_scales(errors, epistemic, aleatoric, math.exp(log_a),
                                      math.exp(log_t))

    grid = [(log_a, log_t) for log_a in np.linspace(*log_a_bounds, 13)
            for log_t in np.linspace(*log_t_bounds, 13)]
    start = min(grid, key=nll)
    res = minimize(nll, np.array(start), method="Nelder-Mead",
                   options={"xatol": 1e-4, "fatol": 1e-9, "maxiter": 2000})
    log_a = min(max(float(res.x[0]), log_a_bounds[0]), log_a_bounds[1])
    log_t = min(max(float(res.x[1]), log_t_bounds[0]), log_t_bounds[1])
    return math.exp(log_a), math.exp(log_t)


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
