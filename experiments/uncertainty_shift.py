"""Does the uncertainty find the wrong structures? e2IP, its variants, eIP and a deep ensemble,
in distribution and under distribution shift (issue 13; paper Table 3 at this machine's scale).

    python experiments/uncertainty_shift.py train --dataset ethanol --seeds 0 1 2
    python experiments/uncertainty_shift.py report --dataset ethanol --seeds 0 1 2

`train` runs `e2ip train` one model after another (one CPU thread each) into
experiments/runs/shift/<dataset>/<method>/seed<k>/ and skips finished runs (an interrupted one
resumes). `report` evaluates every finished run on the in-distribution test frames and on the
shifted sets and writes docs/results/uncertainty_shift_<dataset>.{json,md}.

Data sets (paths relative to the project root, under ../shared/data):
- ethanol: train.xyz -> in distribution: test_MD.xyz; shifted: the 145 methanol frames of
  test_eth_meth.xyz (labelled) and test_H_removal.xyz (no labels: shift detection only);
- 3bpa: train_300K.xyz -> shifted: train_mixedT.xyz (300, 600 and 1200 K MD) without the 31
  frames it shares with train_300K.xyz; in distribution: the held-out 20 % of train_300K.xyz.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from runner import ROOT, RUNS, RunFailed, train_run

SHIFT_RUNS = RUNS / "shift"

#: method -> the `e2ip train --set` options on top of the data set's config
TRAINED = {
    "e2ip": [],
    "eip": ["model.head=eip"],
    "ensemble": ["model.head=none", "ensemble.size=5"],
}


def run_dir(dataset: str, method: str, seed: int) -> Path:
    return SHIFT_RUNS / dataset / method / f"seed{seed}"


def train(dataset: str, seeds: list[int], methods: list[str]) -> None:
    config = ROOT / "experiments" / "configs" / f"shift_{dataset}.yaml"
    for seed in seeds:
        for method in methods:
            start = time.time()
            try:
                seconds = train_run(config, run_dir(dataset, method, seed), TRAINED[method], seed)
            except RunFailed as exc:
                sys.exit(str(exc))
            state = f"trained in {seconds:.0f} s" if seconds else "done"
            print(f"{dataset} {method} seed {seed}: {state} ({time.time() - start:.0f} s)",
                  flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["train", "report", "timing"])
    parser.add_argument("--dataset", choices=["ethanol", "3bpa"], required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(TRAINED), choices=list(TRAINED))
    parser.add_argument("--timing", action="store_true",
                        help="report: also time inference (run it alone on the machine)")
    args = parser.parse_args(argv)
    if args.action == "train":
        train(args.dataset, args.seeds, args.methods)
    elif args.action == "timing":  # alone on the machine: the report's cost table
        from report_shift import update_timing

        update_timing(args.dataset)
    else:
        from report_shift import report  # noqa: PLC0415 - heavy imports only for the report

        report(args.dataset, args.seeds, timing=args.timing)


if __name__ == "__main__":
    main()
