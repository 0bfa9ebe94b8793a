"""Equivariant backbones behind one interface (:mod:`e2ip.backbones.base`)."""

from e2ip.backbones.alphanet import AlphaNetBackbone
from e2ip.backbones.base import Backbone, BackboneOutput
from e2ip.backbones.painn import PaiNN
from e2ip.backbones.tensor_product import TensorProductBackbone
from e2ip.registry import Registry

#: backbones by name (`model.backbone: <name>`)
BACKBONES = Registry("backbone")
for _cls in (PaiNN, TensorProductBackbone, AlphaNetBackbone):
    BACKBONES.register(_cls)

#: class decorator: make a backbone available as `model.backbone: <cls.name>`
register_backbone = BACKBONES.register
get_backbone = BACKBONES.lookup

__all__ = ["AlphaNetBackbone", "BACKBONES", "Backbone", "BackboneOutput", "PaiNN",
           "TensorProductBackbone", "get_backbone", "register_backbone"]
