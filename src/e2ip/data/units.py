"""Units: everything inside e2ip is eV, Å and eV/Å; these tables convert at the edges."""

from __future__ import annotations

from e2ip.errors import ConfigError

#: multiply a value in this unit by the factor to get eV
ENERGY_UNITS: dict[str, float] = {
    "ev": 1.0,
    "mev": 1e-3,
    "kcal/mol": 0.04336410390059322,  # 1 kcal/mol in eV (ASE, CODATA 2014)
    "kj/mol": 0.010364269574711572,
    "hartree": 27.211386245988,
    "ha": 27.211386245988,
    "rydberg": 13.605693122994,
    "ry": 13.605693122994,
}
#: multiply a value in this unit by the factor to get Å
LENGTH_UNITS: dict[str, float] = {
    "å": 1.0,
    "a": 1.0,
    "ang": 1.0,
    "angstrom": 1.0,
    "bohr": 0.529177210903,
    "nm": 10.0,
}


def _norm(name: str) -> str:
    return name.strip().lower().replace(" ", "").replace("ångström", "angstrom")


def energy_factor(unit: str) -> float:
    """Factor that converts energies in `unit` to eV."""
    key = _norm(unit)
    if key not in ENERGY_UNITS:
        raise ConfigError(
            f"unknown energy unit {unit!r}; known: eV, meV, kcal/mol, kJ/mol, Hartree, Rydberg"
        )
    return ENERGY_UNITS[key]


def length_factor(unit: str) -> float:
    """Factor that converts lengths in `unit` to Å."""
    key = _norm(unit)
    if key not in LENGTH_UNITS:
        raise ConfigError(f"unknown length unit {unit!r}; known: Å (Ang, angstrom), Bohr, nm")
    return LENGTH_UNITS[key]


def force_factor(energy_unit: str, length_unit: str) -> float:
    """Factor that converts forces in `energy_unit/length_unit` to eV/Å."""
    return energy_factor(energy_unit) / length_factor(length_unit)

