"""Inference cost of two peer codes, NequIP and MACE, measured like our own model.

What it measures: time per atom (median over repeats) and peak memory of one energy + forces
evaluation of an UNTRAINED peer model (cost does not depend on the weights) on a given structure,
float32, cutoff 5 Å. Neither peer is imported by e2ip nor e2ip by this script: each code runs
under its own virtual environment's python, and this script re-invokes itself there, one
subprocess per (code, structure), so that peak resident memory (`ru_maxrss`) is per measurement.

Models (both built directly from the peer's public Python API, no training run):

- NequIP 0.19.1, `nequip.model.NequIPGNNModel` with the model settings of nequip's tutorial
  config (`configs/tutorial.yaml`, num_layers 4, l_max 1, num_features 32 are its "good
  defaults"): 4 interaction layers, l_max 1 with parity (features 32x0e + 32x0o + 32x1o + 32x1e),
  radial MLP depth 2 x width 64, 8 Bessel functions, polynomial cutoff p=6, no ZBL pair term,
  eager mode (no `torch.compile`): 417,888 parameters for H, O (417,920 for H, C, O); most of
  them are the radial MLPs' last layers, which output the tensor-product weights.
- MACE 0.3.16, `mace.modules.ScaleShiftMACE` as `mace_run_train --model MACE` builds it, with
  MACE's "small" width: hidden irreps 32x0e + 32x1o (32 channels, max_L 1), correlation 3,
  2 interactions, edge spherical harmonics up to l=3 (MACE's default `max_ell`), 8 Bessel
  functions, polynomial cutoff 5, radial MLP [64, 64, 64], readout MLP 16x0e, first block
  RealAgnosticInteractionBlock then RealAgnosticResidualInteractionBlock: 84,720 parameters
  for H, O (93,520 for H, C, O).

Our default model (PaiNN, 64 features, 3 layers, + the e2IP head, cutoff 5 Å, float32) has
156,940 parameters for H, O (157,004 for H, C, O): between the two peers (1.9x MACE's count,
0.38x NequIP's). All three are each code's default/small size with the same cutoff and precision and
2-4 message-passing layers, i.e. what a user of each code gets without tuning for speed.
Weights are untrained but seeded (cost does not depend on them). `n_params` is in each output.

Protocol (the same as for our model): `torch.set_num_threads(--threads)`; the model is built,
then the structure is read, then the resident size is recorded, then the input graph is built
once (neighbour list outside the timed region); 2 warm-up calls; then at least `--min-repeats`
(3) timed calls, adding calls until `--budget-s` (20 s) of timed calls or `--repeats` calls;
`torch.cuda.synchronize()` around each call on CUDA. The median time is reported. Peak memory:
`ru_maxrss` at the end of the subprocess (`peak_rss_mb`) and that minus the resident size
just before the input was built (`peak_rss_delta_mb`, with `baseline_rss_mb`); on CUDA also
`torch.cuda.max_memory_allocated()` (`peak_gpu_mb`, and `peak_gpu_delta_mb` above the model).

Structures: `water:REP` is the first frame of shared/data/water_cheng2019 (192 atoms, periodic)
repeated REP x REP x REP (1, 2, 4 -> 192, 1536, 12288 atoms); `aspirin:B` is the first B frames
of shared/data/rmd17/rmd17_aspirin_test_01.npz (21 atoms each, not periodic) evaluated as one
batch.

Commands:

    python benchmarks/peers.py setup [--code all] [--venv-dir benchmarks/.venvs]
        # creates DIR/{nequip,mace} if missing: python -m venv, then pip install torch==2.13.0
        # first, then nequip==0.19.1 (or mace-torch==0.3.16) with torch kept pinned;
        # --torch-index-url https://download.pytorch.org/whl/cpu for a CPU-only torch
    python benchmarks/peers.py run --code all --structure water:1 water:2 water:4 aspirin:8 \\
        [--threads 2] [--device cpu|cuda] [--out results.jsonl] [--venv-dir DIR]
        # one JSON line per (code, structure) on stdout, or appended to --out

`python benchmarks/peers.py measure --code nequip --structure water:1` is the subprocess itself
(run it with the peer's venv python).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV_DIR = ROOT / "benchmarks/.venvs"
DEFAULT_DATA_DIR = ROOT.parent / "shared/data"
WATER = "water_cheng2019/water_cheng2019.extxyz"
ASPIRIN = "rmd17/rmd17_aspirin_test_01.npz"

TORCH_PIN = "torch==2.13.0"
PACKAGES = {"nequip": ["nequip==0.19.1"], "mace": ["mace-torch==0.3.16"]}
CODES = tuple(PACKAGES)

CUTOFF = 5.0
ELEMENTS = {"water": ["H", "O"], "aspirin": ["H", "C", "O"]}
# mean neighbours within 5 Å (edge-sum normalisation; does not change the cost):
# first water frame 51.9, first aspirin frame 13.9
AVG_NEIGHBORS = {"water": 52.0, "aspirin": 14.0}

NEQUIP_SETTINGS = {
    "builder": "nequip.model.NequIPGNNModel", "r_max": CUTOFF, "num_layers": 4, "l_max": 1,
    "parity": True, "num_features": 32, "radial_mlp_depth": 2, "radial_mlp_width": 64,
    "num_bessels": 8, "polynomial_cutoff_p": 6, "model_dtype": "float32",
    "compile_mode": "eager",
}
MACE_SETTINGS = {
    "builder": "mace.modules.ScaleShiftMACE", "r_max": CUTOFF,
    "hidden_irreps": "32x0e + 32x1o", "max_L": 1, "correlation": 3, "num_interactions": 2,
    "max_ell": 3, "num_bessel": 8, "num_polynomial_cutoff": 5, "radial_MLP": [64, 64, 64],
    "MLP_irreps": "16x0e", "gate": "silu",
    "interaction_cls_first": "RealAgnosticInteractionBlock",
    "interaction_cls": "RealAgnosticResidualInteractionBlock", "use_reduced_cg": False,
    "dtype": "float32",
}


# --------------------------------------------------------------------------------------------
# setup
# --------------------------------------------------------------------------------------------


def venv_python(venv_dir: Path, code: str) -> Path:
    return Path(venv_dir) / code / "bin" / "python"


def setup(codes=CODES, venv_dir: Path = DEFAULT_VENV_DIR, python: str = sys.executable,
          torch_index_url: str | None = None, dry_run: bool = False) -> None:
    """Create `venv_dir/<code>` for each code unless it already has a python.

    torch is installed first and pinned (never an unpinned torch), then the peer package with
    the same pin so that pip cannot replace it."""
    for code in codes:
        target = Path(venv_dir) / code
        if venv_python(venv_dir, code).exists():
            print(f"{code}: {target} exists, left as it is", file=sys.stderr)
            continue
        pip = [str(target / "bin" / "pip"), "install"]
        index = ["--index-url", torch_index_url] if torch_index_url else []
        # a local version such as 2.13.0+cpu satisfies the pin, so the second install keeps it
        steps = [[python, "-m", "venv", str(target)],
                 [*pip, *index, TORCH_PIN],
                 [*pip, TORCH_PIN, *PACKAGES[code], "ase"]]
        for cmd in steps:
            print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
            if not dry_run:
                subprocess.run(cmd, check=True)


# --------------------------------------------------------------------------------------------
# structures (ase only: available in both venvs)
# --------------------------------------------------------------------------------------------


def parse_structure(spec: str) -> tuple[str, int]:
    name, _, count = spec.partition(":")
    if name not in ELEMENTS or not count.isdigit() or int(count) < 1:
        raise ValueError(f"structure must be water:REP or aspirin:B, got {spec!r}")
    return name, int(count)


def read_structure(spec: str, data_dir: Path) -> list:
    """The frames to evaluate together, as ase.Atoms with positions, numbers, cell, pbc only."""
    import numpy as np
    from ase import Atoms
    from ase.io import read

    name, count = parse_structure(spec)
    if name == "water":
        frame = read(Path(data_dir) / WATER, index=0, format="extxyz")
        atoms = Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell,
                      pbc=frame.pbc).repeat((count, count, count))
        return [atoms]
    with np.load(Path(data_dir) / ASPIRIN) as data:
        numbers, coords = data["nuclear_charges"], data["coords"]
    if count > len(coords):
        raise ValueError(f"aspirin has {len(coords)} frames, asked for {count}")
    return [Atoms(numbers=numbers, positions=coords[i], pbc=False) for i in range(count)]


# --------------------------------------------------------------------------------------------
# models and inputs, through each peer's public API
# --------------------------------------------------------------------------------------------


def build_nequip(type_names: list[str], avg_num_neighbors: float, device):
    from nequip.model import NequIPGNNModel
    from nequip.utils.global_state import set_global_state

    set_global_state()  # required before building; sets torch's default dtype to float64
    settings = {k: v for k, v in NEQUIP_SETTINGS.items() if k != "builder"}
    model = NequIPGNNModel(seed=0, type_names=type_names, avg_num_neighbors=avg_num_neighbors,
                           per_type_energy_scales=1.0, per_type_energy_shifts=0.0,
                           **settings)
    return model.to(device).eval()


def nequip_input(frames: list, type_names: list[str], device):
    from nequip.data import AtomicDataDict, compute_neighborlist_, from_ase
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper

    to_types = ChemicalSpeciesToAtomTypeMapper(model_type_names=type_names)
    graphs = [compute_neighborlist_(to_types(from_ase(a)), CUTOFF) for a in frames]
    data = graphs[0] if len(graphs) == 1 else AtomicDataDict.batched_from_list(graphs)
    data = AtomicDataDict.to_(data, device)
    return data, int(data[AtomicDataDict.EDGE_INDEX_KEY].shape[1])


def nequip_call(model, data):
    from nequip.data import AtomicDataDict

    out = model(data)
    return out[AtomicDataDict.TOTAL_ENERGY_KEY], out[AtomicDataDict.FORCE_KEY]


def build_mace(type_names: list[str], avg_num_neighbors: float, device):
    import numpy as np
    import torch
    from ase.data import atomic_numbers
    from mace import modules

    # only after mace, which sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD: e3nn 0.4.4 torch.load()s
    # its constants, which torch >= 2.6 refuses by default
    o3 = importlib.import_module("e3nn.o3")

    torch.set_default_dtype(torch.float32)
    zs = sorted(atomic_numbers[s] for s in type_names)
    s = MACE_SETTINGS
    model = modules.ScaleShiftMACE(
        r_max=s["r_max"], num_bessel=s["num_bessel"],
        num_polynomial_cutoff=s["num_polynomial_cutoff"], max_ell=s["max_ell"],
        interaction_cls=modules.interaction_classes[s["interaction_cls"]],
        interaction_cls_first=modules.interaction_classes[s["interaction_cls_first"]],
        num_interactions=s["num_interactions"], num_elements=len(zs),
        hidden_irreps=o3.Irreps(s["hidden_irreps"]), MLP_irreps=o3.Irreps(s["MLP_irreps"]),
        atomic_energies=np.zeros(len(zs)), avg_num_neighbors=avg_num_neighbors,
        atomic_numbers=zs, correlation=s["correlation"], gate=modules.gate_dict[s["gate"]],
        radial_MLP=s["radial_MLP"], use_reduced_cg=s["use_reduced_cg"],
        atomic_inter_scale=1.0, atomic_inter_shift=0.0)
    return model.to(device).eval()


def mace_input(frames: list, type_names: list[str], device):
    from ase.data import atomic_numbers
    from mace.data import AtomicData, config_from_atoms
    from mace.tools import AtomicNumberTable
    from mace.tools.torch_geometric.dataloader import DataLoader

    z_table = AtomicNumberTable(sorted(atomic_numbers[s] for s in type_names))
    graphs = [AtomicData.from_config(config_from_atoms(a), z_table=z_table, cutoff=CUTOFF)
              for a in frames]
    loader = DataLoader(dataset=graphs, batch_size=len(graphs), shuffle=False, drop_last=False)
    data = next(iter(loader)).to(device).to_dict()
    return data, int(data["edge_index"].shape[1])


def mace_call(model, data):
    out = model(data, training=False, compute_force=True)
    return out["energy"], out["forces"]


PEERS = {
    "nequip": (build_nequip, nequip_input, nequip_call, NEQUIP_SETTINGS),
    "mace": (build_mace, mace_input, mace_call, MACE_SETTINGS),
}


# --------------------------------------------------------------------------------------------
# one measurement (runs under the peer's python)
# --------------------------------------------------------------------------------------------


def _rss_mb() -> float:
    """Current resident size (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return _peak_rss_mb()


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def measure(code: str, spec: str, threads: int = 2, device: str = "cpu", min_repeats: int = 3,
            max_repeats: int = 20, budget_s: float = 20.0, warmup: int = 2,
            data_dir: Path = DEFAULT_DATA_DIR) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    build, make_input, call, settings = PEERS[code]
    name, _ = parse_structure(spec)
    type_names = ELEMENTS[name]

    torch.manual_seed(0)  # the same untrained weights every time (nequip also takes seed=0)
    model = build(type_names, AVG_NEIGHBORS[name], dev)
    n_params = sum(p.numel() for p in model.parameters())
    frames = read_structure(spec, data_dir)
    n_atoms = sum(len(a) for a in frames)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        gpu_base = torch.cuda.memory_allocated(dev)
    baseline, peak_before = _rss_mb(), _peak_rss_mb()
    t0 = time.perf_counter()
    data, n_edges = make_input(frames, type_names, dev)
    input_s = time.perf_counter() - t0

    def once():
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        energy, forces = call(model, data)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, energy.detach(), forces.detach()

    warm = [once()[0] for _ in range(warmup)]
    times = []
    while True:
        elapsed, energy, forces = once()
        times.append(elapsed)
        if len(times) >= min_repeats and (len(times) >= max_repeats or sum(times) >= budget_s):
            break

    energy = energy.detach().double().cpu().numpy().reshape(-1)
    forces = forces.detach().double().cpu().numpy()
    median = statistics.median(times)
    peak = _peak_rss_mb()
    row = {
        "code": code, "version": _version(code), "torch": torch.__version__,
        "model": settings, "n_params": int(n_params), "structure": spec,
        "frames": len(frames), "atoms": n_atoms, "edges": n_edges, "threads": threads,
        "device": device, "repeats": len(times), "warmup_s": warm,
        "ms_per_atom": 1e3 * median / n_atoms, "seconds": median, "seconds_min": min(times),
        "input_s": input_s, "peak_rss_mb": peak, "baseline_rss_mb": baseline,
        "peak_rss_delta_mb": peak - baseline, "peak_rss_before_input_mb": peak_before,
    }
    if cuda:
        gpu_peak = torch.cuda.max_memory_allocated(dev)
        row.update(peak_gpu_mb=gpu_peak / 2**20, peak_gpu_delta_mb=(gpu_peak - gpu_base) / 2**20)
    row.update({
        "energy": energy.tolist(), "energy_finite": bool(np.isfinite(energy).all()),
        "forces_shape": list(forces.shape),
        "forces_finite": bool(np.isfinite(forces).all()),
        "forces_abs_max": float(np.abs(forces).max()),
        "forces_rms": float(np.sqrt((forces**2).mean())),
        "python": platform.python_version(), "machine": platform.machine(),
    })
    return row


def _version(code: str) -> str:
    from importlib.metadata import version

    return version({"nequip": "nequip", "mace": "mace-torch"}[code])


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def _emit(row: dict, out: str | None) -> None:
    line = json.dumps(row)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")
    print(line, flush=True)


def run(codes, structures, venv_dir: Path, out: str | None, passthrough: list[str]) -> int:
    """One subprocess per (code, structure) under that code's venv python."""
    failures = 0
    for code in codes:
        python = venv_python(venv_dir, code)
        if not python.exists():
            raise SystemExit(f"no {python}: run `python {__file__} setup --code {code} "
                             f"--venv-dir {venv_dir}` first")
        for spec in structures:
            cmd = [str(python), str(Path(__file__).resolve()), "measure", "--code", code,
                   "--structure", spec, *passthrough]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                failures += 1
                _emit({"code": code, "structure": spec, "error": f"exit {proc.returncode}",
                       "stdout_tail": proc.stdout[-2000:]}, out)
                continue
            _emit(json.loads(lines[-1]), out)
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)

    p_setup = sub.add_parser("setup", help="create the peer venvs if missing")
    p_setup.add_argument("--code", choices=[*CODES, "all"], default="all")
    p_setup.add_argument("--venv-dir", type=Path, default=DEFAULT_VENV_DIR)
    p_setup.add_argument("--python", default=sys.executable, help="python that makes the venvs")
    p_setup.add_argument("--torch-index-url", help="e.g. https://download.pytorch.org/whl/cpu")
    p_setup.add_argument("--dry-run", action="store_true", help="print the commands only")

    for mode in ("run", "measure"):
        p = sub.add_parser(mode, help="measure under each peer's venv" if mode == "run"
                           else "one measurement in this python (internal)")
        p.add_argument("--code", required=True,
                       choices=[*CODES, "all"] if mode == "run" else list(CODES))
        p.add_argument("--structure", nargs="+" if mode == "run" else None, required=True,
                       help="water:REP (192*REP^3 atoms) or aspirin:B (batch of B molecules)")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--device", default="cpu")
        p.add_argument("--repeats", type=int, default=20, help="most timed calls")
        p.add_argument("--min-repeats", type=int, default=3)
        p.add_argument("--budget-s", type=float, default=20.0,
                       help="stop adding timed calls (beyond --min-repeats) after this")
        p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
        if mode == "run":
            p.add_argument("--venv-dir", type=Path, default=DEFAULT_VENV_DIR)
            p.add_argument("--out", help="append the JSON lines to this file")

    args = parser.parse_args(argv)
    if args.mode == "setup":
        codes = CODES if args.code == "all" else (args.code,)
        setup(codes, args.venv_dir, args.python, args.torch_index_url, args.dry_run)
        return 0
    if args.mode == "measure":
        for message in ("Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD",
                        "The TorchScript type system"):  # known and harmless (mace, e3nn 0.4.4)
            warnings.filterwarnings("ignore", message=message)
        row = measure(args.code, args.structure, args.threads, args.device, args.min_repeats,
                      args.repeats, args.budget_s, data_dir=args.data_dir)
        print(json.dumps(row), flush=True)
        return 0
    for spec in args.structure:
        try:
            parse_structure(spec)
        except ValueError as err:
            parser.error(str(err))
    codes = CODES if args.code == "all" else (args.code,)
    passthrough = ["--threads", str(args.threads), "--device", args.device,
                   "--repeats", str(args.repeats), "--min-repeats", str(args.min_repeats),
                   "--budget-s", str(args.budget_s), "--data-dir", str(args.data_dir)]
    return run(codes, args.structure, args.venv_dir, args.out, passthrough)


if __name__ == "__main__":
    sys.exit(main())
