"""Accuracy and uncertainty metrics of per-atom force predictives (SPEC section 7).

All functions take a concatenated per-atom :class:`~e2ip.predictive.Predictive` (N atoms),
reference forces ``y`` (N, 3) as a torch tensor, and return plain Python floats or numpy arrays.
Everything is evaluated in float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats

from .predictive import Predictive

LEVELS = np.arange(1, 100) / 100.0
"""Nominal levels p_k = 0.01, 0.02, ..., 0.99 of the coverage curve and the calibration error."""


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _t64(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double()
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


# --------------------------------------------------------------------------------------- accuracy
def force_errors(pred, ref) -> dict[str, float]:
    """Force MAE (mean absolute component error) and RMSE (root mean squared component error)
    of predicted forces ``pred`` (N, 3) against ``ref`` (N, 3), in the units of the inputs."""
    err = _np(pred) - _np(ref)
    return {"force_mae": float(np.mean(np.abs(err))), "force_rmse": float(np.sqrt(np.mean(err**2)))}


# ----------------------------------------------------------------------------- PIT and calibration
def pit_values(predictive: Predictive, y) -> np.ndarray:
    """Per-atom PIT (N,) of the predictive's invariant statistic (uniform if calibrated)."""
    return _np(predictive.pit(y))


def coverage_curve(pit, levels=None) -> tuple[np.ndarray, np.ndarray]:
    """(levels, coverage) with coverage(p) = mean(pit <= p); levels default to 0.01..0.99."""
    levels = LEVELS if levels is None else np.asarray(levels, dtype=np.float64)
    pit = np.sort(_np(pit).ravel())
    if pit.size == 0:
        return levels, np.full(levels.shape, np.nan)
    coverage = np.searchsorted(pit, levels, side="right") / pit.size
    return levels, coverage


def coverage_at(pit, p: float = 0.95) -> float:
    """Fraction of atoms with PIT <= p (Coverage@95 for the default p)."""
    return float(coverage_curve(pit, [p])[1][0])


def calibration_error(pit, levels=None) -> float:
    """CE = mean_k |coverage(p_k) - p_k| over p_k = 0.01..0.99 (0 for perfectly uniform PIT)."""
    levels, coverage = coverage_curve(pit, levels)
    return float(np.mean(np.abs(coverage - levels)))


# ------------------------------------------------------------------------------- proper scores
def mean_nll(predictive: Predictive, y) -> float:
    """Mean per-atom negative log density of the predictive at the reference forces."""
    with torch.no_grad():
        return float(_np(predictive.nll(y)).mean())


