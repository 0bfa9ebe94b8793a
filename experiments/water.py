"""Liquid water (paper Table 1, Fig. 2): e2IP against deep ensembles and heteroskedastic deep
ensembles, raw and calibrated, every member with the full single-model budget.

    python experiments/water.py train [--seeds 0 1 2]
    python experiments/water.py report [--seeds 0 1 2] [--timing]

Data: ../shared/data/water_cheng2019 (revPBE0-D3, 192-atom boxes), split 80/10/10 with seed 0,
then capped to the sizes in experiments/configs/water.yaml (this machine's scale; say so beside
every figure). PaiNN, cutoff 4 Å. Writes docs/results/water.{json,md} and, for the first seed,
water_calibration.png (coverage curves of every row) and water_pit.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from runner import RESULTS, ROOT, RUNS, RunFailed, mean_std, prepared, train_run, train_seconds

CONFIG = ROOT / "experiments" / "configs" / "water.yaml"
METHODS = {
    "e2ip": ["head.evidence=learned"],  # the paper's e2IP (the default is the feature distance)
    "ensemble": ["model.head=none", "ensemble.size=5"],
    "het_ensemble": ["model.head=mve", "ensemble.size=5"],
}
#: (row, method, form); the paper's numbers (docs/maths.md §8, AlphaNet on a GPU) beside the matching rows
ROWS = [
    ("Ensemble (raw), 5 models", "ensemble", "raw"),
    ("Ensemble (cal)", "ensemble", "cal"),
    ("Het. ensemble (raw), 5 models", "het_ensemble", "raw"),
    ("Het. ensemble (cal)", "het_ensemble", "cal"),
    ("e2IP (raw)", "e2ip", "raw"),
    ("e2IP (cal)", "e2ip", "cal"),
    ("e2IP-FD (raw)", "e2ip-fd", "raw"),  # the e2IP run with the feature distance (the default)
    ("e2IP-FD (cal)", "e2ip-fd", "cal"),
]
PAPER = {"Ensemble (raw), 5 models": [0.386, 0.64, 0.255, 0.380, 237.62, 0.463],
         "Ensemble (cal)": [0.386, 0.67, 0.931, 0.256, 2.74, 0.463],
         "e2IP (raw)": [0.471, 0.68, 0.910, 0.114, 1.31, 0.102]}
KEYS = ["force_mae", "energy_score", "coverage_95", "calibration_error", "nll", "spearman",
        "ause_atoms", "time_per_atom_ms"]
HEADERS = ["force MAE (kcal/mol/Å)", "ES", "Cov@95", "CE", "NLL", "Spearman", "AUSE (atoms)",
           "ms/atom"]


def run_dir(method: str, seed: int) -> Path:
    return RUNS / "water" / method / f"seed{seed}"


def train(seeds: list[int], methods: list[str], threads: int) -> None:
    for seed in seeds:
        for method in methods:
            try:
                seconds = train_run(CONFIG, run_dir(method, seed), METHODS[method], seed,
                                    threads)
            except RunFailed as exc:
                sys.exit(str(exc))
            state = f"trained in {seconds:.0f} s" if seconds else "done"
            print(f"water {method} seed {seed}: {state}", flush=True)


def report(seeds: list[int], timing: bool) -> None:
    from e2ip.evaluation.evaluate import collect, compute_metrics, time_per_atom_ms
    from e2ip.evaluation.plots import plot_calibration, plot_pit
    from e2ip.models.io import load_model
    from e2ip.stats import metrics as M

    torch.set_num_threads(1)
    cfg, data = prepared(CONFIG)
    test = list(data.test)
    rows: dict = {label: [] for label, _, _ in ROWS}
    curves, pits = {}, {}
    for seed in seeds:
        loaded: dict = {}
        for label, method, form in ROWS:
            path = run_dir(method.removesuffix("-fd"), seed) / "model.pt"
            if not path.exists():
                continue
            if method not in loaded:
                loaded[method] = load_model(path)
                if method.endswith("-fd"):  # fitted on the training frames, calibrated again
                    loaded[method] = loaded[method].with_feature_distance(
                        data.train, cfg.data.eval_batch_size)
                    loaded[method].calibrate(data.validation, cfg.data.eval_batch_size)
            model = loaded[method]
            # small batches: 4 boxes stay under the edge-chunking threshold (faster on a CPU)
            c = collect(model, test, batch_size=cfg.data.eval_batch_size, forms=[form])
            metrics, arrays = compute_metrics(c, "kcal/mol", form)
            u = c.forms[form]
            metrics["ause_atoms"] = M.ause(u.u_epi, (c.forces - c.forces_ref).norm(dim=-1)) * 23.0605
            if timing and seed == seeds[0]:
                metrics["time_per_atom_ms"] = time_per_atom_ms(model, test[:32],
                                                               batch_size=cfg.data.eval_batch_size)
            rows[label].append({k: metrics.get(k) for k in KEYS})
            if seed == seeds[0]:
                curves[label], pits[label] = arrays["coverage_curve"], arrays["pit"]
    seconds = {m: [train_seconds(run_dir(m, s)) for s in seeds] for m in METHODS}
    results = {"seeds": seeds, "rows": rows, "train_seconds": seconds, "n_test": len(test),
               "n_train": cfg.data.n_train, "epochs": cfg.training.max_epochs,
               "machine": f"{platform.processor() or platform.machine()}, 1 torch thread"}
    stem = RESULTS / "water"
    if not timing and stem.with_suffix(".json").exists():  # keep the last measured timings
        old = json.loads(stem.with_suffix(".json").read_text())["rows"]
        for label, runs in rows.items():
            for run, before in zip(runs, old.get(label, []), strict=False):
                run["time_per_atom_ms"] = before.get("time_per_atom_ms")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    if curves:
        plot_calibration(curves, RESULTS / "water_calibration.png", title="liquid water, test set")
        for label, pit in pits.items():
            name = label.split(" (")[0].replace(" ", "_").replace(".", "").lower()
            plot_pit(pit, RESULTS / f"water_pit_{name}_{label.split('(')[1][:3]}.png",
                     title=label)
    stem.with_suffix(".md").write_text(markdown(results))
    print(stem.with_suffix(".md").read_text())


def markdown(results: dict) -> str:
    lines = ["# Liquid water (paper Table 1)", "",
             f"Ours: PaiNN, {results['n_train']} training frames, {results['epochs']} epochs per "
             f"model and per ensemble member, {results['n_test']} test frames, seeds "
             f"{results['seeds']} (mean ± std); {results['machine']}. Paper: AlphaNet, full "
             "data, GPU. Made by `python experiments/water.py train` then `report --timing`.", "",
             "| method | n | " + " | ".join(HEADERS) + " |", "|---|---|" + "---|" * len(KEYS)]
    for label, runs in results["rows"].items():
        if runs:
            lines.append(f"| {label} (ours) | {len(runs)} | "
                         + " | ".join(mean_std([r[k] for r in runs]) for k in KEYS) + " |")
        if label in PAPER:
            paper = PAPER[label]
            lines.append(f"| {label} (paper) | | {paper[0]} | {paper[1]} | {paper[2]} | "
                         f"{paper[3]} | {paper[4]} | | | {paper[5]} |")
    lines += ["", "Training cost (seconds, one run; an ensemble is its 5 members; a resumed run, "
              "timed only in its last part, is left out):", ""]
    for method, secs in results["train_seconds"].items():
        lines.append(f"- {method}: {mean_std(secs, 0)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["train", "report"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timing", action="store_true")
    args = parser.parse_args(argv)
    if args.action == "train":
        train(args.seeds, args.methods, args.threads)
    else:
        report(args.seeds, args.timing)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
