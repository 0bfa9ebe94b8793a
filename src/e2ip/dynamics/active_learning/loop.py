"""Active learning: train -> MD -> select the most uncertain, diverse frames -> label -> repeat.

Round r (0 .. rounds):

1. train on ``data/labelled_<r>.extxyz`` (round 0 from scratch with the ``training`` config;
   later rounds fine-tune the previous round's model: ``training.init_from``, plus ``finetune``
   overrides), then evaluate on the ``test`` sets (force MAE);
2. (r < rounds) run ``md.trajectories`` MD trajectories with the model, each from a structure
   drawn from ``md.start`` (the seeds, the labelled frames or the last round's new ones), and keep
   a frame every ``md.interval`` steps as a candidate (``md.max_uncertainty`` ends a trajectory
   once it is passed; ``md.bias_strength`` turns on uncertainty-driven dynamics); with ``pool``
   set, the candidates are instead the pool structures no earlier round selected;
3. select ``per_round`` candidates: ``uncertainty`` takes the ``pool_factor * per_round`` with the
   largest mean per-atom ``forces_uncertainty`` (the model's epistemic part: the e2IP head's, or
   the ensemble spread for an ensemble) and picks a diverse subset of them by farthest-point
   sampling on a smooth interatomic-distance histogram, starting from the most uncertain;
   ``random`` (the control) draws uniformly from all candidates;
4. label them with the oracle (:mod:`e2ip.dynamics.oracle`) through a ``concurrent.futures.Executor``
   (default: a local process pool of ``workers``; pass a Dask or Parsl executor to
   :func:`run_active_learning` to label on a cluster) and append them to the labelled set.

Every stage writes its output atomically under ``out/round_<r>/``, so a stopped loop resumes
where it was (a half-finished training resumes from its checkpoint). ``learning_curve.csv`` has a
row per round.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from e2ip.dynamics.active_learning.config import ALConfig, read_seeds, training_config
from e2ip.dynamics.active_learning.selection import distance_histogram, select_diverse
from e2ip.dynamics.oracle import label
from e2ip.errors import ConfigError
from e2ip.files import atomic_write_text
from e2ip.models.io import MODEL_FILE_NAME

log = logging.getLogger("e2ip")


# -- structures on disk ---------------------------------------------------------------------------
def _atomic_write_frames(path: Path, frames: list[Atoms]) -> None:
    buffer = io.StringIO()
    write(buffer, frames, format="extxyz")
    atomic_write_text(path, buffer.getvalue())


def _labelled(atoms: Atoms, energy: float, forces: np.ndarray) -> Atoms:
    out = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    out.calc = SinglePointCalculator(out, energy=energy, forces=forces)
    return out


def _read_frames(path: Path) -> list[Atoms]:
    return read(path, index=":", format="extxyz") if path.stat().st_size else []


# -- the loop -------------------------------------------------------------------------------------
@dataclass
class _Round:
    index: int
    path: Path

    def file(self, name: str) -> Path:
        return self.path / name


def run_active_learning(cfg: ALConfig, out: str | os.PathLike,
                        executor: Executor | None = None) -> str:
    """Run (or resume) the loop in `out`; returns the learning-curve table as text.

    executor: where labelling runs (any concurrent.futures.Executor); None: a local process pool
    of `cfg.workers` processes (0: in this process)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recorded = out / "active_learning.yaml"
    current = yaml.safe_dump(cfg.to_dict(), sort_keys=True)

    def comparable(text: str) -> dict:  # `workers` changes where labelling runs, not results
        # a loop recorded before a key existed has that key's default (e.g. pool, md.start)
        values = ALConfig().to_dict()
        for key, value in yaml.safe_load(text).items():
            values[key] = {**values[key], **value} if key == "md" else value
        return {k: v for k, v in values.items() if k != "workers"}

    if recorded.exists() and comparable(recorded.read_text()) != comparable(current):
        raise ConfigError(f"{out} holds an active-learning loop with a different configuration "
                          f"({recorded}); choose another --out")
    atomic_write_text(recorded, current)
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    first = data_dir / "labelled_00.extxyz"
    if not first.exists():
        from e2ip.data.read import read_structures

        initial = read_structures(cfg.train)
        _atomic_write_frames(first, [_labelled(s.to_atoms(), s.energy, s.forces) for s in initial])
    seeds = read_seeds(cfg)
    tests = {Path(t).stem: _test_set(t) for t in cfg.test}
    own_pool = None
    if executor is None and cfg.workers > 0:
        import multiprocessing

        own_pool = ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        previous_model = None
        for r in range(cfg.rounds + 1):
            rnd = _Round(r, out / f"round_{r:02d}")
            rnd.path.mkdir(exist_ok=True)
            labelled = data_dir / f"labelled_{r:02d}.extxyz"
            model_path = _train(cfg, rnd, labelled, previous_model)
            _evaluate(rnd, model_path, tests, labelled)
            previous_model = model_path
            if r == cfg.rounds:
                break
            nxt = data_dir / f"labelled_{r + 1:02d}.extxyz"
            if nxt.exists():
                continue
            candidates = (_rank_pool(cfg, rnd, model_path) if cfg.pool else
                          _sample(cfg, rnd, model_path, _starts(cfg, rnd, data_dir, seeds)))
            selected = _select(cfg, rnd, candidates)
            new = _label(cfg, rnd, selected, executor or own_pool)
            _atomic_write_frames(nxt, _read_frames(labelled) + new)
    finally:
        if own_pool is not None:
            own_pool.shutdown(cancel_futures=True)
    return _learning_curve(out, cfg)


