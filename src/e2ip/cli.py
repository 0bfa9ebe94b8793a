"""Command line: `e2ip train | evaluate | compare`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .data.structures import DataError
from .train.config import ConfigError

log = logging.getLogger("e2ip")


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="data file (extxyz or anything ASE reads, npz)")
    p.add_argument("--out", default=None, help="output directory (metrics, plots)")
    p.add_argument("--units", default="eV", help="reported energy unit: eV, meV, kcal/mol, kJ/mol")
    p.add_argument("--energy-unit", default=None, help="energy unit in the file (default: eV "
                   "for xyz, kcal/mol for npz)")
    p.add_argument("--length-unit", default=None, help="length unit in the file (default Å)")
    p.add_argument("--energy-key", default="energy")
    p.add_argument("--forces-key", default="forces")
    p.add_argument("--index", default=":", help="frames to use, e.g. ':100' or '::10'")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rotate", action="store_true",
                   help="also evaluate on randomly rotated copies (Delta rho, equivariance errors)")
    p.add_argument("--device", default="cpu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="e2ip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (no config: PaiNN + e2IP on the demo data)")
    p.add_argument("config", nargs="?", default=None, help="YAML configuration file")
    p.add_argument("--data", default=None, help="training data file (sets data.train)")
    p.add_argument("--out", default="runs/e2ip", help="run directory (default runs/e2ip)")
    p.add_argument("--max-epochs", type=int, default=None)
    p.add_argument("--max-time", type=float, default=None, help="wall-clock limit in minutes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.backbone=painn")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")

    p = sub.add_parser("evaluate", help="evaluate a model file on a data set")
    p.add_argument("model", help="model.pt written by e2ip train (or its run directory)")
    _add_data_options(p)

    p = sub.add_parser("calibrate", help="fit a model's variance scale on held-out data")
    p.add_argument("model", help="model.pt (or its run directory)")
    p.add_argument("--data", required=True, help="held-out data with forces (validation set)")
    p.add_argument("--out", default=None, help="where to write the calibrated model "
                   "(default: overwrite MODEL)")
    p.add_argument("--energy-unit", default=None)
    p.add_argument("--length-unit", default=None)
    p.add_argument("--energy-key", default="energy")
    p.add_argument("--forces-key", default="forces")
    p.add_argument("--index", default=":")
    p.add_argument("--batch-size", type=int, default=32)

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
    cfg = load_config(args.config, overrides)
    metrics = run_training(cfg, args.out, resume=args.resume)
    print(f"\n{metrics['data']} set metrics ({args.out}/metrics.json):")
    print(format_table(metrics))
    print(f"model written to {args.out}/model.pt")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate, format_table, write_plots
    from .model import load_model

    model = load_model(_model_path(args.model), device=args.device)
    structures = _read_eval_data(args)
    metrics, arrays = evaluate(model, structures, units=args.units, batch_size=args.batch_size,
                               rotate=args.rotate)
    metrics["data"] = str(args.data)
    print(format_table(metrics))
    if args.out:
        out = Path(args.out)
        metrics["plots"] = write_plots(arrays, out, args.units)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(f"metrics written to {out}/metrics.json")
    return 0


def cmd_calibrate(args) -> int:
    from .model import load_model

    path = _model_path(args.model)
    model = load_model(path)
    if getattr(model, "kind", "model") == "ensemble":
        factor = model.fit_calibration(_read_eval_data(args), batch_size=args.batch_size)
        print(f"ensemble variance floor s^2 = {factor:.6g} (eV/Å)^2")
    else:
        factor = model.calibrate(_read_eval_data(args), batch_size=args.batch_size)
        print(f"variance scale = {factor:.6g}")
    out = Path(args.out) if args.out else path
    model.save(out)
    print(f"calibrated model written to {out}")
    return 0


def cmd_compare(args) -> int:
    from .compare import compare_models

    table = compare_models([_model_path(m) for m in args.models], _read_eval_data(args),
                           out_dir=Path(args.out), units=args.units,
                           batch_size=args.batch_size, rotate=args.rotate, device=args.device)
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
    args = build_parser().parse_args(argv)
    commands = {"train": cmd_train, "evaluate": cmd_evaluate, "calibrate": cmd_calibrate,
                "compare": cmd_compare}
    try:
        return commands[args.command](args)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"e2ip {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        if "model file" in str(exc):
            print(f"e2ip {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
