"""Active learning: train -> MD -> select the most uncertain, diverse frames -> label -> repeat.

Round r (0 .. rounds):

1. train on ``data/labelled_<r>.extxyz`` (round 0 from scratch with the ``training`` config;
   later rounds fine-tune the previous round's model: ``training.init_from``, plus ``finetune``
   overrides), then evaluate on the ``test`` sets (force MAE);
2. (r < rounds) run MD with the model from ``md.trajectories`` seed structures and keep a frame
   every ``md.interval`` steps as a candidate (``md.max_uncertainty`` ends a trajectory once it is
   passed; ``md.bias_strength`` turns on uncertainty-driven dynamics);
3. select ``per_round`` candidates: ``uncertainty`` takes the ``pool_factor * per_round`` with the
   largest mean per-atom ``forces_uncertainty`` (the model's epistemic part: the e2IP head's, or
   the ensemble spread for an ensemble) and picks a diverse subset of them by farthest-point
   sampling on a smooth interatomic-distance histogram, starting from the most uncertain;
   ``random`` (the control) draws uniformly from all candidates;
4. label them with the oracle (:mod:`e2ip.oracle`) through a ``concurrent.futures.Executor``
   (default: a local process pool of ``workers``; pass a Dask or Parsl executor to
   :func:`run_active_learning` to label on a cluster) and append them to the labelled set.

Every stage writes its output atomically under ``out/round_<r>/``, so a stopped loop resumes
where it was (a half-finished training resumes from its checkpoint). ``learning_curve.csv`` has a
row per round.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import shutil
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from .errors import ConfigError
from .files import atomic_write_text
from .oracle import check_oracle, label
from .train.config import _build_section, apply_overrides, config_from_dict, read_yaml_mapping

log = logging.getLogger("e2ip")

SELECTIONS = ("uncertainty", "random")


@dataclass
class MDSettings:
    """MD that generates candidates: steps per trajectory, temperature (K), timestep (fs),
    ensemble (nve | langevin | nvt), friction (Langevin, 1/fs), interval (steps between candidate
    frames), trajectories (seed structures per round), max_uncertainty (eV/Å: end a trajectory
    once the largest per-atom forces_uncertainty passes it; null: run all steps),
    bias_strength (eV) and bias_width (eV/Å) of uncertainty-driven dynamics (null: off)."""

    steps: int = 500
    temperature: float = 300.0
    timestep: float = 0.5
    ensemble: str = "langevin"
    friction: float = 0.01
    interval: int = 10
    trajectories: int = 4
    max_uncertainty: float | None = None
    bias_strength: float | None = None
    bias_width: float = 0.05


@dataclass
class ALConfig:
    """train: labelled structures to start from (extxyz, eV and Å, keys energy/forces);
    seeds: structures MD starts from (default: train); test: held-out labelled sets evaluated
    every round; oracle (+ oracle_options): the reference, see e2ip.oracle; rounds: acquisition
    rounds (rounds + 1 models are trained); per_round: structures labelled per round;
    selection: uncertainty | random; pool_factor: see the module docstring; workers: labelling
    processes (0: in this process); seed: seeds MD, selection and training;
    training: an e2ip training config (data/model/head/training/ensemble sections; data.train is
    set by the loop, the default split is 90/10/0); finetune: training-section values for rounds
    >= 1 (default max_epochs: half of round 0's)."""

    train: str | None = None
    seeds: str | None = None
    test: list[str] = field(default_factory=list)
    oracle: str = "xtb"
    oracle_options: dict[str, Any] = field(default_factory=dict)
    rounds: int = 5
    per_round: int = 10
    selection: str = "uncertainty"
    pool_factor: int = 5
    workers: int = 2
    seed: int = 0
    md: MDSettings = field(default_factory=MDSettings)
    training: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_al_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> ALConfig:
    """Read and validate an active-learning YAML (None: defaults) with key=value overrides."""
    raw = read_yaml_mapping(path) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    md = raw.pop("md", None) or {}
    if isinstance(raw.get("test"), str):
        raw["test"] = [raw["test"]]
    cfg = _build_section(ALConfig, raw, "")
    cfg.md = _build_section(MDSettings, md, "md.")
    _check(cfg)
    return cfg


def _check(cfg: ALConfig) -> None:
    if cfg.train is None:
        raise ConfigError("'train' is required: the labelled structures to start from "
                          "(--train FILE)")
    for key, paths in (("train", [cfg.train]), ("seeds", [cfg.seeds] if cfg.seeds else []),
                       ("test", cfg.test)):
        for p in paths:
            if not Path(p).exists():
                raise ConfigError(f"'{key}': file not found: {p}")
    if cfg.selection not in SELECTIONS:
        raise ConfigError(f"'selection' must be one of {', '.join(SELECTIONS)}, "
                          f"got {cfg.selection!r}")
    for key in ("rounds", "workers"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"'{key}' must be >= 0, got {getattr(cfg, key)}")
    for key in ("per_round", "pool_factor"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"'{key}' must be >= 1, got {getattr(cfg, key)}")
    md = cfg.md
    if md.ensemble not in ("nve", "langevin", "nvt"):
        raise ConfigError(f"'md.ensemble' must be nve, langevin or nvt, got {md.ensemble!r}")
    if md.temperature <= 0 or md.timestep <= 0 or md.friction < 0:
        raise ConfigError("'md.temperature' and 'md.timestep' must be > 0, 'md.friction' >= 0")
    if md.steps < 1 or md.interval < 1 or md.trajectories < 1:
        raise ConfigError("'md.steps', 'md.interval' and 'md.trajectories' must be >= 1")
    if md.bias_strength is not None and (md.bias_strength <= 0 or md.bias_width <= 0):
        raise ConfigError("'md.bias_strength' and 'md.bias_width' must be > 0")
    if not isinstance(cfg.training, dict) or not isinstance(cfg.finetune, dict):
        raise ConfigError("'training' and 'finetune' must be mappings")
    if len({Path(t).stem for t in cfg.test}) != len(cfg.test):
        raise ConfigError(f"'test': the files must have different names, got {cfg.test}")
    _read_seeds(cfg)
    _training_config(cfg, cfg.train, 0, None)  # validates the training section now
    check_oracle(cfg.oracle, cfg.oracle_options)


def _training_config(cfg: ALConfig, train_file: str | Path, round_index: int,
                     init_from: str | Path | None):
    raw = json.loads(json.dumps(cfg.training))  # a deep copy of plain data
    data = raw.setdefault("data", {})
    data["train"] = str(train_file)
    data.setdefault("split", [0.9, 0.1, 0.0])
    data.setdefault("energy_unit", "eV")
    data.setdefault("length_unit", "Å")
    for key in ("validation", "test"):
        data.pop(key, None)
    training = raw.setdefault("training", {})
    training["seed"] = int(training.get("seed", 0)) + cfg.seed * 1000 + round_index
    training.setdefault("progress_bar", False)
    if init_from is not None:
        training["max_epochs"] = max(1, int(training.get("max_epochs", 200)) // 2)
        training.update(cfg.finetune)
        training["init_from"] = str(init_from)
    return config_from_dict(raw)


def _read_seeds(cfg: ALConfig) -> list[Atoms]:
    """The MD starting structures (any format e2ip reads; labels not needed)."""
    from .data.readers import read_structures

    path = cfg.seeds or cfg.train
    return [s.to_atoms() for s in read_structures(path, require_energy=False,
                                                  require_forces=False)]


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


# -- selection ------------------------------------------------------------------------------------
def distance_histogram(atoms: Atoms, cutoff: float = 6.0, bins: int = 48,
                       width: float = 0.1) -> np.ndarray:
    """A smooth, rotation- and permutation-invariant descriptor: Gaussian-smeared histogram of
    all interatomic distances below `cutoff` (Å), per atom (bins,)."""
    from .data.neighbors import neighbor_list

    _, _, _, d = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff,
                               return_distances=True)
    grid = np.linspace(0.5, cutoff, bins)
    return np.exp(-0.5 * ((d[:, None] - grid) / width) ** 2).sum(0) / len(atoms)


def select_diverse(scores: np.ndarray, descriptors: np.ndarray, k: int,
                   pool_factor: int) -> list[int]:
    """Indices of k structures: the pool_factor * k highest `scores`, then farthest-point
    sampling on `descriptors` within that pool starting from the highest score."""
    if k >= len(scores):
        return list(np.argsort(-scores))
    pool = np.argsort(-scores)[:pool_factor * k]
    chosen = [int(pool[0])]
    dist = np.linalg.norm(descriptors[pool] - descriptors[pool[0]], axis=1)
    dist[0] = -np.inf
    while len(chosen) < k:
        nxt = int(np.argmax(dist))
        chosen.append(int(pool[nxt]))
        dist = np.minimum(dist, np.linalg.norm(descriptors[pool] - descriptors[pool[nxt]], axis=1))
        dist[nxt] = -np.inf  # never the same frame twice (identical descriptors)
    return chosen


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
        return {k: v for k, v in yaml.safe_load(text).items() if k != "workers"}

    if recorded.exists() and comparable(recorded.read_text()) != comparable(current):
        raise ConfigError(f"{out} holds an active-learning loop with a different configuration "
                          f"({recorded}); choose another --out")
    atomic_write_text(recorded, current)
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    first = data_dir / "labelled_00.extxyz"
    if not first.exists():
        from .data.readers import read_structures

        initial = read_structures(cfg.train)
        _atomic_write_frames(first, [_labelled(s.to_atoms(), s.energy, s.forces) for s in initial])
    seeds = _read_seeds(cfg)
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
            candidates = _sample(cfg, rnd, model_path, seeds)
            selected = _select(cfg, rnd, candidates)
            new = _label(cfg, rnd, selected, executor or own_pool)
            _atomic_write_frames(nxt, _read_frames(labelled) + new)
    finally:
        if own_pool is not None:
            own_pool.shutdown(cancel_futures=True)
    return _learning_curve(out, cfg)


def _test_set(path: str):
    from .data.readers import read_structures

    return read_structures(path)


def _train(cfg: ALConfig, rnd: _Round, labelled: Path, previous: Path | None) -> Path:
    from .train.run import run_training

    run_dir = rnd.file("model")
    if (run_dir / "metrics.json").exists():
        return run_dir / "model.pt"
    tcfg = _training_config(cfg, labelled, rnd.index, previous)
    holds = (run_dir / "checkpoints/last.ckpt").exists() or any(
        run_dir.glob("member_*/checkpoints/last.ckpt")) or any(run_dir.glob("member_*/model.pt"))
    if run_dir.exists() and not holds:  # crashed before its first checkpoint: start it again
        shutil.rmtree(run_dir)
    log.info("round %d: training on %s (%s)", rnd.index, labelled,
             "fine-tuning" if previous else "from scratch")
    run_training(tcfg, run_dir, resume=holds, force=True)
    return run_dir / "model.pt"


def _evaluate(rnd: _Round, model_path: Path, tests: dict, labelled: Path) -> None:
    target = rnd.file("evaluation.json")
    if target.exists():
        return
    from .metrics import force_errors
    from .model_io import load_model

    model = load_model(model_path)
    result: dict[str, Any] = {"round": rnd.index, "labelled": len(_read_frames(labelled))}
    for name, structures in tests.items():
        pred = model.predict(structures)
        entry = force_errors(pred["forces"], np.concatenate([s.forces for s in structures]))
        if "sigma_epi" in pred:
            entry["mean_forces_uncertainty"] = float(pred["sigma_epi"].mean())
        result[name] = entry
    atomic_write_text(target, json.dumps(result, indent=1) + "\n")


def _sample(cfg: ALConfig, rnd: _Round, model_path: Path, seeds: list[Atoms]) -> list[Atoms]:
    from .bias import UncertaintyBias
    from .calculator import E2IPCalculator
    from .md import run_md
    from .model_io import load_model

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
                        keep_frames=True, progress=False)
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
        raise ConfigError(f"round {rnd.index}: MD produced no candidate frames "
                          "(raise md.steps or lower md.interval)")
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
