"""``e2ip export``: a model as one TorchScript file for simulation engines (metatomic: LAMMPS,
ASE, i-PI, ...), with per-atom force covariances (docs/engines.md)."""

from __future__ import annotations

from pathlib import Path

from e2ip.errors import ConfigError
from e2ip.files import atomic_write

NAME = "export"
FORMATS = ("metatomic",)


def add_parser(subparsers) -> None:
    """The `e2ip export` sub-command's arguments."""
    p = subparsers.add_parser("export", help="export a model for simulation engines "
                              "(metatomic: LAMMPS, ASE, i-PI)")
    p.add_argument("model", help="model.pt (or its run directory)")
    p.add_argument("--format", choices=FORMATS, default="metatomic",
                   help="metatomic (default): a TorchScript file for pair_style metatomic, "
                   "metatomic-ase and other metatomic engines")
    p.add_argument("--out", required=True, help="the file to write, e.g. model-metatomic.pt")
    p.add_argument("--form", choices=("raw", "cal"), default=None,
                   help="uncertainty form baked into the file (default: cal when the model is "
                   "calibrated)")


def run(args) -> int:
    from e2ip.models.io import load_model

    try:
        from e2ip.integrations.metatomic import UNCERTAINTY_OUTPUTS, to_metatomic
    except ImportError as exc:  # the optional dependency
        raise ConfigError(f"export --format metatomic needs metatomic-torch ({exc}); "
                          "pip install 'e2ip[metatomic]'") from None
    model = load_model(args.model)
    exported = to_metatomic(model, form=args.form)
    out = Path(args.out)
    atomic_write(out, lambda tmp: exported.save(str(tmp)))
    outputs = ["energy"] + (list(UNCERTAINTY_OUTPUTS) if model.has_uncertainty else [])
    print(f"{model.label()} exported to {out} (metatomic; outputs: {', '.join(outputs)})")
    return 0
