"""Run a model over a data set and compute every metric (docs/maths.md §7); write metrics.json and plots."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from e2ip.data.graph import frames_listing, graph_from_structures
from e2ip.data.structures import Structure
from e2ip.data.units import energy_factor
from e2ip.data.validate import check_elements
from e2ip.errors import ModelError
from e2ip.files import atomic_write_text
from e2ip.models.potential import Potential, sigma_from_trace, traces
from e2ip.stats.predictive import Predictive, concatenate


@dataclass
class FormParts:
    """The uncertainty of one form ('raw' or 'cal') over a data set: the per-atom predictive,
    u_epi/u_ale (N,) traces and the epistemic covariances (N, 3, 3), float64 on the CPU."""

    predictive: Predictive
    u_epi: torch.Tensor
    u_ale: torch.Tensor
    epistemic: torch.Tensor


@dataclass
class Collected:
    """Predictions over a data set (eV, eV/Å): forces/forces_ref (N, 3), energy/energy_ref (B,),
    n_atoms (B,), batch (N,), and the uncertainty per form (empty without uncertainty)."""

    forces: torch.Tensor
    forces_ref: torch.Tensor
    energy: torch.Tensor
    energy_ref: torch.Tensor
    n_atoms: torch.Tensor
    batch: torch.Tensor
    forms: dict[str, FormParts]


def _cpu64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().double()


def collect(model: Potential, structures: list[Structure], batch_size: int = 32,
            forms: list[str] | None = None) -> Collected:
    """One forward pass over `structures` in batches; the uncertainty of each form in `forms`
    (default: every form the model offers) is computed from that same pass."""
    check_elements(structures, model.elements)
    forms = model.available_forms() if forms is None else [model.resolve_form(f) for f in forms]
    model.eval()
    forces, energy = [], []
    parts: dict[str, dict[str, list]] = {f: {"pred": [], "u_epi": [], "u_ale": [], "epi": []}
                                         for f in forms}
    for k in range(0, len(structures), batch_size):
        g = graph_from_structures(structures[k:k + batch_size], model.cutoff, model.dtype)
        out = model(g.to(model.device), create_graph=False)
        forces.append(_cpu64(out["forces"]))
        energy.append(_cpu64(out["energy"]))
        _check_finite(forces[-1], energy[-1], g.frames, "energy or forces")
        for form in forms:
            covs = model.covariances(out["params"], out["forces"], form)
            _check_finite(covs["predictive"], None, g.frames, f"{form} covariances")
            pred = model.predictive(out["params"], out["forces"], form)
            summary = traces(covs)
            p = parts[form]
            p["pred"].append(pred.detached())
            p["u_epi"].append(_cpu64(summary["u_epi"]))
            p["u_ale"].append(_cpu64(summary["u_ale"]))
            p["epi"].append(_cpu64(covs["epistemic"]))
    n_atoms = torch.tensor([s.n_atoms for s in structures])
    return Collected(
        forces=torch.cat(forces),
        # structures without force labels (an unlabelled reference set) get NaN references
        forces_ref=torch.from_numpy(np.concatenate(
            [s.forces if s.forces is not None else np.full((s.n_atoms, 3), np.nan)
             for s in structures])).double(),
        energy=torch.cat(energy),
        energy_ref=torch.tensor([math.nan if s.energy is None else s.energy
                                 for s in structures], dtype=torch.float64),
        n_atoms=n_atoms,
        batch=torch.repeat_interleave(torch.arange(len(structures)), n_atoms),
        forms={f: FormParts(predictive=concatenate(p["pred"]), u_epi=torch.cat(p["u_epi"]),
                            u_ale=torch.cat(p["u_ale"]), epistemic=torch.cat(p["epi"]))
               for f, p in parts.items()},
    )


def time_per_atom_ms(model: Potential, structures: list[Structure], batch_size: int = 32,
                     repeats: int = 5) -> float:
    """Inference cost as docs/maths.md §7 says: energy, forces and every covariance of the default form,
    graphs built beforehand, one warm-up pass, then the median over `repeats` passes of the
    time per atom (ms); CUDA-synchronised on GPUs."""
    device = model.device
    graphs = [graph_from_structures(structures[k:k + batch_size], model.cutoff, model.dtype)
              .to(device) for k in range(0, len(structures), batch_size)]
    n_atoms = sum(s.n_atoms for s in structures)
    form = model.resolve_form(None) if model.has_uncertainty else None

    def one_pass() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for g in graphs:
            out = model(g, create_graph=False)
            if form is not None:
                model.covariances(out["params"], out["forces"], form)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    model.eval()
    one_pass()
    return 1e3 * float(np.median([one_pass() for _ in range(repeats)])) / max(n_atoms, 1)


def rotate_structures(structures: list[Structure], rotations: torch.Tensor) -> list[Structure]:
    """Each structure k rotated by rotations[k] (positions, cell rows and forces)."""
    out = []
    for s, r in zip(structures, rotations.double().numpy()):
        out.append(Structure(numbers=s.numbers, positions=s.positions @ r.T, cell=s.cell @ r.T,
                             pbc=s.pbc, energy=s.energy,
                             forces=None if s.forces is None else s.forces @ r.T,
                             source=s.source, frame=s.frame))
    return out


UNCERTAINTY_KEYS = ("nll", "energy_score", "coverage_95", "calibration_error", "spearman",
                    "spearman_per_structure", "ause_per_structure", "auc_worst10",
                    "auc_reference", "mean_epistemic", "mean_aleatoric")

#: the default per-structure aggregate of per-atom uncertainties (see metrics.per_structure)
DEFAULT_AGGREGATE = "mean"


def _check_finite(x: torch.Tensor, y: torch.Tensor | None, frames, what: str) -> None:
    """Raise ModelError naming the batch's structures when a prediction is NaN or inf (a model
    with broken weights; metrics of such predictions would be meaningless or crash)."""
    if not bool(torch.isfinite(x).all()) or (y is not None and not bool(torch.isfinite(y).all())):
        raise ModelError(f"the model predicts non-finite {what} for a batch holding "
                         f"{frames_listing(frames, 3)}; "
                         "its weights are probably broken (NaN or inf)")


def compute_metrics(c: Collected, units: str = "eV", form: str | None = None,
                    n_samples: int = 100, seed: int = 0, aggregate: str = DEFAULT_AGGREGATE,
                    reference: Collected | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Scalar metrics (in `units` energy and units/Å forces) of the predictions, with the
    uncertainty metrics of `form` (None: accuracy only), and arrays for plots.

    aggregate: how per-atom u_epi becomes one uncertainty per structure ('mean', 'max', 'sum');
    reference: the same model's predictions on an in-distribution reference set (its labels are
    not used), for `auc_reference`."""
    from e2ip.stats import metrics as M

    conv = 1.0 / energy_factor(units)  # eV -> report units
    errors = M.force_errors(c.forces, c.forces_ref)
    labelled = torch.isfinite(c.energy_ref)  # structures without an energy label are skipped
    e_err = (c.energy - c.energy_ref).abs()[labelled]
    per_atom = float((e_err / c.n_atoms[labelled]).mean()) * conv if len(e_err) else None
    out: dict[str, Any] = {
        "n_structures": int(len(c.n_atoms)),
        "n_atoms": int(c.n_atoms.sum()),
        "units": {"energy": units, "forces": f"{units}/Å"},
        "force_mae": errors["force_mae"] * conv,
        "force_rmse": errors["force_rmse"] * conv,
        "energy_mae": float(e_err.mean()) * conv if len(e_err) else None,
        "energy_rmse": float(e_err.pow(2).mean().sqrt()) * conv if len(e_err) else None,
        "energy_mae_per_atom": per_atom,
    }
    arrays: dict[str, Any] = {}
    if form is None:
        return out, arrays
    u = c.forms[form]
    unc = M.uncertainty_metrics(u.predictive, c.forces_ref, u.u_epi, c.batch,
                                n_samples=n_samples, seed=seed, aggregate=aggregate)
    if reference is not None:
        u_ref, _ = M.per_structure(reference.forms[form].u_epi, reference.forces_ref,
                                   reference.batch, aggregate)
        auc_ref = M.auc_reference(unc["u_structure"], u_ref)
    else:
        auc_ref = math.nan
    out.update(
        # a density in (units/Å)^-3: 3 log(conv) converts the per-atom NLL from eV/Å
        nll=float(unc["nll"]) + 3 * math.log(conv),
        energy_score=float(unc["energy_score"]) * conv,
        coverage_95=float(unc["coverage_95"]),
        calibration_error=float(unc["calibration_error"]),
        spearman=float(unc["spearman"]),
        spearman_per_structure=float(unc["spearman_per_structure"]),
        ause_per_structure=float(unc["ause_per_structure"]) * conv,
        auc_worst10=float(unc["auc_worst10"]),
        aggregate=aggregate,
        mean_epistemic=float(sigma_from_trace(u.u_epi).mean()) * conv,
        mean_aleatoric=float(sigma_from_trace(u.u_ale).mean()) * conv,
    )
    if reference is not None:
        out["auc_reference"] = float(auc_ref)
    arrays["pit"] = np.asarray(unc["pit"])
    arrays["coverage_curve"] = M.coverage_curve(arrays["pit"])
    arrays["sigma_epi"] = (sigma_from_trace(u.u_epi) * conv).numpy()
    arrays["error_norm"] = ((c.forces - c.forces_ref).norm(dim=-1) * conv).numpy()
    arrays["u_structure"] = unc["u_structure"]
    arrays["rmse_structure"] = unc["rmse_structure"] * conv
    return out, arrays


