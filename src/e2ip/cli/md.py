"""``e2ip md``: molecular dynamics that stops or saves frames on an uncertainty threshold."""

from __future__ import annotations

import argparse

from e2ip.cli.common import non_negative_int, positive_int

NAME = "md"


def threshold_value(text: str) -> float | str:
    """--max-uncertainty: a number of eV/Å or 'auto'."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number (eV/Å) or 'auto', got {text!r}"
                                         ) from None


def add_parser(subparsers) -> None:
    """The `e2ip md` sub-command's arguments."""
    p = subparsers.add_parser("md", help="molecular dynamics that watches its own uncertainty")
    p.add_argument("model", help="model.pt (or its run directory)")
    p.add_argument("--structure", required=True, help="starting structure (any file ASE reads)")
    p.add_argument("--index", default="-1", help="frame of --structure to start from (default "
                   "the last)")
    p.add_argument("--steps", type=non_negative_int, default=1000)
    p.add_argument("--temperature", type=float, default=300.0, help="K (default 300)")
    p.add_argument("--timestep", type=float, default=0.5, help="fs (default 0.5)")
    p.add_argument("--ensemble", choices=("nve", "langevin", "nvt", "npt"), default="langevin")
    p.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs")
    p.add_argument("--pressure", type=float, default=0.0, help="npt pressure, GPa")
    p.add_argument("--max-uncertainty", type=threshold_value, default=None, metavar="X",
                   help="threshold on the largest per-atom forces_uncertainty, eV/Å, or 'auto' "
                   "(the model's stored stop_threshold, fitted at calibration)")
    p.add_argument("--on-exceed", choices=("stop", "save"), default="stop",
                   help="past the threshold: stop, or save the frame for labelling and go on")
    p.add_argument("--bias-strength", type=float, default=None, metavar="A",
                   help="uncertainty-driven dynamics: bias strength A in eV (see "
                   "docs/uncertainty_in_use.md)")
    p.add_argument("--bias-width", type=float, default=None, metavar="B",
                   help="bias width B in eV/Å (default: 0.05)")
    p.add_argument("--form", choices=("raw", "cal"), default=None,
                   help="uncertainty form (default: cal when the model is calibrated)")
    p.add_argument("--log-interval", type=positive_int, default=1, help="steps per md.csv row")
    p.add_argument("--traj-interval", type=positive_int, default=10,
                   help="steps per trajectory frame")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--out", default="md", help="output directory (default md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from e2ip.dynamics.md import bias_from_options, read_start_structure, run_md
    from e2ip.integrations.ase_calculator import E2IPCalculator

    atoms = read_start_structure(args.structure, args.index)
    bias = bias_from_options(args.bias_strength, args.bias_width, args.form)
    calc = E2IPCalculator(args.model, device=args.device, form=args.form, bias=bias)
    result = run_md(atoms, calc, steps=args.steps, temperature_K=args.temperature,
                    timestep_fs=args.timestep, ensemble=args.ensemble,
                    friction_per_fs=args.friction, pressure_GPa=args.pressure,
                    max_uncertainty=args.max_uncertainty, on_exceed=args.on_exceed, out=args.out,
                    log_interval=args.log_interval, traj_interval=args.traj_interval,
                    seed=args.seed, progress=not args.no_progress)
    what = {"completed": "completed",
            "uncertainty": f"stopped at step {result.steps}: forces_uncertainty passed "
                           f"{result.threshold or float('nan'):.4g} eV/Å (frame in "
                           f"{args.out}/exceeded.extxyz)",
            "non-finite": f"stopped at step {result.steps}: non-finite energy or forces"}
    print(f"MD {what[result.stop_reason]}: {result.steps} steps, "
          f"{result.steps_per_second:.1f} steps/s, max forces_uncertainty "
          f"{result.max_uncertainty:.4g} eV/Å, {result.exceeded} step(s) over the threshold; "
          f"log {args.out}/md.csv, trajectory {args.out}/trajectory.extxyz")
    return 0
