"""Turn a DataConfig into train/validation/test structure lists, elements and data scales."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from e2ip.data.formats.hdf5 import is_lazy
from e2ip.data.read import read_structures
from e2ip.data.splits import (
    check_split,
    fit_reference_energies,
    reference_energies_from_file,
    split_by_fractions,
)
from e2ip.data.structures import DataError, Structure
from e2ip.data.validate import check_duplicates, check_elements, without_energies
from e2ip.train.config.schema import DataConfig

log = logging.getLogger("e2ip")

DEMO_FILE = "rmd17_ethanol_demo.npz"
DEMO_TEST_FILE = "rmd17_ethanol_demo_test.npz"


def demo_data_path(test: bool = False) -> Path:
    """The built-in demo data (CC0 rMD17 ethanol, kcal/mol and Å): 400 training frames from the
    train split 01, or with `test` 200 frames of the test split 01."""
    name = DEMO_TEST_FILE if test else DEMO_FILE
    return Path(str(resources.files("e2ip.data").joinpath("demo", name)))


@dataclass
class PreparedData:
    """The parts are lists of structures, or lazy views of an on-disk (.h5) file."""

    train: Sequence[Structure]
    validation: Sequence[Structure]
    test: Sequence[Structure]
    elements: list[int]
    reference_energies: list[float]
    force_scale: float
    energy_scale: float


def read_with(cfg: DataConfig, path) -> Sequence[Structure]:
    """Read one data file as the config says (`energy_key: null`: forces only). An on-disk
    (.h5) file gives a lazy sequence."""
    structures = read_structures(path, energy_key=cfg.energy_key or "energy",
                                 forces_key=cfg.forces_key, energy_unit=cfg.energy_unit,
                                 length_unit=cfg.length_unit,
                                 require_energy=cfg.energy_key is not None)
    if cfg.energy_key is None:
        structures = without_energies(structures)
    return structures


def _elements_of(structures: Sequence[Structure]) -> set[int]:
    """The atomic numbers that occur in `structures` (on disk: from the stored composition)."""
    if is_lazy(structures):
        return set(structures.elements_present())
    return {int(z) for s in structures for z in s.numbers}


def _check_no_duplicates(part: Sequence[Structure] | None) -> None:
    """check_duplicates, skipped for on-disk data whose conversion refused duplicates already
    (a lazy file that was converted with --allow-duplicates is streamed through the check)."""
    if part is None:
        return
    if is_lazy(part) and part.duplicates_checked:
        log.info("%s: duplicate frames were refused when it was converted; not checked again",
                 part.path)
        return
    check_duplicates(part)


def _check_elements_in_training(train, others: dict[str, Sequence[Structure]], known) -> None:
    """Every element of the validation and test sets must occur in the training set (or, when
    fine-tuning, be known to the base model): otherwise its embedding and reference energy are
    never trained."""
    from ase.data import chemical_symbols

    for name, structures in others.items():
        if is_lazy(structures):  # only the first offender is read, to name it
            k = structures.first_outside(known)
            structures = [] if k is None else [structures[k]]
        for s in structures:
            unknown = sorted({int(z) for z in s.numbers} - known)
            if unknown:
                symbols = ", ".join(chemical_symbols[z] for z in unknown)
                raise DataError(f"{s.where()}: element(s) {symbols} occur in the {name} set but "
                                "not in the training set, so the model cannot learn them; move "
                                "such structures into the training data")


def prepare_data(cfg: DataConfig, base=None) -> PreparedData:
    """Read and split the data. `base` (a PotentialModel being fine-tuned) fixes the elements,
    reference energies and scales; data with an element it does not know is an error.

    An on-disk (.h5) file stays on disk: its parts are lazy views, and the elements, reference
    energies and force scale come from the per-frame summaries stored at conversion."""
    path = cfg.train or demo_data_path()
    pool = read_with(cfg, path)
    f_train, f_val, f_test = cfg.split
    check_split(cfg.split, "'data.split' fractions")
    test_path = cfg.test or (None if cfg.train else demo_data_path(test=True))
    validation = read_with(cfg, cfg.validation) if cfg.validation else None
    test = read_with(cfg, test_path) if test_path else None
    if not cfg.allow_duplicates:  # per file: a file concatenated twice, a frame written twice
        for part in (pool, validation, test):
            _check_no_duplicates(part)
    # parts that come from their own files take nothing from the pool: the rest is re-shared
    fractions = [f_train, 0.0 if validation else f_val, 0.0 if test else f_test]
    total = sum(fractions) if (validation or test) else 1.0
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
    if base is not None:
        check_elements(train, base.elements, "the model being fine-tuned (training.init_from)")
        _check_elements_in_training(train, {"validation": validation, "test": test},
                                    set(base.elements))
        return PreparedData(train=train, validation=validation, test=test,
                            elements=list(base.elements),
                            reference_energies=base.reference_energies.tolist(),
                            force_scale=base.force_scale, energy_scale=base.energy_scale)
    train_elements = _elements_of(train)
    _check_elements_in_training(train, {"validation": validation, "test": test}, train_elements)
    elements = sorted(train_elements)
    if cfg.reference_energies == "fit" and cfg.energy_key is not None:
        ref = fit_reference_energies(train, elements)
    elif cfg.reference_energies == "fit":  # forces only: nothing to fit, energies up to a constant
        ref = np.zeros(len(elements))
    elif cfg.reference_energies == "zero":
        ref = np.zeros(len(elements))
    else:
        ref = reference_energies_from_file(cfg.reference_energies, elements)
    if is_lazy(train):  # from the stored per-frame sums of squares: no frame is read
        force_scale = train.force_rms()
    else:
        forces = np.concatenate([s.forces for s in train])
        force_scale = float(np.sqrt(np.mean(forces**2)))
    return PreparedData(train=train, validation=validation, test=test, elements=elements,
                        reference_energies=[float(e) for e in ref], force_scale=force_scale,
                        energy_scale=force_scale)
