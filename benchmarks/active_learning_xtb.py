"""Active learning on ethanol with GFN2-xTB (tblite) as the oracle: e2IP-selected vs random vs
ensemble-selected frames, and what uncertainty-aware and uncertainty-driven MD do.

1. Reference data, all labelled by GFN2-xTB: Langevin MD with xTB at 300 K (the 50 starting
   frames, and an independent trajectory for the 300 K test set) and at 600 K (test set).
2. Active learning (`e2ip.dynamics.active_learning.loop`), 5 rounds x 10 frames from 50, candidates from 500 K
   model MD; strategies: e2ip (single PaiNN + e2IP, select by its epistemic uncertainty), random
   (same model, random frames), ensemble (5 plain PaiNN members, each with the full budget,
   select by their spread); 3 seeds each. Force MAE on both test sets vs labelled frames.
3. Uncertainty-aware MD: the round-0 e2IP models at 1200 K, plain vs stopped at a threshold
   (3x the largest forces_uncertainty on the training frames); a blow-up is a C-H/C-C/C-O/O-H bond
   past 2 Å or an xTB force error above 10 eV/Å (checked every 10 steps); phase stop_fd: the
   same with those models switched to the feature-distance evidence (the default since);
   phases calm and calm_fd: the same models for 1 ps at 300 K, the false-alarm side.
4. Uncertainty-driven MD at 300 K vs plain MD at 300 K: diversity of the frames (xTB energy
   spread, model force error against xTB, descriptor spread).

    python benchmarks/active_learning_xtb.py [--phases data,al,stop,bias,stop_fd,calm,calm_fd] [--seeds 3]
    python benchmarks/active_learning_xtb.py --phases data,al_fd \
        --results benchmarks/results/active_learning_fd_xtb.json       # issue 25
    python benchmarks/active_learning_xtb.py --phases al_plain \
        --results benchmarks/results/active_learning_fd_xtb.json
    python benchmarks/active_learning_xtb.py --phases data,al_fd16[,al_fd16_ensemble] \
        --results benchmarks/results/active_learning_fd_xtb.json
    python benchmarks/active_learning_xtb.py \
        --phases data,al_frontier,al_frontier_plain,al_frontier_ensemble,al_frontier_ensemble_random \
        --results benchmarks/results/active_learning_fd_xtb.json       # seeds 3-5
    python benchmarks/active_learning_xtb.py --phases data,al_target_pool \
        --results benchmarks/results/active_learning_fd_xtb.json       # seeds 3-5
    python benchmarks/active_learning_xtb.py --phases data,threshold_auto \
        --results benchmarks/results/md_threshold_auto_xtb.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from al_common import learning_curve, selecting_by, strategy_overrides, true_errors_by_pool_index
from ase import units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks/runs/al_xtb"
RESULTS = ROOT / "benchmarks/results/active_learning_xtb.json"
STRATEGIES = ("e2ip", "random", "ensemble")
MODEL = {"model": {"cutoff": 4.0, "painn": {"num_features": 32, "num_layers": 2}},
         "head": {"hidden": 32},
         "data": {"batch_size": 8},
         "training": {"max_epochs": 40, "num_threads": 1, "patience": 1000}}


def xtb():
    from tblite.ase import TBLite

    return TBLite(method="GFN2-xTB", verbosity=0)


def xtb_md(start, temperature: float, steps: int, every: int, seed: int):
    atoms = start.copy()
    atoms.calc = xtb()
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=np.random.default_rng(seed))
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=temperature, friction=0.02 / units.fs,
                   fixcm=False, rng=np.random.default_rng(seed))
    frames = []
    for _ in dyn.irun(steps):
        if dyn.nsteps % every == 0 and dyn.nsteps >= 400:  # skip 200 fs of equilibration
            f = atoms.copy()
            f.calc = SinglePointCalculator(f, energy=atoms.get_potential_energy(),
                                           forces=atoms.get_forces())
            frames.append(f)
    return frames


def make_data(out: Path) -> None:
    from e2ip.data.read import read_structures

    start = read_structures(ROOT / "src/e2ip/data/demo/rmd17_ethanol_demo.npz", index=":1")[0]
    start = start.to_atoms()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write(out / "train_300K.extxyz", xtb_md(start, 300, 400 + 50 * 40, 40, seed=1))
    write(out / "test_300K.extxyz", xtb_md(start, 300, 400 + 100 * 20, 20, seed=2))
    write(out / "test_600K.extxyz", xtb_md(start, 600, 400 + 100 * 20, 20, seed=3))
    print(f"reference data: {time.perf_counter() - t0:.0f} s of GFN2-xTB MD")


def run_al(out: Path, seeds: int, md_temperature: float = 500, stop: str | None = None,
           tag: str = "", strategies: tuple[str, ...] = STRATEGIES, trajectories: int = 4,
           overrides: tuple[str, ...] = (), first_seed: int = 0) -> dict:
    """The three strategies, `seeds` seeds each; candidates from `trajectories` model-MD runs at
    `md_temperature` (K), each ended once the largest forces_uncertainty passes `stop` (None:
    never; 'auto': the model's stored stop_threshold). Runs go to out/<tag><strategy>_seed<k>."""
    from e2ip.dynamics.active_learning.config import load_al_config
    from e2ip.dynamics.active_learning.loop import run_active_learning

    curves = {}
    for strategy in strategies:
        for seed in range(first_seed, first_seed + seeds):
            cfg = load_al_config(None, [
                f"train={out / 'train_300K.extxyz'}",
                f"test=['{out / 'test_300K.extxyz'}', '{out / 'test_600K.extxyz'}']",
                "oracle=xtb", "rounds=5", "per_round=10", f"seed={seed}", "workers=0",
                "md.steps=400", f"md.temperature={md_temperature}", "md.interval=10",
                f"md.trajectories={trajectories}", *strategy_overrides(MODEL, strategy),
                *([f"md.max_uncertainty={stop}"] if stop else []), *overrides])
            t0 = time.perf_counter()
            run = out / f"{tag}{strategy}_seed{seed}"
            run_active_learning(cfg, run)
            rows = learning_curve(run, 5, {"test_300K": "mae_300K", "test_600K": "mae_600K"})
            curves[f"{strategy}_seed{seed}"] = {"rows": rows,
                                                "wall_s": time.perf_counter() - t0}
            print(strategy, seed, [round(r["mae_600K"], 4) for r in rows], flush=True)
    return curves


def run_al_by_true_error(out: Path, seeds: int, trajectories: int, overrides: tuple[str, ...],
                         tag: str) -> dict:
    def errors_of(candidates):  # every candidate labelled by GFN2-xTB
        calc, errors = xtb(), []
        for f in candidates:
            a = f.copy()
            a.calc = calc
            errors.append(float(np.abs(a.get_forces() - f.arrays["e2ip_forces"]).mean()))
        return np.array(errors)

    with selecting_by(errors_of):
        curves = run_al(out, seeds, 600, "auto", tag, ("e2ip",), trajectories, overrides)
    return {k.replace("e2ip", "true_error"): v for k, v in curves.items()}


def make_target_pool(out: Path) -> Path:
    """204 frames of the shifted test's own distribution: four fresh GFN2-xTB Langevin
    trajectories at 600 K (seeds 11-14; the 600 K test set is seed 3), 51 frames each, one every
    20 steps from step 400 (200 fs of equilibration) to 1400."""
    from e2ip.data.read import read_structures

    target = out / "pool_600K.extxyz"
    if not target.exists():
        start = read_structures(ROOT / "src/e2ip/data/demo/rmd17_ethanol_demo.npz",
                                index=":1")[0].to_atoms()
        frames = [f for seed in range(11, 15) for f in xtb_md(start, 600, 400 + 50 * 20, 20, seed)]
        write(target, frames)
    return target


def run_al_target_pool(out: Path, seeds: int) -> dict:
    """The loop in pool mode on frames drawn from the 600 K test distribution itself (an ideal
    pool no MD gives): how good random frames of the target are (headroom), and whether selection
    beats random when the pool matches the target. Seeds 3-5, as the frontier protocol."""
    pool = make_target_pool(out)
    overrides = (f"pool={pool}",)
    curves = run_al(out, seeds, 600, None, "target_pool_", ("e2ip", "random"), 16, overrides, 3)

    # the oracle ranking from the pool's own GFN2-xTB labels (which the loop ignores)
    with selecting_by(true_errors_by_pool_index(pool)):
        oracle = run_al(out, seeds, 600, None, "target_pool_oracle_", ("e2ip",), 16, overrides, 3)
    curves.update({k.replace("e2ip", "true_error"): v for k, v in oracle.items()})
    return curves


def bonds(atoms):
    d = atoms.get_all_distances()
    heavy = atoms.numbers != 1
    pairs = [(i, j) for i in range(len(atoms)) for j in range(i + 1, len(atoms))
             if (heavy[i] or heavy[j]) and d[i, j] < 1.7]
    return pairs


def blown_up(atoms, pairs, model_forces) -> bool:
    d = atoms.get_all_distances()
    if any(d[i, j] > 2.0 for i, j in pairs):
        return True
    ref = atoms.copy()
    ref.calc = xtb()
    return bool(np.abs(ref.get_forces() - model_forces).max() > 10.0)


def per_atom_uncertainties(model: Path, frames) -> list:
    """The calculator's per-atom forces_uncertainty (eV/Å) for each frame."""
    from e2ip.integrations.ase_calculator import E2IPCalculator

    calc = E2IPCalculator(model)
    out = []
    for a in frames:
        a = a.copy()
        a.calc = calc
        out.append(calc.get_property("forces_uncertainty", a))
    return out


def with_feature_distance(model: Path) -> Path:
    """model_fd.pt beside a trained e2IP model file: the same weights with the feature-distance
    evidence, fitted on the run's own training split and calibrated on its validation split."""
    from e2ip.models.io import load_model
    from e2ip.train.config.yaml_io import load_config
    from e2ip.train.datasets import prepare_data

    path = model.with_name("model_fd.pt")
    if not path.exists():
        data = prepare_data(load_config(model.parent / "config.yaml").data)
        fd = load_model(model).with_feature_distance(data.train)
        fd.calibrate(data.validation)
        fd.save(path)
    return path


MULTIPLES = (1.5, 2.0, 3.0)  # thresholds recorded, x the training maximum (3x: `first_exceed`)


def watch_md(model: Path, start, temperature: float, steps: int, rng_seed: int,
             thresholds: dict[str, float]) -> dict:
    """Langevin MD of `start` with `model` at `temperature` (K) for at most `steps` steps of
    0.5 fs: the first step and the number of steps the largest per-atom forces_uncertainty
    passed each of `thresholds` (eV/Å), the peak, and the blow-up step (None: none), checked
    every 10 steps."""
    from e2ip.integrations.ase_calculator import E2IPCalculator

    atoms = start.copy()
    atoms.calc = E2IPCalculator(model)
    pairs = bonds(atoms)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature,
                                 rng=np.random.default_rng(rng_seed))
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=temperature,
                   friction=0.02 / units.fs, fixcm=False, rng=np.random.default_rng(rng_seed))
    blow_up, peak = None, 0.0
    first = dict.fromkeys(thresholds)
    above = dict.fromkeys(thresholds, 0)
    for _ in dyn.irun(steps):
        step = dyn.nsteps
        u = float(atoms.calc.results["forces_uncertainty"].max())
        peak = max(peak, u)
        for name, value in thresholds.items():
            if u > value:
                above[name] += 1
                if first[name] is None:
                    first[name] = step
        if step % 10 == 0 and blown_up(atoms, pairs, atoms.calc.results["forces"]):
            blow_up = step
            break
    return {"steps": dyn.nsteps, "blow_up": blow_up, "peak": peak, "first": first,
            "steps_above": above}