def rotation_metrics(model: Potential, structures, c: Collected, batch_size: int, seed: int = 0,
                     forms: list[str] | None = None) -> dict[str | None, dict[str, float]]:
    """Per form: Delta rho (Spearman on randomly rotated copies minus the original) and the
    equivariance errors of forces and epistemic covariances (eV/Å, (eV/Å)^2)."""
    from e2ip.stats import metrics as M

    forms = list(c.forms) if forms is None else forms
    gen = torch.Generator().manual_seed(seed)
    rotations = M.random_rotations(len(structures), gen, torch.float64)
    cr = collect(model, rotate_structures(structures, rotations), batch_size, forms)
    r_atom = rotations[c.batch]
    f_expected = torch.einsum("nij,nj->ni", r_atom, c.forces)
    base = {"equivariance_error_forces": float((cr.forces - f_expected).abs().max())}
    if not forms:
        return {None: base}
    err = (c.forces - c.forces_ref).norm(dim=-1)
    err_r = (cr.forces - cr.forces_ref).norm(dim=-1)
    out: dict[str | None, dict[str, float]] = {}
    for form in forms:
        u, ur = c.forms[form], cr.forms[form]
        rho = M.spearman(u.u_epi.numpy(), err.numpy())
        rho_r = M.spearman(ur.u_epi.numpy(), err_r.numpy())
        cov_expected = r_atom @ u.epistemic @ r_atom.transpose(-1, -2)
        out[form] = {**base, "spearman_rotated": float(rho_r),
                     "delta_rho": float(M.rotation_stability(rho, rho_r)),
                     "equivariance_error_covariance":
                         float((ur.epistemic - cov_expected).abs().max())}
    return out


