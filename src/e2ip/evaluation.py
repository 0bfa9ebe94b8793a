"""Run a model over a data set and compute every metric (SPEC 7); write metrics.json and plots."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data.graph import graph_from_structures
from .data.readers import check_elements
from .data.structures import Structure
from .data.units import energy_factor
from .predictive import Predictive, concatenate


@dataclass
class Collected:
    """Predictions over a data set (eV, eV/Å): forces/forces_ref (N, 3), energy/energy_ref (B,),
    n_atoms (B,), batch (N,), predictive (per atom) and u_epi/u_ale (N,) traces, or None."""

    forces: torch.Tensor
    forces_ref: torch.Tensor
    energy: torch.Tensor
    energy_ref: torch.Tensor
    n_atoms: torch.Tensor
    batch: torch.Tensor
    predictive: Predictive | None
    u_epi: torch.Tensor | None
    u_ale: torch.Tensor | None
    epistemic: torch.Tensor | None
    seconds: float


def collect(model, structures: list[Structure], batch_size: int = 32,
            predictive_options: dict | None = None) -> Collected:
    """Predict on `structures` in batches (float64 results on the CPU)."""
    check_elements(structures, model.elements)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    model.eval()
    graphs = [graph_from_structures(structures[k:k + batch_size], model.cutoff, dtype)
              for k in range(0, len(structures), batch_size)]
    if graphs:  # warm-up, not timed
        model(graphs[0].to(device), create_graph=False)
    parts: dict[str, list] = {k: [] for k in ("forces", "energy", "pred", "u_epi", "u_ale", "epi")}
    seconds = 0.0
    for g in graphs:
        g = g.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(g, create_graph=False)
        covs = model.covariances(out["params"], out["forces"], **(predictive_options or {}))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        parts["forces"].append(out["forces"].detach().cpu().double())
        parts["energy"].append(out["energy"].detach().cpu().double())
        if covs:
            pred = model.predictive(out["params"], out["forces"], **(predictive_options or {}))
            parts["pred"].append(_detach_predictive(pred))
            parts["u_epi"].append(covs["epistemic"].diagonal(dim1=-2, dim2=-1).sum(-1).detach()
                                  .cpu().double())
            parts["u_ale"].append(covs["aleatoric"].diagonal(dim1=-2, dim2=-1).sum(-1).detach()
                                  .cpu().double())
            parts["epi"].append(covs["epistemic"].detach().cpu().double())
    n_atoms = torch.tensor([s.n_atoms for s in structures])
    has_unc = bool(parts["pred"])
    return Collected(
        forces=torch.cat(parts["forces"]),
        forces_ref=torch.from_numpy(np.concatenate([s.forces for s in structures])).double(),
        energy=torch.cat(parts["energy"]),
        energy_ref=torch.tensor([s.energy for s in structures], dtype=torch.float64),
        n_atoms=n_atoms,
        batch=torch.repeat_interleave(torch.arange(len(structures)), n_atoms),
        predictive=concatenate(parts["pred"]) if has_unc else None,
        u_epi=torch.cat(parts["u_epi"]) if has_unc else None,
        u_ale=torch.cat(parts["u_ale"]) if has_unc else None,
        epistemic=torch.cat(parts["epi"]) if has_unc else None,
        seconds=seconds,
    )


def _detach_predictive(pred: Predictive) -> Predictive:
    """A float64 CPU copy without autograd history."""
    clone = object.__new__(type(pred))
    for key, value in vars(pred).items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            value = value.double() if value.is_floating_point() else value
        setattr(clone, key, value)
    return clone


def rotate_structures(structures: list[Structure], rotations: torch.Tensor) -> list[Structure]:
    """Each structure k rotated by rotations[k] (positions, cell rows and forces)."""
    out = []
    for s, r in zip(structures, rotations.double().numpy()):
        out.append(Structure(numbers=s.numbers, positions=s.positions @ r.T, cell=s.cell @ r.T,
                             pbc=s.pbc, energy=s.energy,
                             forces=None if s.forces is None else s.forces @ r.T,
                             source=s.source, frame=s.frame))
    return out


def compute_metrics(c: Collected, units: str = "eV", n_samples: int = 100,
                    seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Scalar metrics (JSON-ready, in `units` energy and units/Å forces) and arrays for plots."""
    from . import metrics as M

    conv = 1.0 / energy_factor(units)  # eV -> report units
    force_unit = f"{units}/Å"
    errors = M.force_errors(c.forces, c.forces_ref)
    e_err = (c.energy - c.energy_ref).abs()
    n_atoms_total = int(c.n_atoms.sum())
    out: dict[str, Any] = {
        "n_structures": int(len(c.n_atoms)),
        "n_atoms": n_atoms_total,
        "units": {"energy": units, "forces": force_unit},
        "force_mae": errors["force_mae"] * conv,
        "force_rmse": errors["force_rmse"] * conv,
        "energy_mae": float(e_err.mean()) * conv,
        "energy_rmse": float(e_err.pow(2).mean().sqrt()) * conv,
        "energy_mae_per_atom": float((e_err / c.n_atoms).mean()) * conv,
        "time_per_atom_ms": 1e3 * c.seconds / max(n_atoms_total, 1),
    }
    arrays: dict[str, Any] = {}
    if c.predictive is not None:
        unc = M.uncertainty_metrics(c.predictive, c.forces_ref, c.u_epi, c.batch,
                                    n_samples=n_samples, seed=seed)
        out.update(
            nll=float(unc["nll"]) + 3 * math.log(conv),
            energy_score=float(unc["energy_score"]) * conv,
            coverage_95=float(unc["coverage_95"]),
            calibration_error=float(unc["calibration_error"]),
            spearman=float(unc["spearman"]),
            spearman_per_structure=float(unc["spearman_per_structure"]),
            mean_epistemic=float(torch.sqrt(c.u_epi / 3).mean()) * conv,
            mean_aleatoric=float(torch.sqrt(c.u_ale / 3).mean()) * conv,
        )
        arrays["pit"] = np.asarray(unc["pit"])
        levels, coverage = M.coverage_curve(arrays["pit"])
        arrays["coverage_curve"] = (np.asarray(levels), np.asarray(coverage))
        arrays["sigma_epi"] = (torch.sqrt(c.u_epi / 3) * conv).numpy()
        arrays["error_norm"] = ((c.forces - c.forces_ref).norm(dim=-1) * conv).numpy()
    return out, arrays


