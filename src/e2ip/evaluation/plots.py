"""Figures of calibration and error-vs-uncertainty (matplotlib, Agg backend, imported lazily).

Each function writes one PNG (or any format matplotlib infers from the suffix) and returns its path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from e2ip.stats.metrics import as_float64_numpy, sparsification_curves, spearman


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    _pyplot().close(fig)
    return path


def plot_calibration(curves: dict, path, title: str | None = None) -> Path:
    """Observed coverage vs nominal level, one line per method, with the ideal diagonal dashed.

    ``curves`` maps a method name to ``(levels, coverage)`` as returned by
    :func:`e2ip.stats.metrics.coverage_curve`; one entry for a single method, several to compare."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
    for name, (levels, coverage) in curves.items():
        ax.plot(as_float64_numpy(levels), as_float64_numpy(coverage), lw=1.8, label=str(name))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("nominal level p")
    ax.set_ylabel("observed coverage  P(PIT <= p)")
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    return _save(fig, path)


def plot_pit(pit, path, bins: int = 20, title: str | None = None) -> Path:
    """Histogram (density) of the PIT values with the uniform density 1 of a calibrated model."""
    plt = _pyplot()
    pit = as_float64_numpy(pit).ravel()
    pit = pit[np.isfinite(pit)]
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    ax.hist(pit, bins=bins, range=(0.0, 1.0), density=True, color="tab:blue", alpha=0.7,
            edgecolor="white")
    ax.axhline(1.0, color="k", ls="--", lw=1, label="uniform")
    ax.set_xlim(0, 1)
    ax.set_xlabel("PIT")
    ax.set_ylabel("density")
    if title:
        ax.set_title(title)
    ax.legend(loc="upper center", fontsize=8, frameon=False)
    return _save(fig, path)


def plot_error_vs_uncertainty(u, err_norm, path, unit: str = "eV/Å", title: str | None = None,
                              gridsize: int = 60, xlabel: str = "sqrt(u / 3)",
                              diagonal: bool = True) -> Path:
    """Log-log density of the per-atom error |e| against sigma = sqrt(u / 3).

    ``u`` (N,) is a trace-type variance (e.g. u_epi = tr U_epi, in unit^2), ``err_norm`` (N,) the
    error norm (unit). A hexbin for many atoms, a scatter for few; the Spearman rank correlation of
    u and |e| is shown in the title. Non-positive or non-finite points are left out of the plot."""
    plt = _pyplot()
    u, err = as_float64_numpy(u).ravel(), as_float64_numpy(err_norm).ravel()
    rho = spearman(u, err)
    sigma = np.sqrt(np.clip(u, 0.0, None) / 3.0)
    keep = np.isfinite(sigma) & np.isfinite(err) & (sigma > 0) & (err > 0)
    sigma, err = sigma[keep], err[keep]
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    if sigma.size >= 500:
        hb = ax.hexbin(sigma, err, xscale="log", yscale="log", bins="log", gridsize=gridsize,
                       cmap="viridis", mincnt=1)
        fig.colorbar(hb, ax=ax, label="atoms")
    elif sigma.size:
        ax.scatter(sigma, err, s=6, alpha=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
    if sigma.size and diagonal:
        lo = min(sigma.min(), err.min())
        hi = max(sigma.max(), err.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel(f"{xlabel}  [{unit}]")
    ax.set_ylabel(f"|error|  [{unit}]")
    head = f"{title}: " if title else ""
    ax.set_title(f"{head}Spearman = {rho:.3f}")
    return _save(fig, path)


def plot_sparsification(curves: dict, path, unit: str = "eV/Å", what: str = "structures",
                        title: str | None = None) -> Path:
    """Sparsification curves: the mean error of what remains after removing the fraction f
    with the largest uncertainty (solid), and after removing the largest errors first (the
    oracle, dashed); the area between them is the AUSE.

    ``curves`` maps a method name to ``(uncertainty, error)`` arrays (n,), e.g. per structure
    the aggregated u_epi and the force RMSE."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    for k, (name, (u, err)) in enumerate(curves.items()):
        fractions, model, oracle = sparsification_curves(u, err)
        color = f"C{k}"
        ax.plot(fractions, model, color=color, lw=1.8, label=str(name))
        ax.plot(fractions, oracle, color=color, lw=1, ls="--",
                label="oracle" if len(curves) == 1 else f"{name} oracle")
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"fraction of {what} removed (most uncertain first)")
    ax.set_ylabel(f"mean force RMSE of the rest  [{unit}]")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, frameon=False)
    return _save(fig, path)
