"""``e2ip active-learn``: the active-learning loop."""

from __future__ import annotations

from e2ip.cli.common import non_negative_int, positive_int

NAME = "active-learn"


def add_parser(subparsers) -> None:
    """The `e2ip active-learn` sub-command's arguments."""
    p = subparsers.add_parser("active-learn", help="active learning with a reference calculator")
    p.add_argument("config", nargs="?", default=None, help="active-learning YAML (see "
                   "docs/uncertainty_in_use.md)")
    p.add_argument("--train", default=None, help="labelled structures to start from (extxyz)")
    p.add_argument("--seeds", default=None, help="structures MD starts from (default: --train)")
    p.add_argument("--pool", default=None, help="unlabelled structures to select from instead "
                   "of running MD (pool-based active learning)")
    p.add_argument("--test", action="append", default=None, metavar="FILE",
                   help="held-out labelled set evaluated every round (repeatable)")
    p.add_argument("--oracle", default=None, help="reference: xtb (GFN2-xTB via tblite), emt, "
                   "or module:function returning an ASE calculator")
    p.add_argument("--rounds", type=non_negative_int, default=None)
    p.add_argument("--per-round", type=positive_int, default=None)
    p.add_argument("--selection", choices=("uncertainty", "random"), default=None)
    p.add_argument("--workers", type=non_negative_int, default=None,
                   help="labelling processes (0: in this process)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set md.steps=500 or "
                   "--set training.training.max_epochs=50")
    p.add_argument("--out", default="runs/active", help="output directory (resumes if it "
                   "holds a loop with the same configuration)")


def run(args) -> int:
    from e2ip.dynamics.active_learning.config import load_al_config
    from e2ip.dynamics.active_learning.loop import run_active_learning

    overrides = list(args.overrides)
    for key, value in (("train", args.train), ("seeds", args.seeds), ("pool", args.pool),
                       ("oracle", args.oracle),
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
