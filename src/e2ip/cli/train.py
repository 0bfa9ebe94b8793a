"""``e2ip train``: train (or resume, or fine-tune) a model and evaluate it."""

from __future__ import annotations

from pathlib import Path

from e2ip.cli.common import positive_int

NAME = "train"


def add_parser(subparsers) -> None:
    """The `e2ip train` sub-command's arguments."""
    p = subparsers.add_parser("train", help="train a model (no config: PaiNN + e2IP on the demo data)")
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
    p.add_argument("--num-nodes", type=positive_int, default=None,
                   help="nodes of a multi-node run (sets training.num_nodes)")
    p.add_argument("--strategy", default=None,
                   help="Lightning strategy, e.g. ddp (sets training.strategy)")


def run(args) -> int:
    from e2ip.evaluation.evaluate import format_table
    from e2ip.train.config.yaml_io import load_config
    from e2ip.train.ranks import is_global_zero
    from e2ip.train.run import run_training

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
