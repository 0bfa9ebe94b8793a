"""Speed and scale, in one command (issue 10): time per atom and peak memory of every model
variant, the training step, graph building, expm, torch.compile, and the peer codes.

    python benchmarks/run.py                          # default plan, CPU (about 40 min on 2 cores)
    python benchmarks/run.py --plan quick             # a few minutes: small systems only
    python benchmarks/run.py --plan full --device cuda   # everything, on a GPU
    python benchmarks/run.py --peers                  # also NequIP and MACE (benchmarks/peers.py)

Inference variants, each energy + forces on a prebuilt graph (the neighbour list is not timed;
`graph_share` measures it separately):
  bare      the backbone alone (head "none")
  e2ip      + the e2IP head: energy, forces and every covariance (aleatoric, epistemic,
            predictive, Sigma0)
  ensemble5 five bare members (a deep ensemble): mean forces and their covariance
  eip       + the eIP head and its covariances
Systems: `aspirin` (a batch of 32 rMD17 aspirin frames, 672 atoms), `water1` (the 192-atom
periodic water box, the first frame of shared/data/water_cheng2019) and `waterR` (it repeated
R x R x R: water2 = 1,536, water4 = 12,288, water8 = 98,304 atoms). Models are untrained (cost
does not depend on the weights), cutoff 5 Å, default hyperparameters.

Protocol: every case runs in its own process (peak resident memory, `ru_maxrss`, is per process;
on CUDA `max_memory_allocated`), `torch.set_num_threads(--threads)`, warm-up calls, then the
median of repeats (at least 3, more until ~--budget seconds), CUDA-synchronised. Results are
appended case by case to `benchmarks/results/<machine>.json` (a rerun skips finished cases;
`--fresh` starts over); `benchmarks/performance_table.py` turns the file into the tables of
docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WATER = SHARED / "water_cheng2019" / "water_cheng2019.extxyz"
ASPIRIN = SHARED / "rmd17" / "rmd17_aspirin_test_01.npz"
BACKBONES = ("painn", "tensor_product", "alphanet")
VARIANTS = ("bare", "e2ip", "ensemble5", "eip")
#: tcmalloc (Debian: libtcmalloc-minimal4) for the `allocator="tcmalloc"` cases
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


# -- the plan ---------------------------------------------------------------------------------
def plan(name: str) -> list[dict]:
    """The cases of a plan. `quick`: small systems; `default`: what fits a 2-core CPU in about
    40 minutes (every backbone and variant up to 1,536 atoms in float32, float64 for PaiNN,
    the default model up to 98,304 atoms); `full`: every backbone, dtype and variant at every
    size (a GPU's plan)."""
    cases: list[dict] = []

    def add(kind, **kw):
        cases.append({"kind": kind, **kw})

    small = ("aspirin", "water1") if name == "quick" else ("aspirin", "water1", "water2")
    dtypes = {"quick": ("float32",), "default": ("float32", "float64"),
              "full": ("float32", "float64")}[name]
    for backbone in BACKBONES:
        for dtype in dtypes:
            if name == "default" and dtype == "float64" and backbone != "painn":
                continue
            for system in small:
                for variant in VARIANTS:
                    if (name == "default" and system == "water2" and variant == "ensemble5"
                            and backbone != "painn"):
                        continue  # 5 slow members: the ensemble ratio at 1.5k is the default's
                    add("inference", backbone=backbone, dtype=dtype, system=system,
                        variant=variant)
    if name != "quick":
        large = {"default": {"water4": VARIANTS[:2] + ("eip",), "water8": ("e2ip",)},
                 "full": {"water4": VARIANTS, "water8": VARIANTS}}[name]
        backbones = BACKBONES if name == "full" else ("painn",)
        for backbone in backbones:
            for system, variants in large.items():
                for variant in variants:
                    add("inference", backbone=backbone, dtype="float32", system=system,
                        variant=variant)
    for backbone in BACKBONES:
        for system in ("aspirin8", "water1"):
            add("training", backbone=backbone, dtype="float32", system=system)
            add("graph_share", backbone=backbone, dtype="float32", system=system)
    for dtype in ("float32", "float64"):
        add("expm", dtype=dtype, n=100_000)
    for system in ("aspirin", "water2") + (("water4",) if name != "quick" else ()):
        add("ratios", backbone="painn", dtype="float32", system=system,
            variants=["bare", "e2ip"] + (["ensemble5"] if system != "water4" else []))
    if name != "quick":  # the head overhead of the backbones with native 2e features / frames
        for backbone in ("tensor_product", "alphanet"):
            for system in ("aspirin", "water2"):
                add("ratios", backbone=backbone, dtype="float32", system=system,
                    variants=["bare", "e2ip"])
        # smaller edge chunks, and tcmalloc instead of glibc's malloc (docs/performance.md)
        for system in ("water2", "water4"):
            add("inference", backbone="painn", dtype="float32", system=system, variant="e2ip",
                edge_chunk=2**14)
        for system in ("water2", "water4", "water8"):
            add("inference", backbone="painn", dtype="float32", system=system, variant="e2ip",
                allocator="tcmalloc")
    add("calculator", system="aspirin1")
    add("calculator", system="water1")
    add("calculator", system="water2")
    if name != "quick":
        add("compile_inference", backbone="painn", dtype="float32", system="water2")
        add("compile_training", backbone="painn", dtype="float32", system="aspirin8")
    return cases


def case_key(case: dict) -> str:
    return json.dumps({k: v for k, v in sorted(case.items())})


# -- building blocks (run inside the case's own process) -------------------------------------
def structures(system: str):
    """The structures of a named system: aspirinB (a batch of B frames; `aspirin` = 32),
    waterR (the water box repeated R x R x R)."""
    from e2ip.data.read import read_structures
    from e2ip.data.structures import Structure

    if system.startswith("aspirin"):
        batch = int(system[len("aspirin"):] or 32)
        return read_structures(ASPIRIN, index=f":{batch}")
    import numpy as np
    from ase.io import read

    rep = int(system[len("water"):])
    box = read(WATER, index=0).repeat((rep, rep, rep))
    # zero labels: a training step's cost does not depend on them
    return [Structure.from_atoms(box, energy=0.0, forces=np.zeros((len(box), 3)))]


def elements(system: str) -> list[int]:
    return [1, 6, 8] if system.startswith("aspirin") else [1, 8]


def build(variant: str, backbone: str, system: str, dtype, device):
    import torch

    from e2ip.models.ensemble import Ensemble
    from e2ip.models.single import PotentialModel

    torch.manual_seed(0)

    def one(head: str):
        return PotentialModel(elements=elements(system), cutoff=5.0, backbone=backbone,
                              head=head)

    if variant == "ensemble5":
        model = Ensemble([one("none") for _ in range(5)])
    else:
        model = one({"bare": "none", "e2ip": "e2ip", "eip": "eip"}[variant])
    return model.to(device=device, dtype=dtype).eval()


def timed(fn, device, budget: float, warmup: int = 2, min_repeats: int = 3,
          max_repeats: int = 30) -> tuple[float, int]:
    """(median seconds, repeats) after `warmup` calls; repeats until `budget` seconds."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - start < budget
                                       and len(times) < max_repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def variant_call(model, graph, variant: str):
    """One inference call of a variant: energy and forces, and every covariance unless bare."""
    def call():
        out = model(graph, create_graph=False)
        if variant != "bare":
            model.covariances(out["params"], out["forces"])
    return call


def timed_in_turn(calls: dict, device, budget: float, warmup: int, least: int,
                  most: int) -> dict[str, list[float]]:
    """Seconds of each call, the calls timed in turn (a, b, c, a, b, ...) so that machine load
    affects them alike: `warmup` rounds, then at least `least` rounds, more until `budget`
    seconds (at most `most`)."""
    import torch

    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    t_end = time.perf_counter() + budget
    rounds = 0
    while rounds < least or (time.perf_counter() < t_end and rounds < most):
        for name, fn in calls.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return times


def eager_then_compiled(fn, model, device, budget: float) -> tuple[float, float, dict]:
    """Median seconds of `fn` eager, then after `model.enable_compile()` (the first compiled
    call, which compiles, is timed apart)."""
    eager, _ = timed(fn, device, budget)
    model.enable_compile()
    t0 = time.perf_counter()
    fn()
    compile_seconds = time.perf_counter() - t0
    compiled, reps = timed(fn, device, budget)
    return eager, compiled, {"compile_seconds": compile_seconds, "speedup": eager / compiled,
                             "repeats": reps}


def rss_mb() -> float:
    """Current resident memory of this process (MB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_case(case: dict, device_name: str, threads: int, budget: float) -> dict:
    """Measure one case in this process; returns the result row."""
    import torch

    from e2ip.backbones.base import set_edge_chunk_size
    from e2ip.data.graph import graph_from_structures

    torch.set_num_threads(threads)
    device = torch.device(device_name)
    dtype = getattr(torch, case.get("dtype", "float32"))
    kind = case["kind"]
    row: dict = {}
    base_rss = rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    if kind == "inference":
        structs = structures(case["system"])
        graph = graph_from_structures(structs, 5.0, dtype).to(device)
        model = build(case["variant"], case["backbone"], case["system"], dtype, device)
        if "edge_chunk" in case:
            set_edge_chunk_size(model, case["edge_chunk"])
        n_atoms = int(graph.n_atoms.sum())
        big, large = n_atoms > 50_000, n_atoms > 5_000

        call = variant_call(model, graph, case["variant"])
        base_rss = rss_mb()
        # one warm-up call even at 98k atoms: the first call pays for mapping the process's
        # memory (2.8x a later call at 98k atoms with 65,536-edge chunks)
        seconds, reps = timed(call, device, budget, warmup=1 if large else 2,
                              min_repeats=1 if big else 2 if large else 3)
        row.update(atoms=n_atoms, edges=int(graph.edge_index.shape[1]), seconds=seconds,
                   repeats=reps, ms_per_atom=1e3 * seconds / n_atoms)

    elif kind in ("training", "compile_training", "graph_share"):
        from e2ip.models.single import PotentialModel

        structs = structures(case["system"])
        graph = graph_from_structures(structs, 5.0, dtype).to(device)
        torch.manual_seed(0)
        model = PotentialModel(elements=elements(case["system"]), cutoff=5.0,
                               backbone=case["backbone"], head="e2ip").to(device, dtype).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            out = model(graph, create_graph=True)
            loss = model.head.loss(out["params"], out["forces"], graph.forces)["loss"].mean()
            loss = loss + ((out["energy"] - graph.energy) / graph.n_atoms).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        n_atoms = int(graph.n_atoms.sum())
        row["atoms"] = n_atoms
        if kind == "compile_training":
            eager, compiled, extra = eager_then_compiled(step, model, device, budget)
            row.update(eager_ms=1e3 * eager, compiled_ms=1e3 * compiled, **extra)
        else:
            seconds, reps = timed(step, device, budget)
            row.update(seconds=seconds, repeats=reps, ms_per_atom=1e3 * seconds / n_atoms)
            if kind == "graph_share":
                from e2ip.data.graph import collate, structure_to_graph

                def build_graph():
                    collate([structure_to_graph(s, 5.0) for s in structs], dtype).to(device)

                records = [structure_to_graph(s, 5.0) for s in structs]
                neighbors, _ = timed(build_graph, device, budget)
                collate_only, _ = timed(lambda: collate(records, dtype).to(device), device, budget)
                row.update(step_ms=1e3 * seconds, neighbors_and_collate_ms=1e3 * neighbors,
                           collate_ms=1e3 * collate_only,
                           share_built_in_loader=neighbors / (neighbors + seconds),
                           share_precomputed=collate_only / (collate_only + seconds))

    elif kind == "ratios":
        # the head-overhead and ensemble ratios from one process, the variants timed in turn
        # (bare, e2ip, ensemble, bare, ...): separate processes differ by ~10 % among themselves
        structs = structures(case["system"])
        graph = graph_from_structures(structs, 5.0, dtype).to(device)
        models = {v: build(v, case["backbone"], case["system"], dtype, device)
                  for v in case["variants"]}
        calls = {v: variant_call(models[v], graph, v) for v in models}
        n_atoms = int(graph.n_atoms.sum())
        times = timed_in_turn(calls, device, budget, warmup=1,
                              least=3 if n_atoms > 5000 else 7, most=30)
        ms = {v: 1e3 * statistics.median(t) / n_atoms for v, t in times.items()}
        row.update(atoms=n_atoms, rounds=len(times["bare"]),
                   **{f"{v}_ms_per_atom": m for v, m in ms.items()},
                   head_ratio=ms["e2ip"] / ms["bare"])
        if "ensemble5" in ms:
            row["ensemble_ratio"] = ms["ensemble5"] / ms["e2ip"]

    elif kind == "compile_inference":
        structs = structures(case["system"])
        graph = graph_from_structures(structs, 5.0, dtype).to(device)
        model = build("e2ip", case["backbone"], case["system"], dtype, device)
        # unchunked: edge-chunked graphs take the eager path, which would time eager twice
        set_edge_chunk_size(model, 0)
        call = variant_call(model, graph, "e2ip")
        eager, compiled, extra = eager_then_compiled(call, model, device, budget)
        n_atoms = int(graph.n_atoms.sum())
        row.update(atoms=n_atoms, eager_ms_per_atom=1e3 * eager / n_atoms,
                   compiled_ms_per_atom=1e3 * compiled / n_atoms, **extra)

    elif kind == "expm":
        from e2ip.heads.spd import expm_symmetric

        g = torch.Generator().manual_seed(0)
        x = torch.randn(case["n"], 3, 3, generator=g, dtype=torch.float64)
        a = (0.5 * (x + x.transpose(1, 2))).to(device=device, dtype=dtype)
        w = torch.randn_like(a)

        def fwd_bwd(fn):
            def go():
                leaf = a.detach().requires_grad_(True)
                (fn(leaf) * w).sum().backward()
            return go

        ours, _ = timed(fwd_bwd(lambda m: expm_symmetric(m, max_norm=5.0)), device, budget)
        dynamic, _ = timed(fwd_bwd(expm_symmetric), device, budget)
        reference, _ = timed(fwd_bwd(torch.linalg.matrix_exp), device, budget)
        row.update(matrices=case["n"], ours_fixed_ms=1e3 * ours, ours_dynamic_ms=1e3 * dynamic,
                   matrix_exp_ms=1e3 * reference, speedup=reference / ours)

    elif kind == "calculator":
        import numpy as np

        from e2ip.data.structures import Structure
        from e2ip.integrations.ase_calculator import E2IPCalculator

        structs = structures(case["system"])
        atoms = structs[0].to_atoms()
        model = build("e2ip", "painn", case["system"], dtype, device)
        graph = graph_from_structures([Structure.from_atoms(atoms)], 5.0, dtype).to(device)
        calc = E2IPCalculator(model, skin=1.0, device=device_name)
        rng = np.random.default_rng(0)
        start = atoms.positions.copy()

        def bare():
            model(graph, create_graph=False)

        def call():
            atoms.positions = start + rng.normal(scale=0.005, size=start.shape)
            calc.calculate(atoms, ["energy", "forces"], ["positions"])

        small = len(atoms) < 1000
        times = timed_in_turn({"bare": bare, "calculator": call}, device, budget,
                              warmup=5 if small else 1, least=20 if small else 5, most=300)
        t_bare, t_calc = times["bare"], times["calculator"]
        b, c = statistics.median(t_bare), statistics.median(t_calc)
        row.update(atoms=len(atoms), bare_ms=1e3 * b, calculator_ms=1e3 * c, ratio=c / b,
                   repeats=len(t_bare))
    else:
        raise ValueError(f"unknown case kind {kind!r}")

    if device.type == "cuda":
        row["peak_mb"] = torch.cuda.max_memory_allocated(device) / 1e6
    else:
        row["peak_rss_mb"] = peak_mb()
        row["peak_delta_mb"] = peak_mb() - base_rss
    return row


# -- the driver ---------------------------------------------------------------------------------
def machine_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name().replace(" ", "_").lower()
    return f"cpu_{os.cpu_count()}cores"


def meta(args) -> dict:
    import torch

    return {"device": args.device, "threads": args.threads, "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpu": _cpu_model(), "cores": os.cpu_count(), "plan": args.plan,
            "command": "python benchmarks/run.py " + " ".join(sys.argv[1:])}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", choices=("quick", "default", "full"), default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--budget", type=float, default=5.0,
                    help="seconds of repeats per timing after the minimum (default 5)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results file (default benchmarks/results/<machine>.json)")
    ap.add_argument("--fresh", action="store_true", help="discard earlier results in --out")
    ap.add_argument("--only", default=None, help="run only the cases of this kind")
    ap.add_argument("--peers", action="store_true",
                    help="also run NequIP and MACE (benchmarks/peers.py) on the water boxes")
    ap.add_argument("--peer-structures", nargs="+", default=["water:1", "water:2", "water:4"],
                    help="structures for --peers (benchmarks/peers.py syntax)")
    ap.add_argument("--peer-venvs", default=None, help="where the peers' virtual environments "
                    "are (default: peers.py's, benchmarks/.venvs)")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # one case, in a subprocess
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case), args.device, args.threads,
                                  args.budget)))
        return
    out = args.out or ROOT / "benchmarks" / "results" / f"{machine_name(args.device)}.json"
    results = {"meta": meta(args), "rows": []}
    if out.exists() and not args.fresh:
        # failed cases are tried again
        results["rows"] = [r for r in json.loads(out.read_text())["rows"] if "error" not in r]
    done = {case_key(r["case"]) for r in results["rows"]}
    cases = [c for c in plan(args.plan) if not args.only or c["kind"] == args.only]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    for k, case in enumerate(cases):
        if case_key(case) in done:
            continue
        t0 = time.perf_counter()
        case_env = env
        if case.get("allocator") == "tcmalloc":
            if not TCMALLOC.exists():
                print(f"[{k + 1}/{len(cases)}] skipped (no {TCMALLOC}): {json.dumps(case)}")
                continue
            case_env = {**env, "LD_PRELOAD": str(TCMALLOC)}
        proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case),
                               "--device", args.device, "--threads", str(args.threads),
                               "--budget", str(args.budget)],
                              capture_output=True, text=True, env=case_env)
        if proc.returncode:
            row = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
        else:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        row = {"case": case, **row, "wall_s": time.perf_counter() - t0}
        results["rows"].append(row)
        print(f"[{k + 1}/{len(cases)}] {json.dumps(row)}", flush=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, out)
    if args.peers:
        peers_out = out.with_name(out.stem + "_peers.jsonl")
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), "run",
                        "--code", "all", "--structure", *args.peer_structures,
                        "--threads", str(args.threads), "--out", str(peers_out),
                        "--device", args.device,
                        *(["--venv-dir", args.peer_venvs] if args.peer_venvs else [])],
                       check=False)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
