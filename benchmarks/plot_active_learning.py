"""Plot the active-learning runs of benchmarks/active_learning_xtb.py: force MAE vs labelled
frames per strategy (mean ± std over seeds), 300 K and 600 K test sets ->
docs/active_learning_xtb.png, and print a markdown table.

    python benchmarks/plot_active_learning.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LABELS = {"e2ip": "e2IP-selected", "random": "random (e2IP model)",
          "ensemble": "ensemble-selected (5 members)"}


def curves(runs_dir: Path) -> dict:
    """{strategy: [rows per seed]} from the finished runs' round_*/evaluation.json files."""
    out = {}
    for run in sorted(runs_dir.glob("*_seed*")):
        files = sorted(run.glob("round_*/evaluation.json"))
        if len(files) < 6:
            continue  # unfinished
        rows = []
        for f in files:
            ev = json.loads(f.read_text())
            rows.append({"labelled": ev["labelled"], "mae_300K": ev["test_300K"]["force_mae"],
                         "mae_600K": ev["test_600K"]["force_mae"]})
        out.setdefault(run.name.rsplit("_seed", 1)[0], []).append(rows)
    return out


def main() -> None:
    data = curves(ROOT / "benchmarks/runs/al_xtb")
    summary = {k: v for k, v in data.items()}
    (ROOT / "benchmarks/results/active_learning_curves.json").write_text(json.dumps(summary,
                                                                                  indent=1))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=False)
    lines = ["| strategy | seeds | " + " | ".join(
        f"{t} MAE @ {n} frames" for t in ("300 K", "600 K") for n in (51, 101)) + " |",
        "|---|---|---|---|---|---|"]
    for strategy, runs in data.items():
        labelled = np.array([r["labelled"] for r in runs[0]])
        row = [LABELS.get(strategy, strategy), str(len(runs))]
        for ax, key in zip(axes, ("mae_300K", "mae_600K")):
            mae = 1000 * np.array([[r[key] for r in rows] for rows in runs])  # meV/Å
            mean, std = mae.mean(0), mae.std(0)
            ax.errorbar(labelled, mean, yerr=std, marker="o", capsize=3,
                        label=LABELS.get(strategy, strategy))
            row += [f"{mean[0]:.0f} ± {std[0]:.0f}", f"{mean[-1]:.0f} ± {std[-1]:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    for ax, title in zip(axes, ("held-out 300 K MD", "held-out 600 K MD")):
        ax.set_xlabel("labelled frames (GFN2-xTB)")
        ax.set_ylabel("force MAE (meV/Å)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Active learning on ethanol (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(ROOT / "docs/active_learning_xtb.png", dpi=120)
    print("\n".join(lines))
    print("written docs/active_learning_xtb.png")


if __name__ == "__main__":
    main()
