"""Accuracy and uncertainty metrics of per-atom force predictives (docs/maths.md §7).

All functions take a concatenated per-atom :class:`~e2ip.stats.predictive.Predictive` (N atoms),
reference forces ``y`` (N, 3) as a torch tensor, and return plain Python floats or numpy arrays.
Everything is evaluated in float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats

from e2ip.stats.predictive import Predictive

LEVELS = np.arange(1, 100) / 100.0
"""Nominal levels p_k = 0.01, 0.02, ..., 0.99 of the coverage curve and the calibration error."""


def as_float64_numpy(x) -> np.ndarray:
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
    err = as_float64_numpy(pred) - as_float64_numpy(ref)
    return {"force_mae": float(np.mean(np.abs(err))), "force_rmse": float(np.sqrt(np.mean(err**2)))}


# ----------------------------------------------------------------------------- PIT and calibration
def pit_values(predictive: Predictive, y) -> np.ndarray:
    """Per-atom PIT (N,) of the predictive's invariant statistic (uniform if calibrated)."""
    return as_float64_numpy(predictive.pit(y))


def coverage_curve(pit, levels=None) -> tuple[np.ndarray, np.ndarray]:
    """(levels, coverage) with coverage(p) = mean(pit <= p); levels default to 0.01..0.99."""
    levels = LEVELS if levels is None else np.asarray(levels, dtype=np.float64)
    pit = np.sort(as_float64_numpy(pit).ravel())
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
        return float(as_float64_numpy(predictive.nll(y)).mean())


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
    u, err = as_float64_numpy(u).ravel(), as_float64_numpy(err).ravel()
    keep = np.isfinite(u) & np.isfinite(err)
    u, err = u[keep], err[keep]
    if u.size < 3 or np.ptp(u) == 0 or np.ptp(err) == 0:
        return math.nan
    return float(stats.spearmanr(u, err)[0])


#: how per-atom uncertainties become one per structure (the default is the first)
AGGREGATES = ("mean", "max", "sum")


