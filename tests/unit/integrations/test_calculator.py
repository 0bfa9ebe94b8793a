"""The ASE calculator: every model kind, forces and stress against finite differences, covariances
that rotate with the structure, the neighbour-list skin, and the uncertainty bias."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from scipy.spatial.transform import Rotation

from e2ip import Ensemble, PotentialModel
from e2ip.backbones import BACKBONES
from e2ip.data.neighbors import neighbor_list
from e2ip.errors import DataError
from e2ip.heads import HEADS
from e2ip.integrations.ase_calculator import E2IPCalculator, NeighborCache
from e2ip.models.bias import UncertaintyBias
from e2ip.testing.model_suite import ELEMENTS, random_molecule, random_periodic, small_options
from tests.support import SHARED

UNCERTAINTY_KEYS = ("forces_covariance", "forces_aleatoric", "forces_epistemic",
                    "forces_uncertainty", "forces_std")


def build(head: str = "e2ip", seed: int = 0, cutoff: float = 4.0) -> PotentialModel:
    torch.manual_seed(seed)
    model = PotentialModel(elements=ELEMENTS, cutoff=cutoff, head=head,
                           backbone_options=small_options(BACKBONES["painn"]),
                           head_options=small_options(HEADS[head]), force_scale=0.5,
                           energy_scale=0.5)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # anisotropic covariances, evidence away from its initialisation
        for p in model.head.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.double().eval()


def ensemble() -> Ensemble:
    return Ensemble([build("none", seed=s) for s in (0, 1, 2)]).double().eval()


KINDS = {"e2ip": lambda: build("e2ip"), "eip": lambda: build("eip"),
         "cholesky": lambda: build("cholesky"), "plain": lambda: build("none"),
         "ensemble": ensemble}


def molecule(seed: int = 0) -> Atoms:
    return random_molecule(7, seed=seed).to_atoms()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_same_keys_and_forces_match_predict_and_finite_differences(kind):
    model = KINDS[kind]()
    atoms = molecule()
    atoms.calc = E2IPCalculator(model)
    forces = atoms.get_forces()
    pred = model.predict(atoms)
    np.testing.assert_allclose(forces, pred["forces"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(atoms.get_potential_energy(), pred["energy"][0], rtol=1e-12)
    numerical = calculate_numerical_forces(atoms, eps=1e-5)
    np.testing.assert_allclose(forces, numerical, atol=1e-7 * max(1, np.abs(forces).max()))
    assert atoms.get_potential_energy() == atoms.calc.results["free_energy"]
    np.testing.assert_allclose(atoms.calc.results["energies"].sum(), atoms.get_potential_energy(),
                               rtol=1e-12)
    if model.has_uncertainty:
        r = atoms.calc.results
        assert set(UNCERTAINTY_KEYS) <= set(r)
        n = len(atoms)
        assert r["forces_covariance"].shape == (n, 3, 3) and r["forces_std"].shape == (n, 3)
        np.testing.assert_allclose(r["forces_covariance"], pred["predictive"], rtol=1e-12)
        np.testing.assert_allclose(r["forces_epistemic"], pred["epistemic"], rtol=1e-12)
        np.testing.assert_allclose(r["forces_aleatoric"], pred["aleatoric"], rtol=1e-12)
        # the scalar proxy and per-component std from their definitions
        np.testing.assert_allclose(r["forces_uncertainty"],
                                   np.sqrt(np.trace(pred["epistemic"], axis1=1, axis2=2) / 3))
        np.testing.assert_allclose(r["forces_std"],
                                   np.sqrt(np.diagonal(pred["predictive"], axis1=1, axis2=2)))
        assert (np.linalg.eigvalsh(r["forces_covariance"]) > 0).all()
    else:
        with pytest.raises(PropertyNotImplementedError):
            atoms.calc.get_property("forces_covariance", atoms)
    if kind == "ensemble":
        member_energies = [m.predict(atoms)["energy"][0] for m in model.members]
        np.testing.assert_allclose(atoms.calc.results["energy_uncertainty"],
                                   np.std(member_energies), rtol=1e-10)
    else:
        assert "energy_uncertainty" not in atoms.calc.results


@pytest.mark.parametrize("kind", ["e2ip", "ensemble"])
def test_stress_equals_finite_differences_of_the_energy_under_strain(kind):
    model = KINDS[kind]()
    atoms = random_periodic(10, seed=3).to_atoms()
    atoms.calc = E2IPCalculator(model)
    stress = atoms.get_stress()
    numerical = calculate_numerical_stress(atoms, eps=1e-6)
    assert np.abs(stress).max() > 1e-4  # not trivially zero
    np.testing.assert_allclose(stress, numerical, atol=1e-8)
    # a molecule has no stress
    mol = molecule()
    mol.calc = E2IPCalculator(model)
    with pytest.raises(PropertyNotImplementedError):
        mol.get_stress()


def test_stress_on_a_periodic_water_box():
    """The 192-atom liquid-water box of the shared data set (PaiNN + e2IP, cutoff 4 Å)."""

    from e2ip.data.read import read_structures

    path = SHARED / "water_cheng2019/water_cheng2019.extxyz"
    if not path.exists():
        pytest.skip(f"{path} not available")
    atoms = read_structures(path, index=":1")[0].to_atoms()
    torch.manual_seed(0)
    model = PotentialModel(elements=[1, 8], cutoff=4.0,
                           backbone_options=small_options(BACKBONES["painn"]),
                           head_options=small_options(HEADS["e2ip"])).double().eval()
    atoms.calc = E2IPCalculator(model)
    stress = atoms.get_stress()
    numerical = calculate_numerical_stress(atoms, eps=1e-6)
    np.testing.assert_allclose(stress, numerical, atol=1e-9)


@pytest.mark.parametrize("kind", ["e2ip", "cholesky", "ensemble"])
def test_covariances_rotate_with_the_structure(kind):
    model = KINDS[kind]()
    atoms = molecule(seed=4)
    rot = Rotation.random(random_state=5).as_matrix()
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rot.T
    atoms.calc, rotated.calc = E2IPCalculator(model), E2IPCalculator(model)
    atoms.get_forces(), rotated.get_forces()
    a, b = atoms.calc.results, rotated.calc.results
    np.testing.assert_allclose(b["forces"], a["forces"] @ rot.T, atol=1e-10)
    tol = 1e-9 if kind != "cholesky" else None
    cov_rotated = rot @ a["forces_covariance"] @ rot.T
    if tol is None:  # the non-equivariant ablation does not rotate: that is its point
        assert np.abs(b["forces_covariance"] - cov_rotated).max() > 1e-4
    else:
        np.testing.assert_allclose(b["forces_covariance"], cov_rotated, atol=tol)
        np.testing.assert_allclose(b["forces_epistemic"], rot @ a["forces_epistemic"] @ rot.T,
                                   atol=tol)
        np.testing.assert_allclose(b["forces_uncertainty"], a["forces_uncertainty"], atol=tol)


@pytest.mark.parametrize("periodic", [False, True])
def test_neighbour_skin_gives_the_edges_of_a_fresh_list(periodic):
    s = random_periodic(12, seed=7) if periodic else random_molecule(12, seed=7, box=4.0)
    cache = NeighborCache(cutoff=3.0, skin=0.6)
    rng = np.random.default_rng(0)
    pos = s.positions.copy()
    for step in range(12):
        pos = pos + rng.normal(scale=0.06, size=pos.shape)  # drifts past skin/2 after a few steps
        edge_index, shifts = cache.pairs(pos, s.cell, np.asarray(s.pbc), s.numbers)
        i, j, ref_shifts = neighbor_list(pos, s.cell, s.pbc, 3.0)
        ours = sorted(zip(edge_index[0].tolist(), edge_index[1].tolist(),
                          map(tuple, shifts.long().tolist())))
        ref = sorted(zip(i.tolist(), j.tolist(), map(tuple, ref_shifts.tolist())))
        assert ours == ref, step
    assert 1 < cache.builds < 12  # reused, and rebuilt once atoms moved more than skin / 2


def test_skin_and_no_skin_give_the_same_results_along_a_trajectory():
    model = build("e2ip")
    atoms = molecule(seed=2)
    with_skin, without = E2IPCalculator(model, skin=1.0), E2IPCalculator(model, skin=0.0)
    rng = np.random.default_rng(1)
    for _ in range(6):
        atoms.positions += rng.normal(scale=0.1, size=atoms.positions.shape)
        with_skin.calculate(atoms.copy(), ["forces"])
        without.calculate(atoms.copy(), ["forces"])
        for key in ("energy", "forces", "forces_covariance"):
            np.testing.assert_allclose(with_skin.results[key], without.results[key], atol=1e-11)


@pytest.mark.parametrize("kind", ["e2ip", "ensemble"])
def test_bias_forces_are_the_gradient_of_the_biased_energy(kind):
    model = KINDS[kind]()
    atoms = molecule(seed=6)
    plain = E2IPCalculator(model)
    plain.calculate(atoms.copy(), ["forces"])
    # width near the model's own uncertainty so that the bias is far from flat
    width = float(np.sqrt(np.mean(plain.results["forces_uncertainty"] ** 2)))
    bias = UncertaintyBias(strength=0.5, width=width)
    atoms.calc = E2IPCalculator(model, bias=bias)
    r = atoms.calc.get_property("forces", atoms) is not None and atoms.calc.results
    # E_bias from its definition and the unbiased calculator's per-atom uncertainties
    s2 = np.mean(plain.results["forces_uncertainty"] ** 2)
    np.testing.assert_allclose(r["bias_energy"], 0.5 * (np.exp(-s2 / width**2) - 1), rtol=1e-10)
    np.testing.assert_allclose(r["energy_unbiased"], plain.results["energy"], rtol=1e-12)
    np.testing.assert_allclose(r["energy"], plain.results["energy"] + r["bias_energy"], rtol=1e-12)
    numerical = calculate_numerical_forces(atoms, eps=1e-5)
    scale = max(1, np.abs(r["forces"]).max())
    np.testing.assert_allclose(r["forces"], numerical, atol=1e-6 * scale)
    assert np.abs(r["forces"] - plain.results["forces"]).max() > 1e-4  # the bias does something


def test_bias_needs_an_uncertainty_model_and_positive_parameters():
    with pytest.raises(ValueError, match="positive"):
        UncertaintyBias(0.0, 0.1)
    atoms = molecule()
    atoms.calc = E2IPCalculator(build("none"), bias=UncertaintyBias(0.1, 0.1))
    with pytest.raises(Exception, match="uncertainty head"):
        atoms.get_forces()


def test_calculator_errors_are_e2ip_errors(tmp_path):
    model = build("e2ip")
    atoms = Atoms("CNH", positions=[[0, 0, 0], [1.2, 0, 0], [0, 1.1, 0]])
    atoms.calc = E2IPCalculator(model)
    with pytest.raises(DataError, match="N"):
        atoms.get_forces()
    bad = molecule()
    bad.positions[0, 0] = np.nan
    bad.calc = E2IPCalculator(model)
    with pytest.raises(DataError, match="non-finite"):
        bad.get_forces()
    from e2ip.errors import ModelError

    with pytest.raises(ModelError, match="not found"):
        E2IPCalculator(tmp_path / "missing.pt")


def test_calculator_loads_a_model_file_and_form_raw(tmp_path):
    model = build("e2ip")
    model.variance_scale.fill_(2.0)
    model.save(tmp_path / "model.pt")
    atoms = molecule()
    cal, raw = E2IPCalculator(tmp_path), E2IPCalculator(tmp_path / "model.pt", form="raw")
    cal.calculate(atoms.copy(), ["forces"])
    raw.calculate(atoms.copy(), ["forces"])
    np.testing.assert_allclose(cal.results["forces_covariance"],
                               2.0 * raw.results["forces_covariance"], rtol=1e-6)
    np.testing.assert_allclose(cal.results["forces"], raw.results["forces"])


def test_biased_ensemble_on_a_periodic_cell_gives_forces_and_refuses_only_stress():
    model = ensemble()
    atoms = random_periodic(8, seed=9).to_atoms()
    width = 0.5
    atoms.calc = E2IPCalculator(model, bias=UncertaintyBias(0.3, width))
    forces = atoms.get_forces()  # constant-volume MD asks for forces only
    numerical = calculate_numerical_forces(atoms, eps=1e-5)
    np.testing.assert_allclose(forces, numerical, atol=1e-6 * max(1, np.abs(forces).max()))
    from e2ip.errors import ModelError

    with pytest.raises(ModelError, match="stress"):
        atoms.get_stress()


def test_biased_calibrated_ensemble_follows_its_calibrated_epistemic_part():
    """Form 'cal' of an ensemble with t = 3: the bias reads t x the members' spread
    (reference: the member forces evaluated one by one, numpy covariance)."""
    model = ensemble()
    model.epistemic_scale.fill_(3.0)
    model.set_calibration_variance(1e-3)
    atoms = molecule(2)
    members = np.stack([m.predict(atoms)["forces"] for m in model.members])  # (M, N, 3)
    tr = np.array([np.trace(np.cov(members[:, i, :].T, bias=True)) for i in range(len(atoms))])
    strength, width = 0.3, 0.05
    expected = {form: strength * (np.exp(-(t * tr).sum() / (3 * len(atoms)) / width**2) - 1)
                for form, t in (("cal", 3.0), ("raw", 1.0))}
    for form in ("cal", "raw"):
        calc = E2IPCalculator(model, bias=UncertaintyBias(strength, width, form=form))
        calc.calculate(atoms.copy(), ["energy", "forces"])
        np.testing.assert_allclose(calc.results["bias_energy"], expected[form], rtol=1e-8)


@pytest.mark.parametrize("kind", ["e2ip", "ensemble"])
def test_edge_chunking_gives_the_same_results_with_stress(kind):
    """Large graphs are evaluated in checkpointed chunks of edges: energies, forces, stress and
    covariances equal the unchunked ones (a 96-atom periodic box, chunks of 50 edges)."""
    from e2ip.backbones.base import set_edge_chunk_size

    rng = np.random.default_rng(5)
    cell = np.array([[9.0, 0.0, 0.0], [0.5, 8.5, 0.0], [0.3, -0.4, 9.2]])
    atoms = Atoms(numbers=rng.choice(ELEMENTS, 96), positions=rng.uniform(0, 1, (96, 3)) @ cell,
                  cell=cell, pbc=True)
    model = KINDS[kind]()
    results = {}
    for size in (0, 50):
        set_edge_chunk_size(model, size)
        atoms.calc = E2IPCalculator(model)
        atoms.get_stress()
        results[size] = dict(atoms.calc.results)
    for key, value in results[0].items():
        np.testing.assert_allclose(results[50][key], value, rtol=1e-10, atol=1e-12, err_msg=key)
    assert {"stress", "forces", "energy"} <= set(results[0])


def test_get_properties_works_and_the_uncertainty_stays_in_results():
    """ASE's `Properties` refuses names it does not define: `atoms.get_properties` (which
    i-PI's ASE driver calls) raised KeyError 'forces_covariance' before."""
    from ase.build import molecule

    from e2ip.testing import small_model

    atoms = molecule("CH3OH")
    atoms.calc = E2IPCalculator(small_model("painn", "e2ip"))
    props = atoms.get_properties(["energy", "forces"])
    np.testing.assert_allclose(props["forces"], atoms.get_forces(), rtol=0, atol=0)
    assert props["energy"] == atoms.get_potential_energy()
    assert atoms.calc.results["forces_covariance"].shape == (len(atoms), 3, 3)
    assert atoms.calc.get_property("forces_uncertainty").shape == (len(atoms),)
