"""Short runs: force MAE of the exported model vs an untrained one of the same spec after 1, 2
and 4 epochs on 64 demo frames (8 steps per epoch), 40 held-out frames, one thread.

Runs against any e2ip checkout, to compare code versions:

    python benchmarks/ema_short_runs.py                       # this checkout
    PYTHONPATH=/path/to/other/checkout/src python benchmarks/ema_short_runs.py
"""

from __future__ import annotations

import inspect
import tempfile

import torch

import e2ip
from e2ip import load_model
from e2ip.data.read import read_structures
from e2ip.evaluation.evaluate import collect
from e2ip.models.single import PotentialModel
from e2ip.train.config.yaml_io import load_config
from e2ip.train.datasets import demo_data_path
from e2ip.train.run import run_training

OPTIONS = ["data.n_train=64", "data.n_validation=16", "data.batch_size=8", "model.cutoff=4.0",
           "model.painn.num_features=16", "model.painn.num_layers=2", "model.painn.num_radial=8",
           "head.hidden=16", "head.tensor_channels=2", "training.progress_bar=false",
           "training.num_threads=1", "training.recalibrate=false", "training.lr=0.005"]


def force_mae(model, structures) -> float:
    model.eval()
    # the landed version's collect has no `forms` argument: accuracy needs none
    extra = [[]] if "forms" in inspect.signature(collect).parameters else []
    c = collect(model, structures, 40, *extra)
    return float((c.forces - c.forces_ref).abs().mean())


def main() -> None:
    torch.set_num_threads(1)
    print("code:", e2ip.__file__)
    held_out = read_structures(demo_data_path(test=True), index=":40")
    for epochs in (1, 2, 4):
        out = tempfile.mkdtemp()
        run_training(load_config(None, OPTIONS + [f"training.max_epochs={epochs}"]), f"{out}/r")
        trained = load_model(f"{out}/r/model.pt")
        torch.manual_seed(123)
        untrained = PotentialModel(**trained.spec())
        print(f"{epochs} epochs ({8 * epochs} steps): exported force MAE "
              f"{force_mae(trained, held_out):.3f} eV/Å, untrained {force_mae(untrained, held_out):.3f}")


if __name__ == "__main__":
    main()
