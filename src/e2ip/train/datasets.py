"""Turn a DataConfig into train/validation/test structure lists, elements and data scales."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..data.readers import read_structures
from ..data.splits import fit_reference_energies, reference_energies_from_file, split_by_fractions
from ..data.structures import DataError, Structure
from .config import DataConfig

DEMO_FILE = "rmd17_ethanol_demo.npz"
DEMO_TEST_FILE = "rmd17_ethanol_demo_test.npz"


def demo_data_path(test: bool = False) -> Path:
    """The built-in demo data (CC0 rMD17 ethanol, kcal/mol and Å): 400 training frames from the
    train split 01, or with `test` 200 frames of the test split 01."""
    name = DEMO_TEST_FILE if test else DEMO_FILE
    return Path(str(resources.files("e2ip.data").joinpath("demo", name)))


@dataclass
class PreparedData:
    train: list[Structure]
    validation: list[Structure]
    test: list[Structure]
    elements: list[int]
    reference_energies: list[float]
    force_scale: float
    energy_scale: float


def read_with(cfg: DataConfig, path) -> list[Structure]:
    return read_structures(path, energy_key=cfg.energy_key, forces_key=cfg.forces_key,
                           energy_unit=cfg.energy_unit, length_unit=cfg.length_unit)


def prepare_data(cfg: DataConfig) -> PreparedData:
    path = cfg.train or demo_data_path()
    pool = read_with(cfg, path)
    f_train, f_val, f_test = cfg.split
    test_path = cfg.test or (None if cfg.train else demo_data_path(test=True))
    validation = read_with(cfg, cfg.validation) if cfg.validation else None
    test = read_with(cfg, test_path) if test_path else None
    fractions = [f_train, 0.0 if validation else f_val, 0.0 if test else f_test]
    total = sum(fractions)
    train, val_cut, test_cut = split_by_fractions(pool, [f / total for f in fractions], cfg.seed)
    validation = validation if validation is not None else val_cut
    test = test if test is not None else test_cut
    if cfg.n_train is not None:
        train = train[: cfg.n_train]
    if cfg.n_validation is not None:
        validation = validation[: cfg.n_validation]
    if cfg.n_test is not None:
        test = test[: cfg.n_test]
    if not train:
        raise DataError(f"{path}: no training structures after the split {cfg.split}")
    if not validation:
        raise DataError(f"{path}: no validation structures: set data.validation or data.split")
    elements = sorted({int(z) for s in train + validation + test for z in s.numbers})
    if cfg.reference_energies == "fit":
        ref = fit_reference_energies(train, elements)
    elif cfg.reference_energies == "zero":
        ref = np.zeros(len(elements))
    else:
        ref = reference_energies_from_file(cfg.reference_energies, elements)
    forces = np.concatenate([s.forces for s in train])
    force_scale = float(np.sqrt(np.mean(forces**2)))
    return PreparedData(train=train, validation=validation, test=test, elements=elements,
                        reference_energies=[float(e) for e in ref], force_scale=force_scale,
                        energy_scale=force_scale)
