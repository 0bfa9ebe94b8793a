"""The metatomic export (`e2ip export --format metatomic`): the TorchScript file, loaded through
metatomic-ase (what LAMMPS's `pair_style metatomic` also loads), gives the energies, forces,
stress and force covariances of the eager model (`E2IPCalculator`), on molecules and periodic
boxes, in float64 and float32; covariances rotate with the structure; `selected_atoms` (domain
decomposition) limits the outputs; kinds that do not export are refused with one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms

from e2ip.errors import ModelError
from e2ip.integrations.ase_calculator import E2IPCalculator
from e2ip.models import Ensemble, PotentialModel
from e2ip.testing.model_suite import MOLECULE, random_molecule, random_periodic, small_model

metatomic_ase = pytest.importorskip("metatomic_ase")
mta = pytest.importorskip("metatomic.torch")
from e2ip.integrations.metatomic import UNCERTAINTY_OUTPUTS, to_metatomic  # noqa: E402

OUTPUTS = list(UNCERTAINTY_OUTPUTS)


def _atoms(structure) -> Atoms:
    return Atoms(numbers=structure.numbers, positions=structure.positions, cell=structure.cell,
                 pbc=structure.pbc)


def _exported(model, tmp_path, name="model.pt"):
    path = tmp_path / name
    to_metatomic(model).save(str(path))
    extra = {key: mta.ModelOutput(sample_kind="atom")
             for key in (OUTPUTS if model.has_uncertainty else [])}
    return metatomic_ase.MetatomicCalculator(str(path), additional_outputs=extra)


def _model(backbone: str, head: str, dtype: torch.dtype):
    model = small_model(backbone, head)
    if head == "e2ip":  # the default feature-distance evidence, fitted, with both scales
        model.fit_training_statistics([MOLECULE, random_periodic(4, seed=3)])
        model.variance_scale.fill_(1.7)
        model.epistemic_scale.fill_(2.5)
    return model.to(dtype)


def _compare(model, calc, atoms, rtol):
    exported, eager = atoms.copy(), atoms.copy()
    exported.calc, eager.calc = calc, E2IPCalculator(model)
    scale = max(1.0, abs(eager.get_potential_energy()))
    assert abs(exported.get_potential_energy() - eager.get_potential_energy()) <= rtol * scale
    np.testing.assert_allclose(exported.get_forces(), eager.get_forces(), rtol=rtol,
                               atol=rtol * np.abs(eager.get_forces()).max())
    if atoms.pbc.any():
        np.testing.assert_allclose(exported.get_stress(), eager.get_stress(), rtol=rtol,
                                   atol=rtol * np.abs(eager.get_stress()).max())
    if not model.has_uncertainty:
        return None
    out = {k: v.block().values.detach().double().numpy() for k, v in calc.additional_outputs.items()}
    ref = eager.calc.results
    cov = out["e2ip::forces_covariance"][..., 0]
    np.testing.assert_allclose(cov, ref["forces_covariance"], rtol=rtol,
                               atol=rtol * np.abs(ref["forces_covariance"]).max())
    np.testing.assert_allclose(out["e2ip::forces_uncertainty"][:, 0], ref["forces_uncertainty"],
                               rtol=rtol, atol=0)
    flat = out["e2ip::forces_covariance_6"]
    np.testing.assert_array_equal(flat[:, [0, 1, 2]], np.diagonal(cov, axis1=1, axis2=2))
    np.testing.assert_array_equal(flat[:, [3, 4, 5]], cov[:, [0, 0, 1], [1, 2, 2]])
    return cov


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 2e-5)],
                         ids=["float64", "float32"])
@pytest.mark.parametrize("backbone, head", [("painn", "e2ip"), ("alphanet", "e2ip"),
                                            ("painn", "none"), ("alphanet", "eip"),
                                            ("painn", "mve")])
def test_exported_model_matches_the_eager_calculator(tmp_path, backbone, head, dtype, rtol):
    model = _model(backbone, head, dtype)
    calc = _exported(model, tmp_path)
    for structure in (random_molecule(7, seed=4), random_periodic(5, seed=6)):
        _compare(model, calc, _atoms(structure), rtol)


def test_exported_covariances_rotate_with_the_structure(tmp_path):
    model = _model("painn", "e2ip", torch.float64)
    calc = _exported(model, tmp_path)
    atoms = _atoms(random_periodic(5, seed=7))
    cov = _compare(model, calc, atoms, 1e-10)
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    rotated = atoms.copy()
    rotated.positions, rotated.cell = atoms.positions @ q.T, atoms.cell[:] @ q.T
    cov_rotated = _compare(model, calc, rotated, 1e-10)
    np.testing.assert_allclose(cov_rotated, q @ cov @ q.T, rtol=1e-9,
                               atol=1e-9 * np.abs(cov).max())


def test_selected_atoms_limit_the_outputs_and_the_energy(tmp_path):
    """Domain decomposition: two systems in one call; only the selected atoms are reported and
    summed, the others still act as neighbours."""
    model = _model("painn", "e2ip", torch.float64)
    calc = _exported(model, tmp_path)
    systems = [_atoms(random_molecule(6, seed=8)), _atoms(random_periodic(4, seed=9))]
    selected = mta_labels([[0, 4], [1, 2], [0, 1]])  # reported in this order
    outputs = {"energy": mta.ModelOutput(sample_kind="system"),
               "e2ip::forces_covariance": mta.ModelOutput(sample_kind="atom")}
    got = calc.run_model(systems, outputs, selected_atoms=selected)
    per_atom = [model.predict(atoms) for atoms in systems]
    eager = [E2IPCalculator(model) for _ in systems]
    atomic = []
    for atoms, c in zip(systems, eager):
        atoms.calc = c
        atomic.append(c.get_property("energies", atoms))
    energy = got["energy"].block().values.detach().numpy()[:, 0]
    np.testing.assert_allclose(energy, [atomic[0][1] + atomic[0][4], atomic[1][2]], rtol=1e-10)
    block = got["e2ip::forces_covariance"].block()
    assert block.samples.values.tolist() == [[0, 4], [1, 2], [0, 1]]
    expected = np.stack([per_atom[0]["predictive"][4], per_atom[1]["predictive"][2],
                         per_atom[0]["predictive"][1]])
    np.testing.assert_allclose(block.values.detach().numpy()[..., 0], expected, rtol=1e-10)


def test_uncertainties_convert_to_the_units_an_engine_asks_for(tmp_path):
    model = _model("painn", "e2ip", torch.float64)
    calc = _exported(model, tmp_path)
    atoms = _atoms(random_molecule(6, seed=12))
    kcal = mta.unit_conversion_factor("eV", "kcal/mol")

    def values(name, unit):
        out = calc.run_model(atoms, {name: mta.ModelOutput(unit=unit, sample_kind="atom")})
        return out[name].block().values.detach().numpy()

    ev_cov = values("e2ip::forces_covariance", "(eV/Angstrom)^2")
    np.testing.assert_allclose(values("e2ip::forces_covariance", "(kcal/mol/Angstrom)^2"),
                               ev_cov * kcal**2, rtol=1e-12)
    np.testing.assert_allclose(values("e2ip::forces_uncertainty", "kcal/mol/Angstrom"),
                               values("e2ip::forces_uncertainty", "eV/Angstrom") * kcal,
                               rtol=1e-12)


def mta_labels(rows):
    from metatensor.torch import Labels

    return Labels(["system", "atom"], torch.tensor(rows, dtype=torch.int32))


@pytest.mark.parametrize("head, calibrated", [("none", True), ("mve", True), ("e2ip", False)],
                         ids=["plain-cal", "heteroskedastic-cal", "e2ip-members-raw"])
def test_exported_ensembles_match_the_eager_calculator(tmp_path, head, calibrated):
    """Member forces from the model's own autograd pass give the epistemic covariance; the
    engine's forces (the mean energy's gradient) are unaffected."""
    ensemble = Ensemble([small_model("painn", head, seed=k) for k in range(3)])
    if calibrated:
        ensemble.set_calibration_variance(0.3)
    calc = _exported(ensemble, tmp_path)
    for structure in (random_molecule(6, seed=10), random_periodic(4, seed=11)):
        atoms = _atoms(structure)
        _compare(ensemble, calc, atoms, 1e-10)
        spread = calc.run_model(atoms, {"energy_uncertainty": mta.ModelOutput(
            sample_kind="atom")})["energy_uncertainty"].block().values.detach().numpy()[:, 0]
        members = np.stack([E2IPCalculator(m).get_property("energies", atoms)
                            for m in ensemble.members])
        np.testing.assert_allclose(spread, members.std(0), rtol=1e-9, atol=1e-12)
        total = calc.run_model(atoms, {"energy_uncertainty": mta.ModelOutput(
            sample_kind="system")})["energy_uncertainty"].block().values.detach().numpy()
        np.testing.assert_allclose(total[:, 0], [members.sum(1).std()], rtol=1e-9)
        # the energy alone needs no member forces: it runs without autograd too
        with torch.no_grad():
            energy = calc.run_model(atoms, {"energy": mta.ModelOutput(sample_kind="system")})
        np.testing.assert_allclose(energy["energy"].block().values.numpy()[0, 0],
                                   E2IPCalculator(ensemble).get_property("energy", atoms),
                                   rtol=1e-10)


def test_a_model_that_does_not_compile_is_refused_with_one_line():
    from e2ip.backbones import BACKBONES, PaiNN, register_backbone

    @register_backbone
    class Uncompilable(PaiNN):  # a user's backbone that TorchScript cannot compile
        name = "uncompilable_test_backbone"

        def forward(self, species, edge_index, edge_vectors, batch, num_graphs, **options):
            return super().forward(species, edge_index, edge_vectors, batch, num_graphs)

    try:
        model = PotentialModel(elements=[1, 6, 8], cutoff=4.0, backbone=Uncompilable.name,
                               backbone_options={"num_features": 8, "num_layers": 1})
        with pytest.raises(ModelError, match="does not compile with TorchScript") as info:
            to_metatomic(model)
        assert "\n" not in str(info.value)
    finally:
        BACKBONES.pop(Uncompilable.name)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 2e-5)],
                         ids=["float64", "float32"])
def test_the_tensor_product_backbone_exports_through_e3nn_compile(tmp_path, dtype, rtol):
    model = _model("tensor_product", "e2ip", dtype)
    calc = _exported(model, tmp_path)
    for structure in (random_molecule(7, seed=4), random_periodic(5, seed=6)):
        _compare(model, calc, _atoms(structure), rtol)
    ensemble = Ensemble([small_model("tensor_product", "none", seed=k) for k in range(2)])
    _compare(ensemble, _exported(ensemble, tmp_path, "ensemble.pt"),
             _atoms(random_periodic(4, seed=2)), 1e-10)


def test_cli_export_writes_a_file_metatomic_loads(tmp_path, capsys):
    from e2ip.cli import main

    model = _model("painn", "e2ip", torch.float32)
    model.save(tmp_path / "model.pt")
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "exported.pt")]) == 0
    assert "exported to" in capsys.readouterr().out
    loaded = mta.load_atomistic_model(str(tmp_path / "exported.pt"))
    assert set(OUTPUTS) <= set(loaded.capabilities().outputs)
    assert loaded.capabilities().dtype == "float32"
    assert main(["export", str(tmp_path / "model.pt"), "--out", str(tmp_path / "x.pt"),
                 "--form", "bogus"]) == 2
