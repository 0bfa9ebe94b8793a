"""Damping ablation (paper Fig. 4): the condition number of Sigma0 over early training on liquid
water, with and without spectral damping, at several learning rates; and whether training
survives.

    python experiments/damping.py [--steps 200] [--lrs 1e-3 1e-2 3e-2]

Each run: PaiNN + e2IP, 40 water frames (192 atoms each), batch 2, float32, one thread. Every
`--probe-every` optimiser steps the current (not weight-averaged) model is evaluated on 2 fixed
training frames: cond(Sigma0) = exp(lambda_max(A) - lambda_min(A)) per atom (mean, min, max) and
the largest |c2|. Writes docs/results/damping.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from e2ip.data.graph import graph_from_structures
from e2ip.errors import E2IPError
from e2ip.train.config.yaml_io import load_config
from e2ip.train.datasets import prepare_data
from e2ip.train.fit import train_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
CLIP = 8.0  # log10 cond above this is drawn at the top of the axes (a diverged run reaches 2e3)
WATER = ROOT.parent / "shared" / "data" / "water_cheng2019" / "water_cheng2019.extxyz"


class ConditionProbe(Callback):
    """cond(Sigma0) statistics of the model being trained on a fixed probe batch."""

    def __init__(self, probe, every: int):
        self.probe, self.every, self.rows = probe, every, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every:
            return
        model = pl_module.model
        with torch.no_grad():
            features = model.backbone(model.species(self.probe.numbers), self.probe.edge_index,
                                      self.probe.edge_vectors(self.probe.positions),
                                      self.probe.batch, self.probe.num_graphs)
            params = model.head(features)
        eig = torch.linalg.eigvalsh(params["A"].double())
        log_cond = (eig[:, -1] - eig[:, 0]).numpy()
        finite = bool(np.isfinite(log_cond).all())
        self.rows.append({
            "step": int(step),
            "loss": float(outputs["loss"]) if outputs is not None else math.nan,
            "log10_cond_mean": float(np.log10(np.mean(np.exp(log_cond)))) if finite else math.inf,
            "log10_cond_min": float(log_cond.min() / math.log(10)) if finite else math.inf,
            "log10_cond_max": float(log_cond.max() / math.log(10)) if finite else math.inf,
            "c2_max": float(params["c2"].norm(dim=-1).max()),
        })


def run(damping: bool, lr: float, steps: int, every: int, out: Path) -> dict:
    cfg = load_config(None, [
        f"data.train={WATER}", "data.split=[0.8,0.1,0.1]", "data.n_train=40",
        "data.n_validation=4", "data.n_test=4", "data.batch_size=2", "model.cutoff=4.0",
        "model.painn.avg_num_neighbors=26.6", f"head.damping={str(damping).lower()}",
        f"training.lr={lr}", f"training.max_epochs={math.ceil(steps / 20)}",
        "training.num_threads=1", "training.progress_bar=false", "training.patience=1000",
        "training.scheduler_patience=1000"])
    data = prepare_data(cfg.data)
    probe = graph_from_structures(list(data.train)[:2], cfg.model.cutoff, torch.float32)
    callback = ConditionProbe(probe, every)
    start = time.time()
    error = None
    try:
        train_model(cfg, out, data=data, extra_callbacks=[callback])
    except (E2IPError, RuntimeError, ValueError) as exc:  # a run that diverges is a result
        error = str(exc).splitlines()[0][:200]
    return {"damping": damping, "lr": lr, "rows": callback.rows, "error": error,
            "seconds": time.time() - start}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--probe-every", type=int, default=5)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2, 3e-2])
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the table and plot from docs/results/damping.json")
    args = parser.parse_args(argv)
    if args.report_only:
        saved = json.loads((RESULTS / "damping.json").read_text())
        write_report(saved["runs"], saved["steps"], args.probe_every)
        return
    torch.set_num_threads(1)
    runs = []
    for lr in args.lrs:
        for damping in (True, False):
            name = f"lr{lr:g}_{'damped' if damping else 'undamped'}"
            out = ROOT / "experiments" / "runs" / "damping" / name
            result = run(damping, lr, args.steps, args.probe_every, out)
            runs.append(result)
            last = result["rows"][-1] if result["rows"] else {}
            print(f"lr {lr:g} damping {damping}: {len(result['rows'])} probes, last log10 cond "
                  f"max {last.get('log10_cond_max')}, error {result['error']}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "damping.json").write_text(json.dumps({"steps": args.steps, "runs": runs}))
    write_report(runs, args.steps, args.probe_every)


def write_report(runs: list[dict], steps: int, probe_every: int) -> None:
    lines = ["# Damping ablation: cond(Sigma0) in early training on liquid water", "",
             f"PaiNN + e2IP, 40 frames, batch 2, float32, {steps} steps, one thread; "
             "cond(Sigma0) over the atoms of 2 fixed training frames, probed every "
             f"{probe_every} steps. Made by `python experiments/damping.py`.", "",
             "| lr | damping | max log10 cond over training | final log10 cond (mean / max) | "
             "max abs(c2) | survived |", "|---|---|---|---|---|---|"]
    for r in runs:
        rows = r["rows"]
        peak = max((x["log10_cond_max"] for x in rows), default=math.nan)
        last = rows[-1] if rows else {}
        c2 = max((x["c2_max"] for x in rows), default=math.nan)
        lines.append(f"| {r['lr']:g} | {'on' if r['damping'] else 'off'} | {peak:.2f} | "
                     f"{last.get('log10_cond_mean', math.nan):.2f} / "
                     f"{last.get('log10_cond_max', math.nan):.2f} | {c2:.2f} | "
                     f"{'yes' if r['error'] is None else 'no: ' + _short(r['error'])} |")
    (RESULTS / "damping.md").write_text("\n".join(lines) + "\n")
    plot(runs, RESULTS / "damping.png")
    print("\n".join(lines))


def _short(error: str) -> str:
    """The reason a run stopped, without the file and frame."""
    return error.split(" (training.max_bad_steps)")[0].replace("training stopped at ", "stopped at ")


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted({r["lr"] for r in runs})
    fig, axes = plt.subplots(1, len(lrs), figsize=(4 * len(lrs), 3.5), sharey=True)
    for ax, lr in zip(np.atleast_1d(axes), lrs, strict=True):
        for r in (r for r in runs if r["lr"] == lr):
            steps = [x["step"] for x in r["rows"]]
            mean = [x["log10_cond_mean"] for x in r["rows"]]
            lo = [x["log10_cond_min"] for x in r["rows"]]
            hi = [x["log10_cond_max"] for x in r["rows"]]
            label = "damping" if r["damping"] else "no damping"
            if r["error"] is not None:
                label += f" (diverged, step {steps[-1] if steps else 0})"
            clip = [min(v, CLIP) for v in mean], [min(v, CLIP) for v in lo], \
                [min(v, CLIP) for v in hi]
            line, = ax.plot(steps, clip[0], label=label)
            ax.fill_between(steps, clip[1], clip[2], alpha=0.2, color=line.get_color())
        ax.set_ylim(-0.2, CLIP + 0.5)
        ax.set_title(f"lr {lr:g}")
        ax.set_xlabel("optimiser step")
        ax.legend(fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel(f"log10 cond(Σ0), clipped at {CLIP:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
