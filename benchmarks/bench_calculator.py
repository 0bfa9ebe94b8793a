"""Calculator cost over a bare forward, and MD steps per second.

bare: `model(graph)` (energy + forces) on a prebuilt graph; calculator: `E2IPCalculator` called
as an MD step would (positions moved by ~0.005 Å each call, so nothing is cached), returning
energy, forces, all covariances and the scalar uncertainties. Median of repeated calls after a
warm-up, interleaved (bare, calc, bare, ...) so that machine load affects both alike.

    python benchmarks/bench_calculator.py [--model M] [--threads 1] [--repeats 200]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from ase import units
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

import e2ip
from e2ip.data.graph import graph_from_structures
from e2ip.data.read import read_structures
from e2ip.data.structures import Structure
from e2ip.integrations.ase_calculator import E2IPCalculator
from e2ip.models.single import PotentialModel

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(model, atoms, repeats: int, skin: float) -> dict:
    graph = graph_from_structures([Structure.from_atoms(atoms)], model.cutoff, model.dtype)
    calc = E2IPCalculator(model, skin=skin)
    rng = np.random.default_rng(0)
    base = atoms.positions.copy()

    def bare():
        model(graph, create_graph=False)

    def call():
        atoms.positions = base + rng.normal(scale=0.005, size=base.shape)
        calc.calculate(atoms, ["energy", "forces"], ["positions"])

    for _ in range(10):
        bare(), call()
    t_bare, t_calc = [], []
    for _ in range(repeats):
        t_bare.append(timed(bare))
        t_calc.append(timed(call))
    n = len(atoms)
    b, c = np.median(t_bare), np.median(t_calc)
    return {"atoms": n, "skin": skin, "bare_ms": 1e3 * b, "calculator_ms": 1e3 * c,
            "ratio": c / b, "neighbor_builds": calc.neighbors.builds}


def md_speed(model, atoms, steps: int, skin: float) -> float:
    atoms = atoms.copy()
    atoms.calc = E2IPCalculator(model, skin=skin)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=300, friction=0.01 / units.fs,
                   rng=np.random.default_rng(0))
    dyn.run(5)
    t0 = time.perf_counter()
    dyn.run(steps)
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "benchmarks/runs/aspirin_e2ip_64_ema/model.pt"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/calculator_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    aspirin = read_structures(SHARED / "rmd17/rmd17_aspirin_test_01.npz", index=":1")[0].to_atoms()
    water = read_structures(SHARED / "water_cheng2019/water_cheng2019.extxyz",
                            index=":1")[0].to_atoms()
    trained = e2ip.load_model(args.model)
    # the water box: same architecture (PaiNN + e2IP defaults), weights untrained (cost only)
    torch.manual_seed(0)
    water_model = PotentialModel(elements=[1, 8], cutoff=5.0).eval()
    for name, model, atoms in (("aspirin", trained, aspirin), ("water192", water_model, water)):
        for skin in (0.0, 1.0):
            row = {"system": name, **compare(model, atoms.copy(), args.repeats, skin)}
            row["md_steps_per_s"] = md_speed(model, atoms, 100, skin)
            print(json.dumps(row))
            rows.append(row)
    result = {"threads": args.threads, "torch": torch.__version__, "repeats": args.repeats,
              "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
