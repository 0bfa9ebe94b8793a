"""e2ip: equivariant evidential deep learning for interatomic potentials."""

from .ensemble import Ensemble
from .errors import ConfigError, DataError, E2IPError, ModelError
from .model import PotentialModel
from .model_io import load_model
from .potential import Potential

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "E2IPError", "Ensemble", "ModelError", "Potential",
           "PotentialModel", "__version__", "load_model"]
