"""`e2ip train`: read data, train (one model or an ensemble), calibrate, write model.pt,
metrics.json and plots."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from e2ip.errors import ConfigError
from e2ip.models.io import MODEL_FILE_NAME
from e2ip.train.config.schema import Config
from e2ip.train.config.yaml_io import config_diff, dump_config, flat_config, load_config
from e2ip.train.datasets import prepare_data
from e2ip.train.ensemble import train_ensemble
from e2ip.train.fit import check_trainer_settings, load_base_members, train_model
from e2ip.train.ranks import is_global_zero

log = logging.getLogger("e2ip")


#: keys that may differ on --resume without --force: they change neither the model nor the data
#: nor the optimisation. Not the devices, nodes or strategy: a different number of processes
#: changes the global batch (data.batch_size per process) and so the steps of every epoch.
RESUME_FREE_KEYS = ("training.progress_bar", "training.num_threads", "data.num_workers",
                    "training.compile")


def check_resume_config(cfg: Config, out_dir: Path, force: bool) -> None:
    """Refuse (unless `force`) to resume a run whose recorded config.yaml differs from `cfg`."""
    recorded_path = out_dir / "config.yaml"
    if not recorded_path.exists():
        return
    recorded = load_config(recorded_path)
    changed = [k for k in config_diff(recorded, cfg) if k not in RESUME_FREE_KEYS]
    if changed and not force:
        old, new = flat_config(recorded), flat_config(cfg)
        listing = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ConfigError(f"--resume: the configuration differs from the one recorded in "
                          f"{recorded_path} ({listing}); pass --force to resume with the new "
                          "values, or drop the changes")


def check_run_folder(cfg: Config, out_dir: Path, resume: bool, force: bool,
                     rank_zero: bool = True) -> None:
    """Refuse a folder that already holds a run (without `resume`), one that holds none (with
    it), and a resume with a changed configuration (without `force`).

    Under DDP rank 0 writes config.yaml before the other ranks may look (Lightning's launcher
    starts them when training begins), so they ignore it when not resuming: checkpoints, which
    no rank can write before every rank has joined, tell them alone that a run is there."""
    checkpoints = (out_dir / "checkpoints").exists() or any(out_dir.glob("member_*/checkpoints"))
    config = (out_dir / "config.yaml").exists() and (rank_zero or resume)
    holds_run = config or checkpoints
    if not resume and holds_run:
        raise ConfigError(f"{out_dir} already holds a run; use --resume to continue it or "
                          "choose another --out")
    if resume and not holds_run:
        raise ConfigError(f"--resume: {out_dir} holds no run to resume")
    if resume:
        check_resume_config(cfg, out_dir, force)


def run_training(cfg: Config, out_dir: str | Path, resume: bool = False, force: bool = False,
                 extra_callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """The whole `e2ip train` job: train (one model or an ensemble), save `model.pt`, evaluate
    on the test set (`metrics.json`, plots) and return the metrics.

    Nothing in `out_dir` is written before the run is accepted: a folder that already holds a
    run needs `resume`, and resuming with a changed configuration needs `force`.

    Under DDP every process runs this job and trains; only global rank 0 writes (config.yaml,
    checkpoints, metrics.csv, model.pt, metrics.json, plots) and calibrates and evaluates. The
    other ranks return an empty dict once training is over."""
    from e2ip.evaluation.evaluate import evaluate_and_report, write_metrics_json

    out_dir = Path(out_dir)
    rank_zero = is_global_zero()
    check_run_folder(cfg, out_dir, resume, force, rank_zero)
    check_trainer_settings(cfg.training)
    bases = load_base_members(cfg)
    data = prepare_data(cfg.data, bases[0] if bases else None)
    if rank_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume and force and (out_dir / "config.yaml").exists():
            os.replace(out_dir / "config.yaml", out_dir / "config.previous.yaml")
        dump_config(cfg, out_dir / "config.yaml")
        log.info("data: %d train, %d validation, %d test structures; elements %s",
                 len(data.train), len(data.validation), len(data.test), data.elements)
    if bases is not None and rank_zero:
        log.info("fine-tuning from %s: its architecture, elements, scales and reference energies "
                 "are used (the config's model and head sections are ignored)",
                 cfg.training.init_from)
    if cfg.ensemble.size > 1:
        model = train_ensemble(cfg, out_dir, data=data, resume=resume, bases=bases)
    else:
        model = train_model(cfg, out_dir, data=data, resume=resume,
                            extra_callbacks=extra_callbacks,
                            base=bases[0] if bases else None)
    if not is_global_zero():  # the process group now exists: its rank decides
        return {}
    atoms = model.fit_training_statistics(data.train, batch_size=cfg.data.eval_batch_size)
    if atoms:
        log.info("training statistics of the uncertainty head fitted on %d atoms", atoms)
    if cfg.training.recalibrate and model.has_uncertainty:
        value = model.calibrate(data.validation, batch_size=cfg.data.eval_batch_size)
        log.info("calibration (%s) fitted on the validation set: %.4g",
                 model.calibration_method, value)
    model.save(out_dir / MODEL_FILE_NAME)
    test = data.test or data.validation
    metrics = evaluate_and_report(model, test, out_dir, units=cfg.data.report_units,
                                  batch_size=cfg.data.eval_batch_size,
                                  label="test" if data.test else "validation")
    write_metrics_json(metrics, out_dir / "metrics.json")
    return metrics