def _test_set(path: str):
    from e2ip.data.read import read_structures

    return read_structures(path)


def _train(cfg: ALConfig, rnd: _Round, labelled: Path, previous: Path | None) -> Path:
    from e2ip.train.run import run_training

    run_dir = rnd.file("model")
    if (run_dir / "metrics.json").exists():
        return run_dir / MODEL_FILE_NAME
    tcfg = training_config(cfg, labelled, rnd.index, previous)
    holds = (run_dir / "checkpoints/last.ckpt").exists() or any(
        run_dir.glob("member_*/checkpoints/last.ckpt")) or any(run_dir.glob("member_*/model.pt"))
    if run_dir.exists() and not holds:  # crashed before its first checkpoint: start it again
        shutil.rmtree(run_dir)
    log.info("round %d: training on %s (%s)", rnd.index, labelled,
             "fine-tuning" if previous else "from scratch")
    run_training(tcfg, run_dir, resume=holds, force=True)
    return run_dir / MODEL_FILE_NAME


def _evaluate(rnd: _Round, model_path: Path, tests: dict, labelled: Path) -> None:
    target = rnd.file("evaluation.json")
    if target.exists():
        return
    from e2ip.models.io import load_model
    from e2ip.stats.metrics import force_errors

    model = load_model(model_path)
    result: dict[str, Any] = {"round": rnd.index, "labelled": len(_read_frames(labelled))}
    for name, structures in tests.items():
        pred = model.predict(structures)
        entry = force_errors(pred["forces"], np.concatenate([s.forces for s in structures]))
        if "sigma_epi" in pred:
            entry["mean_forces_uncertainty"] = float(pred["sigma_epi"].mean())
        result[name] = entry
    atomic_write_text(target, json.dumps(result, indent=1) + "\n")


def _starts(cfg: ALConfig, rnd: _Round, data_dir: Path, seeds: list[Atoms]) -> list[Atoms]:
    """The structures round `rnd`'s trajectories start from (``md.start``)."""
    if rnd.index == 0 or cfg.md.start == "seeds":
        return seeds
    if cfg.md.start == "labelled":
        return _read_frames(data_dir / f"labelled_{rnd.index:02d}.extxyz")
    previous = rnd.path.parent / f"round_{rnd.index - 1:02d}" / "labelled.extxyz"
    return _read_frames(previous) or seeds  # frontier; nothing labelled last round: the seeds


def _rank_pool(cfg: ALConfig, rnd: _Round, model_path: Path) -> list[Atoms]:
    """Pool-based candidates: the ``pool`` frames no earlier round selected, with the model's
    predictions and uncertainties (the same arrays as MD frames; ``info['pool_index']``: the
    frame's index in the pool file)."""
    from e2ip.data.read import read_structures
    from e2ip.dynamics.md import prediction_frame
    from e2ip.integrations.ase_calculator import E2IPCalculator
    from e2ip.models.io import load_model

    target = rnd.file("candidates.extxyz")
    if target.exists():
        return _read_frames(target)
    used = {int(f.info["pool_index"]) for r in range(rnd.index)
            for f in _read_frames(rnd.path.parent / f"round_{r:02d}" / "selected.extxyz")}
    calc = E2IPCalculator(load_model(model_path))
    frames = []
    pool = read_structures(cfg.pool, require_energy=False, require_forces=False)
    for index, structure in enumerate(pool):
        if index in used:
            continue
        atoms = structure.to_atoms()
        atoms.calc = calc
        atoms.get_forces()
        frame = prediction_frame(atoms, calc.results, step=0, time_fs=0.0)
        frame.info["pool_index"] = index
        frames.append(frame)
    log.info("round %d: %d candidate frames from the pool (%d selected before)", rnd.index,
             len(frames), len(used))
    _atomic_write_frames(target, frames)
    return frames


