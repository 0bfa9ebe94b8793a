"""Page faults and time per call of PaiNN + e2IP inference on one system (docs/performance.md,
"Memory allocation"): how glibc's malloc, tcmalloc and the edge-chunk size interact.

    python benchmarks/bench_alloc.py water4 3                     # glibc, default chunks
    EDGE_CHUNK=16384 python benchmarks/bench_alloc.py water4 3    # smaller chunks
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/bench_alloc.py water4 3
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647 python benchmarks/bench_alloc.py water4 3

Per call: ms per atom, minor page faults, system and user CPU seconds, and the peak resident
memory above the process's memory before the first call. 2 torch threads.
"""

from __future__ import annotations

import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import build, rss_mb, structures, variant_call  # noqa: E402

from e2ip.backbones.base import set_edge_chunk_size  # noqa: E402
from e2ip.data.graph import graph_from_structures  # noqa: E402


def main() -> None:
    system, calls = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3
    torch.set_num_threads(2)
    graph = graph_from_structures(structures(system), 5.0, torch.float32)
    model = build("e2ip", "painn", system, torch.float32, torch.device("cpu"))
    if os.environ.get("EDGE_CHUNK"):
        set_edge_chunk_size(model, int(os.environ["EDGE_CHUNK"]))
    call = variant_call(model, graph, "e2ip")
    n_atoms = int(graph.n_atoms.sum())
    base = rss_mb()
    for _ in range(calls):
        before = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        call()
        seconds = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF)
        print(f"{1e3 * seconds / n_atoms:.3f} ms/atom  minor faults "
              f"{after.ru_minflt - before.ru_minflt}  sys {after.ru_stime - before.ru_stime:.1f} s"
              f"  user {after.ru_utime - before.ru_utime:.1f} s  peak +"
              f"{after.ru_maxrss / 1024 - base:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
