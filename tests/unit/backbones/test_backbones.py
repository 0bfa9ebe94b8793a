"""The tensor-product and AlphaNet backbones: O(3) equivariance of every output (float64, exact to
1e-9), permutation equivariance, degenerate geometries (linear molecules, isolated atoms), and use
inside PotentialModel. FD forces, batching and supercells for every registered backbone live in
test_model_suite.py."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from e3nn import o3

from e2ip.backbones import BACKBONES, get_backbone
from e2ip.backbones.alphanet import AlphaNetBackbone, edge_frames
from e2ip.backbones.tensor_product import TensorProductBackbone
from e2ip.nn.irreps import L2_BASIS, traceless_sym_to_l2
from e2ip.nn.radial import cosine_cutoff

CUTOFF = 4.0
NUM_SPECIES = 3
TOL = 1e-9

SMALL = {
    "tensor_product": dict(num_scalars=8, num_vectors=4, num_tensors=3, num_layers=2,
                           num_radial=6, radial_hidden=16, correlation=2, product_channels=4),
    "tensor_product_c1": dict(num_scalars=8, num_vectors=4, num_tensors=3, num_layers=2,
                              num_radial=6, radial_hidden=16, correlation=1),
    "alphanet": dict(num_features=16, num_tensors=4, num_layers=2, num_radial=8,
                     frame_channels=4),
}
NAMES = list(SMALL)


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def wigner_d2(rot: torch.Tensor) -> torch.Tensor:
    # e3nn builds its generators in the default dtype: float64 for a 1e-15 accurate D
    with default_dtype(torch.float64):
        return o3.Irrep("2e").D_from_matrix(rot)


def rotations(seed: int = 0):
    with default_dtype(torch.float64):
        torch.manual_seed(seed)
        r1, r2 = o3.rand_matrix(), o3.rand_matrix()
    return {"rotation": r1, "improper": -r2}


@pytest.fixture(scope="module", params=NAMES)
def backbone(request):
    """A small backbone built in float32 (the library default) and then cast to float64."""
    name = request.param
    cls = get_backbone(name.removesuffix("_c1"))
    torch.manual_seed(1)
    model = cls(NUM_SPECIES, CUTOFF, cls.Hyperparameters(**SMALL[name])).double()
    return model


def graph(pos: torch.Tensor, cutoff: float = CUTOFF):
    n = pos.shape[0]
    ii, jj = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    mask = (ii != jj) & (torch.cdist(pos, pos) < cutoff)
    return torch.stack([ii[mask], jj[mask]])


def molecule(n: int = 9, seed: int = 0) -> torch.Tensor:
    """Random positions (float64, Å) with all distances > 0.9 Å, spread over ~4 Å."""
    gen = np.random.default_rng(seed)
    pts: list[np.ndarray] = []
    while len(pts) < n:
        p = gen.uniform(-2.0, 2.0, 3)
        if all(np.linalg.norm(p - q) > 0.9 for q in pts):
            pts.append(p)
    return torch.tensor(np.array(pts))


def run(model, species, pos, edge_index=None):
    edge_index = graph(pos) if edge_index is None else edge_index
    vec = pos[edge_index[1]] - pos[edge_index[0]]
    batch = torch.zeros(pos.shape[0], dtype=torch.long)
    return model(species, edge_index, vec, batch, 1)


def energy_and_forces(model, species, pos):
    pos = pos.clone().requires_grad_(True)
    out = run(model, species, pos)
    (grad,) = torch.autograd.grad(out.atomic_energy.sum(), pos)
    return out, -grad


def check_equivariant(model, species, pos, rot, tol=TOL):
    out, forces = energy_and_forces(model, species, pos)
    out_r, forces_r = energy_and_forces(model, species, pos @ rot.T)
    assert (out_r.scalars - out.scalars).abs().max() < tol
    assert (out_r.atomic_energy - out.atomic_energy).abs().max() < tol
    assert (out_r.vectors - out.vectors @ rot.T).abs().max() < tol
    assert (out_r.tensors - out.tensors @ wigner_d2(rot).T).abs().max() < tol
    assert (forces_r - forces @ rot.T).abs().max() < tol
    return out, forces


def test_registry():
    assert {"painn", "tensor_product", "alphanet"} <= set(BACKBONES)
    assert get_backbone("tensor_product") is TensorProductBackbone
    assert get_backbone("alphanet") is AlphaNetBackbone


def test_output_shapes(backbone):
    pos = molecule()
    species = torch.arange(pos.shape[0]) % NUM_SPECIES
    out = run(backbone, species, pos)
    n = pos.shape[0]
    assert out.scalars.shape == (n, backbone.num_scalars)
    assert out.vectors.shape == (n, backbone.num_vectors, 3)
    assert out.tensors.shape == (n, backbone.num_tensors, 5)
    assert out.atomic_energy.shape == (n,)
    for t in (out.scalars, out.vectors, out.tensors, out.atomic_energy):
        assert t.dtype == torch.float64
        assert torch.isfinite(t).all()
    # the equivariant channels are not trivially zero
    assert out.vectors.abs().max() > 1e-6 and out.tensors.abs().max() > 1e-6


@pytest.mark.parametrize("kind", ["rotation", "improper"])
def test_o3_equivariance(backbone, kind):
    pos = molecule(seed=3)
    species = torch.tensor([0, 1, 2, 1, 0, 0, 2, 1, 0])
    check_equivariant(backbone, species, pos, rotations(5)[kind])


@pytest.mark.parametrize("shape", ["linear", "diatomic", "symmetric"])
def test_degenerate_geometries(backbone, shape):
    """Linear chains, a diatomic, and a site with a vanishing neighbour sum (CO2's carbon):
    exactly equivariant, finite forces."""
    if shape == "linear":
        pos = torch.zeros(5, 3, dtype=torch.float64)
        pos[:, 0] = torch.tensor([0.0, 1.1, 2.3, 3.2, 4.5])
    elif shape == "diatomic":
        pos = torch.tensor([[0.0, 0.0, 0.0], [1.2, 0.0, 0.0]], dtype=torch.float64)
    else:
        pos = torch.tensor([[-1.16, 0.0, 0.0], [0.0, 0.0, 0.0], [1.16, 0.0, 0.0]],
                           dtype=torch.float64)
    with default_dtype(torch.float64):
        tilt = o3.rand_matrix()  # a generic axis, not a coordinate axis
    pos = pos @ tilt.T
    species = torch.arange(pos.shape[0]) % NUM_SPECIES
    for rot in rotations(7).values():
        out, forces = check_equivariant(backbone, species, pos, rot)
        assert torch.isfinite(forces).all()
        # by symmetry every vector feature of a linear molecule lies on its axis
        axis = pos[1] - pos[0]
        axis = axis / axis.norm()
        for vec in (out.vectors, forces):
            assert torch.linalg.cross(vec, axis.expand_as(vec), dim=-1).abs().max() < 1e-9


def test_permutation_equivariance(backbone):
    pos = molecule(seed=4)
    species = torch.tensor([0, 1, 2, 1, 0, 0, 2, 1, 0])
    perm = torch.randperm(pos.shape[0], generator=torch.Generator().manual_seed(0))
    out = run(backbone, species, pos)
    out_p = run(backbone, species[perm], pos[perm])
    for a, b in [(out.scalars, out_p.scalars), (out.vectors, out_p.vectors),
                 (out.tensors, out_p.tensors), (out.atomic_energy, out_p.atomic_energy)]:
        assert (a[perm] - b).abs().max() < TOL
    # also the edge order must not matter
    edge_index = graph(pos)
    order = torch.randperm(edge_index.shape[1], generator=torch.Generator().manual_seed(1))
    out_e = run(backbone, species, pos, edge_index[:, order])
    assert (out_e.tensors - out.tensors).abs().max() < TOL
    assert (out_e.atomic_energy - out.atomic_energy).abs().max() < TOL


def test_isolated_atoms(backbone):
    """No edges at all, and an isolated atom next to a molecule in the same batch."""
    species = torch.tensor([1])
    pos = torch.zeros(1, 3, dtype=torch.float64)
    alone = run(backbone, species, pos, torch.zeros(2, 0, dtype=torch.long))
    assert torch.isfinite(alone.atomic_energy).all()
    assert alone.vectors.abs().max() == 0 and alone.tensors.abs().max() == 0
    mol = molecule(n=4, seed=5)
    far = torch.tensor([[50.0, 0.0, 0.0]], dtype=torch.float64)
    both = run(backbone, torch.tensor([0, 1, 2, 0, 1]), torch.cat([mol, far]))
    assert torch.allclose(both.atomic_energy[-1], alone.atomic_energy[0], atol=1e-12)


def test_smooth_at_cutoff(backbone):
    """An atom just inside vs just outside the cutoff of every other atom: nearly no change."""
    mol = molecule(n=4, seed=6)
    species = torch.tensor([0, 1, 2, 1, 2])
    direction = torch.tensor([0.6, 0.8, 0.0], dtype=torch.float64)
    k = int(torch.argmax(mol @ direction))  # the newcomer approaches atom k from outside
    outs = []
    for d in (CUTOFF - 1e-4, CUTOFF + 1e-4):
        outs.append(run(backbone, species, torch.cat([mol, (mol[k] + d * direction)[None]])))
    assert (outs[0].atomic_energy[:4] - outs[1].atomic_energy[:4]).abs().max() < 1e-5
    assert (outs[0].tensors[:4] - outs[1].tensors[:4]).abs().max() < 1e-5


def test_float32_default():
    for name in NAMES:
        cls = get_backbone(name.removesuffix("_c1"))
        model = cls(NUM_SPECIES, CUTOFF, cls.Hyperparameters(**SMALL[name]))
        pos = molecule(seed=8).float()
        out = run(model, torch.arange(9) % NUM_SPECIES, pos)
        assert out.tensors.dtype == torch.float32 and torch.isfinite(out.tensors).all()


def test_hparams_roundtrip():
    for name in ("tensor_product", "alphanet"):
        cls = get_backbone(name)
        hp = cls.hparams_from_dict(SMALL[name])
        assert cls.hparams_from_dict(cls.hparams_to_dict(hp)) == hp


def test_tensor_product_rejects_bad_correlation():
    with pytest.raises(ValueError, match="correlation"):
        TensorProductBackbone(NUM_SPECIES, CUTOFF, TensorProductBackbone.Hyperparameters(
            num_scalars=4, num_vectors=2, num_tensors=2, num_layers=1, correlation=3))


def test_traceless_sym_to_l2():
    from e2ip.nn.irreps import l2_basis_tensor

    assert torch.equal(torch.tensor(L2_BASIS, dtype=torch.float64), l2_basis_tensor(torch.float64))
    torch.manual_seed(0)
    m = torch.randn(4, 3, 3, dtype=torch.float64)
    rot = rotations(2)["rotation"]
    c = traceless_sym_to_l2(m)
    assert (traceless_sym_to_l2(rot @ m @ rot.T) - c @ wigner_d2(rot).T).abs().max() < 1e-12
    # only the symmetric traceless part counts
    sym = 0.5 * (m + m.transpose(1, 2))
    sym = sym - sym.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None] / 3 * torch.eye(3)
    assert torch.allclose(traceless_sym_to_l2(sym), c)
    assert torch.allclose(c.norm(dim=-1), sym.flatten(1).norm(dim=-1))


def test_alphanet_frames():
    """Orthonormal frames for a generic geometry; e2, e3 shrink smoothly when degenerate."""
    pos = molecule(seed=9)
    ei = graph(pos)
    vec = pos[ei[1]] - pos[ei[0]]
    fcut = cosine_cutoff(vec.norm(dim=-1), CUTOFF)
    frame, geometry = edge_frames(ei, vec, fcut, pos.shape[0], CUTOFF, 1e-6)
    gram = frame @ frame.transpose(1, 2)
    assert (gram - torch.eye(3, dtype=gram.dtype)).abs().max() < 1e-8
    assert torch.allclose(torch.linalg.det(frame), torch.ones(len(frame), dtype=frame.dtype))
    # a diatomic: no second axis, e2 = e3 = 0 exactly, e1 still the bond
    pos = torch.tensor([[0.0, 0.0, 0.0], [0.3, 1.0, 0.2]], dtype=torch.float64)
    ei = graph(pos)
    vec = pos[ei[1]] - pos[ei[0]]
    frame, geometry = edge_frames(ei, vec, cosine_cutoff(vec.norm(dim=-1), CUTOFF), 2, CUTOFF,
                                  0.25)
    assert frame[:, 1:].abs().max() < 1e-15
    assert torch.allclose(frame[:, 0], vec / vec.norm(dim=-1, keepdim=True))
    assert torch.isfinite(geometry).all()


@pytest.mark.parametrize("name", ["tensor_product", "alphanet"])
@pytest.mark.parametrize("head", ["e2ip", "none"])
def test_potential_model(name, head):
    from e2ip.data.graph import graph_from_structures
    from e2ip.data.structures import Structure
    from e2ip.models.single import PotentialModel

    opts = SMALL[name]
    model = PotentialModel(elements=[1, 6, 8], cutoff=CUTOFF, backbone=name, head=head,
                           backbone_options=opts)
    assert model.spec()["backbone_options"]["num_layers"] == 2
    structures = [
        Structure(numbers=np.array([8, 1, 1]),
                  positions=np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])),
        Structure(numbers=np.array([6, 8, 1, 1]), positions=molecule(n=4, seed=10).numpy()),
    ]
    for dtype in (torch.float32, torch.float64):
        model = model.to(dtype)
        out = model(graph_from_structures(structures, CUTOFF, dtype))
        assert out["energy"].shape == (2,) and out["forces"].shape == (7, 3)
        assert torch.isfinite(out["forces"]).all()
        if head == "e2ip":
            assert out["params"]["c2"].shape == (7, 5)
            assert torch.isfinite(out["params"]["A"]).all()


def test_tensor_product_constants_exact_after_cast():
    """e3nn's Wigner-3j buffers are restored exactly on casts, also in deep copies."""
    import copy

    hp = TensorProductBackbone.Hyperparameters(**SMALL["tensor_product"])
    model = copy.deepcopy(TensorProductBackbone(NUM_SPECIES, CUTOFF, hp)).double()
    found = 0
    for name, buf in model.named_buffers():
        if "_w3j_" in name:
            ls = [int(x) for x in name.rsplit("_w3j_", 1)[1].split("_")]
            assert buf.dtype == torch.float64
            assert torch.equal(buf, o3.wigner_3j(*ls, dtype=torch.float64))
            found += 1
    assert found > 0
