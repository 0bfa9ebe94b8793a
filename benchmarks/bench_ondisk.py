"""Training data in memory vs on disk (issue 10): peak memory and time per epoch.

    python benchmarks/bench_ondisk.py                  # water x1 and x3 (~4 min on 2 cores)
    python benchmarks/bench_ondisk.py --replicate 1    # water only

The data are `shared/data/water_cheng2019` (1588 periodic frames of 192 atoms, extxyz), repeated
`--replicate` times (as if the file were that much longer; duplicates allowed). Each measurement
runs in its own process (peak resident memory, `ru_maxrss`, is per process):

- `convert`: `e2ip data convert` of the copies into one HDF5 file (time, peak memory, size);
- `memory`: `read_structures` of the copies and `GraphDataset(structures, cutoff 5 Å)` (the
  neighbour lists of every frame built and held), then two epochs of the training loader
  (batch 8, shuffled, float32) with `num_workers` 0 or 2;
- `disk`: the same from the HDF5 file: `read_structures(FILE.h5)` (lazy) and `GraphDataset`,
  whose items are read and their neighbour lists built as the loader asks for them.

`baseline_rss_mb` is the process after imports, `peak_rss_mb` its peak over the phase;
`peak_worker_rss_mb` the largest peak of a loader worker (forked: it shares the parent's pages
until they are written to). Epoch 1 includes starting the workers. Writes
benchmarks/results/ondisk_cpu.json.
"""

from __future__ import annotations

import argparse
import gc
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
CUTOFF = 5.0
BATCH = 8


def _peak_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0


def _epochs(dataset, workers: int) -> list[float]:
    """Seconds of each of two epochs over the shuffled training loader."""
    import torch

    loader = dataset.loader(BATCH, shuffle=True, dtype=torch.float32, seed=0,
                            num_workers=workers)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        n = sum(int(g.n_atoms.shape[0]) for g in loader)
        times.append(time.perf_counter() - t0)
        assert n == len(dataset)
    del loader
    gc.collect()
    return times


def phase_convert(replicate: int, h5: str) -> dict:
    from e2ip.data.convert import convert

    base = _peak_mb()
    t0 = time.perf_counter()
    summary = convert([WATER] * replicate, h5, allow_duplicates=replicate > 1, overwrite=True)
    return {"phase": "convert", "replicate": replicate, "frames": summary.n_frames,
            "atoms": summary.n_atoms, "seconds": time.perf_counter() - t0,
            "file_mb": summary.size_bytes / 2**20, "baseline_rss_mb": base,
            "peak_rss_mb": _peak_mb()}


def phase_load(kind: str, replicate: int, workers: int, h5: str) -> dict:
    import torch

    from e2ip.data.graph import GraphDataset
    from e2ip.data.read import read_structures

    torch.set_num_threads(1)
    base = _peak_mb()
    t0 = time.perf_counter()
    if kind == "memory":
        structures = [s for _ in range(replicate) for s in read_structures(WATER)]
    else:
        structures = read_structures(h5)
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    dataset = GraphDataset(structures, CUTOFF)
    build_s = time.perf_counter() - t0
    after_build = _peak_mb()
    epochs = _epochs(dataset, workers)
    return {"phase": kind, "replicate": replicate, "frames": len(dataset), "num_workers": workers,
            "read_s": read_s, "dataset_build_s": build_s, "epoch_s": epochs,
            "baseline_rss_mb": base, "peak_rss_after_build_mb": after_build,
            "peak_rss_mb": _peak_mb(),
            "peak_worker_rss_mb": _peak_mb(resource.RUSAGE_CHILDREN) if workers else None}


def _child(args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([sys.executable, __file__, "--child", *args, "--result", str(out)],
                       check=True)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicate", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--child", nargs="*")
    parser.add_argument("--result")
    args = parser.parse_args()
    if args.child:
        kind, replicate, workers, h5 = args.child
        result = (phase_convert(int(replicate), h5) if kind == "convert"
                  else phase_load(kind, int(replicate), int(workers), h5))
        Path(args.result).write_text(json.dumps(result))
        return
    if not WATER.exists():
        sys.exit(f"{WATER} not found (see ../shared/data/README.md)")
    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for replicate in args.replicate:
            h5 = str(Path(tmp) / f"water_x{replicate}.h5")
            jobs = [("convert", 0)] + [(kind, w) for kind in ("memory", "disk") for w in (0, 2)]
            for kind, workers in jobs:
                row = _child([kind, str(replicate), str(workers), h5])
                print(json.dumps(row), flush=True)
                rows.append(row)
    out = ROOT / "benchmarks/results/ondisk_cpu.json"
    out.write_text(json.dumps({
        "command": "python benchmarks/bench_ondisk.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, 2 CPU cores (shared), no GPU, 1 torch thread",
        "data": f"{WATER.name}: 1588 frames x 192 atoms, periodic; cutoff {CUTOFF} Å, "
                f"batch {BATCH}",
        "total_s": time.perf_counter() - t_start, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
