"""Test helpers shipped with e2ip for code built on it: the reusable model test suite
(:mod:`e2ip.testing.model_suite`) that a new backbone, head or model kind inherits."""

from e2ip.testing.model_suite import PotentialTests, random_molecule, random_periodic, small_model

__all__ = ["PotentialTests", "random_molecule", "random_periodic", "small_model"]
