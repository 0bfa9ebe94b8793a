"""`e2ip compare`: several models on the same data, in the layout of the paper's tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from .evaluation import evaluate
from .model import load_model

COLUMNS = [
    ("method", "Method", "{}"),
    ("force_mae", "Force MAE", "{:.4f}"),
    ("energy_score", "ES", "{:.4f}"),
    ("coverage_95", "Cov@95", "{:.3f}"),
    ("calibration_error", "CE", "{:.3f}"),
    ("nll", "NLL", "{:.3f}"),
    ("spearman", "Spearman", "{:.3f}"),
    ("spearman_per_structure", "Spearman/struct", "{:.3f}"),
    ("delta_rho", "Δρ", "{:+.3f}"),
    ("time_per_atom_ms", "ms/atom", "{:.4f}"),
    ("n_parameters", "params", "{}"),
]


def method_label(model, path: Path) -> str:
    """A readable name: head (backbone), e.g. 'e2ip (painn)', or the run directory."""
    if getattr(model, "kind", "model") == "ensemble":
        return f"Ensemble x{len(model.members)} ({model.members[0].backbone_name})"
    head = {"e2ip": "e2IP", "eip": "eIP", "cholesky": "e2IP w/o equiv.", "none": "plain"}.get(
        model.head_name, model.head_name)
    if model.head_name == "e2ip" and not getattr(model.head.hparams, "damping", True):
        head = "e2IP w/o damping"
    return f"{head} ({model.backbone_name})"


def compare_models(paths: list[Path], structures, *, out_dir: Path, units: str = "eV",
                   batch_size: int = 32, rotate: bool = False, device: str = "cpu",
                   seed: int = 0) -> str:
    """Evaluate each model (ensembles twice: raw and calibrated); write comparison.md/.csv and
    calibration.png into `out_dir`; return the markdown table."""
    from .metrics import coverage_curve
    from .plots import plot_calibration

    rows: list[dict[str, Any]] = []
    curves = {}
    for path in paths:
        model = load_model(path, device=device)
        forms = [{"form": "raw"}, {"form": "cal"}] if getattr(model, "calibrated", False) \
            else [None]
        base = method_label(model, Path(path))
        n_params = sum(p.numel() for p in model.parameters())
        for opts in forms:
            if not opts:
                label = base
            elif getattr(model, "kind", "model") == "model":  # a single model's recalibration
                label = base if opts["form"] == "raw" else f"{base} + recal."
            else:  # an ensemble's raw and calibrated forms
                label = f"{base} {opts['form']}"
            metrics, arrays = evaluate(model, structures, units=units, batch_size=batch_size,
                                       rotate=rotate, seed=seed, predictive_options=opts)
            metrics.update(method=label, model=str(path), n_parameters=n_params)
            rows.append(metrics)
            if "pit" in arrays:
                curves[label] = coverage_curve(arrays["pit"])
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, units)
    (out_dir / "comparison.md").write_text(table + "\n")
    keys = [c[0] for c in COLUMNS] + ["force_rmse", "energy_mae", "model"]
    with open(out_dir / "comparison.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "comparison.json").write_text(json.dumps(rows, indent=2, default=str))
    if curves:
        plot_calibration(curves, out_dir / "calibration.png")
    return table


def markdown_table(rows: list[dict[str, Any]], units: str) -> str:
    header = [name if key != "force_mae" else f"{name} ({units}/Å)" for key, name, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            cells.append("–" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
