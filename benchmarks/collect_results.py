"""Summarise benchmark runs: a markdown table of test metrics and learning curves.

    python benchmarks/collect_results.py benchmarks/runs/aspirin_* --out benchmarks/results/aspirin
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

KEYS = [("force_mae", "{:.3f}"), ("force_rmse", "{:.3f}"), ("energy_mae", "{:.3f}"),
        ("nll", "{:.3f}"), ("energy_score", "{:.3f}"), ("coverage_95", "{:.3f}"),
        ("calibration_error", "{:.3f}"), ("spearman", "{:.3f}"),
        ("spearman_per_structure", "{:.3f}"), ("time_per_atom_ms", "{:.3f}")]


def read_curve(run: Path):
    path = run / "metrics.csv"
    if not path.exists():
        members = sorted(run.glob("member_*/metrics.csv"))
        if not members:
            return None
        path = members[0]
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    return ([float(r["elapsed_s"]) / 60 for r in rows], [int(r["epoch"]) for r in rows],
            [float(r["val_force_mae"]) for r in rows if r.get("val_force_mae")])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows, curves = [], {}
    for run in args.runs:
        metrics_file = run / "metrics.json"
        if not metrics_file.exists():
            continue
        m = json.loads(metrics_file.read_text())
        curve = read_curve(run)
        m["run"] = run.name
        m["epochs"] = curve[1][-1] + 1 if curve else None
        rows.append(m)
        if curve:
            curves[run.name] = curve
    units = rows[0]["units"] if rows else {"energy": "?", "forces": "?"}
    head = ["run", "epochs"] + [k for k, _ in KEYS]
    lines = [f"Units: forces {units['forces']}, energies {units['energy']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in rows:
        cells = [m["run"], str(m["epochs"])]
        for key, fmt in KEYS:
            v = m.get(key)
            cells.append("–" if v is None else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    if curves:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, (minutes, _, val) in curves.items():
            ax.plot(minutes[: len(val)], val, label=name)
        ax.set_xlabel("training time (CPU minutes, 1 thread)")
        ax.set_ylabel("validation force MAE (eV/Å)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.out.with_name(args.out.name + "_learning_curves.png"), dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
