"""A reusable test suite for any model kind (a single potential, an ensemble, a new backbone or
head), in the spirit of nequip's model tests: inherit :class:`PotentialTests` in a test file and
give it a ``model`` fixture (a small float64 model in eval mode); pytest then runs every check.

.. code-block:: python

    import pytest
    from e2ip.testing import PotentialTests, small_model

    class TestMyBackbone(PotentialTests):
        @pytest.fixture(scope="class", params=["e2ip", "none"])
        def model(self, request):
            return small_model("my_backbone", request.param)

Checks, each against an independent reference (finite differences, the transformed structure,
the structure alone, the float64 model): forces = -dE/dr; energy invariance and equivariance of
forces and of every covariance under rotations, translations and permutations (a head with
``equivariant = False`` must instead NOT be rotation-equivariant); symmetric positive-definite
covariances; batching; a periodic box vs its 2x2x2 supercell; an isolated atom; float32 vs
float64; save and load. Only the :class:`~e2ip.models.Potential` interface is used, so every
model kind is covered the same way.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from ase import Atoms

from e2ip.backbones import BACKBONES
from e2ip.data.graph import collate, graph_from_structures, structure_to_graph
from e2ip.data.neighbors import neighbor_list
from e2ip.data.structures import Structure
from e2ip.heads import HEADS, Head
from e2ip.models.io import load_model
from e2ip.models.potential import Potential
from e2ip.models.single import PotentialModel

ELEMENTS = [1, 6, 8]
CUTOFF = 4.0
#: float64 tolerance of equivariance and batching, relative to max(1, |reference|)
TOL = 1e-9

#: small values tried for every hyperparameter of these names (only integer-valued fields)
SMALL_OPTIONS: dict[str, int] = {
    "num_features": 16, "num_scalars": 16, "num_vectors": 8, "num_tensors": 4,
    "num_channels": 16, "channels": 16, "hidden_channels": 16, "num_layers": 2,
    "num_interactions": 2, "num_radial": 8, "num_basis": 8, "num_rbf": 8, "radial_hidden": 16,
    "edge_hidden": 16, "frame_channels": 4, "readout_hidden": 8, "mlp_hidden": 16, "hidden": 16,
    "tensor_channels": 4,
}


def small_options(cls) -> dict:
    """Small widths for a backbone or head class (its integer hyperparameters named in
    :data:`SMALL_OPTIONS`)."""
    hp = getattr(cls, "Hyperparameters", None)
    if hp is None or not dataclasses.is_dataclass(hp):
        return {}
    return {f.name: SMALL_OPTIONS[f.name] for f in dataclasses.fields(hp)
            if f.name in SMALL_OPTIONS and type(f.default) is int}


def small_model(backbone: str, head: str, seed: int = 0) -> PotentialModel:
    """A small float64 model in eval mode with random weights; the head is moved away from its
    (near-isotropic) initialisation so that covariances are anisotropic and the dampers act."""
    torch.manual_seed(seed)
    model = PotentialModel(
        elements=ELEMENTS, cutoff=CUTOFF, backbone=backbone, head=head,
        backbone_options=small_options(BACKBONES[backbone]),
        head_options=small_options(HEADS[head]), force_scale=0.5, energy_scale=0.5,
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.double().eval()


# --- structures -----------------------------------------------------------------------------------

def random_molecule(n: int, seed: int, box: float = 3.0, min_dist: float = 0.9) -> Structure:
    """n atoms of H, C, O (the first a C) in a box (Å), no two closer than `min_dist`."""
    rng = np.random.default_rng(seed)
    pos: list[np.ndarray] = []
    while len(pos) < n:
        p = rng.uniform(0, box, 3)
        if all(np.linalg.norm(p - q) > min_dist for q in pos):
            pos.append(p)
    numbers = rng.choice(ELEMENTS, size=n)
    numbers[0] = 6
    return Structure(numbers=numbers.astype(np.int64), positions=np.array(pos))


def random_periodic(n: int, seed: int, min_dist: float = 0.8) -> Structure:
    """A small triclinic box (cutoff > half the box: several images) with separated atoms."""
    rng = np.random.default_rng(seed)
    cell = np.array([[4.3, 0.0, 0.0], [0.7, 4.1, 0.0], [-0.4, 0.5, 4.6]])
    while True:
        pos = rng.uniform(0, 1, (n, 3)) @ cell
        i, _, _ = neighbor_list(pos, cell, True, min_dist)
        if len(i) == 0:
            break
    numbers = rng.choice(ELEMENTS, size=n).astype(np.int64)
    return Structure(numbers=numbers, positions=pos, cell=cell, pbc=np.ones(3, dtype=bool))


def transformed(s: Structure, rot=None, shift=None, perm=None) -> Structure:
    """`s` rotated (positions and cell), shifted and with its atoms permuted."""
    pos, cell = s.positions.copy(), s.cell.copy()
    if rot is not None:
        pos, cell = pos @ rot.T, cell @ rot.T
    if shift is not None:
        pos = pos + shift
    numbers = s.numbers
    if perm is not None:
        pos, numbers = pos[perm], numbers[perm]
    return Structure(numbers=numbers.copy(), positions=pos, cell=cell, pbc=s.pbc.copy())


def random_rotations(n: int, seed: int) -> np.ndarray:
    """n uniformly random proper rotations (QR of Gaussian matrices, float64), (n, 3, 3)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        q = q * np.sign(np.diag(r))
        if np.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]
        out.append(q)
    return np.array(out)


