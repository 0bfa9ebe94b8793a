"""Pool-based active learning on a periodic system: pure-silica zeolites (si_zeo22), labelled by
GFN2-xTB (tblite, periodic), e2IP-selected vs random vs ensemble-selected frames.

The setting is the one a user with a structure database meets: a few labelled frames of known
frameworks, and an unlabelled pool that mixes more frames of those frameworks with frames of
frameworks the model has never seen. Which frames are worth a reference calculation?

1. Data (``--phases data``; every label is GFN2-xTB, not the set's DFT, so that the oracle and
   the tests agree): from ``../shared/data/si_zeo22`` (rng seed 0)
   - start: 2 frames of each of the 10 training topologies (20 labelled frames);
   - pool: 10 other frames of each training topology and 10 frames of each of the 6 new
     topologies (160 unlabelled frames, 60 of them new);
   - test_id: 3 frames of each training topology from test_id.xyz; test_shift: 6 other frames
     of each new topology (disjoint from the pool).
2. Active learning (``--phases al``; :func:`e2ip.dynamics.active_learning.loop`, ``pool`` mode):
   4 rounds x 10 frames; strategies e2ip (PaiNN + e2IP head with the default feature-distance
   evidence, selecting by its epistemic forces_uncertainty and diversity), random (the same
   model, frames drawn uniformly from the pool), ensemble (``--phases al_ensemble``: 5 plain
   PaiNN members, each trained as long as the single model, selecting by their spread);
   3 seeds each; ``--phases al_ensemble_random``: the ensemble model with random selection (which
   part of the ensemble's result is its selection). Force MAE on both test sets vs labelled
   frames, and how many selected frames came from the new topologies.
3. ``--phases al_true_error``: the oracle ranking (a baseline, not a method): the same loop
   ranking the pool by the round model's true force MAE against GFN2-xTB (the whole pool
   labelled once, ``pool_labelled.extxyz``), then the same diverse subset as the real rule.
4. ``--phases al_new_only``: the headroom on the new frameworks: every round labels random
   frames of the new topologies only (read from the pool file's topology, which no model sees).

    python benchmarks/active_learning_silica_xtb.py \
        [--phases data,al,al_ensemble,al_ensemble_random,al_true_error,al_new_only]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from al_common import learning_curve, selecting_by, strategy_overrides, true_errors_by_pool_index
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared/data/si_zeo22"
OUT = ROOT / "benchmarks/runs/al_silica"
RESULTS = ROOT / "benchmarks/results/active_learning_silica_xtb.json"
THREADS = 2
MODEL = {"model": {"cutoff": 5.0, "painn": {"num_features": 32, "num_layers": 2}},
         "head": {"hidden": 32},
         "data": {"batch_size": 4},
         "training": {"max_epochs": 60, "num_threads": THREADS, "patience": 1000}}
ROUNDS, PER_ROUND = 4, 10


def _positions_only(atoms: Atoms) -> Atoms:
    out = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    out.info["topology"] = atoms.info["topology"]
    return out


def _xtb_labelled(frames: list[Atoms]) -> list[Atoms]:
    from e2ip.dynamics.oracle import label

    out = []
    for atoms in frames:
        result = label(("xtb", {}, atoms))
        if isinstance(result, str):
            print(f"skipped a {atoms.info['topology']} frame: {result}")
            continue
        energy, forces = result
        labelled = _positions_only(atoms)
        labelled.calc = SinglePointCalculator(labelled, energy=energy, forces=forces)
        out.append(labelled)
    return out


def make_data(out: Path) -> None:
    rng = np.random.default_rng(0)
    train = read(SOURCE / "train.xyz", index=":")
    test_id = read(SOURCE / "test_id.xyz", index=":")
    new = read(SOURCE / "test_new_topologies.xyz", index=":")

    def by_topology(frames):
        groups: dict[str, list[Atoms]] = {}
        for a in frames:
            groups.setdefault(a.info["topology"], []).append(a)
        return {k: [groups[k][i] for i in rng.permutation(len(groups[k]))]
                for k in sorted(groups)}

    start, pool, tid, tshift = [], [], [], []
    for frames in by_topology(train).values():
        start += frames[:2]
        pool += frames[2:12]
    for frames in by_topology(test_id).values():
        tid += frames[:3]
    for frames in by_topology(new).values():
        pool += frames[:10]
        tshift += frames[10:16]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write(out / "start.extxyz", _xtb_labelled(start))
    write(out / "test_id.extxyz", _xtb_labelled(tid))
    write(out / "test_shift.extxyz", _xtb_labelled(tshift))
    write(out / "pool.extxyz", [_positions_only(a) for a in pool])
    print(f"reference data: {time.perf_counter() - t0:.0f} s of GFN2-xTB")


def true_errors_from_labelled_pool(out: Path):
    """errors_of(candidates) for `selecting_by`: the whole pool labelled once by
    GFN2-xTB (kept in pool_labelled.extxyz), each candidate found by its pool_index."""
    labelled = out / "pool_labelled.extxyz"
    if not labelled.exists():
        pool = read(out / "pool.extxyz", index=":")
        frames = _xtb_labelled(pool)
        if len(frames) != len(pool):
            raise RuntimeError("a pool frame failed to label; the oracle ranking needs all of them")
        write(labelled, frames)
    return true_errors_by_pool_index(labelled)


def run_al(out: Path, seeds: int, strategies: tuple[str, ...], first_seed: int = 0,
           overrides: tuple[str, ...] = ()) -> dict:
    from e2ip.dynamics.active_learning.config import load_al_config
    from e2ip.dynamics.active_learning.loop import run_active_learning

    pool_topology = [a.info["topology"] for a in read(out / "pool.extxyz", index=":")]
    known = {a.info["topology"] for a in read(out / "start.extxyz", index=":")}
    curves = {}
    for strategy in strategies:
        for seed in range(first_seed, first_seed + seeds):
            cfg = load_al_config(None, [
                f"train={out / 'start.extxyz'}", f"pool={out / 'pool.extxyz'}",
                f"test=['{out / 'test_id.extxyz'}', '{out / 'test_shift.extxyz'}']",
                "oracle=xtb", f"rounds={ROUNDS}", f"per_round={PER_ROUND}", f"seed={seed}",
                "workers=0", *strategy_overrides(MODEL, strategy), *overrides])
            t0 = time.perf_counter()
            run = out / f"{strategy}_seed{seed}"  # true_error: selection swapped by the caller
            run_active_learning(cfg, run)
            rows = learning_curve(run, ROUNDS, {"test_id": "mae_id", "test_shift": "mae_shift"})
            for r, row in enumerate(rows[:-1]):
                picked = read(run / f"round_{r:02d}/selected.extxyz", index=":")
                row["selected_new"] = sum(pool_topology[int(a.info["pool_index"])] not in known
                                          for a in picked)
            curves[f"{strategy}_seed{seed}"] = {"rows": rows, "wall_s": time.perf_counter() - t0}
            print(strategy, seed, [(round(r["mae_id"], 4), round(r["mae_shift"], 4))
                                   for r in rows], flush=True)
    return curves


def run_al_new_only(out: Path, seeds: int) -> dict:
    """The headroom of selection on the new frameworks: each round labels 10 frames drawn at
    random from the *new-topology* pool frames only (the topology is read from the pool file, as
    no model could), through the loop's selection with pool_factor 1 (no diversity filter). The
    random order is one fixed draw per pool frame and seed, so a resumed loop picks the same."""
    pool_topology = [a.info["topology"] for a in read(out / "pool.extxyz", index=":")]
    known = {a.info["topology"] for a in read(out / "start.extxyz", index=":")}
    curves = {}
    for seed in range(seeds):
        # new-topology frames score 1 + U(0, 0.5), the others U(0, 0.5)
        score = (np.array([float(t not in known) for t in pool_topology])
                 + 0.5 * np.random.default_rng([seed, 25]).random(len(pool_topology)))

        def new_first(candidates, score=score):
            return np.array([score[int(f.info["pool_index"])] for f in candidates])

        with selecting_by(new_first):
            curves.update(run_al(out, 1, ("new_only",), seed, ("pool_factor=1",)))
    return curves


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phases", default="data,al")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--results", default=str(RESULTS), help="JSON file the phases are merged into")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    out = Path(args.out)
    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["threads"] = THREADS
    phases = args.phases.split(",")
    if "data" in phases and not (out / "pool.extxyz").exists():
        make_data(out)
    for phase, strategies in (("al", ("e2ip", "random")), ("al_ensemble", ("ensemble",)),
                              ("al_ensemble_random", ("ensemble_random",)),
                              ("al_true_error", ("true_error",)),
                              ("al_new_only", ("new_only",))):
        if phase in phases:
            t0 = time.perf_counter()
            if phase == "al_new_only":
                results[phase] = run_al_new_only(out, args.seeds)
            elif phase == "al_true_error":
                with selecting_by(true_errors_from_labelled_pool(out)):
                    results[phase] = run_al(out, args.seeds, strategies)
            else:
                results[phase] = run_al(out, args.seeds, strategies)
            results[phase + "_wall_s"] = time.perf_counter() - t0
            results_path.parent.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(results, indent=1))
    print(f"written to {results_path}")


if __name__ == "__main__":
    main()
