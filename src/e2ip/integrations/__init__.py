"""e2ip inside other codes: the ASE calculator (every model kind, with force covariances)."""

from e2ip.integrations.ase_calculator import E2IPCalculator

__all__ = ["E2IPCalculator"]
