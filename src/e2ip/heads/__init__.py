"""Uncertainty heads behind one interface (:mod:`e2ip.heads.base`)."""

from e2ip.heads.base import FeatureDims, Head, NoHead
from e2ip.heads.cholesky import CholeskyHead
from e2ip.heads.eip import EIPHead
from e2ip.heads.evidential import E2IPHead
from e2ip.heads.mve import MVEHead

HEADS: dict[str, type[Head]] = {
    cls.name: cls for cls in (NoHead, E2IPHead, EIPHead, CholeskyHead, MVEHead)
}


def register_head(cls: type[Head]) -> type[Head]:
    """Class decorator: make a head available as `model.head: <cls.name>`."""
    HEADS[cls.name] = cls
    return cls


def get_head(name: str) -> type[Head]:
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; available: {', '.join(sorted(HEADS))}")
    return HEADS[name]


__all__ = ["CholeskyHead", "E2IPHead", "EIPHead", "FeatureDims", "HEADS", "Head", "MVEHead", "NoHead",
           "get_head", "register_head"]
