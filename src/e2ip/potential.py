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
- ``predict(inputs)`` numpy predictions; ``save(path)``; ``label()`` a readable method name.

The model file is a plain dictionary of tensors and built-in types, loaded with
``torch.load(weights_only=True)``: no pickled code runs when a model is loaded.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .data.graph import AtomicGraph, graph_from_structures
from .data.readers import check_elements, validate_structure
from .data.structures import Structure
from .errors import ModelError, first_line, short_repr, shorten
from .files import atomic_torch_save
from .predictive import Predictive

MODEL_FORMAT = "e2ip-model"
MODEL_VERSION = 1
FORMS = ("raw", "cal")

_FX_CONSTANT = re.compile(r"(^|\.)_tensor_constant\d+$")


def portable_state_dict(state_dict: dict) -> dict:
    """Drop the `_tensor_constant<n>` entries that copy.deepcopy of a torch.fx-compiled module
    (e3nn's tensor products) adds to its state_dict (e.g. the weight-averaged copy in training):
    a freshly built model has no such keys and rebuilds the constants itself."""
    return {k: v for k, v in state_dict.items() if not _FX_CONSTANT.search(k)}


def is_fx_constant(key: str) -> bool:
    return bool(_FX_CONSTANT.search(key))


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch.device, or a one-line ModelError for a name torch does not know or a CUDA device
    this machine does not have."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(f"unknown device {device!r} ({str(exc).splitlines()[0]})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {str(device)!r} requested, but CUDA is not available on this "
                         "machine (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelError(f"device {str(device)!r} requested, but this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


