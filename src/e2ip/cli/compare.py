"""``e2ip compare``: several models on one data set, one table and overlaid plots."""

from __future__ import annotations

from pathlib import Path

from e2ip.cli.common import add_data_options, read_eval_data, read_reference

NAME = "compare"


def add_parser(subparsers) -> None:
    """The `e2ip compare` sub-command's arguments."""
    p = subparsers.add_parser("compare", help="evaluate several models side by side")
    p.add_argument("models", nargs="+", help="model files or run directories")
    add_data_options(p)
    p.set_defaults(out="comparison")


def run(args) -> int:
    from e2ip.evaluation.compare import compare_models

    table = compare_models([m for m in args.models], read_eval_data(args),
                           out_dir=Path(args.out), units=args.units,
                           batch_size=args.batch_size, rotate=args.rotate, device=args.device,
                           timing=args.timing, aggregate=args.aggregate,
                           reference=read_reference(args))
    print(table)
    return 0
