"""The one interface every model kind offers (a single potential, an ensemble, ...).

Code above the model layer (training, evaluation, compare, the calculator, MD, active learning)
uses only what :class:`Potential` declares and never asks which kind it holds:

- ``forward(graph)`` -> ``energy`` (B,) eV, ``forces`` (N, 3) eV/Å, ``atomic_energies`` (N,),
  ``params`` (whatever the kind needs for its uncertainty);
- ``covariances(params, forces, form)`` -> (N, 3, 3) ``aleatoric``, ``epistemic``,
  ``predictive`` in (eV/Å)^2 (empty without uncertainty);
- ``predictive(params, forces, form)`` -> the per-atom predictive distribution, or None;
- ``fit_training_statistics(structures)`` fits what the uncertainty needs from the training
  data once after training (a no-op for most kinds);
- ``with_feature_distance(train)``: a copy whose epistemic part knows how far each atom is from
  the training data (e2IP only);
- ``calibrate(structures)`` fits the kind's post-hoc calibration on held-out data; ``calibrated``,
  ``calibration()`` describe it; ``form`` is ``"raw"`` (the model's own uncertainty) or ``"cal"``
  (with the fitted calibration); None means ``"cal"`` when calibrated, else ``"raw"``;
- ``stop_threshold``: the largest per-atom ``forces_uncertainty`` (eV/Å, form "cal") that
  :data:`THRESHOLD_QUANTILE` of the calibration structures stay below, fitted by ``calibrate``
  and saved with the model: the default threshold of uncertainty-stopped MD and selection;
- ``predict(inputs)`` numpy predictions; ``save(path)``; ``label()`` a readable method name.

The model file (format, versions, loading any kind) is :mod:`e2ip.models.io`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from e2ip.data.graph import AtomicGraph, graph_from_structures
from e2ip.data.structures import to_structures
from e2ip.data.validate import check_elements, validate_structure
from e2ip.errors import ModelError
from e2ip.models.io import load_model, save_model
from e2ip.stats.predictive import Predictive

FORMS = ("raw", "cal")
#: the quantile of the calibration structures' largest per-atom forces_uncertainty stored as
#: `stop_threshold` (fixed before any run it is reported on: docs/uncertainty_in_use.md)
THRESHOLD_QUANTILE = 0.99


def trace(matrices: torch.Tensor) -> torch.Tensor:
    """Traces of a batch of matrices (..., 3, 3) -> (...)."""
    return matrices.diagonal(dim1=-2, dim2=-1).sum(-1)


def traces(covs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scalar summaries of the covariances: u_epi, u_ale (traces, (eV/Å)^2) and
    sigma_epi = sqrt(u_epi / 3) (eV/Å); all (N,)."""
    u_epi = trace(covs["epistemic"])
    u_ale = trace(covs["aleatoric"])
    return {"u_epi": u_epi, "u_ale": u_ale, "sigma_epi": sigma_from_trace(u_epi)}


def sigma_from_trace(u):
    """The paper's scalar force uncertainty sqrt(u / 3) (eV/Å) of a covariance trace u, e.g.
    u_epi = tr U_epi in (eV/Å)^2; a torch tensor or a numpy array of any shape."""
    return (u / 3) ** 0.5


