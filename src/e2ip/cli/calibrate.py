"""``e2ip calibrate``: refit a model's post-hoc calibration (optionally its feature distance)."""

from __future__ import annotations

from pathlib import Path

from e2ip.cli.common import add_read_options, read_eval_data, read_with_options
from e2ip.models.io import model_file

NAME = "calibrate"


def add_parser(subparsers) -> None:
    """The `e2ip calibrate` sub-command's arguments."""
    p = subparsers.add_parser("calibrate", help="fit a model's variance scale on held-out data")
    p.add_argument("model", help="model.pt (or its run directory)")
    p.add_argument("--data", required=True, help="held-out data with forces (validation set)")
    p.add_argument("--out", default=None, help="where to write the calibrated model "
                   "(default: overwrite MODEL)")
    p.add_argument("--feature-distance", metavar="TRAIN", default=None,
                   help="first switch an e2IP model to `evidence: feature_distance`, fitted on "
                   "TRAIN (the data it was trained on): its epistemic part then grows with each "
                   "atom's distance from the training data (docs/uncertainty_under_shift.md)")
    p.add_argument("--r-bins", type=int, default=None, metavar="N",
                   help="with --feature-distance: also fit one variance factor per bin of N "
                   "equal quantile bins of the feature distance r (head.calibration_r_bins; 0: "
                   "none; docs/uncertainty_under_shift.md)")
    add_read_options(p)


def run(args) -> int:
    from e2ip.errors import ModelError
    from e2ip.models.io import load_model

    path = model_file(args.model)
    model = load_model(path)
    if args.r_bins is not None and not args.feature_distance:
        raise ModelError("calibrate: --r-bins needs --feature-distance TRAIN (the bins are of "
                         "the feature distance fitted on TRAIN)")
    if args.feature_distance:
        train = read_with_options(args, args.feature_distance, require_energy=False,
                                   require_forces=False)
        model = model.with_feature_distance(train, batch_size=args.batch_size,
                                            r_bins=args.r_bins)
        print(f"feature distance fitted on {len(train)} structures of {args.feature_distance}")
    value = model.calibrate(read_eval_data(args), batch_size=args.batch_size)
    extra = model.calibration() or {}
    if "epistemic_scale" in extra:
        print(f"{model.label()}: epistemic_scale = {extra['epistemic_scale']:.6g}")
    if "r_bin_factors" in extra:
        factors = ", ".join(f"{f:.3g}" for f in extra["r_bin_factors"])
        print(f"{model.label()}: factors per bin of r = {factors}")
    unit = " (eV/Å)^2" if model.calibration_method.endswith("_floor") else ""
    print(f"{model.label()}: {model.calibration_method} = {value:.6g}{unit}")
    out = Path(args.out) if args.out else path
    model.save(out)
    print(f"calibrated model written to {out}")
    return 0