def run_stop(out: Path, seeds: int, evidence: str = "learned", temperature: float = 1200,
             steps: int = 3000) -> dict:
    """Uncertainty-aware MD with the round-0 e2IP models (as trained, or switched to the
    feature-distance evidence): at 1200 K, does the uncertainty pass the threshold before the
    blow-up; at 300 K (phases calm, calm_fd), how often does it pass it where nothing blows up
    (false alarms)."""
    train = read(out / "train_300K.extxyz", index=":")
    rows = []
    for seed in range(seeds):
        model = out / f"e2ip_seed{seed}/round_00/model/model.pt"
        if evidence == "feature_distance":
            model = with_feature_distance(model)
        threshold = 3 * max(float(u.max()) for u in per_atom_uncertainties(model, train))
        for run in range(5):
            md = watch_md(model, train[run], temperature, steps, 100 * seed + run,
                          {k: k / 3 * threshold for k in MULTIPLES})
            rows.append({"seed": seed, "run": run, "threshold": threshold,
                         "temperature_K": temperature, "steps": md["steps"],
                         "first_exceed": md["first"][3.0], "blow_up": md["blow_up"],
                         "max_uncertainty_over_threshold": md["peak"] / threshold,
                         "first_exceed_lower": {str(k): md["first"][k] for k in MULTIPLES[:-1]},
                         "steps_above": {str(k): v for k, v in md["steps_above"].items()}})
            print(rows[-1], flush=True)
    return {"runs": rows}