class Potential(nn.Module, ABC):
    """Base of every model kind; see the module docstring for the interface."""

    kind: ClassVar[str] = ""
    #: the name of what `calibrate` fits: "variance_scale" (covariances x s), "variance_floor"
    #: or "nll_floor" (+ s^2 I; the paper's by coverage, or by NLL beside an epistemic scale)
    calibration_method: ClassVar[str] = ""

    elements: list[int]
    cutoff: float
    metadata: dict

    def __init__(self):
        super().__init__()
        # fitted by `calibrate` (NaN: none): see `stop_threshold`
        self.register_buffer("uncertainty_threshold",
                             torch.tensor(float("nan"), dtype=torch.float64))

    @property
    def stop_threshold(self) -> float | None:
        """The default threshold on the largest per-atom forces_uncertainty of a structure
        (eV/Å, form "cal"): the :data:`THRESHOLD_QUANTILE` quantile of it over the structures
        the model was calibrated on; None before :meth:`calibrate`."""
        value = float(self.uncertainty_threshold)
        return value if np.isfinite(value) else None

    # -- torch.compile ------------------------------------------------------------------------
    def enable_compile(self, **options) -> Potential:
        """Compile the energy-and-forces path with torch.compile (options go to torch.compile).
        A kind made of other potentials (an ensemble) compiles each of them. Returns self."""
        for module in self.modules():
            if module is not self and isinstance(module, Potential):
                module.enable_compile(**options)
        return self

    # -- to be provided by each kind -----------------------------------------------------------
    @property
    @abstractmethod
    def has_uncertainty(self) -> bool:
        raise NotImplementedError

    @property
    def has_epistemic(self) -> bool:
        """Whether the uncertainty has an epistemic part (a mean-variance model has only an
        aleatoric one); MD thresholds, the uncertainty bias and active learning use it."""
        return self.has_uncertainty

    @property
    @abstractmethod
    def calibrated(self) -> bool:
        raise NotImplementedError

    @abstractmethod
    def calibration_value(self) -> float:
        """The fitted calibration parameter (only meaningful when calibrated)."""
        raise NotImplementedError

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    @abstractmethod
    def from_spec(cls, spec: dict[str, Any]) -> Potential:
        raise NotImplementedError

    @abstractmethod
    def label(self) -> str:
        raise NotImplementedError

    @abstractmethod
    def covariances(self, params, forces, form: str | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @abstractmethod
    def predictive(self, params, forces, form: str | None = None) -> Predictive | None:
        raise NotImplementedError

    @abstractmethod
    def _fit_calibration(self, batches: list[tuple[AtomicGraph, dict]]) -> float:
        """Fit and store the calibration from raw forward outputs on held-out graphs (with
        reference forces); return the fitted value."""
        raise NotImplementedError

    def fit_training_statistics(self, structures, batch_size: int = 32) -> int | None:
        """Fit what the uncertainty needs from the training structures, once after training;
        returns the number of atoms used, or None when the kind needs nothing (default)."""
        return None

    def with_feature_distance(self, train_structures, batch_size: int = 32,
                              r_bins: int | None = None) -> Potential:
        """A copy whose epistemic part grows with the distance of each atom's features from
        `train_structures` (e2IP's `evidence: feature_distance`; `r_bins`: its calibration's
        bins of that distance, None: as the model has them); kinds without it refuse."""
        raise ModelError(f"the feature-distance evidence needs an e2IP head; {self.label()} has "
                         "none")

    def fine_tuning_members(self) -> list | None:
        """The single models a fine-tuning run starts from (each member of an ensemble), or
        None for a kind that cannot be fine-tuned (default)."""
        return None

    def energy_uncertainty(self, params) -> torch.Tensor | None:
        """Per-structure energy uncertainty (B,) in eV where the kind has one (default: none)."""
        return None

    def _extra_predictions(self, out: dict, covs: dict, form: str) -> dict[str, torch.Tensor]:
        """Kind-specific extra arrays for :meth:`predict` (default: none)."""
        return {}

    # -- shared --------------------------------------------------------------------------------
    def resolve_form(self, form: str | None) -> str:
        """'raw' or 'cal' for `form`; None: 'cal' when calibrated, else 'raw'."""
        if form is None:
            return "cal" if self.calibrated else "raw"
        if form not in FORMS:
            raise ModelError(f"form must be 'raw' or 'cal', got {form!r}")
        if form == "cal" and not self.calibrated:
            raise ModelError("form 'cal' asked for, but the model is not calibrated: run "
                             "`e2ip calibrate` (model.calibrate(validation)) first, or use 'raw'")
        return form

    def available_forms(self) -> list[str]:
        """The forms this model can report: ['raw', 'cal'] once calibrated, else ['raw']
        (empty without uncertainty)."""
        if not self.has_uncertainty:
            return []
        return ["raw", "cal"] if self.calibrated else ["raw"]

    def calibration(self) -> dict[str, Any] | None:
        """{"method": ..., "value": ...} of the fitted calibration, or None."""
        if not self.calibrated:
            return None
        out = {"method": self.calibration_method, "value": float(self.calibration_value())}
        if self.stop_threshold is not None:
            out["stop_threshold"] = self.stop_threshold
        return out

    def calibrate(self, structures, batch_size: int = 32) -> float:
        """Fit the post-hoc calibration on held-out structures with reference forces (the
        kind's own method, see `calibration_method`); store it and return the fitted value."""
        if not self.has_uncertainty:
            raise ModelError(f"cannot calibrate a {self.label()} model: it has no uncertainty head")
        was_training = self.training
        self.eval()
        try:
            batches = [(g, detached_outputs(self(g, create_graph=False)))
                       for g in self.graphs(structures, batch_size, require_forces=True)]
        finally:
            self.train(was_training)
        if not batches:
            raise ModelError("calibrate: no structures to calibrate on")
        value = self._fit_calibration(batches)
        if self.has_epistemic:
            self._fit_stop_threshold(batches)
        return value

    def _fit_stop_threshold(self, batches) -> None:
        """`uncertainty_threshold` from the calibrated per-structure maxima of the per-atom
        forces_uncertainty over the calibration batches."""
        maxima = []
        for g, out in batches:
            u = sigma_from_trace(trace(self.covariances(out["params"], out["forces"],
                                                        "cal")["epistemic"])).detach()
            top = torch.full((g.num_graphs,), -torch.inf, dtype=u.dtype, device=u.device)
            maxima.append(top.scatter_reduce(0, g.batch, u, "amax"))
        value = torch.quantile(torch.cat(maxima).double().cpu(), THRESHOLD_QUANTILE)
        self.uncertainty_threshold.fill_(float(value))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def graphs(self, inputs, batch_size: int = 32,
               require_forces: bool = False) -> Iterator[AtomicGraph]:
        """Batched graphs on the model's device from ase.Atoms / Structures (checked against the
        model's elements), or AtomicGraphs passed through."""
        if isinstance(inputs, AtomicGraph):
            yield inputs.to(self.device)
            return
        if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], AtomicGraph):
            for g in inputs:
                yield g.to(self.device)
            return
        structures = to_structures(inputs)
        check_elements(structures, self.elements)
        for s in structures:
            validate_structure(s, require_energy=False, require_forces=require_forces)
        for k in range(0, len(structures), batch_size):
            graph = graph_from_structures(structures[k:k + batch_size], self.cutoff, self.dtype)
            yield graph.to(self.device)

    def predict(self, inputs, batch_size: int = 32, form: str | None = None) -> dict[str, np.ndarray]:
        """Predictions for ase.Atoms, Structures (or lists of them), or AtomicGraphs.

        Returns numpy arrays: energy (B,) eV; forces (N, 3) eV/Å; with uncertainty the (N, 3, 3)
        covariances `aleatoric`, `epistemic`, `predictive` in (eV/Å)^2, the scalars `u_epi`,
        `u_ale` (traces) and `sigma_epi` = sqrt(u_epi/3) (eV/Å), plus kind-specific extras.
        form: 'raw' / 'cal' (None: 'cal' when calibrated)."""
        form = self.resolve_form(form) if self.has_uncertainty else None
        was_training = self.training
        self.eval()
        try:
            parts = [self.predict_graph(g, form) for g in self.graphs(inputs, batch_size)]
        finally:
            self.train(was_training)
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    def predict_graph(self, graph: AtomicGraph, form: str | None = None) -> dict[str, np.ndarray]:
        out = self(graph, create_graph=False)
        result = {"energy": out["energy"], "forces": out["forces"]}
        if self.has_uncertainty:
            form = self.resolve_form(form)
            covs = self.covariances(out["params"], out["forces"], form)
            result.update({k: covs[k] for k in ("aleatoric", "epistemic", "predictive")})
            result.update(traces(covs))
            result.update(self._extra_predictions(out, covs, form))
        return {k: v.detach().cpu().numpy() for k, v in result.items()}

    def save(self, path: str | os.PathLike) -> None:
        """Write the model file atomically (:func:`e2ip.models.io.save_model`)."""
        save_model(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Potential:
        """Load a model file (or a run folder's model.pt) that must hold this kind."""
        return load_model(path, device, kind=cls.kind)


def detached_outputs(out: dict) -> dict:
    """A forward's outputs (and its params) detached from the autograd graph."""
    params = {k: v.detach() for k, v in out["params"].items()}
    return {**{k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in out.items()},
            "params": params}
