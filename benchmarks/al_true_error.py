"""The oracle ranking the active-learning benchmarks compare selection rules with (a baseline,
not a method, and not a bound on every rule): rank the candidates by the round model's *true*
force error instead of its uncertainty, then pick the same diverse subset the real rule picks
(`select_diverse`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
from ase import Atoms


@contextmanager
def selecting_by_true_error(errors_of: Callable[[list[Atoms]], np.ndarray]) -> Iterator[None]:
    """While active, the loop's uncertainty selection ranks candidates by `errors_of(candidates)`
    (each frame's true force MAE, eV/Å, against the oracle; the frames carry the model's
    ``e2ip_forces``). Monkeypatches the loop's private `_select`: a benchmark device only."""
    from e2ip.dynamics.active_learning import loop
    from e2ip.dynamics.active_learning.selection import distance_histogram, select_diverse

    def by_error(cfg, rnd, candidates):
        target = rnd.file("selected.extxyz")
        if target.exists():
            return loop._read_frames(target)
        descriptors = np.stack([distance_histogram(f) for f in candidates])
        chosen = select_diverse(np.asarray(errors_of(candidates)), descriptors,
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