def evaluate_forms(model: Potential, structures: list[Structure], forms: list[str | None], *,
                   units: str = "eV", batch_size: int = 32, rotate: bool = False, seed: int = 0,
                   n_samples: int = 100, aggregate: str = DEFAULT_AGGREGATE,
                   reference: list[Structure] | None = None) -> dict[str | None, tuple[dict, dict]]:
    """Metrics and plot arrays for each form in `forms` (None for a model without uncertainty),
    all from one forward pass (and one more over rotated copies with `rotate`, one over the
    `reference` structures for `auc_reference`)."""
    wanted = [f for f in forms if f is not None]
    c = collect(model, structures, batch_size, wanted)
    ref = collect(model, reference, batch_size, wanted) if reference and wanted else None
    rot = rotation_metrics(model, structures, c, batch_size, seed, wanted) if rotate else {}
    results = {}
    for form in forms:
        metrics, arrays = compute_metrics(c, units, form, n_samples, seed, aggregate, ref)
        metrics.update(rot.get(form, {}))
        metrics["form"] = form
        if form == "cal":  # what was applied: {method, value}, and the value under its name
            calibration = model.calibration()
            metrics["calibration"] = calibration
            metrics[calibration["method"]] = calibration["value"]
        results[form] = (metrics, arrays)
    return results


def evaluate(model: Potential, structures: list[Structure], *, units: str = "eV",
             batch_size: int = 32, rotate: bool = False, seed: int = 0, n_samples: int = 100,
             form: str | None = None, timing: bool = False, aggregate: str = DEFAULT_AGGREGATE,
             reference: list[Structure] | None = None) -> tuple[dict[str, Any], dict]:
    """Every metric of one model on one data set, in one form.

    form: 'raw' or 'cal' (None: 'cal' when the model is calibrated, else 'raw'). The metrics
    always say which: `form`, and whenever a calibration is applied also `calibration`
    ({method, value}), the fitted value under its method's name (`variance_scale` for single
    models and heteroskedastic ensembles, `nll_floor` or the paper's `variance_floor` for
    ensembles) and the raw figures from the same pass under `raw`.
    timing: add `time_per_atom_ms` measured as docs/maths.md §7 says (:func:`time_per_atom_ms`);
    aggregate, reference: the per-structure uncertainty and the reference set of
    :func:`compute_metrics`."""
    form = model.resolve_form(form) if model.has_uncertainty else None
    forms = [form, "raw"] if form == "cal" else [form]
    results = evaluate_forms(model, structures, forms, units=units, batch_size=batch_size,
                             rotate=rotate, seed=seed, n_samples=n_samples, aggregate=aggregate,
                             reference=reference)
    metrics, arrays = results[form]
    if form == "cal":
        raw = results["raw"][0]
        metrics["raw"] = {k: raw[k] for k in (*UNCERTAINTY_KEYS, "delta_rho") if k in raw}
    if timing:
        metrics["time_per_atom_ms"] = time_per_atom_ms(model, structures, batch_size)
    return metrics, arrays


