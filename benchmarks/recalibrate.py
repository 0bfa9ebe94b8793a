"""Fit the variance calibration of finished benchmark runs on their own validation split
(the split in the run's config.yaml), for runs trained before `training.recalibrate` existed.

    python benchmarks/recalibrate.py benchmarks/runs/aspirin_eip benchmarks/runs/aspirin_cholesky
"""

from __future__ import annotations

import sys
from pathlib import Path

from e2ip import load_model
from e2ip.train.config.yaml_io import load_config
from e2ip.train.datasets import prepare_data


def main(runs: list[str]) -> None:
    for run in map(Path, runs):
        model = load_model(run / "model.pt")
        cfg = load_config(run / "config.yaml")
        validation = prepare_data(cfg.data).validation
        if not model.has_uncertainty:
            continue
        value = model.calibrate(validation)
        print(f"{run.name}: {model.calibration_method} = {value:.4g}")
        model.save(run / "model.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
