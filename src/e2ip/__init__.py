"""e2ip: equivariant evidential deep learning for interatomic potentials."""

from .bias import UncertaintyBias
from .calculator import E2IPCalculator
from .ensemble import Ensemble
from .errors import ConfigError, DataError, E2IPError, ModelError
from .model import PotentialModel
from .model_io import load_model
from .potential import Potential

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "E2IPCalculator", "E2IPError", "Ensemble", "ModelError",
           "Potential", "PotentialModel", "UncertaintyBias", "__version__", "load_model"]
