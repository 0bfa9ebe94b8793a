"""The metatomic ``ModelInterface`` of an exported e2ip model (:mod:`e2ip.integrations.metatomic`).

A module of its own because it imports metatomic's TorchScript classes at the top (TorchScript
reads them from the module's globals): only :func:`~e2ip.integrations.metatomic.to_metatomic`
imports it, so e2ip works without the optional ``metatomic-torch`` package.
"""

from typing import Dict, List, Optional  # noqa: UP035 - metatomic checks the annotations literally

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import ModelOutput, NeighborListOptions, System
from torch import nn

from e2ip.integrations.scripted import ScriptedEnsemble, ScriptedPotential


def _no_components() -> list[Labels]:
    return torch.jit.annotate(list[Labels], [])


class MetatomicPotential(nn.Module):
    """Energies and per-atom force covariances of a :class:`ScriptedPotential` for a list of
    metatomic systems, from the engine's full neighbour list."""

    def __init__(self, core: ScriptedPotential | ScriptedEnsemble, cutoff: float):
        super().__init__()
        self.core = core
        self.neighbors = NeighborListOptions(cutoff=cutoff, full_list=True, strict=True)

    def requested_neighbor_lists(self) -> List[NeighborListOptions]:  # noqa: UP006
        return [self.neighbors]

    def forward(self, systems: List[System], outputs: Dict[str, ModelOutput],  # noqa: UP006
                selected_atoms: Optional[Labels] = None) -> Dict[str, TensorMap]:  # noqa: UP006, UP045
        device = systems[0].positions.device
        numbers, edge_index, edge_vectors, batch, atom_index = [], [], [], [], []
        offset = 0
        for k, system in enumerate(systems):
            n = len(system)
            pairs = system.get_neighbor_list(self.neighbors)
            samples = pairs.samples.values
            edge_index.append(samples[:, :2].T.to(torch.long) + offset)
            edge_vectors.append(pairs.values.reshape(-1, 3))
            numbers.append(system.types.to(torch.long))
            batch.append(torch.full((n,), k, dtype=torch.long, device=device))
            atom_index.append(torch.arange(n, dtype=torch.long, device=device))
            offset += n
        # the uncertainty only when asked for: an exported ensemble pays one autograd pass per
        # member for it
        with_uncertainty = False
        for name in outputs.keys():
            if name != "energy":
                with_uncertainty = True
        atomic, extras = self.core(torch.cat(numbers), torch.cat(edge_index, dim=1),
                                   torch.cat(edge_vectors), torch.cat(batch), len(systems),
                                   with_uncertainty)
        system_of = torch.cat(batch)
        atom_of = torch.cat(atom_index)
        # the atoms reported, in the order asked for (all of them, system by system, by default)
        rows = torch.arange(system_of.shape[0], dtype=torch.long, device=device)
        if selected_atoms is not None:
            starts = torch.zeros(len(systems) + 1, dtype=torch.long, device=device)
            starts[1:] = torch.bincount(system_of, minlength=len(systems)).cumsum(0)
            chosen = selected_atoms.values.to(torch.long)
            rows = starts[chosen[:, 0]] + chosen[:, 1]
        atom_samples = Labels(["system", "atom"],
                              torch.stack([system_of[rows], atom_of[rows]], dim=1)
                              .to(torch.int32))
        system_samples = Labels(["system"], torch.arange(
            len(systems), dtype=torch.int32, device=device).unsqueeze(1))
        energy_property = Labels(["energy"], torch.zeros(1, 1, dtype=torch.int32, device=device))
        results: dict[str, TensorMap] = {}
        single = Labels(["_"], torch.zeros(1, 1, dtype=torch.int32, device=device))
        xyz = torch.arange(3, dtype=torch.int32, device=device).unsqueeze(1)
        xyz_1, xyz_2 = Labels(["xyz_1"], xyz), Labels(["xyz_2"], xyz)
        for name, request in outputs.items():
            if name == "energy_uncertainty":
                # spread of the members' energies: per atom, or of each system's total over the
                # reported atoms
                members = extras["member_atomic_energies"][:, rows]  # (M, n)
                if request.sample_kind == "atom":
                    block = TensorBlock(values=members.std(0, unbiased=False).unsqueeze(-1),
                                        samples=atom_samples, components=_no_components(),
                                        properties=energy_property)
                else:
                    totals = torch.zeros(members.shape[0], len(systems), dtype=members.dtype,
                                         device=device).index_add(1, system_of[rows], members)
                    block = TensorBlock(values=totals.std(0, unbiased=False).unsqueeze(-1),
                                        samples=system_samples, components=_no_components(),
                                        properties=energy_property)
                results[name] = TensorMap(single, [block])
                continue
            if name == "energy":
                energies = atomic[rows].unsqueeze(-1)
                if request.sample_kind == "atom":
                    block = TensorBlock(values=energies, samples=atom_samples,
                                        components=_no_components(), properties=energy_property)
                else:
                    total = torch.zeros(len(systems), 1, dtype=atomic.dtype, device=device)
                    total = total.index_add(0, system_of[rows], energies)
                    block = TensorBlock(values=total, samples=system_samples,
                                        components=_no_components(), properties=energy_property)
                results[name] = TensorMap(single, [block])
                continue
            predictive = extras["predictive"][rows]
            epistemic = extras["epistemic"][rows]
            if name == "e2ip::forces_uncertainty":
                trace = epistemic.diagonal(dim1=-2, dim2=-1).sum(-1)
                block = TensorBlock(values=torch.sqrt(trace / 3.0).unsqueeze(-1),
                                    samples=atom_samples, components=_no_components(),
                                    properties=single)
            elif name == "e2ip::forces_covariance":
                block = TensorBlock(values=predictive.unsqueeze(-1), samples=atom_samples,
                                    components=[xyz_1, xyz_2], properties=single)
            elif name == "e2ip::forces_epistemic":
                block = TensorBlock(values=epistemic.unsqueeze(-1), samples=atom_samples,
                                    components=[xyz_1, xyz_2], properties=single)
            else:  # e2ip::forces_covariance_6
                flat = torch.stack([predictive[:, 0, 0], predictive[:, 1, 1],
                                    predictive[:, 2, 2], predictive[:, 0, 1],
                                    predictive[:, 0, 2], predictive[:, 1, 2]], dim=1)
                block = TensorBlock(
                    values=flat, samples=atom_samples, components=_no_components(),
                    properties=Labels(["component"], torch.arange(
                        6, dtype=torch.int32, device=device).unsqueeze(1)))
            results[name] = TensorMap(single, [block])
        return results
