"""Uncertainty heads behind one interface (:mod:`e2ip.heads.base`)."""

from .base import FeatureDims, Head, NoHead
from .cholesky import CholeskyHead
from .eip import EIPHead
from .evidential import E2IPHead
from .mve import MVEHead

HEADS: dict[str, type[Head]] = {
    cls.name: cls for cls in (NoHead, E2IPHead, EIPHead, CholeskyHead, MVEHead)
}


def get_head(name: str) -> type[Head]:
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; available: {', '.join(sorted(HEADS))}")
    return HEADS[name]


__all__ = ["CholeskyHead", "E2IPHead", "EIPHead", "FeatureDims", "HEADS", "Head", "MVEHead", "NoHead",
           "get_head"]
