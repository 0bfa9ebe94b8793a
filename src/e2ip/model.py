"""A potential: backbone + head + energy scale and per-element reference energies.

The model file (`model.pt`) is a plain dictionary of tensors and built-in types, loaded with
`torch.load(weights_only=True)`: no pickled code runs when a model is loaded.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .backbones import get_backbone
from .backbones.base import scatter_sum
from .data.graph import AtomicGraph, graph_from_structures
from .data.readers import check_elements, validate_structure
from .data.structures import DataError, Structure
from .heads import FeatureDims, get_head
from .predictive import StudentT

MODEL_FORMAT = "e2ip-model"
MODEL_VERSION = 1


class PotentialModel(nn.Module):
    """Energy E = sum_i (energy_scale * eps_i + E0[z_i]) (eV), forces -dE/dr (eV/Å), and head outputs.

    elements: atomic numbers the model knows; reference_energies: E0 per element (eV);
    energy_scale, force_scale: typical per-atom energy (eV) and force (eV/Å) scales of the data.
    """

    kind = "model"

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
                           self.backbone.num_tensors)
        self.head = head_cls(dims, force_scale, head_hp)
        self.energy_scale = float(energy_scale)
        self.force_scale = float(force_scale)
        self.metadata = dict(metadata or {})
        ref = torch.zeros(len(self.elements)) if reference_energies is None else torch.tensor(
            [float(e) for e in reference_energies])
        self.register_buffer("reference_energies", ref.to(torch.float64))
        # post-hoc variance calibration (1 = none): every predictive covariance is multiplied by it
        self.register_buffer("variance_scale", torch.ones((), dtype=torch.float64))
        lookup = torch.full((119,), -1, dtype=torch.long)
        lookup[torch.tensor(self.elements)] = torch.arange(len(self.elements))
        self.register_buffer("species_lookup", lookup, persistent=False)

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

    # -- forward ----------------------------------------------------------------------------
    def species(self, numbers: torch.Tensor) -> torch.Tensor:
        species = self.species_lookup[numbers]
        if (species < 0).any():
            from ase.data import chemical_symbols

            unknown = sorted(set(numbers[species < 0].tolist()))
            raise DataError(
                "element(s) " + ", ".join(chemical_symbols[z] for z in unknown)
                + " unknown to the model (trained on "
                + ", ".join(chemical_symbols[z] for z in self.elements) + ")"
            )
        return species

    def forward(self, graph: AtomicGraph, compute_forces: bool = True,
                create_graph: bool | None = None) -> dict[str, Any]:
        """energy (B,) eV, forces (N, 3) eV/Å, atomic_energies (N,), params (head parameters)."""
        if create_graph is None:
            create_graph = self.training
        species = self.species(graph.numbers)
        dtype = next(self.parameters()).dtype
        positions = graph.positions.to(dtype)
        with torch.enable_grad():
            if compute_forces and not positions.requires_grad:
                positions = positions.detach().requires_grad_(True)
            graph = AtomicGraph(**{**graph.__dict__, "positions": positions,
                                   "cell": graph.cell.to(dtype)})
            features = self.backbone(species, graph.edge_index, graph.edge_vectors(positions),
                                     graph.batch, graph.num_graphs)
            atomic = features.atomic_energy * self.energy_scale + self.reference_energies[
                species].to(dtype)
            energy = scatter_sum(atomic, graph.batch, graph.num_graphs)
            forces = None
            if compute_forces:
                (grad,) = torch.autograd.grad(energy.sum(), positions, create_graph=create_graph)
                forces = -grad
        params = self.head(features)
        return {"energy": energy, "forces": forces, "atomic_energies": atomic, "params": params}

    @property
    def calibrated(self) -> bool:
        return bool(self.variance_scale != 1.0)

    def _factor(self, form: str | None) -> float:
        if form not in (None, "raw", "cal"):
            raise ValueError(f"form must be 'raw' or 'cal', got {form!r}")
        if form == "cal" and not self.calibrated:
            raise RuntimeError("model is not calibrated: run model.calibrate(validation) first")
        return 1.0 if form == "raw" else float(self.variance_scale)

    def predictive(self, params, forces, form: str | None = None):
        """Per-atom predictive distribution (e2ip.predictive), or None without uncertainty.

        form: 'raw' (the head's own), 'cal' (with the fitted variance scale), None: 'cal' when
        calibrated."""
        pred = self.head.predictive(params, forces)
        factor = self._factor(form)
        return pred if pred is None or factor == 1.0 else pred.scaled(factor)

    def covariances(self, params, forces, form: str | None = None) -> dict[str, torch.Tensor]:
        """(N, 3, 3) `aleatoric`, `epistemic`, `predictive` covariances in (eV/Å)^2 (and the
        head's extras, e.g. `sigma0`), multiplied by the variance scale unless form='raw'."""
        covs = self.head.covariances(params, forces)
        factor = self._factor(form)
        return covs if factor == 1.0 else {k: v * factor for k, v in covs.items()}

    def calibrate(self, structures, batch_size: int = 32) -> float:
        """Fit the variance scale on held-out structures (with forces) by minimising the mean
        predictive NLL over one scalar (log-scale, bounded to [1e-3, 1e3]); store and return it.

        Why: the head's scale is learned against the errors of the weights being trained, while
        predictions use the (better) EMA/best weights; one scalar removes that mismatch, as the
        calibrated ensemble's fitted floor does for ensembles."""
        from scipy.optimize import minimize_scalar

        from .evaluation import collect

        if not self.has_uncertainty:
            raise ValueError("calibrate: this model has no uncertainty head")
        c = collect(self, structures, batch_size, {"form": "raw"})

        def mean_nll(log_f: float) -> float:
            return float(c.predictive.scaled(math.exp(log_f)).nll(c.forces_ref).mean())

        res = minimize_scalar(mean_nll, bounds=(-3 * math.log(10), 3 * math.log(10)),
                              method="bounded", options={"xatol": 1e-4})
        factor = math.exp(float(res.x))
        self.variance_scale.fill_(factor)
        return factor

    # -- convenience --------------------------------------------------------------------------
    def predict(self, inputs, batch_size: int = 32) -> dict[str, np.ndarray]:
        """ASE-free predictions for ase.Atoms, Structures (or lists of them), or an AtomicGraph.

        Returns numpy arrays: energy (B,) eV; forces (N, 3) eV/Å; and with an uncertainty head
        the (N, 3, 3) covariances `aleatoric`, `epistemic`, `predictive` in (eV/Å)^2, the scalars
        `u_epi`, `u_ale` (traces) and `sigma_epi` = sqrt(u_epi/3) (eV/Å); for the e2IP head also
        `sigma0` (N, 3, 3), the evidence `kappa`, `nu` (N,) and the predictive Student-t's
        `t_scale` (N, 3, 3) and `t_dof` (N,) (its location is `forces`).
        """
        structures = to_structures(inputs)
        check_elements(structures, self.elements)
        for s in structures:
            validate_structure(s, require_energy=False, require_forces=False)
        dtype = next(self.parameters()).dtype
        device = next(self.parameters()).device
        parts: list[dict[str, np.ndarray]] = []
        was_training = self.training
        self.eval()
        try:
            for k in range(0, len(structures), batch_size):
                graph = graph_from_structures(structures[k:k + batch_size], self.cutoff, dtype)
                parts.append(self.predict_graph(graph.to(device)))
        finally:
            self.train(was_training)
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    def predict_graph(self, graph: AtomicGraph) -> dict[str, np.ndarray]:
        out = self(graph, create_graph=False)
        result = {"energy": out["energy"], "forces": out["forces"]}
        covs = self.covariances(out["params"], out["forces"])
        if covs:
            result.update(aleatoric=covs["aleatoric"], epistemic=covs["epistemic"],
                          predictive=covs["predictive"])
            result["u_epi"] = covs["epistemic"].diagonal(dim1=-2, dim2=-1).sum(-1)
            result["u_ale"] = covs["aleatoric"].diagonal(dim1=-2, dim2=-1).sum(-1)
            result["sigma_epi"] = torch.sqrt(result["u_epi"] / 3)
            if "sigma0" in covs:
                result["sigma0"] = covs["sigma0"]
            for key in ("kappa", "nu"):
                if key in out["params"]:
                    result[key] = out["params"][key]
            pred = self.predictive(out["params"], out["forces"])
            if isinstance(pred, StudentT):  # the predictive Student-t: location = forces
                result["t_scale"], result["t_dof"] = pred.scale, pred.dof
        return {k: v.detach().cpu().numpy() for k, v in result.items()}

    def save(self, path: str | os.PathLike) -> None:
        """Write the model file atomically (temporary file + rename)."""
        payload = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "kind": self.kind,
                   "spec": self.spec(),
                   "dtype": str(next(self.parameters()).dtype).replace("torch.", ""),
                   "state_dict": {k: v.detach().cpu()
                                  for k, v in portable_state_dict(self.state_dict()).items()}}
        atomic_torch_save(payload, path)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


MODEL_KINDS: dict[str, Any] = {"model": PotentialModel}

_FX_CONSTANT = re.compile(r"(^|\.)_tensor_constant\d+$")


def portable_state_dict(state_dict: dict) -> dict:
    """Drop the `_tensor_constant<n>` entries that copy.deepcopy of a torch.fx-compiled module
    (e3nn's tensor products) adds to its state_dict (e.g. the EMA copy in training): a freshly
    built model has no such keys and rebuilds the constants itself."""
    return {k: v for k, v in state_dict.items() if not _FX_CONSTANT.search(k)}


def model_from_payload(payload: dict) -> nn.Module:
    from . import ensemble  # noqa: F401  (registers MODEL_KINDS["ensemble"]; lazy: no cycle)

    kind = payload.get("kind", "model")
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}")
    cls = MODEL_KINDS[kind]
    model = cls.from_spec(payload["spec"]) if hasattr(cls, "from_spec") else cls(**payload["spec"])
    dtype = getattr(torch, payload.get("dtype", "float32"))
    model.to(dtype)
    state = portable_state_dict(payload["state_dict"])
    for key in model.state_dict():  # files written before the variance calibration existed
        if key.endswith("variance_scale") and key not in state:
            state[key] = torch.ones((), dtype=torch.float64)
    model.load_state_dict(state)
    return model


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load a model file written by `e2ip train` (safe: weights_only, no pickled code)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: model file not found")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable e2ip model file ({exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: not an e2ip model file")
    model = model_from_payload(payload)
    return model.to(device).eval()


def to_structures(inputs) -> list[Structure]:
    """Normalise ase.Atoms / Structure / lists of them into a list of Structures."""
    if isinstance(inputs, Structure):
        return [inputs]
    try:
        from ase import Atoms
    except ImportError:  # pragma: no cover
        Atoms = ()  # type: ignore[assignment]
    if isinstance(inputs, Atoms):
        return [Structure.from_atoms(inputs)]
    out = []
    for k, item in enumerate(inputs):
        if isinstance(item, Structure):
            out.append(item)
        elif isinstance(item, Atoms):
            out.append(Structure.from_atoms(item, frame=k))
        else:
            raise TypeError(f"cannot predict on {type(item).__name__}; pass ase.Atoms or Structure")
    return out
