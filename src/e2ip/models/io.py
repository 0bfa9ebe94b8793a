"""The model file, in one place: its format and version, :func:`save_model` and :func:`load_model`
for every model kind, the registry of kinds, run folder -> file, and the numbered upgrades that
bring files written by earlier releases to the current version.

A model file is a plain dictionary of tensors and built-in types, loaded with
``torch.load(weights_only=True)`` (no pickled code runs)::

    {"format": "e2ip-model", "version": MODEL_VERSION, "kind": "model" | "ensemble" | ...,
     "spec": {...}, "dtype": "float32" | "float64", "state_dict": {name: tensor}}

``spec`` is what the kind's ``from_spec`` rebuilds the module from; an ensemble's spec holds one
single-model spec per member (``spec["members"]``) and its state their entries under
``members.<k>.``.

Versions (releases before 0.2 wrote "version 1" whatever they held; every upgrade only fills in
what is missing, so such files load as what they are):

1. the first format;
2. adds the post-hoc calibration buffers ``variance_scale`` and ``epistemic_scale`` (1 = none);
3. adds the e2IP head's ``evidence`` option, whose default became ``feature_distance``: files
   without it had the paper's learned evidence (``learned``);
4. the feature distance from centred features with an intercept, optionally per element (head
   options ``feature_centred``, ``feature_per_element``; buffers ``center`` (G, F),
   ``whitening`` (G, F, F), ``offset`` (G,)): files without them had one uncentred distance;
   the ensemble's calibration by NLL, ``N(mu, t U_epi + s^2 I)`` (spec ``calibration_form``
   ``nll``; buffer ``epistemic_scale`` t): files without them had the paper's floor (plain
   ensembles, ``paper_floor``) or one scale on both parts (heteroskedastic: t = s);
   the ``uncertainty_threshold`` buffer of every model (NaN: none fitted);
5. the e2IP head's ``calibration_r_bins`` option (with n >= 2 the buffers ``r_bin_edges``
   (n-1,) and ``r_bin_factors`` (n,), variance factors per bin of the feature distance):
   files without it had none (0).

Changing what a model writes means: bump ``MODEL_VERSION``, add the upgrade from the previous
version to ``UPGRADES``, commit a file of the new version under ``tests/data/model_files/`` and
refresh the format fingerprint (``python tests/data/model_files/make_files.py``); a test fails
until then.

This module imports no model class: kinds register themselves with :func:`register_kind`
(``e2ip.models`` imports every built-in kind), so the model layer's modules import it, never
the other way round.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from e2ip.errors import ModelError, first_line, short_repr, shorten
from e2ip.files import atomic_torch_save
from e2ip.models.state import portable_state_dict
from e2ip.registry import Registry

MODEL_FORMAT = "e2ip-model"
#: the version written now; see the module docstring for what each version added
MODEL_VERSION = 5
#: the model file inside a run folder (`e2ip train --out FOLDER` writes FOLDER/model.pt)
MODEL_FILE_NAME = "model.pt"
DTYPES = ("float32", "float64")

#: model kinds by their file's ``kind`` entry
MODEL_KINDS = Registry("model kind", key="kind")
#: class decorator: a model kind that :func:`load_model` rebuilds from files whose ``kind`` entry
#: is ``cls.kind`` (the class offers ``from_spec(spec)``)
register_kind = MODEL_KINDS.register


def model_file(path: str | os.PathLike) -> Path:
    """The model file `path` names: the file itself, or a run folder's ``model.pt``; a one-line
    ModelError when there is none."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: model file not found")
    if path.is_dir():
        inside = path / MODEL_FILE_NAME
        if not inside.is_file():
            raise ModelError(f"{path}: is a directory without a {MODEL_FILE_NAME}, expected a "
                             "model file or a run folder")
        return inside
    return path


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
    """The dictionary stored in a model file (or a run folder's ``model.pt``) as the current
    format version has it (older files upgraded, :func:`upgrade_payload`), or a one-line
    ModelError saying why not."""
    path = model_file(path)
    dev = resolve_device(device)
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
    return upgrade_payload(payload, str(path))


def _state_error(exc: BaseException) -> str:
    """A one-line summary of why a model could not be rebuilt (load_state_dict's message spans
    several lines: the missing, unexpected or mis-shaped keys are on the second)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return shorten(" ".join(lines[:2]) if lines[0].startswith("Error(s) in loading")
                   else lines[0], 200)


def _single_models(payload: dict) -> Iterator[tuple[dict, str]]:
    """(spec, state-dict prefix) of every single model in a payload: the model itself, or each
    member of an ensemble."""
    spec = payload.get("spec")
    if not isinstance(spec, dict):
        return
    members = spec.get("members")
    if isinstance(members, list):
        for k, member in enumerate(members):
            if isinstance(member, dict):
                yield member, f"members.{k}."
    else:
        yield spec, ""


def _upgrade_1_to_2(payload: dict) -> None:
    """Version 2 added the post-hoc calibration buffers (1 = uncalibrated)."""
    state = payload.get("state_dict")
    if not isinstance(state, dict):
        return
    for _, prefix in _single_models(payload):
        for key in ("variance_scale", "epistemic_scale"):
            state.setdefault(prefix + key, torch.ones((), dtype=torch.float64))


def _upgrade_2_to_3(payload: dict) -> None:
    """Version 3 added the e2IP head's ``evidence`` option (default ``feature_distance``); files
    without it had the paper's learned evidence."""
    for spec, _ in _single_models(payload):
        if spec.get("head", "e2ip") == "e2ip":
            options = spec.get("head_options")
            spec["head_options"] = {"evidence": "learned",
                                    **(options if isinstance(options, dict) else {})}


