"""TorchSim (`e2ip.integrations.torchsim`): TorchSim's own interface checks pass; a batch of
replicas gives, system by system, what the ASE calculator gives (energy, forces, stress, the
force covariance and uncertainty); batched MD with TorchSim's integrator runs and conserves
energy over a short NVE run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms

from e2ip.integrations.ase_calculator import E2IPCalculator
from e2ip.models import Ensemble
from e2ip.testing.model_suite import MOLECULE, random_molecule, random_periodic, small_model

ts = pytest.importorskip("torch_sim")
from e2ip.integrations.torchsim import E2IPTorchSimModel  # noqa: E402


def _atoms(structure) -> Atoms:
    return Atoms(numbers=structure.numbers, positions=structure.positions, cell=structure.cell,
                 pbc=structure.pbc)


def _model():
    model = small_model("painn", "e2ip")
    model.fit_training_statistics([MOLECULE, random_periodic(4, seed=3)])
    model.variance_scale.fill_(1.3)
    return model


def test_torchsim_interface_checks_pass():
    from torch_sim.models.interface import validate_model_outputs

    model = small_model("painn", "e2ip")
    model.elements = [14, 26]  # TorchSim's checks use silicon and iron
    lookup = torch.full((119,), -1, dtype=torch.long)
    lookup[torch.tensor([14, 26])] = torch.arange(2)
    model.species_lookup = lookup
    model.reference_energies = torch.zeros(2, dtype=torch.float64)
    model.backbone.embedding = torch.nn.Embedding(2, model.backbone.embedding.embedding_dim)
    validate_model_outputs(E2IPTorchSimModel(model.double()), torch.device("cpu"),
                           torch.float64)


@pytest.mark.parametrize("periodic", [True, False], ids=["periodic", "molecules"])
@pytest.mark.parametrize("kind", ["single", "ensemble"])
def test_a_batch_of_replicas_matches_the_ase_calculator(periodic, kind):
    model = _model() if kind == "single" else Ensemble(
        [small_model("painn", "mve", seed=k) for k in range(3)])
    structures = ([random_periodic(4, seed=s) for s in (3, 5, 7)] if periodic
                  else [random_molecule(n, seed=n) for n in (5, 7, 6)])
    atoms = [_atoms(s) for s in structures]
    wrapper = E2IPTorchSimModel(model)
    out = wrapper(ts.io.atoms_to_state(atoms, wrapper.device, wrapper.dtype))
    offsets = np.cumsum([0] + [len(a) for a in atoms])
    for k, a in enumerate(atoms):
        a.calc = E2IPCalculator(model)
        rows = slice(offsets[k], offsets[k + 1])
        np.testing.assert_allclose(float(out["energy"][k]), a.get_potential_energy(), rtol=1e-10)
        np.testing.assert_allclose(out["forces"][rows].numpy(), a.get_forces(), rtol=1e-8,
                                   atol=1e-10)
        if periodic:
            from ase.stress import full_3x3_to_voigt_6_stress

            np.testing.assert_allclose(full_3x3_to_voigt_6_stress(out["stress"][k].numpy()),
                                       a.get_stress(), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(out["forces_covariance"][rows].numpy(),
                                   a.calc.results["forces_covariance"], rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(out["forces_uncertainty"][rows].numpy(),
                                   a.calc.results["forces_uncertainty"], rtol=1e-8)
    if kind == "ensemble":
        assert out["energy_uncertainty"].shape == (3,)


def test_batched_nve_md_runs_and_conserves_energy():
    from torch_sim.integrators.nve import nve

    model = _model()
    atoms = [_atoms(random_periodic(4, seed=s)) for s in (3, 5)]
    wrapper = E2IPTorchSimModel(model)
    state = ts.io.atoms_to_state(atoms, wrapper.device, wrapper.dtype)
    units = ts.units.MetalUnits
    init, step = nve(model=wrapper, dt=torch.tensor(0.0002 * units.time, dtype=torch.float64),
                     kT=torch.tensor(300 * units.temperature, dtype=torch.float64), seed=0)
    md = init(state)  # 0.2 fs steps

    def total(md_state):
        kinetic = 0.5 * (md_state.momenta ** 2 / md_state.masses[:, None]).sum(-1)
        per_system = torch.zeros(2, dtype=kinetic.dtype).index_add(0, md_state.system_idx,
                                                                   kinetic)
        return md_state.energy + per_system

    start = total(md)
    for _ in range(20):
        md = step(md)
    drift = (total(md) - start).abs()
    assert torch.isfinite(md.positions).all()
    assert (drift < 1e-3 * start.abs().clamp_min(1.0)).all(), drift
