"""Equivariant backbones behind one interface (:mod:`e2ip.backbones.base`)."""

from e2ip.backbones.alphanet import AlphaNetBackbone
from e2ip.backbones.base import Backbone, BackboneOutput
from e2ip.backbones.painn import PaiNN
from e2ip.backbones.tensor_product import TensorProductBackbone

BACKBONES: dict[str, type[Backbone]] = {
    PaiNN.name: PaiNN,
    TensorProductBackbone.name: TensorProductBackbone,
    AlphaNetBackbone.name: AlphaNetBackbone,
}


def register_backbone(cls: type[Backbone]) -> type[Backbone]:
    """Class decorator: make a backbone available as `model.backbone: <cls.name>`."""
    BACKBONES[cls.name] = cls
    return cls


def get_backbone(name: str) -> type[Backbone]:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]


__all__ = ["AlphaNetBackbone", "BACKBONES", "Backbone", "BackboneOutput", "PaiNN",
           "TensorProductBackbone", "get_backbone", "register_backbone"]
