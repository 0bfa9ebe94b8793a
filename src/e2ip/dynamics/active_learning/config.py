"""The active-learning configuration (YAML with ``--set`` overrides) and its checks."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ase import Atoms

from e2ip.dynamics.oracle import check_oracle
from e2ip.errors import ConfigError
from e2ip.train.config.checks import build_section, config_from_dict
from e2ip.train.config.yaml_io import apply_overrides, read_yaml_mapping

SELECTIONS = ("uncertainty", "random")
STARTS = ("seeds", "labelled", "frontier")


@dataclass
class MDSettings:
    """MD that generates candidates: steps per trajectory, temperature (K), timestep (fs),
    ensemble (nve | langevin | nvt), friction (Langevin, 1/fs), interval (steps between candidate
    frames), trajectories (per round), start (where each trajectory starts, drawn at random:
    seeds: the seed structures every round; labelled: any frame labelled so far; frontier: the
    frames labelled in the previous round, so that exploration goes on from where the last
    selection reached; round 0 starts from the seeds), max_uncertainty (eV/Å: end a trajectory
    once the largest per-atom forces_uncertainty passes it; 'auto': the model's stored
    stop_threshold; null: run all steps),
    bias_strength (eV) and bias_width (eV/Å) of uncertainty-driven dynamics (null: off)."""

    steps: int = 500
    temperature: float = 300.0
    timestep: float = 0.5
    ensemble: str = "langevin"
    friction: float = 0.01
    interval: int = 10
    trajectories: int = 4
    start: str = "seeds"
    max_uncertainty: float | str | None = None
    bias_strength: float | None = None
    bias_width: float = 0.05


@dataclass
class ALConfig:
    """train: labelled structures to start from (extxyz, eV and Å, keys energy/forces);
    seeds: structures MD starts from (default: train); pool: unlabelled structures to select
    from instead of running MD (pool-based active learning: each round ranks the pool frames not
    yet selected; the md section is then unused); test: held-out labelled sets evaluated
    every round; oracle (+ oracle_options): the reference, see e2ip.dynamics.oracle; rounds: acquisition
    rounds (rounds + 1 models are trained); per_round: structures labelled per round;
    selection: uncertainty | random; pool_factor: see the module docstring; workers: labelling
    processes (0: in this process); seed: seeds MD, selection and training;
    training: an e2ip training config (data/model/head/training/ensemble sections; data.train is
    set by the loop, the default split is 90/10/0); finetune: training-section values for rounds
    >= 1 (default max_epochs: half of round 0's)."""

    train: str | None = None
    seeds: str | None = None
    pool: str | None = None
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
    cfg = build_section(ALConfig, raw, "")
    cfg.md = build_section(MDSettings, md, "md.")
    _check(cfg)
    return cfg


def _check(cfg: ALConfig) -> None:
    if cfg.train is None:
        raise ConfigError("'train' is required: the labelled structures to start from "
                          "(--train FILE)")
    for key, paths in (("train", [cfg.train]), ("seeds", [cfg.seeds] if cfg.seeds else []),
                       ("pool", [cfg.pool] if cfg.pool else []),
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
    if md.start not in STARTS:
        raise ConfigError(f"'md.start' must be one of {', '.join(STARTS)}, got {md.start!r}")
    if md.temperature <= 0 or md.timestep <= 0 or md.friction < 0:
        raise ConfigError("'md.temperature' and 'md.timestep' must be > 0, 'md.friction' >= 0")
    if md.steps < 1 or md.interval < 1 or md.trajectories < 1:
        raise ConfigError("'md.steps', 'md.interval' and 'md.trajectories' must be >= 1")
    threshold = md.max_uncertainty
    if threshold is not None and threshold != "auto" and (
            isinstance(threshold, (bool, str)) or not threshold > 0):
        raise ConfigError(f"'md.max_uncertainty' must be a number > 0 (eV/Å), 'auto' or null, "
                          f"got {threshold!r}")
    if md.bias_strength is not None and (md.bias_strength <= 0 or md.bias_width <= 0):
        raise ConfigError("'md.bias_strength' and 'md.bias_width' must be > 0")
    if not isinstance(cfg.training, dict) or not isinstance(cfg.finetune, dict):
        raise ConfigError("'training' and 'finetune' must be mappings")
    if len({Path(t).stem for t in cfg.test}) != len(cfg.test):
        raise ConfigError(f"'test': the files must have different names, got {cfg.test}")
    read_seeds(cfg)
    training_config(cfg, cfg.train, 0, None)  # validates the training section now
    check_oracle(cfg.oracle, cfg.oracle_options)


def training_config(cfg: ALConfig, train_file: str | Path, round_index: int,
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


def read_seeds(cfg: ALConfig) -> list[Atoms]:
    """The MD starting structures (any format e2ip reads; labels not needed)."""
    from e2ip.data.read import read_structures

    path = cfg.seeds or cfg.train
    return [s.to_atoms() for s in read_structures(path, require_energy=False,
                                                  require_forces=False)]
