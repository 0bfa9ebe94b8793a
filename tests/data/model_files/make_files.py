"""Write the model files the tests load (`tests/unit/models/test_model_files.py`): a small e2IP
model and a small ensemble, with the predictions of the code that wrote them.

    python tests/data/model_files/make_files.py            # files of the current format version
    PYTHONPATH=<old checkout>/src python tests/data/model_files/make_files.py --tag v1-823660d

Run with an older checkout on PYTHONPATH, it writes that release's files (how the committed
older files were made: `git worktree add /tmp/old <commit>`). It uses only what every release
had: `PotentialModel(...)`, `Ensemble(members)`, `save`, `predict`, `read_structures`.
It also refreshes `format_v<N>.json`, the fingerprint that fails a test when the file format
changes without a version bump (current code only).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DEMO = HERE.parents[2] / "src/e2ip/data/demo/rmd17_ethanol_demo_test.npz"
SMALL = {"num_features": 8, "num_layers": 1, "num_radial": 6}
KEYS = ("energy", "forces", "aleatoric", "epistemic", "predictive")


def _imports():
    try:  # current layout
        from e2ip.data.read import read_structures
        from e2ip.models import Ensemble, PotentialModel
    except ImportError:  # releases before the layered package (0.1)
        from e2ip.data.readers import read_structures
        from e2ip.ensemble import Ensemble
        from e2ip.model import PotentialModel
    return read_structures, Ensemble, PotentialModel


def build():
    """(name, model) of each file; the same seeds in every release."""
    _, Ensemble, PotentialModel = _imports()
    torch.manual_seed(0)
    single = PotentialModel(elements=[1, 6, 8], cutoff=4.0, backbone_options=SMALL,
                            head_options={"hidden": 8, "tensor_channels": 2},
                            reference_energies=[-13.6, -1029.5, -2041.8])
    with torch.no_grad():  # move the head off its near-isotropic start: anisotropic covariances
        for p in single.head.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype))
    members = [PotentialModel(elements=[1, 6, 8], cutoff=4.0, backbone_options=SMALL,
                              head="none") for _ in range(2)]
    return [("e2ip_painn", single.eval()), ("ensemble_x2", Ensemble(members).eval())]


def fingerprint(model) -> dict:
    """What the file format of `model` consists of: spec keys (with value types) and state-dict
    entries (with shapes and dtypes)."""
    from e2ip.models.io import model_payload

    payload = model_payload(model)

    def shape(node):
        if isinstance(node, dict):
            return {k: shape(v) for k, v in sorted(node.items())}
        if isinstance(node, list):
            return [shape(v) for v in node[:1]]
        return type(node).__name__

    return {"kind": payload["kind"], "spec": shape(payload["spec"]),
            "state_dict": {k: [list(v.shape), str(v.dtype)]
                           for k, v in sorted(payload["state_dict"].items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default=None, help="file name tag (default: v<MODEL_VERSION>)")
    args = parser.parse_args()
    read_structures, _, _ = _imports()
    structures = read_structures(str(DEMO), index=":2")
    current = args.tag is None
    if current:
        from e2ip.models.io import MODEL_VERSION
        tag = f"v{MODEL_VERSION}"
    else:
        tag = args.tag
    prints = {}
    for name, model in build():
        model.save(HERE / f"{name}_{tag}.pt")
        pred = model.predict(structures)
        np.savez(HERE / f"{name}_{tag}_predictions.npz", **{k: pred[k] for k in KEYS if k in pred})
        if current:
            prints[name] = fingerprint(model)
    if current:
        text = json.dumps(prints, indent=1, sort_keys=True) + "\n"
        (HERE / f"format_{tag}.json").write_text(text)
    print("wrote", sorted(p.name for p in HERE.glob(f"*_{tag}*")))


if __name__ == "__main__":
    main()
