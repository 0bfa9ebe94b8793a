"""Inference at scale: the calculator and `e2ip evaluate` on periodic water boxes up to ~100k
atoms, peak memory and time, with and without edge chunking.

    python benchmarks/bench_scale.py                 # 1536, 12288 and 98304 atoms (~25 min)
    python benchmarks/bench_scale.py --reps 2 4      # smaller boxes only

Each measurement runs in its own process (peak resident memory, `ru_maxrss`, is per process):
the default model (PaiNN + e2IP, cutoff 5 Å, float32, untrained weights: cost does not depend
on the weights), 2 torch threads. The boxes are the first frame of
`shared/data/water_cheng2019` (192 atoms) repeated rep x rep x rep. `calculator` is one
`get_stress()` of `E2IPCalculator` (energy, forces, stress and every covariance) from scratch,
then one call after moving every atom by 0.01 Å (the skinned neighbour list is reused).
`evaluate` runs `e2ip evaluate` on the box written as extended XYZ with zero labels (the metrics
are meaningless; memory and time are what is measured). Unchunked runs (`chunk 0`) are done up
to 12288 atoms, where they fit; their results are compared with the chunked ones.
Writes benchmarks/results/scale_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WATER = ROOT.parent / "shared/data/water_cheng2019/water_cheng2019.extxyz"
THREADS = 2


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _box(rep: int):
    from ase.io import read

    return read(WATER, index=0).repeat((rep, rep, rep))


def _model(chunk: int):
    import torch

    from e2ip import PotentialModel
    from e2ip.backbones.base import set_edge_chunk_size

    torch.manual_seed(0)
    model = PotentialModel(elements=[1, 8], cutoff=5.0, force_scale=1.0, energy_scale=1.0).eval()
    set_edge_chunk_size(model, chunk)
    return model


def one_calculator(rep: int, chunk: int, out: str) -> None:
    import numpy as np
    import torch

    from e2ip import E2IPCalculator

    torch.set_num_threads(THREADS)
    atoms = _box(rep)
    atoms.calc = E2IPCalculator(_model(chunk))
    base = _peak_mb()
    t0 = time.perf_counter()
    atoms.get_stress()
    first = time.perf_counter() - t0
    results = {k: np.asarray(v).tolist() if k in ("energy", "stress") else None
               for k, v in atoms.calc.results.items()}
    saved = {k: np.asarray(atoms.calc.results[k]) for k in ("forces", "forces_covariance")}
    atoms.positions += 0.01
    t0 = time.perf_counter()
    atoms.get_stress()
    second = time.perf_counter() - t0
    np.savez(out + ".npz", **saved)
    n = len(atoms)
    Path(out).write_text(json.dumps({
        "what": "calculator", "atoms": n, "chunk": chunk,
        "first_call_s": first, "second_call_s": second, "ms_per_atom": 1e3 * second / n,
        "baseline_rss_mb": base, "peak_rss_mb": _peak_mb(),
        "mb_per_atom": (_peak_mb() - base) / n,
        "energy": results["energy"], "stress": results["stress"]}))


def one_evaluate(rep: int, chunk: int, out: str, xyz: str) -> None:
    import torch

    from e2ip.backbones.base import set_edge_chunk_size
    from e2ip.cli import main

    torch.set_num_threads(THREADS)
    model_path = Path(out).with_suffix(".pt")
    _model(chunk).save(model_path)
    import e2ip.models.io as model_io

    original = model_io.load_model

    def load_with_chunk(path, device="cpu"):  # the CLI has no chunk flag: default or 0
        model = original(path, device)
        set_edge_chunk_size(model, chunk)
        return model

    model_io.load_model = load_with_chunk
    base = _peak_mb()
    t0 = time.perf_counter()
    code = main(["evaluate", str(model_path), "--data", xyz, "--batch-size", "1",
                 "--out", str(Path(out).with_suffix(".eval"))])
    elapsed = time.perf_counter() - t0
    n = 192 * rep**3
    Path(out).write_text(json.dumps({
        "what": "evaluate", "atoms": n, "chunk": chunk, "exit": code, "seconds": elapsed,
        "ms_per_atom": 1e3 * elapsed / n, "baseline_rss_mb": base, "peak_rss_mb": _peak_mb(),
        "mb_per_atom": (_peak_mb() - base) / n}))


def _child(args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        subprocess.run([sys.executable, __file__, "--child", *args, "--result", out], check=True)
        result = json.loads(Path(out).read_text())
        npz = Path(out + ".npz")
        if npz.exists():
            import numpy as np

            result["_arrays"] = dict(np.load(npz))
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--unchunked-up-to", type=int, default=12288)
    parser.add_argument("--child", nargs="*")
    parser.add_argument("--result")
    args = parser.parse_args()
    if args.child:
        kind, rep, chunk, *rest = args.child
        if kind == "calculator":
            one_calculator(int(rep), int(chunk), args.result)
        else:
            one_evaluate(int(rep), int(chunk), args.result, rest[0])
        return
    import numpy as np
    from ase.io import write

    from e2ip.backbones.base import Backbone

    default_chunk = Backbone.edge_chunk_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in args.reps:
            n = 192 * rep**3
            atoms = _box(rep)
            atoms.info["energy"] = 0.0
            atoms.arrays["forces"] = 0.0 * atoms.positions
            xyz = str(Path(tmp) / f"water_{rep}.xyz")
            write(xyz, atoms, format="extxyz")
            chunks = [default_chunk] + ([0] if n <= args.unchunked_up_to else [])
            calc = {}
            for chunk in chunks:
                calc[chunk] = _child(["calculator", str(rep), str(chunk)])
                arrays = calc[chunk].pop("_arrays")
                calc[chunk]["_forces"], calc[chunk]["_cov"] = arrays["forces"], arrays[
                    "forces_covariance"]
                cov = arrays["forces_covariance"].astype("float64")
                finite = np.isfinite(cov).all(axis=(1, 2))
                calc[chunk]["covariances_finite"] = bool(finite.all())
                calc[chunk]["covariances_spd"] = bool(
                    finite.all() and (np.linalg.eigvalsh(cov)[:, 0] > 0).all())
                print(json.dumps({k: v for k, v in calc[chunk].items() if not k.startswith("_")}),
                      flush=True)
            if 0 in calc:
                a, b = calc[default_chunk], calc[0]
                for key, name in (("_forces", "forces"), ("_cov", "covariance")):
                    diff = np.abs(a[key] - b[key]).max() / np.abs(b[key]).max()
                    a[f"max_rel_diff_{name}_vs_unchunked"] = float(diff)
                a["rel_diff_energy_vs_unchunked"] = abs(a["energy"] - b["energy"]) / abs(
                    b["energy"])
            for r in calc.values():
                rows.append({k: v for k, v in r.items() if not k.startswith("_")})
            result = _child(["evaluate", str(rep), str(default_chunk), xyz])
            print(json.dumps(result), flush=True)
            rows.append(result)
    out = ROOT / "benchmarks/results/scale_cpu.json"
    out.write_text(json.dumps({
        "command": "python benchmarks/bench_scale.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {THREADS} torch threads, float32, no GPU",
        "default_edge_chunk": default_chunk, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
