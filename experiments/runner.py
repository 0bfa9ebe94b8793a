"""Shared by the experiment scripts: train runs one after another with `e2ip train`, skipping
finished runs and resuming interrupted ones, and record their wall time."""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RUNS = ROOT / "experiments" / "runs"
RESULTS = ROOT / "docs" / "results"
#: the uncertainty-under-shift runs (`uncertainty_shift.py` trains them, `report_shift.py` reports)
SHIFT_RUNS = RUNS / "shift"
WATER_DATA = SHIFT_RUNS / "water" / "data"
SEED_STRIDE = 10  # seed k trains with training.seed = 10 k: ensemble members 10k..10k+4 never repeat


class RunFailed(RuntimeError):
    pass


def train_run(config: Path, out: Path, overrides: list[str], seed: int, threads: int = 1) -> float:
    """`e2ip train config --out out --set ...` unless out/model.pt exists (then 0 s); an
    interrupted run resumes (and its seconds, of the last part only, are marked resumed). The
    log goes to out.parent/<out.name>.log. Returns the seconds."""
    if (out / "model.pt").exists():
        return 0.0
    cmd = ["e2ip", "train", str(config), "--out", str(out),
           "--set", f"training.seed={SEED_STRIDE * seed}", "--set", f"training.num_threads={threads}"]
    for option in overrides:
        cmd += ["--set", option]
    resumed = out.exists()
    if resumed:
        cmd.append("--resume")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(out.parent / f"{out.name}.log", "a") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.time() - start
    if rc != 0:
        raise RunFailed(f"{' '.join(cmd)}: exit {rc} (log: {out.parent / (out.name + '.log')})")
    (out / "train_seconds.json").write_text(json.dumps({"seconds": seconds, "threads": threads,
                                                        "resumed": resumed}))
    return seconds


def prepared(config: Path):
    """(config, prepared data) of an experiment config, whose data paths are relative to the
    project root, read from there whatever the current folder."""
    from e2ip.train.config.yaml_io import load_config
    from e2ip.train.datasets import prepare_data

    cwd = Path.cwd()
    os.chdir(ROOT)
    try:
        cfg = load_config(config)
        return cfg, prepare_data(cfg.data)
    finally:
        os.chdir(cwd)


def train_seconds(out: Path) -> float | None:
    """The seconds a run trained, None if unknown (a resumed run timed only its last part)."""
    path = out / "train_seconds.json"
    members = sorted(out.glob("member_*/train_seconds.json"))
    if members:  # members trained as separate jobs (parallel_train.py): their sum
        seconds = [train_seconds(m.parent) for m in members]
        return None if None in seconds else float(sum(seconds))
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return None if record.get("resumed") else record["seconds"]


def mean_std(values: list, digits: int | None = None) -> str:
    """'mean ± std' over the finite values ('' when none; the mean alone for one value)."""
    import numpy as np

    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return ""
    mean = float(np.mean(values))
    if digits is None:
        digits = 3 if abs(mean) < 10 else 1
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {float(np.std(values)):.{digits}f}"


def run_dir(dataset: str, method: str, seed: int) -> Path:
    """The run folder of one method and seed of the uncertainty-under-shift experiment."""
    return SHIFT_RUNS / dataset / method / f"seed{seed}"