def energy_score_per_atom(predictive: Predictive, y, n_samples: int = 100, seed: int = 0,
                          chunk_elements: int = 2**24) -> np.ndarray:
    """Monte-Carlo energy score per atom, ES = E||X - y|| - 1/2 E||X - X'|| (N,).

    ``n_samples`` = M samples are drawn once with ``predictive.sample(M, Generator(seed))``; the
    pair term is the unbiased U-statistic, the mean of ||x_i - x_j|| over all M (M - 1) ordered
    pairs i != j. The M x M distance matrices are formed for chunks of atoms so that at most
    ``chunk_elements`` distances exist at once.
    """
    m = int(n_samples)
    if m < 2:
        raise ValueError("the energy score needs at least 2 samples")
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        x = predictive.sample(m, gen).detach()  # (M, N, 3)
    yt = _t64(y)
    n = yt.shape[0]
    out = np.empty(n, dtype=np.float64)
    step = max(1, chunk_elements // (m * m))
    for s in range(0, n, step):
        xs = x[:, s:s + step].cpu().double()  # (M, c, 3)
        first = torch.linalg.vector_norm(xs - yt[s:s + step], dim=-1).mean(0)
        xt = xs.transpose(0, 1).contiguous()  # (c, M, 3)
        dist = torch.cdist(xt, xt, compute_mode="donot_use_mm_for_euclid_dist")
        pair = dist.sum((-1, -2)) / (m * (m - 1))
        out[s:s + step] = (first - 0.5 * pair).numpy()
    return out


def energy_score(predictive: Predictive, y, n_samples: int = 100, seed: int = 0) -> float:
    """Mean over atoms of :func:`energy_score_per_atom` (lower is better; units of force)."""
    return float(energy_score_per_atom(predictive, y, n_samples, seed).mean())


# --------------------------------------------------------------------------------- ranking
def spearman(u, err) -> float:
    """Spearman rank correlation between an uncertainty ``u`` (N,) and an error ``err`` (N,).

    NaN when either input is constant or fewer than 3 finite pairs remain (non-finite pairs are
    dropped)."""
    u, err = _np(u).ravel(), _np(err).ravel()
    keep = np.isfinite(u) & np.isfinite(err)
    u, err = u[keep], err[keep]
    if u.size < 3 or np.ptp(u) == 0 or np.ptp(err) == 0:
        return math.nan
    return float(stats.spearmanr(u, err)[0])


def spearman_per_structure(u, err_vec, batch) -> float:
    """Spearman between the per-structure mean of ``u`` (N,) and the per-structure force RMSE
    (over the components of ``err_vec`` (N, 3)); ``batch`` (N,) holds each atom's structure
    index."""
    u = _np(u).ravel()
    err_vec = _np(err_vec).reshape(u.size, -1)
    labels, inverse = np.unique(_np(batch).astype(np.int64), return_inverse=True)
    count = np.bincount(inverse, minlength=len(labels)).astype(np.float64)
    mean_u = np.bincount(inverse, weights=u, minlength=len(labels)) / count
    sq = np.bincount(inverse, weights=(err_vec**2).mean(-1), minlength=len(labels)) / count
    return spearman(mean_u, np.sqrt(sq))


# ------------------------------------------------------------------------------- rotations
def rotation_stability(rho_original: float, rho_rotated: float) -> float:
    """Delta rho = rho_rotated - rho_original (SPEC 7): the change of a rank correlation (e.g.
    :func:`spearman`) when every test structure is rotated by its own random rotation (forces
    rotated with it) and the model is evaluated again. Zero for an exactly equivariant model;
    negative when the uncertainty ranking degrades under rotation."""
    return float(rho_rotated) - float(rho_original)


def random_rotations(n: int, generator: torch.Generator | int | None = None,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``n`` rotation matrices (n, 3, 3) drawn uniformly (Haar) from SO(3).

    QR of a Gaussian matrix with the signs of R's diagonal moved into Q gives Haar on O(3); the
    improper half is mapped onto SO(3) by flipping the last column (a right multiplication by a
    fixed orthogonal matrix, which preserves the Haar measure). ``generator`` may be a seed."""
    if generator is None or isinstance(generator, int):
        generator = torch.Generator().manual_seed(0 if generator is None else int(generator))
    g = torch.randn(n, 3, 3, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    flip = torch.linalg.det(q) < 0
    q[flip, :, 2] = -q[flip, :, 2]
    return q.to(dtype)


# --------------------------------------------------------------------------------- summary
def uncertainty_metrics(predictive: Predictive, y, u_epi, batch=None, n_samples: int = 100,
                        seed: int = 0) -> dict:
    """All uncertainty metrics of one method on one test set.

    ``u_epi`` (N,) is the scalar uncertainty ranked against the error (tr U_epi for e2IP);
    ``batch`` (N,) maps atoms to structures (None: no per-structure Spearman, NaN).

    Returns a dict whose JSON-serialisable entries are the floats ``nll``, ``energy_score``,
    ``coverage_95``, ``calibration_error``, ``spearman``, ``spearman_per_structure`` (NaN where
    undefined; write with ``allow_nan`` or map NaN to None) and ``coverage_curve`` (list of 99
    floats at the levels 0.01..0.99). ``pit`` is a numpy array (N,) and is not JSON-ready.
    """
    yt = _t64(y)
    loc = _t64(predictive.loc)
    err_vec = yt - loc
    err_norm = torch.linalg.vector_norm(err_vec, dim=-1)
    pit = pit_values(predictive, y)
    _, coverage = coverage_curve(pit)
    return {
        "nll": mean_nll(predictive, y),
        "energy_score": energy_score(predictive, y, n_samples=n_samples, seed=seed),
        "coverage_95": coverage_at(pit, 0.95),
        "calibration_error": calibration_error(pit),
        "spearman": spearman(u_epi, err_norm),
        "spearman_per_structure": (math.nan if batch is None
                                   else spearman_per_structure(u_epi, err_vec, batch)),
        "coverage_curve": [float(c) for c in coverage],
        "pit": pit,
    }