def run_threshold_auto(out: Path, seeds: int, runs: int = 5) -> dict:
    """The stored stop threshold (`max_uncertainty: auto`, the 0.99 quantile fixed before these
    runs) on fresh runs: round-0 models with the default evidence trained here (new folders,
    `r0_seed<k>`), then 1200 K MD (warned before the blow-up?) and 1 ps at 300 K (false alarms),
    from MD seeds no earlier phase used."""
    from e2ip.dynamics.active_learning.config import load_al_config
    from e2ip.dynamics.active_learning.loop import run_active_learning
    from e2ip.models.io import load_model

    train = read(out / "train_300K.extxyz", index=":")
    rows = []
    for seed in range(seeds):
        run_dir = out / f"r0_seed{seed}"
        cfg = load_al_config(None, [
            f"train={out / 'train_300K.extxyz'}", "oracle=xtb", "rounds=0", f"seed={seed}",
            "workers=0", f"training={json.dumps(MODEL)}"])
        run_active_learning(cfg, run_dir)
        model = run_dir / "round_00/model/model.pt"
        threshold = load_model(model).stop_threshold
        train_max = max(float(u.max()) for u in per_atom_uncertainties(model, train))
        for temperature, steps in ((1200, 3000), (300, 2000)):
            for run in range(runs):
                md = watch_md(model, train[10 + run], temperature, steps,
                              10_000 + 100 * seed + run, {"auto": threshold})
                rows.append({"seed": seed, "run": run, "temperature_K": temperature,
                             "threshold": threshold, "train_max": train_max,
                             "steps": md["steps"], "blow_up": md["blow_up"],
                             "first_exceed": md["first"]["auto"],
                             "steps_above": md["steps_above"]["auto"],
                             "peak_over_threshold": md["peak"] / threshold})
                print(rows[-1], flush=True)
    return {"runs": rows}


