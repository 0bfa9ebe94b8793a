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
  frames it shares with train_300K.xyz; in distribution: the held-out 20 % of train_300K.xyz;
- water: the boxes of water_cheng2019 whose density lies in the middle half (0.84-0.95 g/cm^3)
  -> in distribution: held-out central boxes; shifted: 50 boxes of the low-density tail
  (< 0.79 g/cm^3) and 50 of the high-density tail (> 1.06 g/cm^3), 10 % of the set each;
- si_zeo22: train.xyz (10 zeolite topologies) -> in distribution: test_id.xyz (other frames of
  the same 10); shifted: test_new_topologies.xyz (6 topologies never seen).

Many cores or a GPU: `parallel_train.py` trains the same runs side by side.
"""

from __future__ import annotations

import argparse
import sys
import time

from runner import DATA, ROOT, WATER_DATA, RunFailed, run_dir, train_run

#: method -> the `e2ip train --set` options on top of the data set's config
TRAINED = {
    "e2ip": ["head.evidence=learned"],  # the paper's e2IP (the default is the feature distance)
    "eip": ["model.head=eip"],
    "ensemble": ["model.head=none", "ensemble.size=5"],
    "het_ensemble": ["model.head=mve", "ensemble.size=5"],  # members predict a variance too
}

DATASETS = ["ethanol", "3bpa", "water", "si_zeo22"]


#: water density bands, g/cm^3: the training band and the two shifted tails
WATER_BANDS = {"central": (0.84, 0.95), "low": (0.0, 0.79), "high": (1.06, 10.0)}
N_SHIFTED = 50  # boxes per shifted tail


def water_density(atoms) -> float:
    """Mass density of a periodic box, g/cm^3 (amu/Å^3 x 1.66054)."""
    return float(atoms.get_masses().sum() / atoms.get_volume() * 1.66053907)


def write_water_bands() -> None:
    """Split water_cheng2019 by density into central.extxyz (all of the band, in file order) and
    low/high.extxyz (N_SHIFTED boxes of each tail, a fixed random choice), unless written."""
    if all((WATER_DATA / f"{band}.extxyz").exists() for band in WATER_BANDS):
        return
    import numpy as np
    from ase.io import read, write

    frames = read(DATA / "water_cheng2019" / "water_cheng2019.extxyz", index=":")
    density = np.array([water_density(a) for a in frames])
    WATER_DATA.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for band, (low, high) in WATER_BANDS.items():
        chosen = np.flatnonzero((density >= low) & (density <= high))
        if band != "central":
            chosen = np.sort(rng.choice(chosen, N_SHIFTED, replace=False))
        tmp = WATER_DATA / f"{band}.extxyz.tmp"
        write(tmp, [frames[k] for k in chosen], format="extxyz")
        tmp.replace(WATER_DATA / f"{band}.extxyz")
        print(f"water {band}: {len(chosen)} boxes, density {density[chosen].min():.3f}-"
              f"{density[chosen].max():.3f} g/cm^3", flush=True)


def train(dataset: str, seeds: list[int], methods: list[str]) -> None:
    config = ROOT / "experiments" / "configs" / f"shift_{dataset}.yaml"
    if dataset == "water":
        write_water_bands()
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
    parser.add_argument("action", choices=["train", "report", "timing", "markdown", "summary"])
    parser.add_argument("--dataset", choices=DATASETS, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(TRAINED), choices=list(TRAINED))
    parser.add_argument("--timing", action="store_true",
                        help="report: also time inference (run it alone on the machine)")
    parser.add_argument("--suffix", default="",
                        help="report, markdown, summary, timing: docs/results/uncertainty_shift_<dataset>"
                             "<suffix>.{json,md} (e.g. a report of some methods only)")
    args = parser.parse_args(argv)
    if "." in args.suffix:
        parser.error("--suffix: no dots (the file names end in .json and .md)")
    if args.action == "train":
        train(args.dataset, args.seeds, args.methods)
    elif args.action == "markdown":  # the report's tables again from its JSON
        from report_shift import rewrite_markdown

        rewrite_markdown(args.dataset, args.suffix)
    elif args.action == "summary":  # one compact table (form cal, raw in brackets)
        import json

        from report_shift import summary_table
        from runner import RESULTS

        print(summary_table(json.loads(
            (RESULTS / f"uncertainty_shift_{args.dataset}{args.suffix}.json").read_text())))
    elif args.action == "timing":  # alone on the machine: the report's cost table
        from report_shift import update_timing

        update_timing(args.dataset, args.suffix)
    else:
        from report_shift import report  # noqa: PLC0415 - heavy imports only for the report

        report(args.dataset, args.seeds, timing=args.timing, suffix=args.suffix)


if __name__ == "__main__":
    main()
