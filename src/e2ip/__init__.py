"""e2ip: equivariant evidential deep learning for interatomic potentials."""

from e2ip._version import __version__
from e2ip.errors import ConfigError, DataError, E2IPError, ModelError
from e2ip.integrations.ase_calculator import E2IPCalculator
from e2ip.models.bias import UncertaintyBias
from e2ip.models.ensemble import Ensemble
from e2ip.models.io import load_model
from e2ip.models.potential import Potential
from e2ip.models.single import PotentialModel

__all__ = ["ConfigError", "DataError", "E2IPCalculator", "E2IPError", "Ensemble", "ModelError",
           "Potential", "PotentialModel", "UncertaintyBias", "__version__", "load_model"]
