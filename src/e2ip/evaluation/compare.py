"""`e2ip compare`: several models on the same data, in the layout of the paper's tables."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from e2ip.evaluation.evaluate import DEFAULT_AGGREGATE, evaluate_forms, time_per_atom_ms, write_metrics_json
from e2ip.models.io import load_model

COLUMNS = [
    ("method", "Method", "{}"),
    ("form", "Form", "{}"),
    ("force_mae", "Force MAE", "{:.4f}"),
    ("energy_score", "ES", "{:.4f}"),
    ("coverage_95", "Cov@95", "{:.3f}"),
    ("calibration_error", "CE", "{:.3f}"),
    ("nll", "NLL", "{:.3f}"),
    ("spearman", "Spearman", "{:.3f}"),
    ("spearman_per_structure", "Spearman/struct", "{:.3f}"),
    ("ause_per_structure", "AUSE/struct", "{:.4f}"),
    ("auc_worst10", "AUC worst10", "{:.3f}"),
    ("auc_reference", "AUC vs ref", "{:.3f}"),
    ("delta_rho", "Δρ", "{:+.3f}"),
    ("time_per_atom_ms", "ms/atom", "{:.4f}"),
    ("n_parameters", "params", "{}"),
]


def compare_models(paths: list[Path], structures, *, out_dir: Path, units: str = "eV",
                   batch_size: int = 32, rotate: bool = False, device: str = "cpu",
                   seed: int = 0, timing: bool = False, aggregate: str = DEFAULT_AGGREGATE,
                   reference=None) -> str:
    """Evaluate each model in every form it offers (raw, and cal when calibrated; one forward
    pass per model); write comparison.md/.csv/.json and calibration.png into `out_dir`; return
    the markdown table. Rows are labelled '<method> raw' / '<method> cal' for calibrated models
    of every kind. aggregate, reference: the per-structure uncertainty and the in-distribution
    reference set (structures) of :func:`e2ip.evaluation.evaluate.compute_metrics`."""
    from e2ip.evaluation.plots import plot_calibration
    from e2ip.stats.metrics import coverage_curve

    rows: list[dict[str, Any]] = []
    curves = {}
    for path in paths:
        model = load_model(path, device=device)
        forms = model.available_forms() or [None]
        results = evaluate_forms(model, structures, forms, units=units, batch_size=batch_size,
                                 rotate=rotate, seed=seed, aggregate=aggregate,
                                 reference=reference)
        cost = time_per_atom_ms(model, structures, batch_size) if timing else None
        n_params = sum(p.numel() for p in model.parameters())
        for form, (metrics, arrays) in results.items():
            label = model.label() if len(forms) == 1 else f"{model.label()} {form}"
            metrics.update(method=label, model=str(path), n_parameters=n_params)
            if cost is not None:
                metrics["time_per_atom_ms"] = cost
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
    write_metrics_json(rows, out_dir / "comparison.json")
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
            missing = value is None or (isinstance(value, float) and not math.isfinite(value))
            cells.append("–" if missing else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
