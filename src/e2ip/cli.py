"""Command line: `e2ip train | evaluate | calibrate | compare | md | active-learn | data`.

Every problem with the input (data, configuration, model file, flags) is one line on stderr,
`e2ip <command>: error: <message>`, and exit status 2; never a traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import E2IPError

#: per-structure aggregates, the default first (metrics.AGGREGATES; repeated here so that the
#: parser is built without importing torch)
AGGREGATES = ("mean", "max", "sum")

log = logging.getLogger("e2ip")

REPORT_UNITS = ("eV", "meV", "kcal/mol", "kJ/mol")


def _int_at_least(minimum: int, what: str):
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


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _report_unit(text: str) -> str:
    for unit in REPORT_UNITS:
        if text.strip().lower() == unit.lower():
            return unit
    raise argparse.ArgumentTypeError(f"unknown unit {text!r}; choose from {', '.join(REPORT_UNITS)}")


def _unit_checker(kind: str):
    """An argparse type that accepts unit names e2ip.data.units knows (`kind`: energy, length)."""
    from .data import units

    factor = units.energy_factor if kind == "energy" else units.length_factor

    def check(text: str) -> str:
        try:
            factor(text)
        except E2IPError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return check


def _add_read_options(p: argparse.ArgumentParser, batch_size: bool = True) -> None:
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
        p.add_argument("--batch-size", type=_positive_int, default=32)


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="data file (extxyz or anything ASE reads, npz, "
                   "or .h5 written by e2ip data convert)")
    p.add_argument("--out", default=None, help="output directory (metrics, plots)")
    p.add_argument("--units", type=_report_unit, default="eV",
                   help="reported energy unit: eV, meV, kcal/mol, kJ/mol")
    _add_read_options(p)
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


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="e2ip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (no config: PaiNN + e2IP on the demo data)")
    p.add_argument("config", nargs="?", default=None, help="YAML configuration file")
    p.add_argument("--data", default=None, help="training data file (sets data.train)")
    p.add_argument("--out", default="runs/e2ip", help="run directory (default runs/e2ip)")
    p.add_argument("--max-epochs", type=int, default=None)
    p.add_argument("--max-time", type=float, default=None, help="wall-clock limit in minutes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.backbone=painn")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (with its recorded config.yaml)")
    p.add_argument("--force", action="store_true",
                   help="with --resume: accept configuration changes against the recorded run")
    p.add_argument("--init-from", default=None, metavar="MODEL",
                   help="fine-tune: start from this trained model file (sets training.init_from)")
    p.add_argument("--accelerator", default=None,
                   help="cpu, gpu, auto, ... (sets training.accelerator)")
    p.add_argument("--devices", default=None,
                   help="devices per node: a count, -1 (all), auto, or indices like 0,1 (sets "
                   "training.devices); see docs/distributed.md")
    p.add_argument("--num-nodes", type=_positive_int, default=None,
                   help="nodes of a multi-node run (sets training.num_nodes)")
    p.add_argument("--strategy", default=None,
                   help="Lightning strategy, e.g. ddp (sets training.strategy)")

    p = sub.add_parser("evaluate", help="evaluate a model file on a data set")
    p.add_argument("model", help="model.pt written by e2ip train (or its run directory)")
    _add_data_options(p)
    p.add_argument("--form", choices=("raw", "cal"), default=None,
                   help="uncertainty form to report: raw (the model's own) or cal (with its "
                   "fitted calibration); default: cal when the model is calibrated")

    p = sub.add_parser("calibrate", help="fit a model's variance scale on held-out data")
    p.add_argument("model", help="model.pt (or its run directory)")
    p.add_argument("--data", required=True, help="held-out data with forces (validation set)")
    p.add_argument("--out", default=None, help="where to write the calibrated model "
                   "(default: overwrite MODEL)")
    p.add_argument("--feature-distance", metavar="TRAIN", default=None,
                   help="first switch an e2IP model to `evidence: feature_distance`, fitted on "
                   "TRAIN (the data it was trained on): its epistemic part then grows with each "
                   "atom's distance from the training data (docs/uncertainty_under_shift.md)")
    _add_read_options(p)

    p = sub.add_parser("compare", help="evaluate several models side by side")
    p.add_argument("models", nargs="+", help="model files or run directories")
    _add_data_options(p)
    p.set_defaults(out="comparison")

    p = sub.add_parser("md", help="molecular dynamics that watches its own uncertainty")
    p.add_argument("model", help="model.pt (or its run directory)")
    p.add_argument("--structure", required=True, help="starting structure (any file ASE reads)")
    p.add_argument("--index", default="-1", help="frame of --structure to start from (default "
                   "the last)")
    p.add_argument("--steps", type=_non_negative_int, default=1000)
    p.add_argument("--temperature", type=float, default=300.0, help="K (default 300)")
    p.add_argument("--timestep", type=float, default=0.5, help="fs (default 0.5)")
    p.add_argument("--ensemble", choices=("nve", "langevin", "nvt", "npt"), default="langevin")
    p.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs")
    p.add_argument("--pressure", type=float, default=0.0, help="npt pressure, GPa")
    p.add_argument("--max-uncertainty", type=float, default=None, metavar="X",
                   help="threshold on the largest per-atom forces_uncertainty, eV/Å")
    p.add_argument("--on-exceed", choices=("stop", "save"), default="stop",
                   help="past the threshold: stop, or save the frame for labelling and go on")
    p.add_argument("--bias-strength", type=float, default=None, metavar="A",
                   help="uncertainty-driven dynamics: bias strength A in eV (see "
                   "docs/uncertainty_in_use.md)")
    p.add_argument("--bias-width", type=float, default=None, metavar="B",
                   help="bias width B in eV/Å (default: 0.05)")
    p.add_argument("--form", choices=("raw", "cal"), default=None,
                   help="uncertainty form (default: cal when the model is calibrated)")
    p.add_argument("--log-interval", type=_positive_int, default=1, help="steps per md.csv row")
    p.add_argument("--traj-interval", type=_positive_int, default=10,
                   help="steps per trajectory frame")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--out", default="md", help="output directory (default md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("active-learn", help="active learning with a reference calculator")
    p.add_argument("config", nargs="?", default=None, help="active-learning YAML (see "
                   "docs/uncertainty_in_use.md)")
    p.add_argument("--train", default=None, help="labelled structures to start from (extxyz)")
    p.add_argument("--seeds", default=None, help="structures MD starts from (default: --train)")
    p.add_argument("--test", action="append", default=None, metavar="FILE",
                   help="held-out labelled set evaluated every round (repeatable)")
    p.add_argument("--oracle", default=None, help="reference: xtb (GFN2-xTB via tblite), emt, "
                   "or module:function returning an ASE calculator")
    p.add_argument("--rounds", type=_non_negative_int, default=None)
    p.add_argument("--per-round", type=_positive_int, default=None)
    p.add_argument("--selection", choices=("uncertainty", "random"), default=None)
    p.add_argument("--workers", type=_non_negative_int, default=None,
                   help="labelling processes (0: in this process)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set md.steps=500 or "
                   "--set training.training.max_epochs=50")
    p.add_argument("--out", default="runs/active", help="output directory (resumes if it "
                   "holds a loop with the same configuration)")

    p = sub.add_parser("data", help="on-disk data sets: convert data files to HDF5, describe one")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="{convert,info}")
    q = data_sub.add_parser("convert", help="write data files into one HDF5 file (eV, Å) that "
                            "training reads lazily (data.train: FILE.h5)")
    q.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="data files (extxyz or anything ASE reads, npz, or .h5)")
    q.add_argument("--out", required=True, help="the HDF5 file to write (.h5 or .hdf5)")
    _add_read_options(q, batch_size=False)
    q.add_argument("--allow-duplicates", action="store_true",
                   help="keep frames that repeat an earlier one (default: an error naming both)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (atomically, once the new file is complete)")
    q.add_argument("--compression", choices=("gzip", "lzf", "none"), default="gzip",
                   help="gzip (default, any HDF5 tool reads it), lzf (h5py only) or none")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q = data_sub.add_parser("info", help="describe an HDF5 file written by e2ip data convert")
    q.add_argument("file", help="the .h5 file")
    return parser


def _model_path(path: str) -> Path:
    p = Path(path)
    return p / "model.pt" if p.is_dir() else p


def _read_with_options(args, path, **requirements):
    """read_structures of `path` with the --energy-key/--forces-key/--*-unit options."""
    from .data.readers import read_structures

    return read_structures(path, energy_key=args.energy_key, forces_key=args.forces_key,
                           energy_unit=args.energy_unit, length_unit=args.length_unit,
                           **requirements)


def _read_eval_data(args):
    from .data.readers import without_energies

    no_energy = args.energy_key.lower() in ("none", "null")
    structures = _read_with_options(args, args.data, index=args.index,
                                    require_energy=not no_energy)
    return without_energies(structures) if no_energy else structures


def _read_reference(args):
    """The --reference structures (every frame; energies and forces not needed), or None."""
    if not args.reference:
        return None
    return _read_with_options(args, args.reference, require_energy=False, require_forces=False)


def cmd_train(args) -> int:
    from .evaluation import format_table
    from .train.config import load_config
    from .train.ranks import is_global_zero
    from .train.run import run_training

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.train={args.data}")
    if args.max_epochs is not None:
        overrides.append(f"training.max_epochs={args.max_epochs}")
    if args.max_time is not None:
        overrides.append(f"training.max_time={args.max_time}")
    for key, value in (("init_from", args.init_from), ("accelerator", args.accelerator),
                       ("devices", args.devices), ("num_nodes", args.num_nodes),
                       ("strategy", args.strategy)):
        if value is not None:
            overrides.append(f"training.{key}={value}")
    config = args.config
    recorded = Path(args.out) / "config.yaml"
    if args.resume and config is None and recorded.exists():
        config = recorded  # resume the run as it was configured (plus any --set)
    cfg = load_config(config, overrides)
    metrics = run_training(cfg, args.out, resume=args.resume, force=args.force)
    if not is_global_zero():  # another process of a distributed run: rank 0 reports
        return 0
    print(f"\n{metrics['data']} set metrics ({args.out}/metrics.json):")
    print(format_table(metrics))
    print(f"model written to {args.out}/model.pt")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate, format_table, write_metrics_json, write_plots
    from .model_io import load_model

    model = load_model(_model_path(args.model), device=args.device)
    structures = _read_eval_data(args)
    metrics, arrays = evaluate(model, structures, units=args.units, batch_size=args.batch_size,
                               rotate=args.rotate, form=args.form, timing=args.timing,
                               aggregate=args.aggregate, reference=_read_reference(args))
    metrics["data"] = str(args.data)
    if args.reference:
        metrics["reference"] = str(args.reference)
    print(format_table(metrics))
    if args.out:
        out = Path(args.out)
        metrics["plots"] = write_plots(arrays, out, args.units)
        write_metrics_json(metrics, out / "metrics.json")
        print(f"metrics written to {out}/metrics.json")
    return 0


def cmd_calibrate(args) -> int:
    from .model_io import load_model

    path = _model_path(args.model)
    model = load_model(path)
    if args.feature_distance:
        train = _read_with_options(args, args.feature_distance, require_energy=False,
                                   require_forces=False)
        model = model.with_feature_distance(train, batch_size=args.batch_size)
        print(f"feature distance fitted on {len(train)} structures of {args.feature_distance}")
    value = model.calibrate(_read_eval_data(args), batch_size=args.batch_size)
    extra = model.calibration() or {}
    if "epistemic_scale" in extra:
        print(f"{model.label()}: epistemic_scale = {extra['epistemic_scale']:.6g}")
    unit = " (eV/Å)^2" if model.calibration_method == "variance_floor" else ""
    print(f"{model.label()}: {model.calibration_method} = {value:.6g}{unit}")
    out = Path(args.out) if args.out else path
    model.save(out)
    print(f"calibrated model written to {out}")
    return 0


def cmd_compare(args) -> int:
    from .compare import compare_models

    table = compare_models([_model_path(m) for m in args.models], _read_eval_data(args),
                           out_dir=Path(args.out), units=args.units,
                           batch_size=args.batch_size, rotate=args.rotate, device=args.device,
                           timing=args.timing, aggregate=args.aggregate,
                           reference=_read_reference(args))
    print(table)
    return 0


def cmd_md(args) -> int:
    from ase.io import read

    from .bias import UncertaintyBias
    from .calculator import E2IPCalculator
    from .data.readers import read_structures
    from .md import run_md

    structures = read_structures(args.structure, index=args.index, require_energy=False,
                                 require_forces=False)
    if len(structures) != 1:
        raise E2IPError(f"--index {args.index!r} selects {len(structures)} frames of "
                        f"{args.structure}; MD starts from one")
    atoms = structures[0].to_atoms()
    try:
        source = read(args.structure, index=args.index)
        if source.has("momenta"):
            atoms.set_momenta(source.get_momenta())
    except Exception:  # noqa: BLE001 - momenta are optional; the structure itself was read above
        pass
    bias = None
    if args.bias_strength is not None or args.bias_width is not None:
        try:
            bias = UncertaintyBias(args.bias_strength if args.bias_strength is not None else 0.0,
                                   args.bias_width if args.bias_width is not None else 0.05,
                                   form=args.form)
        except ValueError as exc:
            raise E2IPError(str(exc)) from None
    calc = E2IPCalculator(_model_path(args.model), device=args.device, form=args.form, bias=bias)
    result = run_md(atoms, calc, steps=args.steps, temperature_K=args.temperature,
                    timestep_fs=args.timestep, ensemble=args.ensemble,
                    friction_per_fs=args.friction, pressure_GPa=args.pressure,
                    max_uncertainty=args.max_uncertainty, on_exceed=args.on_exceed, out=args.out,
                    log_interval=args.log_interval, traj_interval=args.traj_interval,
                    seed=args.seed, progress=not args.no_progress)
    what = {"completed": "completed",
            "uncertainty": f"stopped at step {result.steps}: forces_uncertainty passed "
                           f"{args.max_uncertainty} eV/Å (frame in {args.out}/exceeded.extxyz)",
            "non-finite": f"stopped at step {result.steps}: non-finite energy or forces"}
    print(f"MD {what[result.stop_reason]}: {result.steps} steps, "
          f"{result.steps_per_second:.1f} steps/s, max forces_uncertainty "
          f"{result.max_uncertainty:.4g} eV/Å, {result.exceeded} step(s) over the threshold; "
          f"log {args.out}/md.csv, trajectory {args.out}/trajectory.extxyz")
    return 0


def cmd_active_learn(args) -> int:
    from .active_learning import load_al_config, run_active_learning

    overrides = list(args.overrides)
    for key, value in (("train", args.train), ("seeds", args.seeds), ("oracle", args.oracle),
                       ("rounds", args.rounds), ("per_round", args.per_round),
                       ("selection", args.selection), ("workers", args.workers)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.test:
        overrides.append("test=[" + ", ".join(repr(t) for t in args.test) + "]")
    cfg = load_al_config(args.config, overrides)
    summary = run_active_learning(cfg, args.out)
    print(summary)
    return 0


def cmd_data(args) -> int:
    from .data.ondisk import _size, convert, describe

    if args.data_command == "info":
        print(describe(args.file))
        return 0
    summary = convert(args.inputs, args.out, energy_key=args.energy_key,
                      forces_key=args.forces_key, energy_unit=args.energy_unit,
                      length_unit=args.length_unit, index=args.index,
                      allow_duplicates=args.allow_duplicates, overwrite=args.overwrite,
                      compression=args.compression, progress=not args.no_progress)
    from ase.data import chemical_symbols

    elements = ", ".join(chemical_symbols[z] for z in summary.elements)
    print(f"wrote {summary.path}: {summary.n_frames} frames, {summary.n_atoms} atoms "
          f"({elements}), {_size(summary.size_bytes)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command; progress goes to stderr through the `e2ip` logger while it runs."""
    handler = logging.StreamHandler()  # the current sys.stderr; removed again when done, so
    handler.setFormatter(logging.Formatter("%(message)s"))  # repeated calls never stack handlers
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    propagate, log.propagate = log.propagate, False
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return _run_command(argv)
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


def _run_command(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors (one line, status 2) and --help (status 0)
        return int(exc.code or 0)
    commands = {"train": cmd_train, "evaluate": cmd_evaluate, "calibrate": cmd_calibrate,
                "compare": cmd_compare, "md": cmd_md, "active-learn": cmd_active_learn,
                "data": cmd_data}
    try:
        return commands[args.command](args)
    except E2IPError as exc:
        print(f"e2ip {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
