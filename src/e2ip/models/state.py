"""State-dict helpers shared by the model kinds and training."""

from __future__ import annotations

import re

_FX_CONSTANT = re.compile(r"(^|\.)_tensor_constant\d+$")


def portable_state_dict(state_dict: dict) -> dict:
    """Drop the `_tensor_constant<n>` entries that copy.deepcopy of a torch.fx-compiled module
    (e3nn's tensor products) adds to its state_dict (e.g. the weight-averaged copy in training):
    a freshly built model has no such keys and rebuilds the constants itself."""
    return {k: v for k, v in state_dict.items() if not _FX_CONSTANT.search(k)}


def is_fx_constant(key: str) -> bool:
    return bool(_FX_CONSTANT.search(key))
