"""Plot the active-learning runs of benchmarks/active_learning_xtb.py: force MAE vs labelled
frames per strategy (mean ± std over seeds), 300 K and 600 K test sets ->
docs/active_learning_xtb.png, and print a markdown table.

    python benchmarks/plot_active_learning.py
    python benchmarks/plot_active_learning.py --results benchmarks/results/active_learning_fd_xtb.json \
        --phases al_fd al_plain --png docs/active_learning_fd_xtb.png \
        --json benchmarks/results/active_learning_fd_curves.json
    python benchmarks/plot_active_learning.py \
        --results benchmarks/results/active_learning_silica_xtb.json \
        --phases al al_ensemble al_ensemble_random al_true_error \
        --panels "mae_id=known frameworks" "mae_shift=new frameworks" \
        --title "Pool-based active learning on silica zeolites" \
        --png docs/active_learning_silica_xtb.png \
        --json benchmarks/results/active_learning_silica_curves.json

`--results` reads the curves from a benchmark results file (its phases' rows) instead of the run
folders; the x axis is the mean number of labelled frames over the seeds (uncertainty-stopped MD
can leave a round with fewer candidates than it asks for, so the seeds' counts may differ).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("e2ip", "random", "ensemble")
LABELS = {"e2ip": "e2IP-selected", "random": "random (e2IP model)",
          "ensemble": "ensemble-selected (5 members)",
          "fd600_e2ip": "e2IP-FD-selected, stop-MD", "fd600_random": "random, same stop-MD",
          "fd600_ensemble": "ensemble-selected, stop-MD",
          "plain600_random": "random, plain MD (no uncertainty)",
          "al_fd/e2ip": "e2IP-FD-selected (stop-MD pool)", "al_fd/random": "random (stop-MD pool)",
          "al_fd/ensemble": "ensemble-selected (its stop-MD pool)",
          "al_plain/e2ip": "e2IP-FD-selected (plain-MD pool)",
          "al_plain/random": "random (plain-MD pool)",
          "al_plain/ensemble": "ensemble-selected (plain-MD pool)",
          "al_fd16/e2ip": "e2IP-FD-selected (stop-MD, 16 trajectories)",
          "al_fd16/random": "random (stop-MD, 16 trajectories)",
          "al_fd16_ensemble/ensemble": "ensemble-selected (its stop-MD, 16 trajectories)",
          "al_frontier/e2ip": "e2IP-FD-selected (stop-MD from the frontier)",
          "al_frontier/random": "random (the same pools)",
          "al_frontier_plain/random": "random (plain MD from the frontier: no uncertainty)",
          "al_frontier_ensemble/ensemble": "ensemble-selected (its stop-MD from the frontier)",
          "al_frontier_ensemble_random/ensemble_random": "random (ensemble model, its pools)",
          "choice_pool64/e2ip": "e2IP-FD-selected (64 trajectories, seeds)",
          "choice_pool64/random": "random (the same pools)",
          "choice_frontier16/e2ip": "e2IP-FD-selected (16 trajectories, frontier)",
          "choice_frontier16/random": "random (the same pools)",
          "choice_true_error16/true_error": "true-error-selected (oracle; 16, frontier)",
          "choice_true_error64/true_error": "true-error-selected (oracle; 64, frontier)",
          "al_true_error/true_error": "true-error-selected (oracle ranking)",
          "al_target_pool/e2ip": "e2IP-FD-selected (pool: 600 K xTB frames)",
          "al_target_pool/random": "random (pool: 600 K xTB frames)",
          "al_target_pool/true_error": "true-error-selected (oracle; 600 K xTB frames)",
          "al_new_only/new_only": "new topologies only (oracle; random among them)",
          "al/e2ip": "e2IP-FD-selected", "al/random": "random",
          "al_ensemble/ensemble": "ensemble-selected (5 members)",
          "al_ensemble_random/ensemble_random": "random (ensemble model)"}
ETHANOL_PANELS = ["mae_300K=held-out 300 K MD", "mae_600K=held-out 600 K MD"]


def curves(runs_dir: Path, prefixes: list[str] | None = None) -> dict:
    """{strategy: [rows per seed]} from the finished runs' round_*/evaluation.json files (runs
    whose names start with one of `prefixes`; None: those without a prefix)."""
    out = {}
    for run in sorted(runs_dir.glob("*_seed*")):
        name = run.name.rsplit("_seed", 1)[0]
        if not (name.startswith(tuple(prefixes)) if prefixes else name in STRATEGIES):
            continue
        files = sorted(run.glob("round_*/evaluation.json"))
        if len(files) < 6:
            continue  # unfinished
        rows = []
        for f in files:
            ev = json.loads(f.read_text())
            rows.append({"labelled": ev["labelled"], "mae_300K": ev["test_300K"]["force_mae"],
                         "mae_600K": ev["test_600K"]["force_mae"]})
        out.setdefault(name, []).append(rows)
    return out


def curves_from_results(path: Path, phases: list[str]) -> dict:
    """{phase/strategy: [rows per seed]} from a benchmark results file (active_learning_xtb.py)."""
    results = json.loads(path.read_text())
    out = {}
    for phase in phases:
        for run, record in results[phase].items():
            if isinstance(record, dict) and "rows" in record:
                out.setdefault(f"{phase}/{run.rsplit('_seed', 1)[0]}", []).append(record["rows"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix", nargs="+", default=None, help="run-name prefixes to plot")
    ap.add_argument("--png", default="docs/active_learning_xtb.png")
    ap.add_argument("--json", default="benchmarks/results/active_learning_curves.json")
    ap.add_argument("--results", default=None, help="read the curves from this results file")
    ap.add_argument("--phases", nargs="+", default=["al_fd"], help="its phases to plot")
    ap.add_argument("--panels", nargs=2, default=ETHANOL_PANELS, metavar="KEY=TITLE",
                    help="the two test sets: row key and panel title")
    ap.add_argument("--title", default="Active learning on ethanol")
    args = ap.parse_args()
    data = (curves_from_results(ROOT / args.results, args.phases) if args.results
            else curves(ROOT / "benchmarks/runs/al_xtb", args.prefix))
    summary = {k: v for k, v in data.items()}
    (ROOT / args.json).write_text(json.dumps(summary, indent=1))
    legend_rows = -(-len(data) // 3)  # below the panels, three entries a row
    height = 3.4 + 0.25 * legend_rows
    fig, axes = plt.subplots(1, 2, figsize=(9, height), sharey=False)
    panels = [p.split("=", 1) for p in args.panels]
    lines = ["| strategy | seeds | labelled (last round) | " + " | ".join(
        f"{t}: MAE first / last round" for _, t in panels) + " |", "|---|---|---|---|---|"]
    for strategy, runs in data.items():
        runs = [seed_rows for seed_rows in runs if len(seed_rows) == len(runs[0])]
        labelled = np.array([[r["labelled"] for r in rows] for rows in runs]).mean(0)
        last = [rows[-1]["labelled"] for rows in runs]
        row = [LABELS.get(strategy, strategy), str(len(runs)),
               f"{np.mean(last):.0f} ({min(last)}-{max(last)})"]
        for ax, (key, _) in zip(axes, panels):
            mae = 1000 * np.array([[r[key] for r in rows] for rows in runs])  # meV/Å
            mean, std = mae.mean(0), mae.std(0)
            ax.errorbar(labelled, mean, yerr=std, marker="o", capsize=3,
                        label=LABELS.get(strategy, strategy))
            row.append(f"{mean[0]:.0f} ± {std[0]:.0f} / {mean[-1]:.0f} ± {std[-1]:.0f}")
        lines.append("| " + " | ".join(row) + " |")
    for ax, (_, title) in zip(axes, panels):
        ax.set_xlabel("labelled frames (GFN2-xTB)")
        ax.set_ylabel("force MAE (meV/Å)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(f"{args.title} (mean ± std over seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0.25 * legend_rows / height + 0.02, 1, 1))
    fig.savefig(ROOT / args.png, dpi=120)
    print("\n".join(lines))
    print(f"written {args.png}")


if __name__ == "__main__":
    main()
