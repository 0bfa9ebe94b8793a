"""Inference cost per atom: bare backbone vs uncertainty heads vs a 5-member ensemble.

    python benchmarks/bench_cost.py --out benchmarks/results/cost_cpu.json [--device cuda]

Energy + forces (+ covariances) for a batch of rMD17 aspirin structures, median over repeats
after warm-up (docs/maths.md §7). Models are untrained (cost does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from e2ip.data.graph import graph_from_structures
from e2ip.data.read import read_structures
from e2ip.models.ensemble import Ensemble
from e2ip.models.single import PotentialModel

DATA = Path(__file__).resolve().parents[2] / "shared/data/rmd17/rmd17_aspirin_test_01.npz"


def timed(fn, device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backbones", nargs="+", default=["painn", "tensor_product", "alphanet"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    structures = read_structures(DATA, index=f":{args.batch}")
    graph = graph_from_structures(structures, 5.0, torch.float32).to(device)
    n_atoms = int(graph.n_atoms.sum())
    results = []
    for backbone in args.backbones:
        for head in ("none", "e2ip", "eip", "cholesky", "ensemble5"):
            torch.manual_seed(0)
            if head == "ensemble5":
                model = Ensemble([PotentialModel(elements=[1, 6, 8], cutoff=5.0,
                                                 backbone=backbone, head="none")
                                  for _ in range(5)]).to(device)
            else:
                model = PotentialModel(elements=[1, 6, 8], cutoff=5.0, backbone=backbone,
                                       head=head).to(device)
            model.eval()

            def run(model=model):
                out = model(graph, create_graph=False)
                model.covariances(out["params"], out["forces"])

            seconds = timed(run, device, args.repeats)
            row = {"backbone": backbone, "head": head, "ms_per_atom": 1e3 * seconds / n_atoms,
                   "batch_atoms": n_atoms}
            results.append(row)
            print(f"{backbone:15s} {head:10s} {row['ms_per_atom']:.4f} ms/atom")
    base = {r["backbone"]: r["ms_per_atom"] for r in results if r["head"] == "none"}
    for r in results:
        r["relative_to_bare"] = r["ms_per_atom"] / base[r["backbone"]]
    meta = {"device": str(device), "threads": args.threads, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "command": "python benchmarks/bench_cost.py " + " ".join(
                f"--{k} {v}" for k, v in vars(args).items() if k != "backbones")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
