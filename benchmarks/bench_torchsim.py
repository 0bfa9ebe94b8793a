"""MD throughput: B replicas in one TorchSim batch vs one ASE MD, the same e2ip model.

    python benchmarks/bench_torchsim.py --out benchmarks/results/torchsim_cpu.json [--device cuda]

Each timing is NVE velocity Verlet steps of rMD17 ethanol (9 atoms) with the model's energy,
forces and force covariances computed at every step; reported as replica-steps per second
(one ASE MD = 1 replica) after a warm-up. The model is untrained (cost does not depend on the
weights).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from ase import units
from ase.md.verlet import VelocityVerlet

from e2ip.data.read import read_structures
from e2ip.integrations.ase_calculator import E2IPCalculator
from e2ip.integrations.torchsim import E2IPTorchSimModel
from e2ip.models import PotentialModel

DEMO = Path(__file__).resolve().parents[1] / "src/e2ip/data/demo/rmd17_ethanol_demo_test.npz"


def main() -> None:
    import torch_sim as ts
    from torch_sim.integrators.nve import nve

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 8, 32, 128])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = PotentialModel(elements=[1, 6, 8], cutoff=5.0).eval()
    atoms = read_structures(DEMO, index="0")[0].to_atoms()

    atoms.calc = E2IPCalculator(model, device=args.device)
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    dyn.run(3)
    start = time.perf_counter()
    dyn.run(args.steps)
    ase_rate = args.steps / (time.perf_counter() - start)
    rows = [{"engine": "ASE (E2IPCalculator)", "replicas": 1, "replica_steps_per_s": ase_rate}]
    print(f"ASE MD, 1 replica: {ase_rate:.1f} steps/s")

    wrapper = E2IPTorchSimModel(model, device=args.device)
    metal = ts.units.MetalUnits
    for count in args.replicas:
        state = ts.io.atoms_to_state([atoms.copy() for _ in range(count)], wrapper.device,
                                     wrapper.dtype)
        init, step = nve(model=wrapper, dt=torch.tensor(0.0005 * metal.time),
                         kT=torch.tensor(300 * metal.temperature), seed=0)
        md = init(state)
        for _ in range(3):
            md = step(md)
        if wrapper.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            md = step(md)
        if wrapper.device.type == "cuda":
            torch.cuda.synchronize()
        rate = count * args.steps / (time.perf_counter() - start)
        rows.append({"engine": "TorchSim (E2IPTorchSimModel)", "replicas": count,
                     "replica_steps_per_s": rate, "over_ase": rate / ase_rate})
        print(f"TorchSim, {count:4d} replicas: {rate:.1f} replica-steps/s ({rate / ase_rate:.1f}x)")
    meta = {"device": args.device, "threads": args.threads, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "atoms_per_replica": len(atoms),
            "command": "python benchmarks/bench_torchsim.py " + " ".join(
                f"--{k} {v}" for k, v in vars(args).items() if k not in ("out", "replicas"))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
