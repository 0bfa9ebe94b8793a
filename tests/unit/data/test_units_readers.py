"""Units and readers: conversions against hand-computed values, every input format on small files
written here, the real reference data when present, and clear errors on bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from e2ip.data import DataError, Structure, read_structures
from e2ip.data.units import energy_factor, force_factor, length_factor
from tests.support import SHARED

KCAL = 0.0433641  # 1 kcal/mol in eV: 4184 J / (6.02214076e23 * 1.602176634e-19 J/eV)
HARTREE = 27.211386245988  # eV
BOHR = 0.529177210903  # Å


def shared_data_dir() -> Path:
    env = os.environ.get("E2IP_SHARED_DATA")
    return Path(env) if env else SHARED


def shared_file(*parts: str) -> Path:
    path = shared_data_dir().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data not present: {path}")
    return path


# --- units -------------------------------------------------------------------------------------

def test_energy_units():
    assert energy_factor("eV") == 1.0
    assert energy_factor("meV") == 1e-3
    # 4184 J/mol / N_A / e, computed from the SI definitions
    kcal_exact = 4184.0 / 6.02214076e23 / 1.602176634e-19
    assert energy_factor("kcal/mol") == pytest.approx(KCAL, abs=1e-7)
    assert energy_factor("kcal/mol") == pytest.approx(kcal_exact, rel=1e-6)
    assert energy_factor("kJ/mol") == pytest.approx(kcal_exact / 4.184, rel=1e-6)
    assert energy_factor("Hartree") == pytest.approx(HARTREE, rel=1e-12)
    assert energy_factor("Ha") == energy_factor("hartree")
    assert energy_factor("Rydberg") == pytest.approx(HARTREE / 2, rel=1e-9)
    assert energy_factor(" KCAL/MOL ") == energy_factor("kcal/mol")


def test_length_and_force_units():
    assert length_factor("Å") == 1.0
    assert length_factor("Ang") == 1.0
    assert length_factor("angstrom") == 1.0
    assert length_factor("Bohr") == pytest.approx(BOHR, rel=1e-12)
    assert length_factor("nm") == 10.0
    # 1 Hartree/Bohr = 27.211386245988 / 0.529177210903 = 51.4220674763 eV/Å (CODATA 2018;
    # the often quoted 51.42208619 is the CODATA 2014 value)
    assert force_factor("Hartree", "Bohr") == pytest.approx(51.422067476325886, rel=1e-12)
    assert force_factor("Hartree", "Bohr") == pytest.approx(51.4221, abs=5e-5)
    assert force_factor("kcal/mol", "Å") == pytest.approx(KCAL, abs=1e-7)
    assert force_factor("eV", "nm") == pytest.approx(0.1)


@pytest.mark.parametrize("bad", ["furlong", "kcal", ""])
def test_unknown_units_raise(bad):
    with pytest.raises(ValueError, match="unknown"):
        energy_factor(bad)
    with pytest.raises(ValueError, match="unknown"):
        length_factor(bad)


# --- small files written by the tests ------------------------------------------------------------

def water(seed: int = 0) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """numbers, positions, energy, forces of a slightly perturbed water molecule."""
    rng = np.random.default_rng(seed)
    numbers = np.array([8, 1, 1])
    positions = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    positions = positions + 0.02 * rng.standard_normal((3, 3))
    forces = rng.standard_normal((3, 3))
    energy = float(-14.0 + rng.standard_normal())
    return numbers, positions, energy, forces


def xyz_frame(numbers, positions, *, energy=None, forces=None, energy_key="energy",
              forces_key="forces", cell=None, pbc="F F F") -> str:
    symbols = {1: "H", 6: "C", 8: "O"}
    props = "species:S:1:pos:R:3" + (f":{forces_key}:R:3" if forces is not None else "")
    head = f'Properties={props} pbc="{pbc}"'
    if cell is not None:
        head = 'Lattice="' + " ".join(f"{x:.10f}" for x in np.ravel(cell)) + '" ' + head
    if energy is not None:
        head += f" {energy_key}={energy!r}"
    lines = [str(len(numbers)), head]
    for k, (z, r) in enumerate(zip(numbers, positions)):
        row = [symbols[int(z)]] + [repr(float(x)) for x in r]
        if forces is not None:
            row += [repr(float(x)) for x in forces[k]]
        lines.append(" ".join(row))
    return "\n".join(lines) + "\n"


def test_extxyz_default_keys(tmp_path):
    frames = [water(k) for k in range(3)]
    path = tmp_path / "w.extxyz"
    path.write_text("".join(xyz_frame(z, r, energy=e, forces=f) for z, r, e, f in frames))
    out = read_structures(path)
    assert len(out) == 3
    for k, (s, (z, r, e, f)) in enumerate(zip(out, frames)):
        assert isinstance(s, Structure)
        np.testing.assert_array_equal(s.numbers, z)
        np.testing.assert_allclose(s.positions, r, rtol=0, atol=1e-12)
        assert s.energy == pytest.approx(e, rel=1e-14)
        np.testing.assert_allclose(s.forces, f, rtol=0, atol=1e-12)
        assert not s.pbc.any()
        assert s.frame == k and s.source == str(path)
    # a slice keeps only those frames; units are converted on request
    sub = read_structures(path, index="1:3", energy_unit="kcal/mol")
    assert len(sub) == 2
    assert sub[0].energy == pytest.approx(frames[1][2] * KCAL, rel=1e-6)
    np.testing.assert_allclose(sub[1].forces, frames[2][3] * energy_factor("kcal/mol"), rtol=1e-12)


def test_extxyz_custom_keys(tmp_path):
    z, r, e, f = water(1)
    path = tmp_path / "custom.xyz"
    path.write_text(xyz_frame(z, r, energy=e, forces=f, energy_key="REF_energy",
                              forces_key="REF_forces"))
    s = read_structures(path, energy_key="REF_energy", forces_key="REF_forces")[0]
    assert s.energy == pytest.approx(e, rel=1e-14)
    np.testing.assert_allclose(s.forces, f, rtol=0, atol=1e-12)


def test_extxyz_hartree_bohr(tmp_path):
    z, r, e, f = water(2)
    path = tmp_path / "au.xyz"
    path.write_text(xyz_frame(z, r / BOHR, energy=e / HARTREE, forces=f / (HARTREE / BOHR)))
    s = read_structures(path, energy_unit="Hartree", length_unit="Bohr")[0]
    np.testing.assert_allclose(s.positions, r, rtol=1e-12, atol=1e-12)
    assert s.energy == pytest.approx(e, rel=1e-12)
    np.testing.assert_allclose(s.forces, f, rtol=1e-10, atol=1e-12)


def test_extxyz_periodic(tmp_path):
    z, r, e, f = water(3)
    cell = np.array([[6.0, 0.0, 0.0], [0.5, 6.5, 0.0], [0.3, 0.2, 7.0]])
    path = tmp_path / "pbc.extxyz"
    path.write_text(xyz_frame(z, r + 2.0, energy=e, forces=f, cell=cell, pbc="T T T"))
    s = read_structures(path)[0]
    assert s.pbc.all()
    np.testing.assert_allclose(s.cell, cell, atol=1e-9)


def test_ase_trajectory_with_calculator(tmp_path):
    from ase.io import write

    frames = []
    for k in range(3):
        z, r, e, f = water(10 + k)
        atoms = Atoms(numbers=z, positions=r)
        atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f)
        frames.append(atoms)
    path = tmp_path / "md.traj"
    write(path, frames)
    out = read_structures(path)
    assert len(out) == 3
    for s, atoms in zip(out, frames):
        assert s.energy == pytest.approx(atoms.calc.results["energy"], rel=1e-14)
        np.testing.assert_allclose(s.forces, atoms.calc.results["forces"], atol=1e-12)
        np.testing.assert_allclose(s.positions, atoms.positions, atol=1e-12)


def test_rmd17_npz(tmp_path):
    frames = [water(20 + k) for k in range(4)]
    path = tmp_path / "rmd17_water.npz"
    np.savez(
        path,
        nuclear_charges=np.array([8, 1, 1], dtype=np.uint8),
        coords=np.stack([r for _, r, _, _ in frames]),
        energies=np.array([e for _, _, e, _ in frames]),  # kcal/mol, as published
        forces=np.stack([f for _, _, _, f in frames]),  # kcal/mol/Å
    )
    out = read_structures(path)
    assert len(out) == 4
    for k, s in enumerate(out):
        _, r, e, f = frames[k]
        np.testing.assert_array_equal(s.numbers, [8, 1, 1])
        np.testing.assert_allclose(s.positions, r, atol=1e-14)
        assert s.energy == pytest.approx(e * KCAL, rel=1e-6)
        np.testing.assert_allclose(s.forces, f * energy_factor("kcal/mol"), rtol=1e-14)
        assert s.frame == k
    # explicit units override the default
    ev = read_structures(path, energy_unit="eV")
    assert ev[0].energy == pytest.approx(frames[0][2], rel=1e-14)
    sub = read_structures(path, index="2:")
    assert [s.frame for s in sub] == [2, 3]


@pytest.mark.parametrize("with_units", [False, True])
def test_sgdml_npz(tmp_path, with_units):
    frames = [water(30 + k) for k in range(3)]
    data = dict(
        z=np.array([8, 1, 1], dtype=np.uint8),
        R=np.stack([r for _, r, _, _ in frames]),
        E=np.array([[e] for _, _, e, _ in frames]),  # sGDML stores E as (n, 1)
        F=np.stack([f for _, _, _, f in frames]),
    )
    if with_units:  # the file says Hartree and Bohr
        data["R"] = data["R"] / BOHR
        data["E"] = data["E"] / HARTREE
        data["F"] = data["F"] / (HARTREE / BOHR)
        data["e_unit"] = np.array("Ha")
        data["r_unit"] = np.array("bohr")
    path = tmp_path / "md22_water.npz"
    np.savez(path, **data)
    out = read_structures(path)
    assert len(out) == 3
    scale = 1.0 if with_units else KCAL
    for s, (_, r, e, f) in zip(out, frames):
        np.testing.assert_allclose(s.positions, r, rtol=1e-12, atol=1e-12)
        assert s.energy == pytest.approx(e * scale, rel=1e-6)
        np.testing.assert_allclose(s.forces, f * (1.0 if with_units else energy_factor("kcal/mol")),
                                   rtol=1e-10, atol=1e-12)


def test_structure_from_atoms_roundtrip():
    z, r, e, f = water(40)
    atoms = Atoms(numbers=z, positions=r, cell=np.eye(3) * 5.0, pbc=[True, False, True])
    s = Structure.from_atoms(atoms, energy=e, forces=f)
    assert s.n_atoms == 3 and s.energy == e
    back = s.to_atoms()
    np.testing.assert_allclose(back.positions, r)
    assert back.pbc.tolist() == [True, False, True]


# --- real reference data (skipped when absent) --------------------------------------------------

def test_real_rmd17_aspirin():
    path = shared_file("rmd17", "rmd17_aspirin_train_01.npz")
    out = read_structures(path, index="0:5")
    assert len(out) == 5
    raw = np.load(path)
    for k, s in enumerate(out):
        assert s.n_atoms == 21
        assert sorted(set(s.numbers.tolist())) == [1, 6, 8]
        assert s.energy == pytest.approx(raw["energies"][k] * KCAL, rel=1e-6)
        np.testing.assert_allclose(s.forces, raw["forces"][k] * energy_factor("kcal/mol"))
        assert -20000 < s.energy < -10000  # eV: aspirin is about -406,000 kcal/mol
    assert len(read_structures(path)) == 1000


def test_real_water_extxyz():
    path = shared_file("water_cheng2019", "water_cheng2019.extxyz")
    out = read_structures(path, index="0:5")
    assert len(out) == 5
    for s in out:
        assert s.n_atoms == 192
        assert s.pbc.all()
        np.testing.assert_allclose(s.cell, np.eye(3) * 12.417201455373695, atol=1e-9)
        assert sorted(set(s.numbers.tolist())) == [1, 8]
        assert s.energy is not None and np.isfinite(s.energy)
        assert s.forces.shape == (192, 3) and np.isfinite(s.forces).all()
    assert out[0].energy == pytest.approx(-30020.753736393934, rel=1e-12)


def test_real_3bpa():
    path = shared_file("3bpa", "train_300K.xyz")
    out = read_structures(path, index="0:5")
    assert len(out) == 5
    for s in out:
        assert s.n_atoms == 27 and not s.pbc.any()
        assert np.isfinite(s.energy) and s.forces.shape == (27, 3)
    assert out[0].energy == pytest.approx(-17660.461737861464, rel=1e-12)


def test_real_ethanol_botnet():
    path = shared_file("ethanol_botnet", "train.xyz")
    out = read_structures(path, index="0:5")
    assert len(out) == 5
    for s in out:
        assert s.n_atoms == 9 and not s.pbc.any()
        assert sorted(set(s.numbers.tolist())) == [1, 6, 8]
    assert out[0].energy == pytest.approx(-4209.4657843064815, rel=1e-12)


# --- bad input -----------------------------------------------------------------------------------

def assert_names(exc: pytest.ExceptionInfo, *parts: str) -> None:
    msg = str(exc.value)
    for part in parts:
        assert part in msg, f"{part!r} not in error message {msg!r}"


def test_missing_forces(tmp_path):
    z, r, e, _ = water(50)
    path = tmp_path / "noforces.xyz"
    path.write_text(xyz_frame(z, r, energy=e))
    with pytest.raises(DataError) as exc:
        read_structures(path)
    assert_names(exc, str(path), "frame 0", "forces")
    # allowed when forces are not required
    assert read_structures(path, require_forces=False)[0].forces is None


def test_nan_in_positions(tmp_path):
    frames = [water(60 + k) for k in range(3)]
    bad_r = frames[2][1].copy()
    bad_r[1, 2] = np.nan
    frames[2] = (frames[2][0], bad_r, frames[2][2], frames[2][3])
    path = tmp_path / "nan.xyz"
    path.write_text("".join(xyz_frame(z, r, energy=e, forces=f) for z, r, e, f in frames))
    with pytest.raises(DataError) as exc:
        read_structures(path)
    assert_names(exc, str(path), "frame 2", "positions")
    # the frame number is the one in the file, also when reading a slice
    for index in ("1:", "2", 2, "0::2"):
        with pytest.raises(DataError) as exc:
            read_structures(path, index=index)
        assert_names(exc, str(path), "frame 2", "positions")


def test_overlapping_atoms(tmp_path):
    z, r, e, f = water(70)
    r = r.copy()
    r[2] = r[0] + [0.05, 0.0, 0.0]
    path = tmp_path / "overlap.xyz"
    path.write_text(xyz_frame(z, r, energy=e, forces=f))
    with pytest.raises(DataError) as exc:
        read_structures(path)
    assert_names(exc, str(path), "frame 0", "positions", "0.050")


def test_overlapping_periodic_image(tmp_path):
    # two atoms 0.05 Å apart only through the periodic boundary
    z = np.array([1, 1])
    r = np.array([[0.02, 1.0, 1.0], [3.97, 1.0, 1.0]])
    path = tmp_path / "overlap_pbc.extxyz"
    path.write_text(xyz_frame(z, r, energy=-1.0, forces=np.zeros((2, 3)), cell=np.eye(3) * 4.0,
                              pbc="T T T"))
    with pytest.raises(DataError) as exc:
        read_structures(path)
    assert_names(exc, str(path), "frame 0", "positions")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.xyz"
    path.write_text("")
    with pytest.raises(DataError) as exc:
        read_structures(path)
    assert_names(exc, str(path), "empty")


def test_wrong_energy_key(tmp_path):
    z, r, e, f = water(80)
    path = tmp_path / "key.xyz"
    path.write_text(xyz_frame(z, r, energy=e, forces=f, energy_key="REF_energy"))
    with pytest.raises(DataError) as exc:
        read_structures(path, energy_key="dft_energy")
    assert_names(exc, str(path), "frame 0", "dft_energy", "REF_energy")


def test_wrong_forces_key(tmp_path):
    z, r, e, f = water(81)
    path = tmp_path / "fkey.xyz"
    path.write_text(xyz_frame(z, r, energy=e, forces=f, forces_key="REF_forces"))
    with pytest.raises(DataError) as exc:
        read_structures(path)
    assert_names(exc, str(path), "frame 0", "forces", "REF_forces")


def test_unknown_npz_layout(tmp_path):
    path = tmp_path / "weird.npz"
    np.savez(path, atoms=np.array([1, 1]), xyz=np.zeros((1, 2, 3)))
    with pytest.raises(DataError) as exc:
        read_structures(path)
    assert_names(exc, str(path), "layout", "atoms", "xyz")


def test_npz_missing_forces_and_bad_shape(tmp_path):
    _, r, e, f = water(90)
    path = tmp_path / "noforces.npz"
    np.savez(path, nuclear_charges=np.array([8, 1, 1]), coords=r[None], energies=np.array([e]))
    with pytest.raises(DataError) as exc:
        read_structures(path)
    assert_names(exc, str(path), "forces")
    path2 = tmp_path / "shape.npz"
    np.savez(path2, z=np.array([8, 1, 1]), R=r[None], E=np.array([e]), F=f[None, :2])
    with pytest.raises(DataError) as exc:
        read_structures(path2)
    assert_names(exc, str(path2), "'F'", "shape")


def test_npz_nan_forces_names_frame(tmp_path):
    frames = [water(95 + k) for k in range(3)]
    forces = np.stack([f for _, _, _, f in frames])
    forces[1, 0, 0] = np.nan
    path = tmp_path / "nanf.npz"
    np.savez(path, z=np.array([8, 1, 1]), R=np.stack([r for _, r, _, _ in frames]),
             E=np.array([e for _, _, e, _ in frames]), F=forces)
    with pytest.raises(DataError) as exc:
        read_structures(path)
    assert_names(exc, str(path), "frame 1", "forces")


def test_nonexistent_file(tmp_path):
    path = tmp_path / "missing.extxyz"
    with pytest.raises(DataError) as exc:
        read_structures(path)
    assert_names(exc, str(path), "not found")


def test_unknown_element_at_prediction():
    from e2ip import PotentialModel

    model = PotentialModel(elements=[1, 8], cutoff=4.0,
                           backbone_options={"num_features": 8, "num_layers": 1, "num_radial": 4})
    z, r, _, _ = water(99)
    ok = model.predict(Atoms(numbers=z, positions=r))
    assert np.isfinite(ok["energy"]).all()
    methanol_like = Atoms(numbers=[6, 8, 1], positions=r)
    with pytest.raises(DataError) as exc:
        model.predict(methanol_like)
    assert_names(exc, "C", "frame 0", "unknown")
    # also through the graph path (no check_elements first)
    from e2ip.data.graph import graph_from_structures

    graph = graph_from_structures([Structure.from_atoms(methanol_like)], 4.0)
    with pytest.raises(DataError) as exc:
        model(graph)
    assert_names(exc, "C", "unknown")
