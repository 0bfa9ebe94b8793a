"""Exported (metatomic, TorchScript) vs eager: the same energy, forces and force covariances, and
the time per atom of each.

    python benchmarks/bench_export.py --out benchmarks/results/export_cpu.json [--device cuda]

For each model, the timed call is the model alone on prepared inputs (neighbour lists built
once, outside the timing): eager ``model(graph)`` + ``model.covariances``, and the exported
``AtomisticModel`` on metatomic systems with the engine's neighbour list, asked for the energy,
its gradient (the forces, by autograd as an engine does) and ``e2ip::forces_covariance``. A
batch of rMD17 aspirin structures, median over repeats after warm-up, float32.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch
from bench_cost import timed  # the same timing as the cost benchmark (script folder on the path)

from e2ip.data.graph import graph_from_structures
from e2ip.data.read import read_structures
from e2ip.integrations.metatomic import to_metatomic
from e2ip.models import Ensemble, PotentialModel

DATA = Path(__file__).resolve().parents[2] / "shared/data/rmd17/rmd17_aspirin_test_01.npz"


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind.startswith("ensemble5-"):
        backbone = kind.split("-", 1)[1]
        return Ensemble([PotentialModel(elements=[1, 6, 8], cutoff=5.0, backbone=backbone,
                                        head="none") for _ in range(5)])
    backbone, head = kind.split("-")
    return PotentialModel(elements=[1, 6, 8], cutoff=5.0, backbone=backbone, head=head)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=["painn-e2ip", "alphanet-e2ip",
                                                        "ensemble5-painn"])
    args = parser.parse_args()
    from metatomic.torch import ModelEvaluationOptions, ModelOutput, systems_to_torch
    from vesin.metatomic import compute_requested_neighbors

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    structures = read_structures(DATA, index=f":{args.batch}")
    atoms = [s.to_atoms() for s in structures]
    graph = graph_from_structures(structures, 5.0, torch.float32).to(device)
    n_atoms = int(graph.n_atoms.sum())
    results = []
    for kind in args.models:
        model = build(kind).to(device).eval()
        exported = to_metatomic(model).to(device)
        systems = systems_to_torch(atoms, dtype=torch.float32, device=device,
                                   positions_requires_grad=True)
        compute_requested_neighbors(systems, "angstrom", exported)
        options = ModelEvaluationOptions(length_unit="angstrom", outputs={
            "energy": ModelOutput(unit="eV", sample_kind="system"),
            "e2ip::forces_covariance": ModelOutput(sample_kind="atom")})

        def eager(model=model):
            out = model(graph, create_graph=False)
            return out["energy"], out["forces"], model.covariances(out["params"], out["forces"])

        def engine(exported=exported, systems=systems, options=options):
            result = exported(systems, options, check_consistency=False)
            energy = result["energy"].block().values
            # retain_graph: the neighbour vectors' own graph (built once, outside the timing)
            forces = torch.autograd.grad(energy.sum(), [s.positions for s in systems],
                                         retain_graph=True)
            return energy, forces, result["e2ip::forces_covariance"].block().values

        e_eager, f_eager, c_eager = eager()
        e_exp, f_exp, c_exp = engine()
        deviation = {
            "energy_eV": float((e_exp[:, 0] - e_eager).abs().max()),
            "forces_eV_per_A": float((-torch.cat(f_exp) - f_eager).abs().max()),
            "covariance_relative": float((c_exp[..., 0] - c_eager["predictive"]).abs().max()
                                         / c_eager["predictive"].abs().max()),
        }
        row = {"model": kind, "batch_atoms": n_atoms,
               "eager_ms_per_atom": 1e3 * timed(eager, device, args.repeats) / n_atoms,
               "exported_ms_per_atom": 1e3 * timed(engine, device, args.repeats) / n_atoms,
               "max_deviation": deviation}
        row["exported_over_eager"] = row["exported_ms_per_atom"] / row["eager_ms_per_atom"]
        results.append(row)
        print(f"{kind:18s} eager {row['eager_ms_per_atom']:.4f}  exported "
              f"{row['exported_ms_per_atom']:.4f} ms/atom ({row['exported_over_eager']:.2f}x); "
              f"max |dE| {deviation['energy_eV']:.1e} eV, |dF| {deviation['forces_eV_per_A']:.1e} "
              f"eV/A, cov {deviation['covariance_relative']:.1e} relative")
    meta = {"device": str(device), "threads": args.threads, "torch": torch.__version__,
            "dtype": "float32", "cpu": platform.processor() or platform.machine(),
            "numpy": np.__version__,
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "command": "python benchmarks/bench_export.py " + " ".join(
                f"--{k} {v}" for k, v in vars(args).items() if k not in ("models", "out"))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
