"""What the ``e2ip`` commands share: argument types, data-reading options, the one-line parser."""

from __future__ import annotations

import argparse

from e2ip.errors import E2IPError

#: per-structure aggregates, the default first (metrics.AGGREGATES; repeated here so that the
#: parser is built without importing torch)
AGGREGATES = ("mean", "max", "sum")


REPORT_UNITS = ("eV", "meV", "kcal/mol", "kJ/mol")


def int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= `minimum` (`what` names it in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


def _report_unit(text: str) -> str:
    for unit in REPORT_UNITS:
        if text.strip().lower() == unit.lower():
            return unit
    raise argparse.ArgumentTypeError(f"unknown unit {text!r}; choose from {', '.join(REPORT_UNITS)}")


def _unit_checker(kind: str):
    """An argparse type that accepts unit names e2ip.data.units knows (`kind`: energy, length)."""
    from e2ip.data import units

    factor = units.energy_factor if kind == "energy" else units.length_factor

    def check(text: str) -> str:
        try:
            factor(text)
        except E2IPError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return check


def add_read_options(p: argparse.ArgumentParser, batch_size: bool = True) -> None:
    """Keys, units and frames of the data files (and the evaluation batch size)."""
    p.add_argument("--energy-unit", type=_unit_checker("energy"), default=None,
                   help="energy unit in the file(s) (default: eV for xyz, kcal/mol for npz)")
    p.add_argument("--length-unit", type=_unit_checker("length"), default=None,
                   help="length unit in the file(s) (default Å)")
    p.add_argument("--energy-key", default="energy",
                   help="extxyz info key of the energy ('none': the data has forces only)")
    p.add_argument("--forces-key", default="forces", help="extxyz array key of the forces")
    p.add_argument("--index", default=":", help="frames of each file, e.g. ':100' or '::10'")
    if batch_size:
        p.add_argument("--batch-size", type=positive_int, default=32)


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="data file (extxyz or anything ASE reads, npz, "
                   "or .h5 written by e2ip data convert)")
    p.add_argument("--out", default=None, help="output directory (metrics, plots)")
    p.add_argument("--units", type=_report_unit, default="eV",
                   help="reported energy unit: eV, meV, kcal/mol, kJ/mol")
    add_read_options(p)
    p.add_argument("--rotate", action="store_true",
                   help="also evaluate on randomly rotated copies (Delta rho, equivariance errors)")
    p.add_argument("--timing", action="store_true",
                   help="also measure the inference time per atom (median of 5 passes after a "
                   "warm-up, graphs prebuilt)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--aggregate", choices=AGGREGATES, default=AGGREGATES[0],
                   help="per-structure uncertainty: the mean (default), max or sum of the "
                   "per-atom epistemic traces (spearman_per_structure, ause_per_structure, "
                   "auc_worst10, auc_reference)")
    p.add_argument("--reference", default=None, metavar="FILE",
                   help="an in-distribution reference set (e.g. the test set of the training "
                   "distribution; labels not needed): adds auc_reference, the ROC-AUC of the "
                   "per-structure uncertainty for telling --data from it")


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def read_with_options(args, path, **requirements):
    """read_structures of `path` with the --energy-key/--forces-key/--*-unit options."""
    from e2ip.data.read import read_structures

    return read_structures(path, energy_key=args.energy_key, forces_key=args.forces_key,
                           energy_unit=args.energy_unit, length_unit=args.length_unit,
                           **requirements)


def read_eval_data(args):
    from e2ip.data.validate import without_energies

    no_energy = args.energy_key.lower() in ("none", "null")
    structures = read_with_options(args, args.data, index=args.index,
                                    require_energy=not no_energy)
    return without_energies(structures) if no_energy else structures


def read_reference(args):
    """The --reference structures (every frame; energies and forces not needed), or None."""
    if not args.reference:
        return None
    return read_with_options(args, args.reference, require_energy=False, require_forces=False)


positive_int = int_at_least(1, "a positive integer")
non_negative_int = int_at_least(0, "an integer >= 0")