def write_plots(arrays: dict[str, Any], out_dir: Path, units: str = "eV",
                label: str = "e2IP") -> list[str]:
    from e2ip.evaluation import plots

    if "pit" not in arrays:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    plots.plot_calibration({label: arrays["coverage_curve"]}, out_dir / "calibration.png")
    plots.plot_pit(arrays["pit"], out_dir / "pit.png")
    plots.plot_error_vs_uncertainty(arrays["sigma_epi"] ** 2 * 3, arrays["error_norm"],
                                    out_dir / "error_vs_uncertainty.png", unit=f"{units}/Å",
                                    xlabel="epistemic σ = sqrt(tr U_epi / 3)", diagonal=False)
    names = ["calibration.png", "pit.png", "error_vs_uncertainty.png"]
    if len(arrays.get("u_structure", ())) >= 2:
        plots.plot_error_vs_uncertainty(arrays["u_structure"], arrays["rmse_structure"],
                                        out_dir / "error_vs_uncertainty_per_structure.png",
                                        unit=f"{units}/Å", xlabel="sqrt(per-structure u_epi / 3)",
                                        title="per structure", diagonal=False)
        plots.plot_sparsification({label: (arrays["u_structure"], arrays["rmse_structure"])},
                                  out_dir / "sparsification.png", unit=f"{units}/Å")
        names += ["error_vs_uncertainty_per_structure.png", "sparsification.png"]
    return names


def evaluate_and_report(model: Potential, structures, out_dir, *, units: str = "eV",
                        batch_size: int = 32, label: str = "test", form: str | None = None,
                        rotate: bool = False, timing: bool = False) -> dict[str, Any]:
    """:func:`evaluate`, then write the plots into `out_dir`; return the metrics (with
    `data` = label and the plot names)."""
    metrics, arrays = evaluate(model, structures, units=units, batch_size=batch_size,
                               form=form, rotate=rotate, timing=timing)
    metrics["data"] = label
    metrics["plots"] = write_plots(arrays, Path(out_dir), units)
    return metrics


#: why a metric can be undefined (it is then null in metrics.json, with the reason)
UNDEFINED_REASONS = {
    "spearman": "undefined: fewer than 3 atoms, or constant errors or uncertainties",
    "spearman_per_structure": "undefined: fewer than 3 structures, or constant per-structure "
                              "errors or uncertainties",
    "spearman_rotated": "undefined: fewer than 3 atoms, or constant errors or uncertainties",
    "ause_per_structure": "undefined: fewer than 2 structures",
    "auc_worst10": "undefined: fewer than 2 structures",
    "auc_reference": "undefined: an empty evaluated or reference set",
    "delta_rho": "undefined: a Spearman correlation it is the difference of is undefined",
}


def json_ready(metrics: dict[str, Any]) -> dict[str, Any]:
    """A copy that strict JSON accepts: every non-finite float becomes null, and its reason is
    listed under `undefined` (dotted keys for nested blocks)."""
    undefined: dict[str, str] = {}

    def clean(node, prefix: str):
        if isinstance(node, dict):
            return {k: clean(v, f"{prefix}{k}.") for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [clean(v, prefix) for v in node]
        if isinstance(node, (float, np.floating)) and not math.isfinite(float(node)):
            key = prefix.rstrip(".")
            undefined[key] = UNDEFINED_REASONS.get(key.split(".")[-1],
                                                   "undefined: could not be computed")
            return None
        if isinstance(node, np.generic):
            return node.item()
        return node

    out = clean(metrics, "")
    if undefined:
        out["undefined"] = {**out.get("undefined", {}), **undefined}
    return out


def write_metrics_json(metrics, path: str | Path) -> None:
    """Write strict JSON (no NaN) atomically; creates the folder."""
    data = json_ready(metrics) if isinstance(metrics, dict) else [json_ready(m) for m in metrics]
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False))


def format_table(metrics: dict[str, Any]) -> str:
    """A two-column text table of the scalar metrics (the form first)."""
    rows = []
    if "form" in metrics:
        form = metrics["form"]
        note = {"cal": "calibrated", "raw": "raw, no calibration applied",
                None: "no uncertainty head"}[form]
        rows.append(f"{'form':<28} {form} ({note})")
    for key, value in metrics.items():
        if key == "form":
            continue
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            rows.append(f"{key:<28} n/a")
        elif isinstance(value, float):
            rows.append(f"{key:<28} {value:.5g}")
        elif isinstance(value, (int, str)):
            rows.append(f"{key:<28} {value}")
        elif key == "units":
            rows.append(f"{key:<28} energy {value['energy']}, forces {value['forces']}")
    return "\n".join(rows)