def _upgrade_3_to_4(payload: dict) -> None:
    """Version 4: the centred (optionally per-element) feature distance, the ensemble's NLL
    calibration and the stored uncertainty threshold (see the module docstring)."""
    state = payload.get("state_dict")
    if not isinstance(state, dict):
        return
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    for spec, prefix in _single_models(payload):
        options = spec.get("head_options")
        if spec.get("head", "e2ip") == "e2ip" and isinstance(options, dict):
            spec["head_options"] = {"feature_centred": False, "feature_per_element": False,
                                    **options}
        whitening = state.get(prefix + "head.feature_distance.whitening")
        if isinstance(whitening, torch.Tensor) and whitening.dim() == 2:
            f = whitening.shape[0]
            state[prefix + "head.feature_distance.whitening"] = whitening[None]
            state.setdefault(prefix + "head.feature_distance.center",
                             torch.zeros(1, f, dtype=whitening.dtype))
            state.setdefault(prefix + "head.feature_distance.offset",
                             torch.zeros(1, dtype=whitening.dtype))
        state.setdefault(prefix + "uncertainty_threshold", nan.clone())
    spec = payload.get("spec")
    if payload.get("kind") == "ensemble" and isinstance(spec, dict):
        members = spec.get("members") or [{}]
        heteroskedastic = isinstance(members[0], dict) and members[0].get("head") == "mve"
        variance = state.get("calibration_variance", nan)
        spec.setdefault("calibration_form", "nll" if heteroskedastic else "paper_floor")
        state.setdefault("epistemic_scale", variance.clone() if heteroskedastic
                         else torch.ones((), dtype=torch.float64))
        state.setdefault("uncertainty_threshold", nan.clone())


def _upgrade_4_to_5(payload: dict) -> None:
    """Version 5: the e2IP head's calibration_r_bins (files without it had no bins: 0)."""
    for spec, _ in _single_models(payload):
        options = spec.get("head_options")
        if spec.get("head", "e2ip") == "e2ip" and isinstance(options, dict):
            options.setdefault("calibration_r_bins", 0)


#: UPGRADES[v] brings a payload of version v to version v + 1 (in place)
UPGRADES: dict[int, Callable[[dict], None]] = {1: _upgrade_1_to_2, 2: _upgrade_2_to_3,
                                               3: _upgrade_3_to_4, 4: _upgrade_4_to_5}


def upgrade_payload(payload: dict, source: str = "model file") -> dict:
    """`payload` brought to :data:`MODEL_VERSION` by applying the upgrades in turn (in place)."""
    version = payload["version"]
    while version < MODEL_VERSION:
        if version not in UPGRADES:
            raise ModelError(f"{source}: no upgrade from model file format version {version}")
        UPGRADES[version](payload)
        version += 1
    payload["version"] = version
    return payload


def model_payload(model: nn.Module) -> dict:
    """The dictionary a model file holds for `model` (any registered kind)."""
    dtype = next(model.parameters()).dtype
    return {"format": MODEL_FORMAT, "version": MODEL_VERSION, "kind": model.kind,
            "spec": model.spec(), "dtype": str(dtype).replace("torch.", ""),
            "state_dict": {k: v.detach().cpu()
                           for k, v in portable_state_dict(model.state_dict()).items()}}


def save_model(model: nn.Module, path: str | os.PathLike) -> None:
    """Write `model`'s file atomically (temporary file + rename); an existing folder gets its
    ``model.pt``, as :func:`load_model` reads it."""
    path = Path(path)
    atomic_torch_save(model_payload(model), path / MODEL_FILE_NAME if path.is_dir() else path)


def model_from_payload(payload: dict, source: str = "model file") -> nn.Module:
    """Rebuild the model a (current-version) payload describes, or a one-line ModelError."""
    kind = payload.get("kind", "model")
    if not isinstance(kind, str) or kind not in MODEL_KINDS:
        raise ModelError(f"{source}: unknown model kind {short_repr(kind)} "
                         f"(known: {', '.join(MODEL_KINDS)})")
    try:
        spec, state = payload["spec"], payload["state_dict"]
        dtype = payload.get("dtype", "float32")
        if not isinstance(spec, dict):
            raise TypeError(f"'spec' must be a dictionary, got {type(spec).__name__}")
        if not isinstance(state, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise TypeError("'state_dict' must map names to tensors")
        if dtype not in DTYPES:
            raise TypeError(f"'dtype' must be float32 or float64, got {short_repr(dtype)}")
        model = MODEL_KINDS[kind].from_spec(spec)
        model.to(getattr(torch, dtype))
        model.load_state_dict(portable_state_dict(state))
    except Exception as exc:  # noqa: BLE001 - any inconsistency of a model file's contents
        raise ModelError(f"{source}: inconsistent e2ip model file "
                         f"({_state_error(exc)})") from None
    return model


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               kind: str | None = None) -> nn.Module:
    """Load a model file written by `e2ip train` (or a run folder's ``model.pt``), any kind,
    in eval mode on `device`; safe: weights_only, no pickled code. kind: the kind it must hold.

    Problems (missing, truncated or corrupted file, a pickle payload, a newer format version, a
    CUDA device this machine lacks) raise :class:`~e2ip.errors.ModelError` with one line."""
    payload = read_model_payload(path, device)
    found = payload.get("kind", "model")
    if kind is not None and found != kind:
        raise ModelError(f"{path}: holds a model of kind {short_repr(found)}, expected {kind!r}")
    model = model_from_payload(payload, str(path))
    return model.to(resolve_device(device)).eval()
