"""How close do e2IP models come to the damping thresholds? Spectrum of A and cond(Sigma0).

    python benchmarks/damping_stats.py benchmarks/runs/aspirin_e2ip_64 benchmarks/runs/aspirin_e2ip_nodamp
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from e2ip import load_model
from e2ip.data.graph import graph_from_structures
from e2ip.train.config.yaml_io import load_config
from e2ip.train.datasets import prepare_data


def main(runs):
    for run in map(Path, runs):
        model = load_model(run / "model.pt")
        test = prepare_data(load_config(run / "config.yaml").data).test[:200]
        c0, c2, cond = [], [], []
        for k in range(0, len(test), 50):
            out = model(graph_from_structures(test[k:k + 50], model.cutoff), create_graph=False)
            p = out["params"]
            c0.append(p["c0"].detach())
            c2.append(p["c2"].norm(dim=-1).detach())
            eig = torch.linalg.eigvalsh(p["A"].detach().double())
            cond.append(torch.exp(eig[:, -1] - eig[:, 0]))
        c0, c2, cond = (torch.cat(x).numpy() for x in (c0, c2, cond))
        hp = model.head.hparams
        print(f"{run.name}: damping={hp.damping} tau0={hp.tau0} tau2={hp.tau2}")
        print(f"  c0 range [{c0.min():.2f}, {c0.max():.2f}]; |c2| median {np.median(c2):.2f}, "
              f"max {c2.max():.2f}; atoms with |c2| > tau2: {np.mean(c2 > hp.tau2):.4f}")
        print(f"  cond(Sigma0) median {np.median(cond):.1f}, max {cond.max():.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