def descriptor_spread(frames) -> float:
    from e2ip.dynamics.active_learning.selection import distance_histogram

    d = np.stack([distance_histogram(f) for f in frames])
    return float(np.linalg.norm(d - d.mean(0), axis=1).mean())


def run_bias(out: Path, seeds: int) -> dict:
    """Plain vs uncertainty-driven MD at 300 K with the round-0 e2IP models."""
    from e2ip.dynamics.md import run_md
    from e2ip.integrations.ase_calculator import E2IPCalculator
    from e2ip.models.bias import UncertaintyBias

    train = read(out / "train_300K.extxyz", index=":")
    rows = []
    for seed in range(seeds):
        model = out / f"e2ip_seed{seed}/round_00/model/model.pt"
        width = float(np.mean([np.sqrt(np.mean(u**2))
                               for u in per_atom_uncertainties(model, train[:10])]))
        for name, bias in (("plain", None), ("biased", UncertaintyBias(0.5, width))):
            frames = []
            for run in range(4):
                res = run_md(train[run], E2IPCalculator(model, bias=bias), steps=1000,
                             temperature_K=300, traj_interval=20, seed=10 * seed + run,
                             keep_frames=True, progress=False)
                frames += res.frames[1:]
            energies, errors = [], []
            for f in frames:
                ref = f.copy()
                ref.calc = xtb()
                energies.append(ref.get_potential_energy())
                errors.append(float(np.abs(ref.get_forces() - f.arrays["e2ip_forces"]).mean()))
            rows.append({"seed": seed, "md": name, "width": width, "frames": len(frames),
                         "xtb_energy_std": float(np.std(energies)),
                         "model_force_mae_vs_xtb": float(np.mean(errors)),
                         "mean_forces_uncertainty": float(np.mean(
                             [f.arrays["forces_uncertainty"].mean() for f in frames])),
                         "descriptor_spread": descriptor_spread(frames)})
            print(rows[-1], flush=True)
    return {"runs": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phases", default="data,al,stop,bias")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--results", default=str(RESULTS), help="JSON file the phases are merged into")
    args = ap.parse_args()
    results_path = Path(args.results)
    torch.set_num_threads(1)
    out = Path(args.out)
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["threads"] = 1
    phases = args.phases.split(",")
    if "data" in phases and not (out / "test_600K.extxyz").exists():
        make_data(out)
    for phase, fn in (("al", run_al), ("stop", run_stop), ("bias", run_bias),
                      ("stop_fd", lambda o, n: run_stop(o, n, "feature_distance")),
                      ("calm", lambda o, n: run_stop(o, n, temperature=300, steps=2000)),
                      ("calm_fd", lambda o, n: run_stop(o, n, "feature_distance", 300, 2000)),
                      # issue 25: the feature-distance default selecting, candidates from MD at
                      # the shifted test's 600 K stopped at the model's stored threshold
                      ("al_fd", lambda o, n: run_al(o, n, 600, "auto", "fd600_")),
                      # candidates from plain 600 K MD (no stop): all three selections
                      ("al_plain", lambda o, n: run_al(o, n, 600, None, "plain600_")),
                      # stop-MD with 4x the trajectories: a pool several times larger than a
                      # round's 10 labels even where trajectories stop early
                      ("al_fd16", lambda o, n: run_al(o, n, 600, "auto", "fd600x16_",
                                                      ("e2ip", "random"), 16)),
                      ("al_fd16_ensemble", lambda o, n: run_al(o, n, 600, "auto", "fd600x16_",
                                                               ("ensemble",), 16)),
                      # issue 25, choosing the protocol on seeds 0-2: a 64-trajectory pool (a frame
                      # every 5 steps), MD starting from the last round's labels ("frontier"),
                      # and the oracle ranking by the true error (16 and 64 trajectories)
                      ("choice_pool64", lambda o, n: run_al(o, n, 600, "auto", "v64i5_",
                                                            ("e2ip", "random"), 64,
                                                            ("md.interval=5",))),
                      ("choice_frontier16", lambda o, n: run_al(o, n, 600, "auto", "front16_",
                                                                ("e2ip", "random"), 16,
                                                                ("md.start=frontier",))),
                      ("choice_true_error16", lambda o, n: run_al_by_true_error(
                          o, n, 16, ("md.start=frontier",), "oracle16_")),
                      ("choice_true_error64", lambda o, n: run_al_by_true_error(
                          o, n, 64, ("md.start=frontier", "md.interval=5"), "oracle64_")),
                      # issue 25, the protocol chosen on seeds 0-2 (md.start=frontier: each round's
                      # MD starts from the frames the last round labelled) and reported on fresh
                      # seeds 3-5: selection vs random from the same stopped pool, the same loop
                      # with no uncertainty anywhere (plain MD, random frames), the ensemble
                      ("al_frontier", lambda o, n: run_al(o, n, 600, "auto", "front_",
                                                          ("e2ip", "random"), 16,
                                                          ("md.start=frontier",), 3)),
                      ("al_frontier_plain", lambda o, n: run_al(o, n, 600, None, "front_plain_",
                                                                ("random",), 16,
                                                                ("md.start=frontier",), 3)),
                      ("al_frontier_ensemble", lambda o, n: run_al(o, n, 600, "auto", "front_",
                                                                   ("ensemble",), 16,
                                                                   ("md.start=frontier",), 3)),
                      # the ensemble's model and pools with random selection: which part of
                      # the ensemble's lead is its selection
                      ("al_frontier_ensemble_random", lambda o, n: run_al(
                          o, n, 600, "auto", "front_", ("ensemble_random",), 16,
                          ("md.start=frontier",), 3)),
                      # frames of the 600 K test distribution itself as the pool: the headroom
                      # of selection, and selection where the pool matches the target
                      ("al_target_pool", run_al_target_pool),
                      # the stored stop threshold on fresh runs (models and MD seeds)
                      ("threshold_auto", run_threshold_auto)):
        if phase in phases:
            t0 = time.perf_counter()
            results[phase] = fn(out, args.seeds)
            results[phase + "_wall_s"] = time.perf_counter() - t0
            results_path.write_text(json.dumps(results, indent=1))
    print(f"written to {results_path}")


if __name__ == "__main__":
    main()
