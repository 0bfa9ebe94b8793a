"""What an engine runs of an e2ip model, in a form TorchScript compiles: atomic energies and
per-atom force covariances from the engine's edge vectors, for a single model and an ensemble.
The export formats (:mod:`e2ip.integrations.metatomic`) wrap these."""

import torch
from torch import nn

from e2ip.backbones.base import with_species
from e2ip.heads.evidential import binned_factor
from e2ip.models.ensemble import Ensemble, member_spread
from e2ip.models.single import PotentialModel, atomic_energies


class ScriptedPotential(nn.Module):
    """Atomic energies (N,) eV and the force covariances (N, 3, 3) (eV/Å)^2 of one single model,
    in a form TorchScript compiles: the model's backbone and head, its reference energies and
    energy scale, and the calibration of `form` as constant factors. Forces are left to the
    caller's autograd on the edge vectors."""

    def __init__(self, model: PotentialModel, form: str):
        super().__init__()
        self.backbone = model.backbone.for_torchscript()
        self.head = model.head
        self.register_buffer("reference_energies", model.reference_energies.detach().clone())
        self.register_buffer("species_lookup", model.species_lookup.detach().clone())
        self.energy_scale = float(model.energy_scale)
        self.has_uncertainty = bool(model.has_uncertainty)
        # the form's calibration, as PotentialModel.covariances applies it
        self.epistemic_factor, self.variance_factor = model.form_factors(form)
        # and its per-bin factors of the feature distance, as PotentialModel._form_params (a
        # constant of the export; without bins the buffers are placeholders, never read)
        binned = bool(model.head.r_bins) and model.resolve_form(form) == "cal"
        self.binned = binned
        self.register_buffer("r_bin_edges", model.head.r_bin_edges.detach().clone() if binned
                             else torch.zeros(0, dtype=torch.float64))
        self.register_buffer("r_bin_factors", model.head.r_bin_factors.detach().clone()
                             if binned else torch.ones(1, dtype=torch.float64))

    def forward(self, numbers: torch.Tensor, edge_index: torch.Tensor, edge_vectors: torch.Tensor,
                batch: torch.Tensor, num_graphs: int,
                with_uncertainty: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        species = self.species_lookup[numbers]
        features = with_species(self.backbone(species, edge_index, edge_vectors, batch, num_graphs),
                                species)
        atomic = atomic_energies(features.atomic_energy, self.energy_scale,
                                 self.reference_energies, species)
        covariances: dict[str, torch.Tensor] = {}
        if self.has_uncertainty and with_uncertainty:
            params = self.head(features)
            if self.epistemic_factor != 1.0:
                params = self.head.scale_epistemic(params, self.epistemic_factor)
            factor = torch.full_like(atomic, self.variance_factor)
            if self.binned:
                factor = factor * binned_factor(params["feature_distance"], self.r_bin_edges,
                                                self.r_bin_factors)
            for key, value in self.head.covariances(params, None).items():
                covariances[key] = value * factor[:, None, None]
        return atomic, covariances


class ScriptedEnsemble(nn.Module):
    """The same for a deep ensemble: the members' mean atomic energies; the epistemic
    covariance of the members' forces (from their own autograd pass, the engine's graph kept);
    the aleatoric part as in :meth:`e2ip.models.ensemble.Ensemble.covariances` (the floor of
    `form`, or for a heteroskedastic ensemble the members' mean covariance times its scale);
    and the members' atomic energies (``member_atomic_energies``, (M, N) eV) for the energy's
    spread. With ``with_uncertainty=False`` the mean energy alone (no member forces)."""

    def __init__(self, ensemble: Ensemble, form: str):
        super().__init__()
        self.members = nn.ModuleList(ScriptedPotential(m, "raw") for m in ensemble.members)
        self.heteroskedastic = bool(ensemble.heteroskedastic)
        self.floor = float(ensemble.floor(form))
        self.epistemic_factor, self.aleatoric_factor = ensemble.form_factors(form)

    def forward(self, numbers: torch.Tensor, edge_index: torch.Tensor, edge_vectors: torch.Tensor,
                batch: torch.Tensor, num_graphs: int,
                with_uncertainty: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not with_uncertainty:  # the mean energy alone: no member forces
            atomic_list: list[torch.Tensor] = []
            for member in self.members:
                atomic, _ = member(numbers, edge_index, edge_vectors, batch, num_graphs, False)
                atomic_list.append(atomic)
            no_extras: dict[str, torch.Tensor] = {}
            return torch.stack(atomic_list).mean(0), no_extras
        n = numbers.shape[0]
        centers, neighbors = edge_index[0], edge_index[1]
        atomic_list: list[torch.Tensor] = []
        forces_list: list[torch.Tensor] = []
        aleatoric_list: list[torch.Tensor] = []
        # the members' forces need autograd (TorchScript has no enable_grad block: engines that
        # compute forces run with it on)
        if not torch.is_grad_enabled():
            raise RuntimeError("the ensemble's uncertainty needs autograd: call it with grad enabled")
        vectors = edge_vectors
        if not vectors.requires_grad:  # the engine wants no forces: a leaf of our own
            vectors = edge_vectors.detach().requires_grad_(True)
        for member in self.members:
            atomic, covariances = member(numbers, edge_index, vectors, batch, num_graphs, True)
            grads = torch.autograd.grad([atomic.sum()], [vectors], retain_graph=True)
            grad = grads[0]
            assert grad is not None
            # r_e = x_neighbor - x_center (+ shift): F = -dE/dx from the edge gradients
            zero = torch.zeros(n, 3, dtype=grad.dtype, device=grad.device)
            forces = zero.index_add(0, centers, grad) - zero.index_add(0, neighbors, grad)
            atomic_list.append(atomic)
            forces_list.append(forces.detach())
            if self.heteroskedastic:
                aleatoric_list.append(covariances["predictive"].detach())
        atomics = torch.stack(atomic_list)
        member_forces = torch.stack(forces_list)
        epistemic = member_spread(member_forces)
        eye = torch.eye(3, dtype=epistemic.dtype, device=epistemic.device)
        if self.heteroskedastic:
            aleatoric = self.aleatoric_factor * (torch.stack(aleatoric_list).mean(0)
                                                 + self.floor * eye)
        else:
            aleatoric = (self.floor * eye).expand_as(epistemic).clone()
        epistemic = self.epistemic_factor * epistemic
        covariances = {"epistemic": epistemic, "aleatoric": aleatoric,
                       "predictive": epistemic + aleatoric,
                       "member_atomic_energies": atomics.detach()}
        return atomics.mean(0), covariances
