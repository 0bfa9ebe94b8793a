"""rMD17 (``nuclear_charges, coords, energies, forces``) and sGDML/MD17/MD22 (``z, R, E, F``) npz
files, recognised by their keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from e2ip.data.structures import DataError, Structure
from e2ip.data.units import energy_factor, length_factor
from e2ip.errors import ConfigError, first_line

if TYPE_CHECKING:
    pass


RMD17_KEYS = ("nuclear_charges", "coords", "energies", "forces")


SGDML_KEYS = ("z", "R", "E", "F")


def _npz_field(data, key: str, path, kinds: str = "iuf") -> np.ndarray:
    """Array `key` of an open npz file, checked to hold numbers of the dtype kinds `kinds`."""
    try:
        array = np.asarray(data[key])
    except Exception as exc:  # noqa: BLE001 - object arrays, corrupted members, ...
        raise DataError(f"{path}: field '{key}' cannot be read ({first_line(exc)})") from None
    if array.dtype.kind not in kinds:
        raise DataError(f"{path}: field '{key}' holds {array.dtype} values, expected numbers")
    return array


def _npz_unit(data, key: str, path, factor) -> float:
    """The conversion factor of the unit named by the npz entry `key` (e_unit, r_unit)."""
    array = _npz_field(data, key, path, kinds="USO")
    unit = array.item() if array.size == 1 else array.tolist()
    if isinstance(unit, bytes):
        unit = unit.decode("utf-8", errors="replace")
    if not isinstance(unit, str):
        raise DataError(f"{path}: field '{key}' must name a unit, got {unit!r}")
    try:
        return factor(unit)
    except ConfigError as exc:
        raise DataError(f"{path}: field '{key}': {exc}") from None


def read_npz(path, energy_unit, length_unit, require_energy, require_forces):
    try:
        data = np.load(path, allow_pickle=False)
        keys = set(data.files)
    except Exception as exc:  # noqa: BLE001 - any failure to parse is a data error
        raise DataError(f"{path}: not a readable npz file ({exc})") from None
    with data:
        return _npz_structures(data, keys, path, energy_unit, length_unit, require_energy,
                               require_forces)


def _npz_structures(data, keys: set[str], path, energy_unit, length_unit, require_energy,
                    require_forces) -> list[Structure]:
    """The structures of an open npz file (rMD17 or sGDML layout), unit-converted."""
    if set(RMD17_KEYS[:2]) <= keys:
        z_key, r_key, e_key, f_key = RMD17_KEYS
    elif set(SGDML_KEYS[:2]) <= keys:
        z_key, r_key, e_key, f_key = SGDML_KEYS
    else:
        raise DataError(
            f"{path}: unknown npz layout (keys {sorted(keys)}); expected rMD17 "
            f"{list(RMD17_KEYS)} or sGDML/MD17/MD22 {list(SGDML_KEYS)}"
        )
    if energy_unit is None and "e_unit" in keys:
        ef = _npz_unit(data, "e_unit", path, energy_factor)
    else:
        ef = energy_factor("kcal/mol" if energy_unit is None else energy_unit)
    if length_unit is None and "r_unit" in keys:
        lf = _npz_unit(data, "r_unit", path, length_factor)
    else:
        lf = length_factor("Å" if length_unit is None else length_unit)
    z = _npz_field(data, z_key, path).reshape(-1)
    known = np.isfinite(z) & (z == np.round(z)) & (z >= 1) & (z <= 118)
    if not known.all():
        bad = sorted({float(v) if z.dtype.kind == "f" else int(v) for v in z[~known]})
        raise DataError(f"{path}: field '{z_key}' has unknown element(s) {bad[:5]} "
                        "(atomic numbers 1 to 118 expected)")
    numbers = z.astype(np.int64)
    coords = _npz_field(data, r_key, path).astype(np.float64)
    if coords.ndim == 2:
        coords = coords[None]
    if coords.ndim != 3 or coords.shape[1:] != (len(numbers), 3):
        raise DataError(
            f"{path}: field '{r_key}' has shape {coords.shape}, expected (frames, {len(numbers)}, 3) "
            f"for the {len(numbers)} atoms of field '{z_key}'"
        )
    n_frames = coords.shape[0]
    energies = forces = None
    if e_key in keys:
        energies = _npz_field(data, e_key, path).astype(np.float64).reshape(-1)
        if len(energies) != n_frames:
            raise DataError(f"{path}: field '{e_key}' has {len(energies)} values for {n_frames} frames")
    elif require_energy:
        raise DataError(f"{path}: field '{e_key}' (energies) is missing")
    if f_key in keys:
        forces = _npz_field(data, f_key, path).astype(np.float64)
        if forces.shape != coords.shape:
            raise DataError(f"{path}: field '{f_key}' has shape {forces.shape}, expected {coords.shape}")
    elif require_forces:
        raise DataError(f"{path}: field '{f_key}' (forces) is missing")
    out = []
    with np.errstate(over="ignore", invalid="ignore"):  # overflow becomes inf: validated below
        for k in range(n_frames):
            out.append(
                Structure(
                    numbers=numbers.copy(),
                    positions=coords[k] * lf,
                    energy=None if energies is None else float(energies[k] * ef),
                    forces=None if forces is None else forces[k] * (ef / lf),
                    source=str(path),
                    frame=k,
                )
            )
    return out
