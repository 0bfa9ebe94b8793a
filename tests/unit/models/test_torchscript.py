"""The model code compiles with TorchScript (`torch.jit.script`), which metatomic and LAMMPS
need, and the compiled backbones and heads compute what the eager ones do (float64, forces
through autograd included). Eager inference keeps its edge chunking; the scripted path sums
over all edges at once."""

from __future__ import annotations

import pytest
import torch

from e2ip.backbones.base import with_species
from e2ip.data.graph import graph_from_structures
from e2ip.heads import HEADS
from e2ip.testing.model_suite import MOLECULE, random_periodic, small_model

BACKBONES = ["alphanet", "painn", "tensor_product"]


def _inputs(model, structures):
    graph = graph_from_structures(structures, model.cutoff, torch.float64)
    species = model.species_lookup[graph.numbers]
    positions = graph.positions.clone().requires_grad_(True)
    return graph, species, positions


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("backbone", BACKBONES)
def test_scripted_backbone_and_head_match_eager(backbone, head):
    model = small_model(backbone, head)
    if head == "e2ip":  # the feature-distance branch too: fit it on a few structures
        model.fit_training_statistics([MOLECULE, random_periodic(4, seed=3)])
    scripted_backbone = torch.jit.script(model.backbone.for_torchscript())
    scripted_head = torch.jit.script(model.head)
    graph, species, positions = _inputs(model, [MOLECULE, random_periodic(4, seed=3)])

    def run(backbone_fn, head_fn):
        pos = positions.detach().clone().requires_grad_(True)
        features = backbone_fn(species, graph.edge_index, graph.edge_vectors(pos), graph.batch,
                               graph.num_graphs)
        forces = -torch.autograd.grad(features.atomic_energy.sum(), pos)[0]
        return features, forces, head_fn(with_species(features, species))  # as the model does

    eager = run(model.backbone, model.head)
    script = run(scripted_backbone, scripted_head)
    for name in ("scalars", "vectors", "tensors", "atomic_energy"):
        a, b = getattr(eager[0], name), getattr(script[0], name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=name)
    torch.testing.assert_close(script[1], eager[1], rtol=1e-12, atol=1e-12)
    assert eager[2].keys() == script[2].keys()
    for key in eager[2]:
        torch.testing.assert_close(script[2][key], eager[2][key], rtol=1e-12, atol=1e-12,
                                   msg=key)


def test_eager_large_graphs_still_sum_in_chunks():
    """The scripted path has no chunking; eager inference keeps it (same sums)."""
    model = small_model("painn", "none")
    graph, species, positions = _inputs(model, [MOLECULE])
    whole = model.backbone(species, graph.edge_index, graph.edge_vectors(positions), graph.batch,
                           graph.num_graphs).atomic_energy
    model.backbone.edge_chunk_size = 5
    chunked = model.backbone(species, graph.edge_index, graph.edge_vectors(positions),
                             graph.batch, graph.num_graphs).atomic_energy
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
