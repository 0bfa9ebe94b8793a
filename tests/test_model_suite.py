"""A reusable test suite for every (backbone, head) pair in the registries (like nequip's).

The parameter list is built at import time from `BACKBONES` x `HEADS`, so a backbone or head that
is registered later is covered without touching this file. Models are small (widths from
`SMALL_OPTIONS`, filtered by each Hyperparameters dataclass) and run in float64.

Checks: forces = -dE/dr (central finite differences); energy invariance and equivariance of forces
and of every covariance from `head.covariances` under rotations, translations and permutations
(heads with `equivariant = False` must instead NOT be rotation-equivariant); batching; periodic
boxes vs their 2x2x2 supercells; an isolated atom; float32; save/load.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import numpy as np
import pytest
import torch
from ase import Atoms
from e3nn import o3

import e2ip
from e2ip import PotentialModel
from e2ip.backbones import BACKBONES
from e2ip.data import Structure
from e2ip.data.graph import collate, graph_from_structures, structure_to_graph
from e2ip.data.neighbors import neighbor_list
from e2ip.heads import HEADS

ELEMENTS = [1, 6, 8]
CUTOFF = 4.0
TOL = 1e-9  # float64 equivariance / batching tolerance, relative to max(1, |reference|)

#: small values tried for every hyperparameter of these names (only integer-valued fields)
SMALL_OPTIONS: dict[str, int] = {
    "num_features": 16, "num_scalars": 16, "num_vectors": 8, "num_tensors": 4,
    "num_channels": 16, "channels": 16, "hidden_channels": 16, "num_layers": 2,
    "num_interactions": 2, "num_radial": 8, "num_basis": 8, "num_rbf": 8, "radial_hidden": 16,
    "edge_hidden": 16, "frame_channels": 4, "readout_hidden": 8, "mlp_hidden": 16, "hidden": 16,
    "tensor_channels": 4,
}


def small_options(cls) -> dict:
    hp = getattr(cls, "Hyperparameters", None)
    if hp is None or not dataclasses.is_dataclass(hp):
        return {}
    out = {}
    for f in dataclasses.fields(hp):
        if f.name in SMALL_OPTIONS and type(f.default) is int:
            out[f.name] = SMALL_OPTIONS[f.name]
    return out


BACKBONE_NAMES = sorted(BACKBONES)
HEAD_NAMES = sorted(HEADS)
#: (backbone, head) pairs that cannot be built, with the reason; every other pair must build
UNSUPPORTED: dict[tuple[str, str], str] = {}
COMBOS = [pytest.param(b, h, id=f"{b}-{h}",
                       marks=pytest.mark.skip(UNSUPPORTED[b, h]) if (b, h) in UNSUPPORTED else ())
          for b in BACKBONE_NAMES for h in HEAD_NAMES]


def is_equivariant_head(head: str) -> bool:
    return bool(getattr(HEADS[head], "equivariant", True))


@functools.cache
def _build(backbone: str, head: str) -> PotentialModel:
    torch.manual_seed(0)
    model = PotentialModel(
        elements=ELEMENTS, cutoff=CUTOFF, backbone=backbone, head=head,
        backbone_options=small_options(BACKBONES[backbone]),
        head_options=small_options(HEADS[head]), force_scale=0.5, energy_scale=0.5,
    )
    # move the head away from its (near-isotropic) initialisation so that covariances are
    # anisotropic and the dampers are exercised
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.double().eval()


def get_model(backbone: str, head: str) -> PotentialModel:
    return _build(backbone, head)


# --- structures -----------------------------------------------------------------------------------

def random_molecule(n: int, seed: int, box: float = 3.0, min_dist: float = 0.9) -> Structure:
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
        frac = rng.uniform(0, 1, (n, 3))
        pos = frac @ cell
        i, _, _ = neighbor_list(pos, cell, True, min_dist)
        if len(i) == 0:
            break
    numbers = rng.choice(ELEMENTS, size=n).astype(np.int64)
    return Structure(numbers=numbers, positions=pos, cell=cell, pbc=np.ones(3, dtype=bool))


def transformed(s: Structure, rot=None, shift=None, perm=None) -> Structure:
    pos, cell = s.positions.copy(), s.cell.copy()
    if rot is not None:
        pos, cell = pos @ rot.T, cell @ rot.T
    if shift is not None:
        pos = pos + shift
    numbers = s.numbers
    if perm is not None:
        pos, numbers = pos[perm], numbers[perm]
    return Structure(numbers=numbers.copy(), positions=pos, cell=cell, pbc=s.pbc.copy())


def run(model: PotentialModel, structures, dtype=torch.float64) -> dict:
    """Energies, forces, atomic energies and covariances for a batch, as float64 numpy."""
    graph = graph_from_structures(structures, model.cutoff, dtype)
    out = model(graph, create_graph=False)
    res = {"energy": out["energy"], "forces": out["forces"],
           "atomic_energies": out["atomic_energies"]}
    covs = model.head.covariances(out["params"], out["forces"])
    for key, value in covs.items():
        res["cov_" + key] = value
    return {k: v.detach().to(torch.float64).numpy() for k, v in res.items()}


def split_atoms(x: np.ndarray, sizes) -> list[np.ndarray]:
    return np.split(x, np.cumsum(sizes)[:-1])


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0:
        return 0.0
    return float(np.abs(a - b).max() / max(1.0, float(np.abs(b).max())))


def random_rotations(n: int, seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    return o3.rand_matrix(n, dtype=torch.float64).numpy()


def equivariance_errors(model, s: Structure, seed: int = 0, dtype=torch.float64) -> dict:
    """Errors of energy, forces and covariances under rotation, translation and permutation, each
    as {transform: {quantity: error}}. All transformed copies run in one batch."""
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
                ref = rot @ per[key][0][p] @ rot.T
                e[key] = rel_err(per[key][c], ref)
        errors[name] = e
    return errors


MOLECULE = random_molecule(8, seed=0)


# --- the suite ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone,head", COMBOS)
def test_forces_are_energy_gradient(backbone, head):
    """Central differences of the energy along single coordinates and along random directions of
    all atoms at once (-dE/de = F . d), all displaced copies in one batch."""
    model = get_model(backbone, head)
    s = random_molecule(6, seed=1)
    rec = structure_to_graph(s, CUTOFF)  # one fixed neighbour list for every displacement
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


@pytest.mark.parametrize("backbone,head", COMBOS)
def test_equivariance(backbone, head, record_property):
    model = get_model(backbone, head)
    errors = equivariance_errors(model, MOLECULE, seed=2)
    record_property("equivariance_errors_float64", errors)
    equivariant_head = is_equivariant_head(head)
    for case, errs in errors.items():
        for key, err in errs.items():
            rotated = case.startswith("rotation") or case == "all"
            if key.startswith("cov_") and rotated and not equivariant_head:
                assert err > 1e-6, f"{head}: {key} unexpectedly rotation-equivariant ({err:.2e})"
            else:
                assert err < TOL, f"{case}: {key} error {err:.2e}"
    if not HEADS[head].has_uncertainty:
        return
    covs = run(model, [MOLECULE])
    cov_keys = [k for k in covs if k.startswith("cov_")]
    assert cov_keys, "a head with uncertainty returns covariances"
    for key in cov_keys:
        c = covs[key]
        assert c.shape == (MOLECULE.n_atoms, 3, 3)
        if key == "cov_epistemic" and not HEADS[head].has_epistemic:  # aleatoric-only head
            assert not c.any(), f"{head}: an aleatoric-only head has a nonzero {key}"
            continue
        np.testing.assert_allclose(c, np.swapaxes(c, -1, -2), rtol=0, atol=1e-12 * np.abs(c).max())
        assert (np.linalg.eigvalsh(c) > 0).all(), f"{key} is not positive definite"


@pytest.mark.parametrize("backbone,head", COMBOS)
def test_batching(backbone, head):
    model = get_model(backbone, head)
    structures = [random_molecule(n, seed=10 + n) for n in (5, 9, 7)]
    batch = run(model, structures)
    sizes = [s.n_atoms for s in structures]
    for k, s in enumerate(structures):
        alone = run(model, [s])
        assert rel_err(batch["energy"][k:k + 1], alone["energy"]) < 1e-12
        for key, value in batch.items():
            if key != "energy":
                assert rel_err(split_atoms(value, sizes)[k], alone[key]) < 1e-12, key


@pytest.mark.parametrize("backbone,head", COMBOS)
def test_periodic_supercell(backbone, head):
    model = get_model(backbone, head)
    s = random_periodic(4, seed=3)
    atoms = Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=True)
    sup = Structure.from_atoms(atoms.repeat(2))  # 8 images, image-major atom order
    out, out_sup = run(model, [s]), run(model, [sup])
    for key, value in out.items():
        if key == "energy":
            assert abs(out_sup["energy"][0] - 8 * value[0]) < TOL * max(1.0, abs(value[0]) * 8)
            continue
        tiled = np.concatenate([value] * 8)
        assert rel_err(out_sup[key], tiled) < TOL, key
    assert np.abs(out["forces"]).max() > 1e-6
    # the periodic structure is equivariant too (cell rotates with the atoms)
    errors = equivariance_errors(model, s, seed=4)
    for case, errs in errors.items():
        for key, err in errs.items():
            if key.startswith("cov_") and not is_equivariant_head(head) and case != "translation" \
                    and case != "permutation":
                continue
            assert err < TOL, f"periodic {case}: {key} error {err:.2e}"


@pytest.mark.parametrize("backbone,head", COMBOS)
def test_isolated_atom(backbone, head):
    model = get_model(backbone, head)
    atom = Structure(numbers=np.array([8]), positions=np.zeros((1, 3)))
    out = run(model, [atom])
    assert out["energy"].shape == (1,) and np.isfinite(out["energy"]).all()
    np.testing.assert_array_equal(out["forces"], np.zeros((1, 3)))
    for key, value in out.items():
        assert np.isfinite(value).all(), key
    # together with a molecule in one batch: unchanged
    both = run(model, [atom, MOLECULE])
    assert rel_err(both["energy"][:1], out["energy"]) < 1e-12
    assert rel_err(both["energy"][1:], run(model, [MOLECULE])["energy"]) < 1e-12
    # predict() path (ase.Atoms) gives the same
    pred = model.predict(Atoms(numbers=[8], positions=[[0.0, 0.0, 0.0]]))
    assert rel_err(pred["energy"], out["energy"]) < 1e-12


@pytest.mark.parametrize("backbone,head", COMBOS)
def test_float32(backbone, head, record_property, capsys):
    model32 = copy.deepcopy(get_model(backbone, head)).float()
    assert next(model32.parameters()).dtype == torch.float32
    errors = equivariance_errors(model32, MOLECULE, seed=5, dtype=torch.float32)
    worst: dict[str, float] = {}
    for case, errs in errors.items():
        for key, err in errs.items():
            rotated = case.startswith("rotation") or case == "all"
            if key.startswith("cov_") and rotated and not is_equivariant_head(head):
                continue
            worst[key] = max(worst.get(key, 0.0), err)
    record_property("equivariance_errors_float32", worst)
    with capsys.disabled():
        print(f"\n[float32 {backbone}-{head}] max relative equivariance error: "
              + ", ".join(f"{k}={v:.1e}" for k, v in worst.items()))
    for key, err in worst.items():
        assert err < 1e-3, f"float32 {key} error {err:.2e}"
    # float32 and float64 agree to float32 precision
    out32, out64 = run(model32, [MOLECULE], torch.float32), run(get_model(backbone, head),
                                                                 [MOLECULE])
    for key in out64:
        assert rel_err(out32[key], out64[key]) < 1e-3, key


@pytest.mark.parametrize("backbone,head", COMBOS)
def test_save_load_roundtrip(backbone, head, tmp_path):
    # a deep copy, like training's EMA model (torch.fx-compiled e3nn modules add
    # `_tensor_constant` entries to the state_dict of a copy: saving and loading must cope)
    model = copy.deepcopy(get_model(backbone, head))
    with torch.no_grad():
        model.reference_energies.copy_(torch.tensor([-13.6, -1029.5, -2041.8]))
    model.metadata["note"] = "roundtrip"
    path = tmp_path / "model.pt"
    model.save(path)
    payload = torch.load(path, weights_only=True)  # safe path: plain tensors and built-ins
    assert payload["spec"]["backbone"] == backbone and payload["spec"]["head"] == head
    loaded = e2ip.load_model(path)
    assert type(loaded) is type(model)
    assert loaded.spec() == model.spec()
    assert next(loaded.parameters()).dtype == torch.float64
    structures = [MOLECULE, random_molecule(5, seed=7), random_periodic(4, seed=3)]
    a, b = model.predict(structures), loaded.predict(structures)
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert np.all(np.isfinite(a["energy"]))


def _saved_bytes(model, structures) -> int:
    """Bytes of the distinct storages the forward pass keeps for the force backward pass."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    graph = graph_from_structures(structures, model.cutoff, torch.float64)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(graph, create_graph=False)
    return sum(storages.values())


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_edge_chunking_is_exact_and_saves_memory(backbone):
    """Messages summed over chunks of edges under checkpointing (inference on large graphs) give
    the unchunked energies, forces and covariances, and keep far less for the backward pass."""
    model = copy.deepcopy(get_model(backbone, "e2ip"))
    structures = [MOLECULE, random_periodic(4, seed=3), random_molecule(7, seed=11)]
    model.backbone.edge_chunk_size = 0
    whole, whole_bytes = run(model, structures), _saved_bytes(model, structures)
    model.backbone.edge_chunk_size = 7  # divides no edge count here: a ragged last chunk
    chunked, chunked_bytes = run(model, structures), _saved_bytes(model, structures)
    for key, value in whole.items():
        assert rel_err(chunked[key], value) < 1e-12, key
    assert chunked_bytes < 0.5 * whole_bytes, (chunked_bytes, whole_bytes)
    model.train()  # never while training: the training step's double backward needs the graph
    assert model.backbone.edge_chunk() == 0