def _sample(cfg: ALConfig, rnd: _Round, model_path: Path, seeds: list[Atoms]) -> list[Atoms]:
    from e2ip.dynamics.md import run_md
    from e2ip.integrations.ase_calculator import E2IPCalculator
    from e2ip.models.bias import UncertaintyBias
    from e2ip.models.io import load_model

    target = rnd.file("candidates.extxyz")
    if target.exists():
        return _read_frames(target)
    md = cfg.md
    rng = np.random.default_rng([cfg.seed, rnd.index])
    picks = rng.choice(len(seeds), size=md.trajectories, replace=len(seeds) < md.trajectories)
    bias = (UncertaintyBias(md.bias_strength, md.bias_width)
            if md.bias_strength is not None else None)
    frames: list[Atoms] = []
    t0 = time.perf_counter()
    model = load_model(model_path)  # once; a calculator per trajectory
    for k, idx in enumerate(picks):
        calc = E2IPCalculator(model, bias=bias)
        start = seeds[int(idx)].copy()
        start.calc = None
        result = run_md(start, calc, steps=md.steps, temperature_K=md.temperature,
                        timestep_fs=md.timestep, ensemble=md.ensemble,
                        friction_per_fs=md.friction, max_uncertainty=md.max_uncertainty,
                        traj_interval=md.interval, seed=int(rng.integers(2**31)) + k,
                        keep_frames=True, progress=False,
                        check_from_step=1)  # the seed is labelled: never stop on it
        for f in result.frames[1:]:  # frame 0 is the (already labelled) seed itself
            f.info["trajectory"] = k
            frames.append(f)
    log.info("round %d: %d candidate frames from %d trajectories (%.0f s)", rnd.index,
             len(frames), len(picks), time.perf_counter() - t0)
    _atomic_write_frames(target, frames)
    return frames


def _select(cfg: ALConfig, rnd: _Round, candidates: list[Atoms]) -> list[Atoms]:
    target = rnd.file("selected.extxyz")
    if target.exists():
        return _read_frames(target)
    if not candidates:
        raise ConfigError(f"round {rnd.index}: no candidate frames (MD: raise md.steps or "
                          "lower md.interval; pool: every pool frame is already selected)")
    k = min(cfg.per_round, len(candidates))
    if cfg.selection == "random":
        rng = np.random.default_rng([cfg.seed, rnd.index, 7])
        chosen = list(rng.choice(len(candidates), size=k, replace=False))
    else:
        scores = np.array([float(np.mean(f.arrays["forces_uncertainty"]))
                           if "forces_uncertainty" in f.arrays else 0.0 for f in candidates])
        descriptors = np.stack([distance_histogram(f) for f in candidates])
        chosen = select_diverse(scores, descriptors, k, cfg.pool_factor)
    selected = [candidates[int(i)] for i in chosen]
    _atomic_write_frames(target, selected)
    return selected


def _label(cfg: ALConfig, rnd: _Round, selected: list[Atoms], executor: Executor | None):
    target = rnd.file("labelled.extxyz")
    if target.exists():
        return _read_frames(target)
    tasks = [(cfg.oracle, cfg.oracle_options, Atoms(numbers=a.numbers, positions=a.positions,
                                                     cell=a.cell, pbc=a.pbc)) for a in selected]
    t0 = time.perf_counter()
    results = list(executor.map(label, tasks)) if executor is not None else [label(t) for t in tasks]
    new, failures = [], []
    for task, res in zip(tasks, results):
        if isinstance(res, str):
            failures.append(res)
        else:
            new.append(_labelled(task[2], *res))
    if failures:
        log.warning("round %d: the oracle failed on %d of %d structures (dropped): %s",
                    rnd.index, len(failures), len(tasks), failures[0])
    log.info("round %d: labelled %d structures with %s (%.1f s)", rnd.index, len(new), cfg.oracle,
             time.perf_counter() - t0)
    _atomic_write_frames(target, new)
    atomic_write_text(rnd.file("labelling.json"),
                      json.dumps({"labelled": len(new), "failed": failures}, indent=1) + "\n")
    return new


def _learning_curve(out: Path, cfg: ALConfig) -> str:
    rows = []
    for r in range(cfg.rounds + 1):
        path = out / f"round_{r:02d}" / "evaluation.json"
        if path.exists():
            rows.append(json.loads(path.read_text()))
    names = [Path(t).stem for t in cfg.test]
    columns = ["round", "labelled"] + [f"{n}_force_mae" for n in names]
    lines = []
    for row in rows:
        lines.append([row["round"], row["labelled"]]
                     + [f"{row[n]['force_mae']:.5f}" for n in names])
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows(lines)
    atomic_write_text(out / "learning_curve.csv", buffer.getvalue())
    width = max(len(c) for c in columns)
    text = "  ".join(c.rjust(width) for c in columns) + "\n"
    text += "\n".join("  ".join(str(v).rjust(width) for v in line) for line in lines)
    return text + f"\n(force MAE in eV/Å; {out}/learning_curve.csv)"