# --- running a model ------------------------------------------------------------------------------

def run(model: Potential, structures, dtype=torch.float64) -> dict[str, np.ndarray]:
    """Energies, forces, atomic energies and the raw covariances (``cov_<name>``) for a batch,
    as float64 numpy."""
    graph = graph_from_structures(structures, model.cutoff, dtype)
    out = model(graph, create_graph=False)
    res = {"energy": out["energy"], "forces": out["forces"],
           "atomic_energies": out["atomic_energies"]}
    if model.has_uncertainty:
        for key, value in model.covariances(out["params"], out["forces"], "raw").items():
            res["cov_" + key] = value
    return {k: v.detach().to(torch.float64).numpy() for k, v in res.items()}


def split_atoms(x: np.ndarray, sizes) -> list[np.ndarray]:
    return np.split(x, np.cumsum(sizes)[:-1])


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max(1, max |b|)."""
    if a.size == 0:
        return 0.0
    return float(np.abs(a - b).max() / max(1.0, float(np.abs(b).max())))


def equivariance_errors(model: Potential, s: Structure, seed: int = 0,
                        dtype=torch.float64) -> dict[str, dict[str, float]]:
    """Errors of energy, forces and covariances under rotation, translation and permutation, as
    {transform: {quantity: error}}. All transformed copies run in one batch."""
    rng = np.random.default_rng(seed)
    rots = random_rotations(3, seed)
    shift = rng.normal(size=3) * 5.0
    perm = rng.permutation(s.n_atoms)
    cases = {f"rotation{k}": dict(rot=r) for k, r in enumerate(rots)}
    cases["translation"] = dict(shift=shift)
    cases["permutation"] = dict(perm=perm)
    cases["all"] = dict(rot=rots[0], shift=shift, perm=perm)
    structures = [s] + [transformed(s, **kw) for kw in cases.values()]
    out = run(model, structures, dtype)
    n = s.n_atoms
    per = {k: split_atoms(v, [n] * len(structures)) for k, v in out.items() if k != "energy"}
    errors = {}
    for c, (name, kw) in enumerate(cases.items(), start=1):
        rot = kw.get("rot", np.eye(3))
        p = kw.get("perm", np.arange(n))
        e = {"energy": rel_err(out["energy"][c:c + 1], out["energy"][:1])}
        e["atomic_energies"] = rel_err(per["atomic_energies"][c], per["atomic_energies"][0][p])
        e["forces"] = rel_err(per["forces"][c], per["forces"][0][p] @ rot.T)
        for key in per:
            if key.startswith("cov_"):
                e[key] = rel_err(per[key][c], rot @ per[key][0][p] @ rot.T)
        errors[name] = e
    return errors


def uncertainty_is_equivariant(model: Potential) -> bool:
    """False when a head of the model declares ``equivariant = False`` (a lab-frame ablation)."""
    return all(getattr(m, "equivariant", True) for m in model.modules() if isinstance(m, Head))


def has_epistemic_part(model: Potential) -> bool:
    return bool(model.has_uncertainty and model.has_epistemic)


MOLECULE = random_molecule(8, seed=0)


class PotentialTests:
    """Inherit and give a ``model`` fixture: a small float64 model (any kind) in eval mode."""

    #: covariances that must be positive definite; the others must be positive semi-definite
    #: (an ensemble's epistemic part, the spread of M member means, has rank at most M - 1)
    positive_definite: tuple[str, ...] = ("aleatoric", "epistemic", "predictive")

    def test_forces_are_energy_gradient(self, model):
        """Central differences of the energy along single coordinates and along random
        directions of all atoms at once (-dE/de = F . d), all displaced copies in one batch."""
        s = random_molecule(6, seed=1)
        rec = structure_to_graph(s, model.cutoff)  # one fixed neighbour list throughout
        rng = np.random.default_rng(1)
        directions = []
        for a, k in [(0, 0), (1, 2), (3, 1), (5, 0)]:
            d = np.zeros((s.n_atoms, 3))
            d[a, k] = 1.0
            directions.append(d)
        directions += [rng.normal(size=(s.n_atoms, 3)) for _ in range(3)]
        h = 1e-5
        records = [rec]
        for d in directions:
            for sign in (1.0, -1.0):
                records.append(dataclasses.replace(rec, positions=s.positions + sign * h * d))
        out = model(collate(records, torch.float64), create_graph=False)
        energy = out["energy"].detach().numpy()
        forces = out["forces"].detach().numpy()[: s.n_atoms]
        fd = -(energy[1::2] - energy[2::2]) / (2 * h)
        analytic = np.array([(forces * d).sum() for d in directions])
        assert np.isfinite(forces).all()
        assert np.abs(forces).max() > 1e-6, "forces vanish: the test would be vacuous"
        assert rel_err(fd, analytic) < 1e-6, (fd, analytic)

    def test_equivariance(self, model, record_property):
        errors = equivariance_errors(model, MOLECULE, seed=2)
        record_property("equivariance_errors_float64", errors)
        equivariant = uncertainty_is_equivariant(model)
        for case, errs in errors.items():
            for key, err in errs.items():
                rotated = case.startswith("rotation") or case == "all"
                if key.startswith("cov_") and rotated and not equivariant:
                    assert err > 1e-6, f"{key} unexpectedly rotation-equivariant ({err:.2e})"
                else:
                    assert err < TOL, f"{case}: {key} error {err:.2e}"

    def test_covariances_are_symmetric_positive_definite(self, model):
        if not model.has_uncertainty:
            assert model.covariances({}, None, None) == {}
            return
        covs = {k: v for k, v in run(model, [MOLECULE]).items() if k.startswith("cov_")}
        assert {"cov_aleatoric", "cov_epistemic", "cov_predictive"} <= set(covs)
        for key, c in covs.items():
            assert c.shape == (MOLECULE.n_atoms, 3, 3)
            if key == "cov_epistemic" and not has_epistemic_part(model):
                assert not c.any(), f"an aleatoric-only model has a nonzero {key}"
                continue
            np.testing.assert_allclose(c, np.swapaxes(c, -1, -2), rtol=0,
                                       atol=1e-12 * np.abs(c).max())
            eigenvalues = np.linalg.eigvalsh(c)
            if key.removeprefix("cov_") in self.positive_definite:
                assert (eigenvalues > 0).all(), f"{key} is not positive definite"
            else:
                assert (eigenvalues > -1e-12 * np.abs(c).max()).all(), f"{key} is not PSD"

    def test_batching(self, model):
        structures = [random_molecule(n, seed=10 + n) for n in (5, 9, 7)]
        batch = run(model, structures)
        sizes = [s.n_atoms for s in structures]
        for k, s in enumerate(structures):
            alone = run(model, [s])
            assert rel_err(batch["energy"][k:k + 1], alone["energy"]) < 1e-12
            for key, value in batch.items():
                if key != "energy":
                    assert rel_err(split_atoms(value, sizes)[k], alone[key]) < 1e-12, key

    def test_periodic_supercell(self, model):
        s = random_periodic(4, seed=3)
        atoms = Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=True)
        sup = Structure.from_atoms(atoms.repeat(2))  # 8 images, image-major atom order
        out, out_sup = run(model, [s]), run(model, [sup])
        for key, value in out.items():
            if key == "energy":
                assert abs(out_sup["energy"][0] - 8 * value[0]) < TOL * max(1.0, abs(value[0]) * 8)
                continue
            assert rel_err(out_sup[key], np.concatenate([value] * 8)) < TOL, key
        assert np.abs(out["forces"]).max() > 1e-6
        # the periodic structure is equivariant too (the cell rotates with the atoms)
        equivariant = uncertainty_is_equivariant(model)
        for case, errs in equivariance_errors(model, s, seed=4).items():
            for key, err in errs.items():
                if key.startswith("cov_") and not equivariant and case not in (
                        "translation", "permutation"):
                    continue
                assert err < TOL, f"periodic {case}: {key} error {err:.2e}"

    def test_isolated_atom(self, model):
        atom = Structure(numbers=np.array([8]), positions=np.zeros((1, 3)))
        out = run(model, [atom])
        assert out["energy"].shape == (1,) and np.isfinite(out["energy"]).all()
        np.testing.assert_array_equal(out["forces"], np.zeros((1, 3)))
        for key, value in out.items():
            assert np.isfinite(value).all(), key
        both = run(model, [atom, MOLECULE])  # together with a molecule in one batch: unchanged
        assert rel_err(both["energy"][:1], out["energy"]) < 1e-12
        assert rel_err(both["energy"][1:], run(model, [MOLECULE])["energy"]) < 1e-12
        pred = model.predict(Atoms(numbers=[8], positions=[[0.0, 0.0, 0.0]]))  # ase.Atoms path
        assert rel_err(pred["energy"], out["energy"]) < 1e-12

    def test_float32(self, model):
        model32 = copy.deepcopy(model).float()
        assert next(model32.parameters()).dtype == torch.float32
        equivariant = uncertainty_is_equivariant(model)
        worst: dict[str, float] = {}
        for case, errs in equivariance_errors(model32, MOLECULE, seed=5, dtype=torch.float32).items():
            for key, err in errs.items():
                rotated = case.startswith("rotation") or case == "all"
                if not (key.startswith("cov_") and rotated and not equivariant):
                    worst[key] = max(worst.get(key, 0.0), err)
        for key, err in worst.items():
            assert err < 1e-3, f"float32 {key} error {err:.2e}"
        out32, out64 = run(model32, [MOLECULE], torch.float32), run(model, [MOLECULE])
        for key in out64:  # float32 and float64 agree to float32 precision
            assert rel_err(out32[key], out64[key]) < 1e-3, key

    def test_save_load_roundtrip(self, model, tmp_path):
        # a deep copy, like training's EMA model (torch.fx-compiled e3nn modules add
        # `_tensor_constant` entries to the state_dict of a copy: saving and loading must cope)
        model = copy.deepcopy(model)
        model.metadata["note"] = "roundtrip"
        path = tmp_path / "model.pt"
        model.save(path)
        payload = torch.load(path, weights_only=True)  # the safe path: tensors and built-ins
        assert payload["kind"] == model.kind
        loaded = load_model(tmp_path)  # a run folder resolves to its model.pt
        assert type(loaded) is type(model)
        assert loaded.spec() == model.spec()
        assert next(loaded.parameters()).dtype == torch.float64
        structures = [MOLECULE, random_molecule(5, seed=7), random_periodic(4, seed=3)]
        a, b = model.predict(structures), loaded.predict(structures)
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert np.all(np.isfinite(a["energy"]))


__all__ = ["CUTOFF", "ELEMENTS", "MOLECULE", "PotentialTests", "equivariance_errors",
           "random_molecule", "random_periodic", "random_rotations", "rel_err", "run",
           "small_model", "small_options", "split_atoms", "transformed"]