def _check_archive(path: Path) -> None:
    """A ModelError if the model file is a zip archive whose checksums do not match (bytes
    changed on disk or in transfer: torch.load itself never checks them). Files that are not
    zip archives are left to torch.load to refuse."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile:
        return
    except Exception as exc:  # noqa: BLE001 - a damaged archive can fail in many ways
        raise ModelError(f"{path}: not a readable e2ip model file (corrupted or truncated? "
                         f"{first_line(exc, 120)})") from None
    if bad is not None:
        raise ModelError(f"{path}: corrupted e2ip model file (checksum mismatch in {bad})")


def read_model_payload(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    """The dictionary stored in a model file, or a one-line ModelError saying why not."""
    path = Path(path)
    dev = resolve_device(device)
    if not path.exists():
        raise ModelError(f"{path}: model file not found")
    if path.is_dir():
        inside = path / "model.pt"
        hint = f" (did you mean {inside}?)" if inside.is_file() else ""
        raise ModelError(f"{path}: is a directory, expected a model file{hint}")
    _check_archive(path)
    try:
        payload = torch.load(path, map_location=dev, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc) or "global" in str(exc):
            raise ModelError(f"{path}: refused: the file holds pickled Python objects, not only "
                             "tensors (loading it could run code); not an e2ip model file") from None
        detail = [line.strip() for line in str(exc).splitlines() if "Unsupported" in line]
        raise ModelError(f"{path}: not a readable e2ip model file (corrupted? "
                         f"{(detail or [first_line(exc, 120)])[0][:120]})") from None
    except Exception as exc:  # noqa: BLE001 - torch.load on damaged bytes can fail in many ways
        first = first_line(exc, 1000).split(". ")[0][:120]
        raise ModelError(f"{path}: not a readable e2ip model file (corrupted or truncated? "
                         f"{first})") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ModelError(f"{path}: not an e2ip model file")
    version = payload.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelError(f"{path}: not a valid e2ip model file (format version "
                         f"{short_repr(version)})")
    if version > MODEL_VERSION:
        raise ModelError(f"{path}: model file format version {version!r} is newer than this e2ip "
                         f"reads (version {MODEL_VERSION}); upgrade e2ip")
    return payload


def to_structures(inputs) -> list[Structure]:
    """Normalise ase.Atoms / Structure / lists of them into a list of Structures."""
    if isinstance(inputs, Structure):
        return [inputs]
    from ase import Atoms

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


class Potential(nn.Module):
    """Base of every model kind; see the module docstring for the interface."""

    kind: ClassVar[str] = ""
    #: what `calibrate` fits: "variance_scale" (covariances x s) or "variance_floor" (+ s^2 I)
    calibration_method: ClassVar[str] = ""

    elements: list[int]
    cutoff: float
    metadata: dict

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
    def has_uncertainty(self) -> bool:
        raise NotImplementedError

    @property
    def has_epistemic(self) -> bool:
        """Whether the uncertainty has an epistemic part (a mean-variance model has only an
        aleatoric one); MD thresholds, the uncertainty bias and active learning use it."""
        return self.has_uncertainty

    @property
    def calibrated(self) -> bool:
        raise NotImplementedError

    def calibration_value(self) -> float:
        """The fitted calibration parameter (only meaningful when calibrated)."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Potential:
        raise NotImplementedError

    def label(self) -> str:
        raise NotImplementedError

    def covariances(self, params, forces, form: str | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predictive(self, params, forces, form: str | None = None) -> Predictive | None:
        raise NotImplementedError

    def _fit_calibration(self, batches: list[tuple[AtomicGraph, dict]]) -> float:
        """Fit and store the calibration from raw forward outputs on held-out graphs (with
        reference forces); return the fitted value."""
        raise NotImplementedError

    def fit_training_statistics(self, structures, batch_size: int = 32) -> int | None:
        """Fit what the uncertainty needs from the training structures, once after training;
        returns the number of atoms used, or None when the kind needs nothing (default)."""
        return None

    def with_feature_distance(self, train_structures, batch_size: int = 32) -> Potential:
        """A copy whose epistemic part grows with the distance of each atom's features from
        `train_structures` (e2IP's `evidence: feature_distance`); kinds without it refuse."""
        raise ModelError(f"the feature-distance evidence needs an e2IP head; {self.label()} has "
                         "none")

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
        return {"method": self.calibration_method, "value": float(self.calibration_value())}

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
        return self._fit_calibration(batches)

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
        """Write the model file atomically (temporary file + rename)."""
        payload = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "kind": self.kind,
                   "spec": self.spec(), "dtype": str(self.dtype).replace("torch.", ""),
                   "state_dict": {k: v.detach().cpu()
                                  for k, v in portable_state_dict(self.state_dict()).items()}}
        atomic_torch_save(payload, path)

    @classmethod
    def from_payload(cls, payload: dict, source: str = "model file") -> Potential:
        """Rebuild a model of this kind from a model file's dictionary."""
        try:
            spec, state, dtype = payload["spec"], payload["state_dict"], payload.get("dtype",
                                                                                    "float32")
            if not isinstance(spec, dict):
                raise TypeError(f"'spec' must be a dictionary, got {type(spec).__name__}")
            if not isinstance(state, dict) or not all(
                    isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
                raise TypeError("'state_dict' must map names to tensors")
            if dtype not in ("float32", "float64"):
                raise TypeError(f"'dtype' must be float32 or float64, got {short_repr(dtype)}")
            model = cls.from_spec(spec)
            model.to(getattr(torch, dtype))
            state = portable_state_dict(state)
            model._upgrade_state(state)
            model.load_state_dict(state)
        except Exception as exc:  # noqa: BLE001 - any inconsistency of a model file's contents
            raise ModelError(f"{source}: inconsistent e2ip model file "
                             f"({_state_error(exc)})") from None
        return model

    def _upgrade_state(self, state: dict) -> None:
        """Fill in entries that files written by earlier versions lack (in place)."""

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Potential:
        """Load a model file that must hold this kind."""
        payload = read_model_payload(path, device)
        kind = payload.get("kind", "model")
        if kind != cls.kind:
            raise ModelError(f"{path}: holds a model of kind {short_repr(kind)}, expected "
                             f"{cls.kind!r}")
        return cls.from_payload(payload, str(path)).to(resolve_device(device)).eval()


def _state_error(exc: BaseException) -> str:
    """A one-line summary of why a model could not be rebuilt (load_state_dict's message spans
    several lines: the missing, unexpected or mis-shaped keys are on the second)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return shorten(" ".join(lines[:2]) if lines[0].startswith("Error(s) in loading")
                   else lines[0], 200)


def detached_outputs(out: dict) -> dict:
    """A forward's outputs (and its params) detached from the autograd graph."""
    params = {k: v.detach() for k, v in out["params"].items()}
    return {**{k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in out.items()},
            "params": params}

