"""A single potential: backbone + head + energy scale and per-element reference energies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from e2ip.backbones import get_backbone
from e2ip.backbones.base import with_species
from e2ip.data.graph import AtomicGraph
from e2ip.errors import DataError, ModelError
from e2ip.heads import FeatureDims, get_head
from e2ip.models.bias import UncertaintyBias
from e2ip.models.io import register_kind
from e2ip.models.potential import Potential, trace
from e2ip.models.state import portable_state_dict
from e2ip.nn.scatter import scatter_sum
from e2ip.stats.calibration import (
    fit_r_bin_factors,
    fit_variance_and_epistemic_scale,
    fit_variance_scale,
)
from e2ip.stats.predictive import StudentT, concatenate


def _is_one(factor: float | torch.Tensor) -> bool:
    """Whether a covariance factor changes nothing (a per-atom tensor always counts as a change:
    no host sync to look at its values)."""
    return not isinstance(factor, torch.Tensor) and factor == 1.0


def atomic_energies(eps: torch.Tensor, energy_scale: float, reference_energies: torch.Tensor,
                    species: torch.Tensor) -> torch.Tensor:
    """E_i = energy_scale * eps_i + E0[z_i] (eV), (N,), from the backbone's dimensionless atomic
    energies eps (N,), the per-element reference energies E0 (eV) and each atom's species index.
    (The ensemble's batched path passes a 0-d tensor as the scale; TorchScript sees floats.)"""
    return eps * energy_scale + reference_energies[species].to(eps.dtype)


@register_kind
class PotentialModel(Potential):
    """Energy E = sum_i (energy_scale * eps_i + E0[z_i]) (eV), forces -dE/dr (eV/Å), and head outputs.

    elements: atomic numbers the model knows; reference_energies: E0 per element (eV);
    energy_scale, force_scale: typical per-atom energy (eV) and force (eV/Å) scales of the data.
    """

    kind = "model"
    calibration_method = "variance_scale"

    def __init__(self, *, elements: Sequence[int], cutoff: float, backbone: str = "painn",
                 backbone_options: dict | None = None, head: str = "e2ip",
                 head_options: dict | None = None, reference_energies: Sequence[float] | None = None,
                 energy_scale: float = 1.0, force_scale: float = 1.0,
                 metadata: dict | None = None):
        super().__init__()
        self.elements = [int(z) for z in elements]
        self.cutoff = float(cutoff)
        self.backbone_name, self.head_name = backbone, head
        backbone_cls, head_cls = get_backbone(backbone), get_head(head)
        bb_hp = backbone_cls.hparams_from_dict(backbone_options)
        head_hp = head_cls.hparams_from_dict(head_options)
        self.backbone = backbone_cls(len(self.elements), self.cutoff, bb_hp)
        dims = FeatureDims(self.backbone.num_scalars, self.backbone.num_vectors,
                           self.backbone.num_tensors, num_species=len(self.elements))
        self.head = head_cls(dims, force_scale, head_hp)
        self.energy_scale = float(energy_scale)
        self.force_scale = float(force_scale)
        self.metadata = dict(metadata or {})
        ref = torch.zeros(len(self.elements)) if reference_energies is None else torch.tensor(
            [float(e) for e in reference_energies])
        self.register_buffer("reference_energies", ref.to(torch.float64))
        # post-hoc variance calibration (1 = none): every predictive covariance is multiplied by it
        self.register_buffer("variance_scale", torch.ones((), dtype=torch.float64))
        # and, for heads that scale their epistemic part on their own, its factor (1 = none)
        self.register_buffer("epistemic_scale", torch.ones((), dtype=torch.float64))
        lookup = torch.full((119,), -1, dtype=torch.long)
        lookup[torch.tensor(self.elements)] = torch.arange(len(self.elements))
        self.register_buffer("species_lookup", lookup, persistent=False)
        self._compile_options: dict | None = None  # set by :meth:`enable_compile`
        self._compiled = None  # the torch.compile'd energy-and-forces function, built lazily

    # -- description -------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """Everything needed to rebuild the model (plain types only)."""
        return {
            "elements": self.elements,
            "cutoff": self.cutoff,
            "backbone": self.backbone_name,
            "backbone_options": type(self.backbone).hparams_to_dict(self.backbone.hparams),
            "head": self.head_name,
            "head_options": type(self.head).hparams_to_dict(self.head.hparams),
            "reference_energies": self.reference_energies.tolist(),
            "energy_scale": self.energy_scale,
            "force_scale": self.force_scale,
            "metadata": self.metadata,
        }

    @property
    def has_uncertainty(self) -> bool:
        return self.head.has_uncertainty

    @property
    def has_epistemic(self) -> bool:
        return self.head.has_uncertainty and self.head.has_epistemic

    # -- forward ----------------------------------------------------------------------------
    def species(self, numbers: torch.Tensor) -> torch.Tensor:
        """Index of each atom's element in `elements`, (N,) long. Unknown elements are a
        DataError in eager mode (one host sync); under torch.compile the check is left to the
        callers that built the graph (a data-dependent branch would break the graph)."""
        species = self.species_lookup[numbers]
        if not torch.compiler.is_compiling():
            self.check_species(numbers, species)
        return species

    def check_species(self, numbers: torch.Tensor, species: torch.Tensor | None = None) -> None:
        """Raise a DataError naming the elements of `numbers` the model does not know."""
        species = self.species_lookup[numbers] if species is None else species
        if (species < 0).any():
            from ase.data import chemical_symbols

            unknown = sorted(set(numbers[species < 0].tolist()))
            raise DataError(
                "element(s) " + ", ".join(chemical_symbols[z] for z in unknown)
                + " unknown to the model (trained on "
                + ", ".join(chemical_symbols[z] for z in self.elements) + ")"
            )

    def forward(self, graph: AtomicGraph, compute_forces: bool = True,
                create_graph: bool | None = None, compute_stress: bool = False,
                bias: UncertaintyBias | None = None) -> dict[str, Any]:
        """energy (B,) eV, forces (N, 3) eV/Å, atomic_energies (N,), params (head parameters).

        compute_stress: also `stress` (B, 3, 3) = (1/V) dE/d(strain) in eV/Å^3 (ASE's sign
        convention), from a symmetric strain applied to positions and cell (periodic graphs).
        bias: an :class:`~e2ip.models.bias.UncertaintyBias`; then `forces` (and `stress`) are those of
        E + E_bias, from the same single backward pass, and `bias_energy` (B,) is added (the
        bias needs an uncertainty head)."""
        if create_graph is None:
            create_graph = self.training
        species = self.species(graph.numbers)
        if (self._compile_options is not None and compute_forces and not compute_stress
                and bias is None and not self._chunked(graph)):
            return self._compiled_forward(graph, species)
        dtype = next(self.parameters()).dtype
        positions = graph.positions.to(dtype)
        cell = graph.cell.to(dtype)
        if bias is not None and not self.has_epistemic:
            raise ModelError(f"an uncertainty bias needs an uncertainty head with an epistemic "
                             f"part; {self.label()} has none")
        out: dict[str, Any] = {}
        with torch.enable_grad():
            if compute_forces and not positions.requires_grad:
                positions = positions.detach().requires_grad_(True)
            wrt = [positions]
            deformed = positions
            if compute_stress:
                strain = torch.zeros_like(cell).requires_grad_(True)
                sym = 0.5 * (strain + strain.transpose(1, 2))
                deformed = positions + torch.einsum("ni,nij->nj", positions, sym[graph.batch])
                cell = cell + torch.bmm(cell, sym)
                wrt.append(strain)
            graph = AtomicGraph(**{**graph.__dict__, "positions": deformed, "cell": cell})
            features = with_species(self.backbone(species, graph.edge_index,
                                                  graph.edge_vectors(deformed), graph.batch,
                                                  graph.num_graphs), species)
            atomic = self._atomic_energies(features, species)
            energy = scatter_sum(atomic, graph.batch, graph.num_graphs)
            params = self.head(features) if bias is not None else None
            if compute_forces:
                total = energy
                if bias is not None:
                    u_epi = trace(self.covariances(params, None, bias.form)["epistemic"])
                    out["bias_energy"] = bias.energy(u_epi, graph.batch, graph.n_atoms,
                                                     graph.num_graphs)
                    total = energy + out["bias_energy"]
                grads = torch.autograd.grad(total.sum(), wrt, create_graph=create_graph)
                out["forces"] = -grads[0]
                if compute_stress:
                    volume = torch.linalg.det(cell.detach()).abs()
                    out["stress"] = grads[1] / volume[:, None, None]
        if params is None:
            params = self.head(features)
        out.update({"energy": energy, "atomic_energies": atomic, "params": params})
        out.setdefault("forces", None)
        return out

    # -- torch.compile ------------------------------------------------------------------------
    def enable_compile(self, **options) -> PotentialModel:
        """Run energy, forces and head parameters through one `torch.compile`d function
        (options go to torch.compile; default `dynamic=True`, so batches of any size share one
        graph). Forces come from `torch.func.grad` inside the compiled function, because
        AOTAutograd cannot differentiate a compiled `autograd.grad` twice (a training step needs
        the gradient of the forces). Stress, the uncertainty bias and edge-chunked large graphs
        take the eager path. Returns self."""
        self._compile_options = {"dynamic": True, **options}
        self._compiled = None
        return self

    def disable_compile(self) -> PotentialModel:
        self._compile_options, self._compiled = None, None
        return self

    def __getstate__(self):  # deepcopy / pickle (e.g. the EMA copy): rebuild the compiled fn lazily
        return {**super().__getstate__(), "_compiled": None}

    def _atomic_energies(self, features, species: torch.Tensor) -> torch.Tensor:
        return atomic_energies(features.atomic_energy, self.energy_scale,
                               self.reference_energies, species)

    def _chunked(self, graph: AtomicGraph) -> bool:
        chunk = self.backbone.edge_chunk()
        return bool(chunk) and graph.edge_index.shape[1] > chunk

    def _energy_and_forces(self, species, positions, edge_index, shifts, cell, batch,
                           num_graphs: int):
        """(atomic energies (N,), forces (N, 3), head parameters); the function torch.compile
        sees: tensors in, tensors out. The per-structure sum is left to the caller: Inductor
        (torch 2.13, CPU) fails to generate the scatter into a one-structure energy buffer."""
        from e2ip.backbones.base import BackboneOutput

        def energy_of(pos):
            graph = AtomicGraph(numbers=species, positions=pos, cell=cell, edge_index=edge_index,
                                shifts=shifts, batch=batch, n_atoms=cell.new_zeros(0))
            features = self.backbone(species, edge_index, graph.edge_vectors(pos), batch,
                                     num_graphs)
            atomic = self._atomic_energies(features, species)
            aux = {"atomic_energy": atomic, "scalars": features.scalars,
                   "vectors": features.vectors, "tensors": features.tensors}
            return atomic.sum(), {k: v for k, v in aux.items() if v is not None}

        grad, aux = torch.func.grad(energy_of, has_aux=True)(positions)
        params = self.head(BackboneOutput(**aux, species=species))
        return aux["atomic_energy"], -grad, params

    def _compiled_forward(self, graph: AtomicGraph, species: torch.Tensor) -> dict[str, Any]:
        if self._compiled is None:
            self._compiled = torch.compile(self._energy_and_forces, **self._compile_options)
        dtype = next(self.parameters()).dtype
        atomic, forces, params = self._compiled(
            species, graph.positions.to(dtype), graph.edge_index, graph.shifts.to(dtype),
            graph.cell.to(dtype), graph.batch, graph.num_graphs)
        energy = scatter_sum(atomic, graph.batch, graph.num_graphs)
        return {"energy": energy, "atomic_energies": atomic, "forces": forces, "params": params}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> PotentialModel:
        """The model a (current-version) file's spec describes."""
        return cls(**spec)

    def label(self) -> str:
        """A readable method name, e.g. 'e2IP (painn)'."""
        head = self.head.describe()
        return f"{head} ({self.backbone_name})"

    def fine_tuning_members(self) -> list[PotentialModel]:
        return [self]

    # -- uncertainty and its calibration --------------------------------------------------------
    @property
    def calibrated(self) -> bool:
        return bool(self.variance_scale != 1.0)

    def calibration_value(self) -> float:
        return float(self.variance_scale)

    def calibration(self) -> dict[str, Any] | None:
        out = super().calibration()
        if out is not None and self.head.scales_epistemic:
            out["epistemic_scale"] = float(self.epistemic_scale)
        if out is not None and self.head.r_bins:
            out["r_bin_edges"] = self.head.r_bin_edges.tolist()
            out["r_bin_factors"] = self.head.r_bin_factors.tolist()
        return out

    def form_factors(self, form: str | None) -> tuple[float, float]:
        """(epistemic factor, variance factor) of `form`: 1, 1 in the form 'raw'; in the form
        'cal' the epistemic scale (for heads that scale their epistemic part on their own, else
        1) and the variance scale that multiplies every covariance."""
        if self.resolve_form(form) == "raw":
            return 1.0, 1.0
        epistemic = float(self.epistemic_scale) if self.head.scales_epistemic else 1.0
        return epistemic, float(self.variance_scale)

    def _form_params(self, params, form: str | None) -> tuple[dict, float | torch.Tensor]:
        """The head parameters of `form` and the factor on every covariance: a float, or (N,)
        per atom in the form 'cal' of a head that bins r (`calibration_r_bins`)."""
        epistemic, variance = self.form_factors(form)
        if epistemic != 1.0:  # (dividing kappa by 1 changes nothing)
            params = self.head.scale_epistemic(params, epistemic)
        if self.head.r_bins and self.resolve_form(form) == "cal":
            return params, self.head.r_bin_factor(params) * variance
        return params, variance

    def predictive(self, params, forces, form: str | None = None):
        """Per-atom predictive distribution (e2ip.stats.predictive), or None without uncertainty.

        form: 'raw' (the head's own), 'cal' (with the fitted calibration), None: 'cal' when
        calibrated."""
        if not self.head.has_uncertainty:
            return None
        params, factor = self._form_params(params, form)
        pred = self.head.predictive(params, forces)
        return pred if _is_one(factor) else pred.scaled(factor)

    def covariances(self, params, forces, form: str | None = None) -> dict[str, torch.Tensor]:
        """(N, 3, 3) `aleatoric`, `epistemic`, `predictive` covariances in (eV/Å)^2 (and the
        head's extras, e.g. `sigma0`), with the fitted calibration in the form 'cal'."""
        if not self.head.has_uncertainty:
            return {}
        params, factor = self._form_params(params, form)
        covs = self.head.covariances(params, forces)
        if _is_one(factor):
            return covs
        if isinstance(factor, torch.Tensor):
            factor = factor[:, None, None]
        return {k: v * factor for k, v in covs.items()}

    def _fit_calibration(self, batches) -> float:
        """Variance scale minimising the mean predictive NLL on the held-out batches (with the
        epistemic scale beside it for heads that scale their epistemic part on their own).

        Why: the head's scale is learned against the errors of the weights being trained, while
        predictions use the weight-averaged (EMA) weights; one scalar removes that mismatch."""
        # on the CPU, with the detached (CPU, float64) predictives the fits compare it with
        ref = torch.cat([g.forces for g, _ in batches]).double().cpu()

        def predictive_for(epistemic_scale: float):
            return concatenate([self.head.predictive(
                self.head.scale_epistemic(out["params"], epistemic_scale), out["forces"])
                for _, out in batches])

        if self.head.scales_epistemic:
            if not self.head.feature_statistics_fitted():
                raise ModelError(f"{self.label()}: its feature distance was never fitted on the "
                                 "training data; run `e2ip calibrate MODEL --feature-distance "
                                 "TRAIN --data VALIDATION` (model.with_feature_distance(train))")
            factor, epistemic = fit_variance_and_epistemic_scale(predictive_for, ref)
            self.epistemic_scale.fill_(epistemic)
            if self.head.r_bins:  # per bin of r, on top of the two scales
                distance = torch.cat([out["params"]["feature_distance"] for _, out in batches])
                self.head.set_r_bins(*fit_r_bin_factors(
                    predictive_for(epistemic).scaled(factor).detached(), ref, distance,
                    self.head.r_bins))
        else:
            pred = concatenate([self.head.predictive(out["params"], out["forces"])
                                for _, out in batches])
            factor = fit_variance_scale(pred.detached(), ref)
        self.variance_scale.fill_(factor)
        return factor

    def with_feature_distance(self, train_structures, batch_size: int = 32,
                              r_bins: int | None = None) -> PotentialModel:
        """A copy of this e2IP model with `evidence: feature_distance`, its feature distance
        fitted on `train_structures` (the data it was trained on) and uncalibrated. Training is
        the same with either evidence (the distance is 1 until fitted), so this equals training
        with `evidence: feature_distance` from the start. `r_bins`: set the head's
        `calibration_r_bins` too (None: keep it)."""
        if not self.head.supports_feature_distance:
            raise ModelError(f"the feature-distance evidence needs an e2IP head; {self.label()} "
                             "has none")
        spec = self.spec()
        spec["head_options"] = type(self.head).feature_distance_options(spec["head_options"])
        if r_bins is not None:
            spec["head_options"]["calibration_r_bins"] = int(r_bins)
        try:
            model = type(self).from_spec(spec).to(device=self.device, dtype=self.dtype)
        except ValueError as exc:  # e.g. calibration_r_bins 1
            raise ModelError(str(exc)) from None
        fitted_after_training = ("head.feature_distance.", "head.r_bin_")
        state = {k: v for k, v in portable_state_dict(self.state_dict()).items()
                 if not k.startswith(fitted_after_training)}
        state["variance_scale"] = torch.ones((), dtype=torch.float64)
        state["epistemic_scale"] = torch.ones((), dtype=torch.float64)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or not all(k.startswith(fitted_after_training) for k in missing):
            raise ModelError(f"cannot switch {self.label()} to the feature-distance evidence "
                             f"(state mismatch: {sorted(unexpected or missing)[:3]})")
        model._compile_options = self._compile_options
        model.fit_training_statistics(train_structures, batch_size)
        return model.eval()

    @torch.no_grad()
    def fit_training_statistics(self, structures, batch_size: int = 32) -> int | None:
        """Fit what the head needs from the training data (its atoms' backbone features; e.g.
        the feature distance of e2IP with `evidence: feature_distance`), streamed in batches
        (an on-disk data set stays on disk), on the model's device; returns the number of atoms
        used, or None for a head that needs nothing."""
        if not self.head.uses_feature_statistics:
            return None
        from e2ip.data.graph import GraphDataset

        was_training = self.training
        self.eval()

        def features():
            loader = GraphDataset(structures, self.cutoff).loader(batch_size, dtype=self.dtype)
            for g in loader:
                g = g.to(self.device)
                species = self.species(g.numbers)
                yield with_species(self.backbone(species, g.edge_index,
                                                 g.edge_vectors(g.positions), g.batch,
                                                 g.num_graphs), species)

        try:
            return self.head.fit_feature_statistics(features())
        finally:
            self.train(was_training)

    def _extra_predictions(self, out, covs, form) -> dict[str, torch.Tensor]:
        """For the e2IP head: `sigma0` (N, 3, 3), the evidence `kappa`, `nu` (N,) (and the
        `feature_distance` r (N,) with `evidence: feature_distance`), and the
        predictive Student-t's `t_scale` (N, 3, 3) and `t_dof` (N,) (its location is `forces`)."""
        extra = {}
        if "sigma0" in covs:
            extra["sigma0"] = covs["sigma0"]
        for key in ("kappa", "nu", "feature_distance"):
            if key in out["params"]:
                extra[key] = out["params"][key]
        pred = self.predictive(out["params"], out["forces"], form)
        if isinstance(pred, StudentT):
            extra["t_scale"], extra["t_dof"] = pred.scale, pred.dof
        return extra
