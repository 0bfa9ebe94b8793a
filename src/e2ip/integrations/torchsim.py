"""TorchSim: many MD replicas of an e2ip model in one batched call, with per-atom uncertainties.

    import torch_sim as ts
    from e2ip.integrations.torchsim import E2IPTorchSimModel

    model = E2IPTorchSimModel("runs/x/model.pt", device="cuda")
    state = ts.io.atoms_to_state([atoms] * 64, model.device, model.dtype)
    out = model(state)   # energy (B,), forces (N, 3), stress (B, 3, 3),
                         # forces_uncertainty (N,), forces_covariance (N, 3, 3)

The neighbour lists are built on the model's device for the whole batch with TorchSim's own
functions (linked cells for periodic systems, all pairs within the cutoff otherwise), and the
model runs as it does everywhere else (:meth:`e2ip.models.Potential.forward`): any model kind,
the calibration of `form`. Written for torch-sim-atomistic 0.3, the release that installs on
Python 3.11 (its ``ModelInterface``); an optional dependency (``pip install e2ip[torchsim]``).
"""

import os

import torch
import torch_sim as ts
from torch_sim.models.interface import ModelInterface
from torch_sim.neighbors import torch_nl_linked_cell, torch_nl_n2

from e2ip.data.graph import AtomicGraph
from e2ip.models.io import load_model, resolve_device
from e2ip.models.potential import Potential, sigma_from_trace, trace


class E2IPTorchSimModel(ModelInterface):
    """An e2ip model (a file, a run folder or a :class:`Potential`) as a TorchSim model.

    device: where it runs (default: the model's); dtype: float32 or float64 (default: the
    model's); compute_stress: also the stress (B, 3, 3) in eV/Å^3, ASE's sign convention;
    form: 'raw' or 'cal' (default: cal when calibrated)."""

    def __init__(self, model: "str | os.PathLike | Potential", device: str | None = None,
                 dtype: torch.dtype | None = None, compute_stress: bool = True,
                 form: str | None = None):
        super().__init__()
        if not isinstance(model, Potential):
            model = load_model(model)
        self._device = resolve_device(device) if device is not None else model.device
        self._dtype = dtype or model.dtype
        self.model = model.to(device=self._device, dtype=self._dtype).eval()
        self._compute_forces = True
        self._compute_stress = bool(compute_stress)
        self._memory_scales_with = "n_atoms_x_density"
        self.form = self.model.resolve_form(form) if self.model.has_uncertainty else None

    def graph(self, state: ts.SimState) -> AtomicGraph:
        """The batch as e2ip's graph: wrapped positions (periodic systems) and neighbour lists
        built on the device."""
        positions = state.positions.to(self._dtype)
        cell = state.row_vector_cell.to(self._dtype)  # (B, 3, 3), rows are lattice vectors
        system_idx = state.system_idx
        n_systems = cell.shape[0]
        cutoff = float(self.model.cutoff)
        if state.pbc:
            positions = ts.transforms.pbc_wrap_batched(positions, state.cell.to(self._dtype),
                                                       system_idx)
            pbc = torch.ones(n_systems, 3, dtype=torch.bool, device=positions.device)
            mapping, _, shifts = torch_nl_linked_cell(cutoff, positions, cell.reshape(-1, 3),
                                                      pbc, system_idx)
        else:
            pbc = torch.zeros(n_systems, 3, dtype=torch.bool, device=positions.device)
            mapping, _, shifts = torch_nl_n2(cutoff, positions, cell.reshape(-1, 3), pbc,
                                             system_idx)
        n_atoms = torch.bincount(system_idx, minlength=n_systems)
        return AtomicGraph(numbers=state.atomic_numbers.to(torch.long), positions=positions,
                           cell=cell, edge_index=mapping.to(torch.long),
                           shifts=shifts.to(self._dtype), batch=system_idx, n_atoms=n_atoms)

    def forward(self, state: "ts.SimState | dict", **kwargs) -> dict[str, torch.Tensor]:
        if not isinstance(state, ts.SimState):
            state = ts.SimState(**state)
        graph = self.graph(state)
        stress = self._compute_stress and bool(state.pbc)
        out = self.model(graph, create_graph=False, compute_stress=stress)
        result = {"energy": out["energy"].detach(), "forces": out["forces"].detach()}
        if self._compute_stress:
            result["stress"] = (out["stress"].detach() if stress else
                                torch.zeros_like(graph.cell))
        if self.model.has_uncertainty:
            covariances = self.model.covariances(out["params"], out["forces"], self.form)
            result["forces_covariance"] = covariances["predictive"].detach()
            result["forces_uncertainty"] = sigma_from_trace(
                trace(covariances["epistemic"].detach()))
            energy_uncertainty = self.model.energy_uncertainty(out["params"])
            if energy_uncertainty is not None:
                result["energy_uncertainty"] = energy_uncertainty.detach()
        return result
