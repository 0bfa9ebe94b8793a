"""Reference calculators ("oracles") that label structures for active learning.

An oracle is named by a string so that labelling can run in other processes or on other machines
(any ``concurrent.futures.Executor``: the local process pool, Dask's or Parsl's executors):

- ``xtb``: GFN2-xTB through tblite (``pip install 'e2ip[xtb]'``); options go to
  ``tblite.ase.TBLite`` (e.g. ``method: GFN1-xTB``, ``electronic_temperature``);
- ``emt``: ASE's EMT (fast, for tests and demonstrations only);
- ``module:function``: any importable function returning an ASE calculator, called with the
  options as keyword arguments (e.g. a DFT code's ASE calculator).
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import numpy as np

from e2ip.errors import ConfigError

BUILT_IN = ("xtb", "emt")


def make_oracle(name: str, options: dict[str, Any] | None = None):
    """An ASE calculator for the oracle `name` (see the module docstring)."""
    options = dict(options or {})
    if name == "xtb":
        try:
            from tblite.ase import TBLite
        except ImportError:
            raise ConfigError("oracle 'xtb' needs tblite: pip install 'e2ip[xtb]' "
                              "(or pip install tblite)") from None
        options.setdefault("method", "GFN2-xTB")
        options.setdefault("verbosity", 0)
        return TBLite(**options)
    if name == "emt":
        from ase.calculators.emt import EMT

        return EMT(**options)
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"oracle {name!r}: cannot import ({exc})") from None
        return factory(**options)
    raise ConfigError(f"unknown oracle {name!r}; use one of {', '.join(BUILT_IN)} or "
                      "module:function")


def check_oracle(name: str, options: dict[str, Any] | None = None) -> None:
    """Raise ConfigError now (not in a worker later) if the oracle cannot be built."""
    try:
        make_oracle(name, options)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a user's factory or options may fail in any way
        raise ConfigError(f"oracle {name!r} with options {options or {}}: cannot be built "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                          ) from None


def label(task: tuple[str, dict, Any]) -> tuple[float, np.ndarray] | str:
    """Label one structure: task = (oracle name, options, ase.Atoms). Returns (energy eV, forces
    (N, 3) eV/Å), or a one-line reason string when the reference fails (e.g. no SCF
    convergence), so one bad structure does not stop the loop."""
    name, options, atoms = task
    atoms = atoms.copy()
    try:
        atoms.calc = make_oracle(name, options)
        energy = float(atoms.get_potential_energy())
        forces = np.asarray(atoms.get_forces(), dtype=np.float64)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of an external code is reported, not raised
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc) else ''}"
    if not math.isfinite(energy) or not np.isfinite(forces).all():
        return "non-finite energy or forces"
    return energy, forces
