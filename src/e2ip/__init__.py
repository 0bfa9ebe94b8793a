"""e2ip: equivariant evidential deep learning for interatomic potentials."""

from .model import PotentialModel, load_model

__version__ = "0.1.0"
__all__ = ["PotentialModel", "__version__", "load_model"]
