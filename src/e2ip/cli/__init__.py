"""Command line: `e2ip train | evaluate | calibrate | compare | export | md | active-learn | data`.

One thin module per command (``e2ip.cli.<command>``: ``NAME``, ``add_parser``, ``run``); the work
is done in the layers below. Every problem with the input (data, configuration, model file,
flags) is one line on stderr, `e2ip <command>: error: <message>`, and exit status 2; never a
traceback."""

from __future__ import annotations

import argparse
import logging
import sys

from e2ip.cli import active_learn, calibrate, compare, data, evaluate, export, md, train
from e2ip.cli.common import Parser
from e2ip.errors import E2IPError

log = logging.getLogger("e2ip")

#: the sub-commands, in the order `e2ip --help` lists them
COMMANDS = {module.NAME: module
            for module in (train, evaluate, calibrate, compare, export, md, active_learn, data)}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="e2ip", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


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
    try:
        return COMMANDS[args.command].run(args)
    except E2IPError as exc:
        print(f"e2ip {args.command}: error: {exc}", file=sys.stderr)
        return 2