def rotation_metrics(model, structures, c: Collected, batch_size: int, seed: int = 0,
                     predictive_options: dict | None = None) -> dict[str, float]:
    """Delta rho (Spearman on randomly rotated copies minus the original) and equivariance errors
    of forces and epistemic covariances (eV/Å, (eV/Å)^2)."""
    from . import metrics as M

    gen = torch.Generator().manual_seed(seed)
    rotations = M.random_rotations(len(structures), gen, torch.float64)
    rotated = rotate_structures(structures, rotations)
    cr = collect(model, rotated, batch_size, predictive_options)
    r_atom = rotations[c.batch]
    f_expected = torch.einsum("nij,nj->ni", r_atom, c.forces)
    out = {"equivariance_error_forces": float((cr.forces - f_expected).abs().max())}
    if c.u_epi is None:
        return out
    err = (c.forces - c.forces_ref).norm(dim=-1)
    err_r = (cr.forces - cr.forces_ref).norm(dim=-1)
    rho = M.spearman(c.u_epi.numpy(), err.numpy())
    rho_r = M.spearman(cr.u_epi.numpy(), err_r.numpy())
    cov_expected = r_atom @ c.epistemic @ r_atom.transpose(-1, -2)
    out.update(spearman_rotated=float(rho_r), delta_rho=float(M.rotation_stability(rho, rho_r)),
               equivariance_error_covariance=float((cr.epistemic - cov_expected).abs().max()))
    return out


def evaluate(model, structures: list[Structure], *, units: str = "eV", batch_size: int = 32,
             rotate: bool = False, seed: int = 0, n_samples: int = 100,
             predictive_options: dict | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    c = collect(model, structures, batch_size, predictive_options)
    metrics, arrays = compute_metrics(c, units, n_samples, seed)
    if rotate:
        metrics.update(rotation_metrics(model, structures, c, batch_size, seed, predictive_options))
    return metrics, arrays


def write_plots(arrays: dict[str, Any], out_dir: Path, units: str = "eV",
                label: str = "e2IP") -> list[str]:
    from . import plots

    if "pit" not in arrays:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    plots.plot_calibration({label: arrays["coverage_curve"]}, out_dir / "calibration.png")
    plots.plot_pit(arrays["pit"], out_dir / "pit.png")
    plots.plot_error_vs_uncertainty(arrays["sigma_epi"] ** 2 * 3, arrays["error_norm"],
                                    out_dir / "error_vs_uncertainty.png", unit=f"{units}/Å",
                                    xlabel="epistemic σ = sqrt(tr U_epi / 3)", diagonal=False)
    return ["calibration.png", "pit.png", "error_vs_uncertainty.png"]


def rescaled(c: Collected, factor: float) -> Collected:
    """The same predictions with every predictive covariance multiplied by `factor`."""
    return dataclasses.replace(c, predictive=c.predictive.scaled(factor), u_epi=c.u_epi * factor,
                               u_ale=c.u_ale * factor, epistemic=c.epistemic * factor)


RAW_KEYS = ("nll", "energy_score", "coverage_95", "calibration_error", "spearman")


def evaluate_and_report(model, structures, out_dir, *, units: str = "eV", batch_size: int = 32,
                        label: str = "test") -> dict[str, Any]:
    """Evaluate, write the plots into `out_dir`, and return the metrics (with `data` = label).

    For a model with a fitted variance scale the metrics are the calibrated ones, and the raw
    head's figures (same forward pass, covariances unscaled) are added under `raw`."""
    scale = float(getattr(model, "variance_scale", 1.0))
    calibrated = getattr(model, "kind", "model") == "model" and getattr(model, "calibrated", False)
    c = collect(model, structures, batch_size, {"form": "raw"} if calibrated else None)
    metrics, arrays = compute_metrics(rescaled(c, scale) if calibrated else c, units)
    metrics["data"] = label
    metrics["plots"] = write_plots(arrays, Path(out_dir), units)
    if calibrated:
        raw, _ = compute_metrics(c, units)
        metrics["variance_scale"] = scale
        metrics["raw"] = {k: raw[k] for k in RAW_KEYS}
    return metrics


def format_table(metrics: dict[str, Any]) -> str:
    """A two-column text table of the scalar metrics."""
    rows = []
    for key, value in metrics.items():
        if isinstance(value, float):
            rows.append(f"{key:<28} {value:.5g}")
        elif isinstance(value, (int, str)):
            rows.append(f"{key:<28} {value}")
        elif key == "units":
            rows.append(f"{key:<28} energy {value['energy']}, forces {value['forces']}")
    return "\n".join(rows)
