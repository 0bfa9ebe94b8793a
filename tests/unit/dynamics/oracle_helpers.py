"""A user-defined oracle for the active-learning tests (imported by name, as users would)."""

from ase.calculators.calculator import Calculator


class _Broken(Calculator):
    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        raise RuntimeError("SCF did not converge")


def broken():
    return _Broken()
