"""Model files: the registry of model kinds and :func:`load_model` (any kind).

The registry lists the kinds explicitly (no import for side effects): the file's ``kind`` entry
picks the class, every class rebuilds itself from the file's ``spec`` and ``state_dict``.
"""

from __future__ import annotations

import os

import torch

from .ensemble import Ensemble
from .errors import ModelError, short_repr
from .model import PotentialModel
from .potential import Potential, read_model_payload, resolve_device

MODEL_KINDS: dict[str, type[Potential]] = {cls.kind: cls for cls in (PotentialModel, Ensemble)}


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> Potential:
    """Load a model file written by `e2ip train` (any kind; safe: weights_only, no pickled code).

    Problems (missing, truncated or corrupted file, a pickle payload, a newer format version, a
    CUDA device this machine lacks) raise :class:`~e2ip.errors.ModelError` with one line."""
    payload = read_model_payload(path, device)
    kind = payload.get("kind", "model")
    if not isinstance(kind, str) or kind not in MODEL_KINDS:
        raise ModelError(f"{path}: unknown model kind {short_repr(kind)} "
                         f"(known: {', '.join(MODEL_KINDS)})")
    model = MODEL_KINDS[kind].from_payload(payload, str(path))
    return model.to(resolve_device(device)).eval()