def test_energy_is_scaled_atomic_energies_plus_reference_energies():
    """E = energy_scale * sum_i eps_i + sum_i E0[z_i]: shifting E0 by d per element shifts E
    by the count-weighted sum of d and leaves forces alone; doubling energy_scale doubles
    E - sum E0 and the forces."""
    model = copy.deepcopy(get_model("painn", "e2ip"))
    structures = [MOLECULE, random_molecule(5, seed=7)]
    base = run(model, structures)
    shift = torch.tensor([0.5, -3.0, 11.0], dtype=torch.float64)
    with torch.no_grad():
        model.reference_energies.add_(shift)
    shifted = run(model, structures)
    lookup = {z: k for k, z in enumerate(model.elements)}
    expected = [sum(float(shift[lookup[int(z)]]) for z in s.numbers) for s in structures]
    np.testing.assert_allclose(shifted["energy"] - base["energy"], expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(shifted["forces"], base["forces"], rtol=0, atol=1e-12)
    e0 = [sum(float(model.reference_energies[lookup[int(z)]]) for z in s.numbers)
          for s in structures]
    model.energy_scale *= 2.0
    doubled = run(model, structures)
    np.testing.assert_allclose(doubled["energy"] - e0, 2 * (shifted["energy"] - e0), rtol=1e-10,
                               atol=1e-10)
    np.testing.assert_allclose(doubled["forces"], 2 * shifted["forces"], rtol=1e-10, atol=1e-12)
