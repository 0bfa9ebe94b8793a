"""Uncertainty heads behind one interface (:mod:`e2ip.heads.base`)."""

from e2ip.heads.base import FeatureDims, Head, NoHead
from e2ip.heads.cholesky import CholeskyHead
from e2ip.heads.eip import EIPHead
from e2ip.heads.evidential import E2IPHead
from e2ip.heads.mve import MVEHead
from e2ip.registry import Registry

#: heads by name (`model.head: <name>`)
HEADS = Registry("head")
for _cls in (NoHead, E2IPHead, EIPHead, CholeskyHead, MVEHead):
    HEADS.register(_cls)

#: class decorator: make a head available as `model.head: <cls.name>`
register_head = HEADS.register
get_head = HEADS.lookup

__all__ = ["CholeskyHead", "E2IPHead", "EIPHead", "FeatureDims", "HEADS", "Head", "MVEHead", "NoHead",
           "get_head", "register_head"]
