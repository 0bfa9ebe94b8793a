"""``e2ip evaluate``: metrics and plots of a model on a data set."""

from __future__ import annotations

from pathlib import Path

from e2ip.cli.common import add_data_options, read_eval_data, read_reference

NAME = "evaluate"


def add_parser(subparsers) -> None:
    """The `e2ip evaluate` sub-command's arguments."""
    p = subparsers.add_parser("evaluate", help="evaluate a model file on a data set")
    p.add_argument("model", help="model.pt written by e2ip train (or its run directory)")
    add_data_options(p)
    p.add_argument("--form", choices=("raw", "cal"), default=None,
                   help="uncertainty form to report: raw (the model's own) or cal (with its "
                   "fitted calibration); default: cal when the model is calibrated")


def run(args) -> int:
    from e2ip.evaluation.evaluate import evaluate, format_table, write_metrics_json, write_plots
    from e2ip.models.io import load_model

    model = load_model(args.model, device=args.device)
    structures = read_eval_data(args)
    metrics, arrays = evaluate(model, structures, units=args.units, batch_size=args.batch_size,
                               rotate=args.rotate, form=args.form, timing=args.timing,
                               aggregate=args.aggregate, reference=read_reference(args))
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
