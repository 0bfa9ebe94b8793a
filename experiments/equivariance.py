"""Equivariance check (paper App. H): how far forces and covariances are from rotating with the
structure, over 300 random rotations, in float32 and float64.

    python experiments/equivariance.py [--e2ip RUN/model.pt] [--eip RUN/model.pt]

For each rotation R (uniform on SO(3)) and each test structure x: the force deviation
max_i |F_i(R x) - R F_i(x)| (eV/Å) and the covariance deviation
max_i |U_i(R x) - R U_i(x) R^T|_max / max_i |U_i(x)|_max (relative; U the predictive covariance
of the form 'raw'). Writes docs/results/equivariance.{json,md,png}. Default models: the
ethanol runs of experiments/uncertainty_shift.py (seed 0).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from e2ip.data.read import read_structures
from e2ip.models.io import load_model
from e2ip.stats.metrics import random_rotations

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "experiments" / "runs" / "shift" / "ethanol"
RESULTS = ROOT / "docs" / "results"
N_ROTATIONS = 300
N_STRUCTURES = 10


def deviations(model, structures, rotations: torch.Tensor) -> dict[str, np.ndarray]:
    """Per rotation: the largest force deviation (eV/Å) and relative covariance deviation over
    the structures' atoms."""
    base = model.predict(structures, form="raw")
    forces, cov = base["forces"], base["predictive"]
    scale = np.abs(cov).max()
    f_dev, c_dev = [], []
    for rot in rotations.numpy():
        turned = []
        for s in structures:
            t = s.__class__(**{**s.__dict__, "positions": s.positions @ rot.T})
            turned.append(t)
        p = model.predict(turned, form="raw")
        f_dev.append(np.abs(p["forces"] - forces @ rot.T).max())
        expected = np.einsum("ij,njk,lk->nil", rot, cov, rot)
        c_dev.append(np.abs(p["predictive"] - expected).max() / scale)
    return {"force": np.array(f_dev), "covariance": np.array(c_dev)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--e2ip", default=str(RUNS / "e2ip" / "seed0" / "model.pt"))
    parser.add_argument("--eip", default=str(RUNS / "eip" / "seed0" / "model.pt"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ethanol_botnet"
                                              / "test_MD.xyz"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    structures = read_structures(args.data, index=f":{N_STRUCTURES}")
    rotations = random_rotations(N_ROTATIONS, torch.Generator().manual_seed(0), torch.float64)
    results: dict = {"rotations": N_ROTATIONS, "structures": N_STRUCTURES, "data": args.data,
                     "models": {}}
    for label, path in (("e2IP", args.e2ip), ("eIP", args.eip)):
        for dtype in (torch.float32, torch.float64):
            model = load_model(path).to(dtype)
            dev = deviations(model, structures, rotations)
            results["models"][f"{label} {str(dtype)[6:]}"] = {k: v.tolist() for k, v in dev.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "equivariance.json").write_text(json.dumps(results))
    lines = ["# Equivariance over 300 random rotations", "",
             f"{N_STRUCTURES} ethanol structures (test_MD), each rotated by the same {N_ROTATIONS} "
             "uniform random rotations; per rotation the largest deviation over all atoms. "
             "Made by `python experiments/equivariance.py`.", "",
             "| model | force dev. median (eV/Å) | force dev. max | cov. dev. median (rel.) | "
             "cov. dev. max (rel.) |", "|---|---|---|---|---|"]
    for name, dev in results["models"].items():
        f, c = np.array(dev["force"]), np.array(dev["covariance"])
        lines.append(f"| {name} | {np.median(f):.1e} | {f.max():.1e} | {np.median(c):.1e} | "
                     f"{c.max():.1e} |")
    (RESULTS / "equivariance.md").write_text("\n".join(lines) + "\n")
    plot(results, RESULTS / "equivariance.png")
    print("\n".join(lines))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, dev in results["models"].items():
        for ax, key in zip(axes, ("force", "covariance"), strict=True):
            values = np.log10(np.maximum(np.array(dev[key]), 1e-18))
            ax.hist(values, bins=40, histtype="step", linewidth=1.5, label=name)
    axes[0].set_xlabel("log10 max |F(Rx) - R F(x)|  (eV/Å)")
    axes[1].set_xlabel("log10 max |U(Rx) - R U(x) R^T| / max |U|")
    for ax in axes:
        ax.set_ylabel("rotations")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