def per_structure(u, err_vec, batch, aggregate: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """Per-structure uncertainty and force RMSE, both (B,) in order of structure index.

    u (N,): per-atom uncertainty, combined over each structure's atoms by `aggregate` ('mean',
    'max' or 'sum'); err_vec (N, 3): force errors, the RMSE over each structure's components;
    batch (N,): each atom's structure index."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    u = as_float64_numpy(u).ravel()
    err_vec = as_float64_numpy(err_vec).reshape(u.size, -1)
    labels, inverse = np.unique(as_float64_numpy(batch).astype(np.int64), return_inverse=True)
    count = np.bincount(inverse, minlength=len(labels)).astype(np.float64)
    if aggregate == "max":
        u_struct = np.full(len(labels), -np.inf)
        np.maximum.at(u_struct, inverse, u)
    else:
        u_struct = np.bincount(inverse, weights=u, minlength=len(labels))
        if aggregate == "mean":
            u_struct = u_struct / count
    sq = np.bincount(inverse, weights=(err_vec**2).mean(-1), minlength=len(labels)) / count
    return u_struct, np.sqrt(sq)


def spearman_per_structure(u, err_vec, batch, aggregate: str = "mean") -> float:
    """Spearman between the per-structure uncertainty (`aggregate` of ``u`` (N,) over each
    structure) and the per-structure force RMSE (over the components of ``err_vec`` (N, 3));
    ``batch`` (N,) holds each atom's structure index."""
    return spearman(*per_structure(u, err_vec, batch, aggregate))


def sparsification_curves(u, err) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fractions, model, oracle): the mean of `err` over what remains after removing the
    fraction f of items with the largest uncertainty `u` (model) or the largest error (oracle),
    for f = 0, 1/n, ..., (n-1)/n. Ties in `u` are removed in the order of the error, smallest
    first (the pessimistic order, so constant uncertainty gains nothing)."""
    u, err = as_float64_numpy(u).ravel(), as_float64_numpy(err).ravel()
    n = err.size
    fractions = np.arange(n) / max(n, 1)

    def remaining_means(order: np.ndarray) -> np.ndarray:
        kept = err[order][::-1]  # the items kept longest first
        return (np.cumsum(kept) / np.arange(1, n + 1))[::-1]

    by_u = np.lexsort((err, -u))  # largest u first; among equal u, smallest error first
    by_err = np.argsort(-err, kind="stable")
    return fractions, remaining_means(by_u), remaining_means(by_err)


def ause(u, err) -> float:
    """Area under the sparsification error: the integral over f in [0, 1) of (model - oracle)
    sparsification curves (:func:`sparsification_curves`, rectangles of width 1/n), in the
    units of `err`. 0 for a ranking as good as the errors themselves; lower is better. NaN for
    fewer than 2 items."""
    u, err = as_float64_numpy(u).ravel(), as_float64_numpy(err).ravel()
    keep = np.isfinite(u) & np.isfinite(err)
    u, err = u[keep], err[keep]
    if err.size < 2:
        return math.nan
    _, model, oracle = sparsification_curves(u, err)
    return float(np.mean(model - oracle))


def roc_auc(scores, labels) -> float:
    """ROC-AUC of `scores` (N,) for telling `labels` True (positive) from False: the probability
    that a random positive scores above a random negative, ties counted one half (the
    Mann-Whitney statistic from average ranks). NaN without both classes."""
    scores, labels = as_float64_numpy(scores).ravel(), np.asarray(labels, dtype=bool).ravel()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = stats.rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_worst(u_struct, rmse_struct, fraction: float = 0.1) -> float:
    """ROC-AUC of the per-structure uncertainty for flagging the worst `fraction` of structures
    (the ceil(fraction * B) with the largest force RMSE; ties at the border broken by order).
    NaN for fewer than 2 structures."""
    rmse = as_float64_numpy(rmse_struct).ravel()
    if rmse.size < 2:
        return math.nan
    n_worst = min(max(1, math.ceil(fraction * rmse.size)), rmse.size - 1)
    worst = np.zeros(rmse.size, dtype=bool)
    worst[np.argsort(-rmse, kind="stable")[:n_worst]] = True
    return roc_auc(u_struct, worst)


def auc_reference(u_struct, u_struct_reference) -> float:
    """ROC-AUC of the per-structure uncertainty for telling the evaluated structures (positive)
    from those of an in-distribution reference set: 0.5 when they look alike, 1 when every
    evaluated structure is more uncertain than every reference one."""
    a, b = as_float64_numpy(u_struct).ravel(), as_float64_numpy(u_struct_reference).ravel()
    return roc_auc(np.concatenate([a, b]), np.r_[np.ones(a.size, bool), np.zeros(b.size, bool)])


# ------------------------------------------------------------------------------- rotations
def rotation_stability(rho_original: float, rho_rotated: float) -> float:
    """Delta rho = rho_rotated - rho_original (docs/maths.md §7): the change of a rank correlation (e.g.
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
                        seed: int = 0, aggregate: str = "mean") -> dict:
    """All uncertainty metrics of one method on one test set.

    ``u_epi`` (N,) is the scalar uncertainty ranked against the error (tr U_epi for e2IP);
    ``batch`` (N,) maps atoms to structures (None: no per-structure metrics, NaN);
    ``aggregate`` combines per-atom uncertainties per structure ('mean', 'max', 'sum').

    Returns a dict whose JSON-serialisable entries are the floats ``nll``, ``energy_score``,
    ``coverage_95``, ``calibration_error``, ``spearman``, and per structure
    ``spearman_per_structure``, ``ause_per_structure`` (in force units) and ``auc_worst10``
    (NaN where undefined; write with ``allow_nan`` or map NaN to None) and ``coverage_curve``
    (list of 99 floats at the levels 0.01..0.99). ``pit`` (N,), ``u_structure`` and
    ``rmse_structure`` (B,) are numpy arrays and not JSON-ready.
    """
    yt = _t64(y)
    loc = _t64(predictive.loc)
    err_vec = yt - loc
    err_norm = torch.linalg.vector_norm(err_vec, dim=-1)
    pit = pit_values(predictive, y)
    _, coverage = coverage_curve(pit)
    if batch is None:
        u_struct = rmse_struct = np.full(0, np.nan)
    else:
        u_struct, rmse_struct = per_structure(u_epi, err_vec, batch, aggregate)
    return {
        "nll": mean_nll(predictive, y),
        "energy_score": energy_score(predictive, y, n_samples=n_samples, seed=seed),
        "coverage_95": coverage_at(pit, 0.95),
        "calibration_error": calibration_error(pit),
        "spearman": spearman(u_epi, err_norm),
        "spearman_per_structure": spearman(u_struct, rmse_struct),
        "ause_per_structure": ause(u_struct, rmse_struct),
        "auc_worst10": auc_worst(u_struct, rmse_struct, 0.1),
        "coverage_curve": [float(c) for c in coverage],
        "pit": pit,
        "u_structure": u_struct,
        "rmse_structure": rmse_struct,
    }
