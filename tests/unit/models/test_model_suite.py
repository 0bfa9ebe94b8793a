"""Every (backbone, head) pair in the registries, and ensembles (plain and heteroskedastic),
through the shipped model test suite (:mod:`e2ip.testing.model_suite`: finite-difference forces,
equivariance, SPD covariances, batching, periodic supercells, an isolated atom, float32,
save/load), plus checks of the single model's own parts.

The parameter list is built at import time from `BACKBONES` x `HEADS`, so a backbone or head that
is registered later is covered without touching this file.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch

from e2ip.backbones import BACKBONES
from e2ip.data.graph import graph_from_structures
from e2ip.heads import HEADS
from e2ip.models import Ensemble, PotentialModel
from e2ip.testing.model_suite import (
    MOLECULE,
    PotentialTests,
    random_molecule,
    random_periodic,
    rel_err,
    run,
    small_model,
)

BACKBONE_NAMES = sorted(BACKBONES)
HEAD_NAMES = sorted(HEADS)
#: (backbone, head) pairs that cannot be built, with the reason; every other pair must build
UNSUPPORTED: dict[tuple[str, str], str] = {}
COMBOS = [pytest.param((b, h), id=f"{b}-{h}",
                       marks=pytest.mark.skip(UNSUPPORTED[b, h]) if (b, h) in UNSUPPORTED else ())
          for b in BACKBONE_NAMES for h in HEAD_NAMES]


@functools.cache
def get_model(backbone: str, head: str) -> PotentialModel:
    return small_model(backbone, head)


class TestEveryBackboneAndHead(PotentialTests):
    @pytest.fixture(scope="class", params=COMBOS)
    def model(self, request) -> PotentialModel:
        return get_model(*request.param)


class TestEnsembles(PotentialTests):
    """A plain deep ensemble (members without uncertainty), one of e2IP members (ensembled on
    their means) and a heteroskedastic one (mean-variance members), batched and looped."""

    positive_definite = ("predictive",)

    @pytest.fixture(scope="class", params=[("none", True), ("e2ip", False), ("mve", False)],
                    ids=["plain-vmap", "e2ip-members-loop", "heteroskedastic"])
    def model(self, request) -> Ensemble:
        head, batched = request.param
        members = [small_model("painn", head, seed=k) for k in range(3)]
        return Ensemble(members, batched=batched).double().eval()


def _saved_bytes(model, structures) -> int:
    """Bytes of the distinct storages the forward pass keeps for the force backward pass."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    graph = graph_from_structures(structures, model.cutoff, torch.float64)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(graph, create_graph=False)
    return sum(storages.values())


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_edge_chunking_is_exact_and_saves_memory(backbone):
    """Messages summed over chunks of edges under checkpointing (inference on large graphs) give
    the unchunked energies, forces and covariances, and keep far less for the backward pass."""
    model = copy.deepcopy(get_model(backbone, "e2ip"))
    structures = [MOLECULE, random_periodic(4, seed=3), random_molecule(7, seed=11)]
    model.backbone.edge_chunk_size = 0
    whole, whole_bytes = run(model, structures), _saved_bytes(model, structures)
    model.backbone.edge_chunk_size = 7  # divides no edge count here: a ragged last chunk
    chunked, chunked_bytes = run(model, structures), _saved_bytes(model, structures)
    for key, value in whole.items():
        assert rel_err(chunked[key], value) < 1e-12, key
    assert chunked_bytes < 0.5 * whole_bytes, (chunked_bytes, whole_bytes)
    model.train()  # never while training: the training step's double backward needs the graph
    assert model.backbone.edge_chunk() == 0


def test_energy_is_scaled_atomic_energies_plus_reference_energies():
    """E = energy_scale * sum_i eps_i + sum_i E0[z_i]: shifting E0 by d per element shifts E
    by the count-weighted sum of d and leaves forces alone; doubling energy_scale doubles
    E - sum E0 and the forces."""
    model = copy.deepcopy(get_model("painn", "e2ip"))
    structures = [MOLECULE, random_molecule(5, seed=7)]
    base = run(model, structures)
    shift = torch.tensor([0.5, -3.0, 11.0], dtype=torch.float64)
    with torch.no_grad():
        model.reference_energies.add_(shift)
    shifted = run(model, structures)
    lookup = {z: k for k, z in enumerate(model.elements)}
    expected = [sum(float(shift[lookup[int(z)]]) for z in s.numbers) for s in structures]
    np.testing.assert_allclose(shifted["energy"] - base["energy"], expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(shifted["forces"], base["forces"], rtol=0, atol=1e-12)
    e0 = [sum(float(model.reference_energies[lookup[int(z)]]) for z in s.numbers)
          for s in structures]
    model.energy_scale *= 2.0
    doubled = run(model, structures)
    np.testing.assert_allclose(doubled["energy"] - e0, 2 * (shifted["energy"] - e0), rtol=1e-10,
                               atol=1e-10)
    np.testing.assert_allclose(doubled["forces"], 2 * shifted["forces"], rtol=1e-10, atol=1e-12)
