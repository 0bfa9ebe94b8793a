"""Models: the :class:`Potential` interface every kind offers, the kinds (a single potential, an
ensemble), the uncertainty bias, and the model file (:mod:`e2ip.models.io`)."""

from e2ip.models.bias import UncertaintyBias
from e2ip.models.ensemble import Ensemble
from e2ip.models.io import MODEL_KINDS, load_model, register_kind, save_model
from e2ip.models.potential import Potential
from e2ip.models.single import PotentialModel

__all__ = ["MODEL_KINDS", "Ensemble", "Potential", "PotentialModel", "UncertaintyBias",
           "load_model", "register_kind", "save_model"]
