"""Command line: `e2ip train | evaluate | calibrate | compare`.

Every problem with the input (data, configuration, model file, flags) is one line on stderr,
`e2ip <command>: error: <message>`, and exit status 2; never a traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import E2IPError

log = logging.getLogger("e2ip")

REPORT_UNITS = ("eV", "meV", "kcal/mol", "kJ/mol")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


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


def _add_read_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--energy-unit", type=_unit_checker("energy"), default=None,
                   help="energy unit in the file (default: eV for xyz, kcal/mol for npz)")
    p.add_argument("--length-unit", type=_unit_checker("length"), default=None,
                   help="length unit in the file (default Å)")
    p.add_argument("--energy-key", default="energy", help="extxyz info key of the energy")
    p.add_argument("--forces-key", default="forces", help="extxyz array key of the forces")
    p.add_argument("--index", default=":", help="frames to use, e.g. ':100' or '::10'")
    p.add_argument("--batch-size", type=_positive_int, default=32)


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="data file (extxyz or anything ASE reads, npz)")
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
    _add_read_options(p)

    p = sub.add_parser("compare", help="evaluate several models side by side")
    p.add_argument("models", nargs="+", help="model files or run directories")
    _add_data_options(p)
    p.set_defaults(out="comparison")
    return parser


def _model_path(path: str) -> Path:
    p = Path(path)
    return p / "model.pt" if p.is_dir() else p


def _read_eval_data(args):
    from .data.readers import read_structures

    return read_structures(args.data, energy_key=args.energy_key, forces_key=args.forces_key,
                           energy_unit=args.energy_unit, length_unit=args.length_unit,
                           index=args.index)


def cmd_train(args) -> int:
    from .evaluation import format_table
    from .train.config import load_config
    from .train.run import run_training

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.train={args.data}")
    if args.max_epochs is not None:
        overrides.append(f"training.max_epochs={args.max_epochs}")
    if args.max_time is not None:
        overrides.append(f"training.max_time={args.max_time}")
    if args.init_from is not None:
        overrides.append(f"training.init_from={args.init_from}")
    config = args.config
    recorded = Path(args.out) / "config.yaml"
    if args.resume and config is None and recorded.exists():
        config = recorded  # resume the run as it was configured (plus any --set)
    cfg = load_config(config, overrides)
    metrics = run_training(cfg, args.out, resume=args.resume, force=args.force)
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
                               rotate=args.rotate, form=args.form, timing=args.timing)
    metrics["data"] = str(args.data)
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
    value = model.calibrate(_read_eval_data(args), batch_size=args.batch_size)
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
                           timing=args.timing)
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors (one line, status 2) and --help (status 0)
        return int(exc.code or 0)
    commands = {"train": cmd_train, "evaluate": cmd_evaluate, "calibrate": cmd_calibrate,
                "compare": cmd_compare}
    try:
        return commands[args.command](args)
    except E2IPError as exc:
        print(f"e2ip {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
