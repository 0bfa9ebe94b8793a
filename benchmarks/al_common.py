"""Pieces the active-learning benchmarks (active_learning_xtb.py, active_learning_silica_xtb.py)
share: what a strategy name sets in the loop's configuration, the learning curve of a finished
run, and the oracle ranking they compare selection rules with (a baseline, not a method, and not
a bound on every rule): rank the candidates by the round model's *true* force error instead of its
uncertainty, then pick the same diverse subset the real rule picks (`select_diverse`); or by any
other score only a benchmark knows (`selecting_by`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from ase import Atoms


def strategy_overrides(model: dict, strategy: str) -> list[str]:
    """Loop overrides for `strategy` with the single-model training config `model`: e2ip and
    true_error (the e2IP model, uncertainty selection), random (the e2IP model, random frames),
    ensemble (5 plain PaiNN members, each with the full budget, selecting by their spread),
    ensemble_random (those members, random frames)."""
    training = json.loads(json.dumps(model))  # a deep copy of plain data
    if strategy.startswith("ensemble"):
        training["model"]["head"] = "none"
        training.pop("head")
        training["ensemble"] = {"size": 5}
    selection = "random" if strategy.endswith("random") else "uncertainty"
    return [f"selection={selection}", f"training={json.dumps(training)}"]


def learning_curve(run: Path, rounds: int, tests: dict[str, str]) -> list[dict]:
    """One row per round of a finished loop in `run`: labelled frames and the force MAE (eV/Å)
    on each test set, under the key `tests` maps its file stem to."""
    rows = []
    for r in range(rounds + 1):
        ev = json.loads((run / f"round_{r:02d}/evaluation.json").read_text())
        rows.append({"labelled": ev["labelled"],
                     **{key: ev[stem]["force_mae"] for stem, key in tests.items()}})
    return rows


def true_errors_by_pool_index(labelled: Path) -> Callable[[list[Atoms]], np.ndarray]:
    """`score_of` for :func:`selecting_by`: each pool-mode candidate's true force MAE (eV/Å),
    its model forces (``e2ip_forces``) against the labels of the frame of the same
    ``pool_index`` in `labelled` (the whole pool, labelled by the oracle; read once)."""
    from ase.io import read

    reference = [a.get_forces() for a in read(labelled, index=":")]
    return lambda candidates: np.array([
        np.abs(reference[int(f.info["pool_index"])] - f.arrays["e2ip_forces"]).mean()
        for f in candidates])


@contextmanager
def selecting_by(score_of: Callable[[list[Atoms]], np.ndarray]) -> Iterator[None]:
    """While active, the loop's uncertainty selection ranks candidates by `score_of(candidates)`
    instead (the oracle ranking: each frame's true force MAE, eV/Å, against the oracle, from the
    model's ``e2ip_forces`` the frames carry; or any other per-frame score a benchmark knows and
    no model does). Monkeypatches the loop's private `_select`: a benchmark device only."""
    from e2ip.dynamics.active_learning import loop
    from e2ip.dynamics.active_learning.selection import distance_histogram, select_diverse

    def by_error(cfg, rnd, candidates):
        target = rnd.file("selected.extxyz")
        if target.exists():
            return loop._read_frames(target)
        descriptors = np.stack([distance_histogram(f) for f in candidates])
        chosen = select_diverse(np.asarray(score_of(candidates)), descriptors,
                                min(cfg.per_round, len(candidates)), cfg.pool_factor)
        selected = [candidates[int(i)] for i in chosen]
        loop._atomic_write_frames(target, selected)
        return selected

    real = loop._select
    loop._select = by_error
    try:
        yield
    finally:
        loop._select = real
