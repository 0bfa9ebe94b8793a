"""Deep-ensemble baseline (docs/maths.md §6): M potentials with the same spec and different seeds.

Mean force mu = mean_m mu_m; epistemic covariance U_epi = 1/M sum_m (mu_m - mu)(mu_m - mu)^T.
Predictive: Gaussian N(mu, U_epi + floor I) with floor = `raw_floor` (tiny, form "raw"). The
form "cal" is N(mu, t U_epi + s^2 I) with t (`epistemic_scale`) and s^2
(`calibration_variance`) minimising the NLL on the validation set (`calibration_form` "nll",
:func:`e2ip.stats.calibration.fit_aleatoric_and_epistemic_scales`): as strong a calibration as
the single models' two scales. `calibration_form` "paper_floor" keeps the paper's recipe
(t = 1, s chosen by bisection so that Coverage@95 is 0.95,
:func:`e2ip.stats.calibration.fit_calibration_floor`) for the paper's tables.

A heteroskedastic ensemble (members with an uncertainty head, e.g. "mve"): the aleatoric part is
the mean of the members' predictive covariances, U_ale = 1/M sum_m C_m, and the predictive the
moment-matched mixture N(mu, U_epi + U_ale) (+ raw_floor I); its calibration is
N(mu, t U_epi + s U_ale), t and s by NLL (files of format 3 and older: t = s, one scale on both).
Such members run one by one (no vmap).

The members run in one batched pass: their parameters are stacked along a leading member axis and
the backbone is evaluated with ``torch.func.functional_call`` under ``torch.vmap``; the forces are
``-torch.func.grad`` of the energy with respect to the (shared) positions, vmapped over members.
``batched=False`` runs a plain Python loop over the members instead (same result). The default
(``batched=None``) picks vmap on CUDA and the loop on the CPU, where it was measured faster
(5 PaiNN members, 32 aspirin molecules, one thread: 0.87 ms/atom looped vs 2.26 with vmap).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from e2ip.constants import DIM as D
from e2ip.data.graph import AtomicGraph
from e2ip.errors import ModelError
from e2ip.models.bias import UncertaintyBias
from e2ip.models.io import register_kind
from e2ip.models.potential import Potential, detached_outputs, trace
from e2ip.models.single import PotentialModel, atomic_energies
from e2ip.nn.scatter import scatter_sum
from e2ip.stats.calibration import fit_aleatoric_and_epistemic_scales, fit_calibration_floor
from e2ip.stats.predictive import Gaussian

RAW_FLOOR = 1e-8  # (eV/Å)^2: the "eps I" of the raw ensemble
#: how `calibrate` fits the form "cal" (see the module docstring)
CALIBRATION_FORMS = ("nll", "paper_floor")


def member_spread(member_forces: torch.Tensor) -> torch.Tensor:
    """U_epi = 1/M sum_m (mu_m - mu)(mu_m - mu)^T from member forces (M, N, 3): (N, 3, 3)."""
    deviation = member_forces - member_forces.mean(0)
    return torch.einsum("mni,mnj->nij", deviation, deviation) / member_forces.shape[0]


@register_kind
class Ensemble(Potential):
    """M :class:`PotentialModel` members (typically head "none") with identical spec but seeds.

    forward(graph) -> energy (B,), forces (N, 3), atomic_energies (N,) (member means) and
    params = {"member_forces": (M, N, 3), "member_energy": (M, B)}.
    """

    kind = "ensemble"
    has_uncertainty = True

    def __init__(self, members: Sequence[PotentialModel], *, raw_floor: float = RAW_FLOOR,
                 calibration_variance: float | None = None, batched: bool | None = None,
                 chunk_size: int | None = None, metadata: dict | None = None,
                 calibration_form: str = "nll"):
        super().__init__()
        members = list(members)
        if not members:
            raise ModelError("an ensemble needs at least one member")
        first = members[0]
        for m in members[1:]:
            if m.elements != first.elements or m.cutoff != first.cutoff:
                raise ModelError("ensemble members must share elements (same order) and cutoff")
            if m.head_name != first.head_name:
                raise ModelError("ensemble members must share their head")
        if calibration_form not in CALIBRATION_FORMS:
            raise ModelError(f"ensemble calibration must be one of {', '.join(CALIBRATION_FORMS)}"
                             f", got {calibration_form!r}")
        if calibration_form == "paper_floor" and first.head.has_uncertainty:
            raise ModelError("the paper's floor calibrates plain ensembles; a heteroskedastic "
                             "one is calibrated by NLL ('nll')")
        self.calibration_form = calibration_form
        self.members = nn.ModuleList(members)
        self.elements = list(first.elements)
        self.cutoff = float(first.cutoff)
        self.force_scale = float(first.force_scale)
        self.energy_scale = float(first.energy_scale)
        self.backbone_name = first.backbone_name
        self.raw_floor = float(raw_floor)
        self.batched = batched
        self.chunk_size = chunk_size
        self.metadata = dict(metadata or {})
        value = float("nan") if calibration_variance is None else float(calibration_variance)
        self.register_buffer("calibration_variance", torch.tensor(value, dtype=torch.float64))
        # the factor t on U_epi in the form "cal" (1 for the paper's floor)
        self.register_buffer("epistemic_scale", torch.ones((), dtype=torch.float64))
        self._stack_cache: tuple[Any, Any] | None = None
        self._vmap_failed = False

    # -- description -------------------------------------------------------------------------
    @property
    def num_members(self) -> int:
        return len(self.members)

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.calibration_variance))

    def calibration_value(self) -> float:
        return float(self.calibration_variance)

    @property
    def heteroskedastic(self) -> bool:
        """Whether the members are mean-variance models (an uncertainty head with an aleatoric
        part only, e.g. "mve"). Members with a full uncertainty head (e2IP, eIP) are ensembled
        on their force means alone, as before: the paper's deep ensemble."""
        head = self.members[0].head
        return head.has_uncertainty and not head.has_epistemic

    @property
    def calibration_method(self) -> str:  # type: ignore[override]
        """The name of the fitted value: 'variance_floor' (s^2 of the paper's floor),
        'nll_floor' (s^2 fitted by NLL beside t) or 'variance_scale' (s on the members' mean
        covariance, heteroskedastic ensembles)."""
        if self.heteroskedastic:
            return "variance_scale"
        return "variance_floor" if self.calibration_form == "paper_floor" else "nll_floor"

    def calibration(self) -> dict[str, Any] | None:
        out = super().calibration()
        if out is not None:
            out["epistemic_scale"] = float(self.epistemic_scale)
        return out

    def label(self) -> str:
        kind = "Het. ensemble" if self.heteroskedastic else "Ensemble"
        return f"{kind} x{self.num_members} ({self.backbone_name})"

    def spec(self) -> dict[str, Any]:
        return {"members": [m.spec() for m in self.members], "raw_floor": self.raw_floor,
                "batched": self.batched, "chunk_size": self.chunk_size,
                "metadata": self.metadata, "calibration_form": self.calibration_form}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Ensemble:
        members = [PotentialModel.from_spec(s) for s in spec["members"]]
        return cls(members, raw_floor=spec.get("raw_floor", RAW_FLOOR),
                   batched=spec.get("batched"), chunk_size=spec.get("chunk_size"),
                   metadata=spec.get("metadata"),
                   calibration_form=spec.get("calibration_form", "nll"))

    def fit_training_statistics(self, structures, batch_size: int = 32) -> int | None:
        """Each member's (for members whose head needs training statistics)."""
        counts = [m.fit_training_statistics(structures, batch_size) for m in self.members]
        return counts[0]

    def fine_tuning_members(self) -> list[PotentialModel]:
        return list(self.members)

    # -- batched evaluation ------------------------------------------------------------------
    def can_batch(self) -> bool:
        """Members can be vmapped when their backbones have identical parameter/buffer layouts."""
        def layout(m):
            return [(n, tuple(t.shape), t.dtype) for n, t in
                    list(m.backbone.named_parameters()) + list(m.backbone.named_buffers())]

        if self.heteroskedastic:  # the members' heads run in their own forward
            return False
        ref = layout(self.members[0])
        return all(layout(m) == ref and type(m.backbone) is type(self.members[0].backbone)
                   for m in self.members[1:])

    def _stacked_state(self, differentiable: bool):
        """Member backbone parameters and buffers stacked on a leading member axis, plus the
        per-member energy scale and reference energies. Like ``torch.func.stack_module_state``,
        but the stack stays attached to the members' parameters when `differentiable` (so
        gradients reach them); otherwise it is computed without grad and cached until a member
        tensor changes (in-place update, dtype or device move)."""
        tensors = [list(m.backbone.named_parameters()) + list(m.backbone.named_buffers())
                   + [("reference_energies", m.reference_energies)] for m in self.members]
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for ts in tensors for _, t in ts)
        key = key + tuple(m.energy_scale for m in self.members)
        if not differentiable and self._stack_cache is not None and self._stack_cache[0] == key:
            return self._stack_cache[1]
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            member_params = [dict(m.backbone.named_parameters()) for m in self.members]
            member_buffers = [dict(m.backbone.named_buffers()) for m in self.members]
            params = {n: torch.stack([d[n] for d in member_params]) for n in member_params[0]}
            buffers = {n: torch.stack([d[n] for d in member_buffers]) for n in member_buffers[0]}
            ref = torch.stack([m.reference_energies for m in self.members])
        dtype = next(iter(params.values())).dtype
        scale = torch.tensor([m.energy_scale for m in self.members], dtype=dtype,
                             device=ref.device)
        state = (params, buffers, ref, scale)
        if not differentiable:
            self._stack_cache = (key, state)
        return state

    def _forward_batched(self, graph: AtomicGraph, compute_forces: bool, create_graph: bool):
        first = self.members[0]
        species = first.species(graph.numbers)
        dtype = next(first.parameters()).dtype
        positions = graph.positions.to(dtype)
        graph = AtomicGraph(**{**graph.__dict__, "positions": positions,
                               "cell": graph.cell.to(dtype)})
        template = first.backbone
        differentiable = create_graph or self.training
        params, buffers, ref, scale = self._stacked_state(differentiable)

        def member_energy(p, b, ref_m, scale_m, pos):
            features = torch.func.functional_call(
                template, (p, b),
                (species, graph.edge_index, graph.edge_vectors(pos), graph.batch,
                 graph.num_graphs))
            atomic = atomic_energies(features.atomic_energy, scale_m, ref_m, species)
            energy = scatter_sum(atomic, graph.batch, graph.num_graphs)
            return energy.sum(), (energy, atomic)

        in_dims = (0, 0, 0, 0, None)
        if compute_forces:
            fn = torch.func.grad(member_energy, argnums=4, has_aux=True)
            grads, (energy, atomic) = torch.vmap(fn, in_dims=in_dims, chunk_size=self.chunk_size)(
                params, buffers, ref, scale, positions)
            forces = -grads
        else:
            _, (energy, atomic) = torch.vmap(member_energy, in_dims=in_dims,
                                             chunk_size=self.chunk_size)(
                params, buffers, ref, scale, positions)
            forces = None
        return energy, forces, atomic

    def _forward_loop(self, graph: AtomicGraph, compute_forces: bool, create_graph: bool,
                      compute_stress: bool = False):
        outs = [m(graph, compute_forces=compute_forces, create_graph=create_graph,
                  compute_stress=compute_stress) for m in self.members]
        energy = torch.stack([o["energy"] for o in outs])
        atomic = torch.stack([o["atomic_energies"] for o in outs])
        forces = torch.stack([o["forces"] for o in outs]) if compute_forces else None
        stress = torch.stack([o["stress"] for o in outs]).mean(0) if compute_stress else None
        covs = None
        if self.heteroskedastic and compute_forces:  # (M, N, 3, 3): each member's own
            covs = torch.stack([m.covariances(o["params"], o["forces"], "raw")["aleatoric"]
                                for m, o in zip(self.members, outs, strict=True)])
        return energy, forces, atomic, stress, covs

    def forward(self, graph: AtomicGraph, compute_forces: bool = True,
                create_graph: bool | None = None, compute_stress: bool = False,
                bias: UncertaintyBias | None = None, batched: bool | None = None) -> dict[str, Any]:
        """energy (B,) eV, forces (N, 3) eV/Å, atomic_energies (N,) (member means), and params
        {"member_forces": (M, N, 3), "member_energy": (M, B)}. `batched` overrides self.batched.

        compute_stress: also `stress` (B, 3, 3) eV/Å^3, the members' mean. bias: forces of
        E + E_bias (E_bias from the member spread, which needs the derivative of the member
        forces: a second-order pass through the members, one by one) and `bias_energy` (B,)."""
        if create_graph is None:
            create_graph = self.training
        if bias is not None:
            return self._forward_biased(graph, bias, create_graph, compute_stress)
        batched = self.batched if batched is None else batched
        if batched is None:
            batched = graph.positions.is_cuda
        result = None
        if batched and not compute_stress and not self._vmap_failed and self.can_batch():
            try:
                result = (*self._forward_batched(graph, compute_forces, create_graph), None, None)
            except (RuntimeError, NotImplementedError) as exc:  # a backbone vmap cannot handle
                self._vmap_failed = True
                warnings.warn(f"ensemble: batched (vmap) evaluation failed ({exc}); "
                              "evaluating the members one by one from now on", stacklevel=2)
        if result is None:
            result = self._forward_loop(graph, compute_forces, create_graph, compute_stress)
        energy, forces, atomic, stress, member_covariances = result
        params = {"member_energy": energy}
        if forces is not None:
            params["member_forces"] = forces
        if member_covariances is not None:
            params["member_covariances"] = member_covariances
        out = {"energy": energy.mean(0), "forces": None if forces is None else forces.mean(0),
               "atomic_energies": atomic.mean(0), "params": params}
        if stress is not None:
            out["stress"] = stress
        return out

    def _forward_biased(self, graph: AtomicGraph, bias: UncertaintyBias, create_graph: bool,
                        compute_stress: bool) -> dict[str, Any]:
        if compute_stress:
            raise ModelError("stress with an uncertainty bias is not available for ensembles "
                             "(use a constant-volume ensemble)")
        dtype = next(self.parameters()).dtype
        with torch.enable_grad():
            positions = graph.positions.to(dtype).detach().requires_grad_(True)
            graph = AtomicGraph(**{**graph.__dict__, "positions": positions})
            out = self.forward(graph, create_graph=True)
            u_epi = trace(self.covariances(out["params"], None, bias.form)["epistemic"])
            bias_energy = bias.energy(u_epi, graph.batch, graph.n_atoms, graph.num_graphs)
            (grad,) = torch.autograd.grad(bias_energy.sum(), positions, create_graph=create_graph)
        out["forces"] = out["forces"] - grad
        out["bias_energy"] = bias_energy
        return out if create_graph else detached_outputs(out)

    def energy_uncertainty(self, params) -> torch.Tensor | None:
        """Standard deviation of the member energies (B,) in eV."""
        return params["member_energy"].std(0, unbiased=False)

    # -- uncertainty -------------------------------------------------------------------------
    def floor(self, form: str | None = None) -> float:
        """The isotropic variance added to the aleatoric part: `raw_floor`, or in the form "cal"
        of a plain ensemble the fitted s^2."""
        if self.heteroskedastic or self.resolve_form(form) == "raw":
            return self.raw_floor
        return float(self.calibration_variance)

    def form_factors(self, form: str | None) -> tuple[float, float]:
        """(factor on U_epi, factor on the members' mean covariance) of `form`: 1, 1 in the form
        "raw"; in the form "cal" t and (heteroskedastic ensembles) s, else 1."""
        if self.resolve_form(form) == "raw":
            return 1.0, 1.0
        aleatoric = float(self.calibration_variance) if self.heteroskedastic else 1.0
        return float(self.epistemic_scale), aleatoric

    @staticmethod
    def epistemic(member_forces: torch.Tensor) -> torch.Tensor:
        return member_spread(member_forces)

    def _aleatoric(self, params, like: torch.Tensor, floor: float) -> torch.Tensor:
        """The members' mean covariance (heteroskedastic) plus floor I, or floor I: (N, 3, 3)."""
        eye = torch.eye(D, dtype=like.dtype, device=like.device)
        if self.heteroskedastic:
            return params["member_covariances"].mean(0) + floor * eye
        return (floor * eye).expand_as(like).clone()

    def covariances(self, params, forces=None, form: str | None = None) -> dict[str, torch.Tensor]:
        """epistemic t U_epi, aleatoric (floor I, or the members' mean covariance times s),
        predictive their sum; all (N, 3, 3), t = s = 1 and the raw floor in the form "raw"."""
        epistemic = self.epistemic(params["member_forces"])
        t, s = self.form_factors(form)
        aleatoric = self._aleatoric(params, epistemic, self.floor(form))
        epistemic, aleatoric = t * epistemic, s * aleatoric
        return {"aleatoric": aleatoric, "epistemic": epistemic,
                "predictive": epistemic + aleatoric}

    def predictive(self, params, forces=None, form: str | None = None) -> Gaussian:
        """Gaussian N(mu, U_epi + floor I); form "raw" or "cal" (None: "cal" if calibrated)."""
        loc = params["member_forces"].mean(0) if forces is None else forces
        return Gaussian(loc, self.covariances(params, loc, form)["predictive"])

    def set_calibration_variance(self, variance: float) -> None:
        self.calibration_variance.fill_(float(variance))

    def _fit_calibration(self, batches, target: float = 0.95, level: float = 0.95) -> float:
        """Fit the form "cal" on held-out batches; returns s^2 (plain) or s (heteroskedastic).
        "nll": (s^2 or s, t) minimising the Gaussian NLL; "paper_floor": s^2 such that
        N(mu, U_epi + s^2 I) covers `target` of the atoms at `level`, t = 1."""
        errors = torch.cat([g.forces.to(out["forces"].dtype) - out["forces"] for g, out in batches])
        epistemic = torch.cat([self.epistemic(out["params"]["member_forces"]) for _, out in batches])
        if self.calibration_form == "paper_floor":
            value, t = fit_calibration_floor(errors, epistemic, target=target, level=level)**2, 1.0
        else:
            aleatoric = (torch.cat([self._aleatoric(out["params"], out["forces"], self.raw_floor)
                                    for _, out in batches]) if self.heteroskedastic else None)
            value, t = fit_aleatoric_and_epistemic_scales(errors.detach(), epistemic.detach(),
                                                          None if aleatoric is None
                                                          else aleatoric.detach())
        self.set_calibration_variance(value)
        self.epistemic_scale.fill_(t)
        return value
