"""Numerics under extreme but valid input: covariances stay finite and SPD in float32, and the
damping bounds the condition number of Sigma0 as docs/maths.md §1 says.

Bound: the 2e part T(c2) is traceless symmetric with Frobenius norm |c2| <= cmax2 after damping,
so its eigenvalues lie in +-sqrt(2/3)|c2| (SPEC) and the largest minus the smallest is at most
sqrt(2)|c2|; Sigma0 = expm((s + c0) I + T(c2)) then has condition number
exp(lambda_max - lambda_min) <= exp(sqrt(2) cmax2) (<= SPEC's exp(2 sqrt(2/3) cmax2)).
Eigenvalues are checked in float64 with numpy, independently of the head's own expm.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from e2ip import PotentialModel
from e2ip.backbones.base import BackboneOutput
from e2ip.data import Structure
from e2ip.data.graph import graph_from_structures
from e2ip.heads import HEADS, FeatureDims

UNCERTAINTY_HEADS = sorted(name for name in HEADS if name != "none")


def _random_features(n: int, scale: float, dims: FeatureDims, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        # magnitudes spread over orders of magnitude up to `scale`, random signs
        mag = torch.exp(torch.rand(*shape, generator=g, dtype=torch.float64) * math.log(scale))
        sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
        return (mag * sign).to(dtype)

    return BackboneOutput(scalars=rand(n, dims.num_scalars), atomic_energy=rand(n),
                          vectors=rand(n, dims.num_vectors, 3) if dims.num_vectors else None,
                          tensors=rand(n, dims.num_tensors, 5) if dims.num_tensors else None)


def _condition_numbers(matrices: torch.Tensor) -> np.ndarray:
    eig = np.linalg.eigvalsh(matrices.detach().to(torch.float64).numpy())
    assert (eig > 0).all(), f"not positive definite: min eigenvalue {eig.min():.3e}"
    return eig[:, -1] / eig[:, 0]


def _assert_spd(matrices: torch.Tensor, what: str) -> None:
    m = matrices.detach().to(torch.float64).numpy()
    assert np.isfinite(m).all(), f"{what}: not finite"
    scale = np.abs(m).max(axis=(-2, -1), keepdims=True)
    asym = np.abs(m - np.swapaxes(m, -1, -2)) / scale
    tol = 1e-5 if matrices.dtype == torch.float32 else 1e-12
    assert asym.max() < tol, f"{what}: asymmetric ({asym.max():.1e})"
    eig = np.linalg.eigvalsh(m)
    assert (eig > 0).all(), f"{what}: min eigenvalue {eig.min():.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dims", [FeatureDims(16, 8, 0), FeatureDims(16, 8, 4)],
                         ids=["from-vectors", "native-2e"])
def test_damping_bounds_the_condition_number(dims, dtype):
    torch.manual_seed(0)
    head = HEADS["e2ip"](dims, force_scale=0.7, hparams=HEADS["e2ip"].Hyperparameters()).to(dtype)
    hp = head.hparams
    bound = math.exp(math.sqrt(2.0) * hp.cmax2)
    assert bound <= math.exp(2 * math.sqrt(2 / 3) * hp.cmax2)  # SPEC's looser statement
    with torch.no_grad():
        for p in head.parameters():  # a trained-looking head, far from its initialisation
            p.normal_(0.0, 1.0)
    worst = 0.0
    for k, scale in enumerate([1e-3, 1.0, 1e2, 1e4, 1e6]):
        features = _random_features(2000, scale, dims, dtype, seed=k)
        params = head(features)
        sigma0 = head.sigma0(params)
        cond = _condition_numbers(sigma0)
        worst = max(worst, float(cond.max()))
        tol = 1e-3 if dtype == torch.float32 else 1e-9
        assert cond.max() <= bound * (1 + tol), (scale, cond.max(), bound)
        for key, value in head.covariances(params, None).items():
            _assert_spd(value, f"scale {scale:g} {key}")
    assert worst > 0.5 * bound  # the extreme features do reach the damped regime
    # the ablation without damping (the same weights) is not bounded: the same features break
    # the bound (hyperparameters are read when the head is built)
    undamped = HEADS["e2ip"](dims, force_scale=0.7,
                             hparams=dataclasses.replace(hp, damping=False)).to(dtype)
    undamped.load_state_dict(head.state_dict())
    features = _random_features(2000, 1e2, dims, dtype, seed=3)
    with torch.no_grad():
        sigma0 = undamped.sigma0(undamped(features))
    m = sigma0.to(torch.float64).numpy()
    finite = np.isfinite(m).all(axis=(1, 2))
    eig = np.linalg.eigvalsh(m[finite])
    with np.errstate(divide="ignore", invalid="ignore"):
        bounded = (eig[:, 0] > 0) & (eig[:, -1] / eig[:, 0] <= bound)
    assert not finite.all() or not bounded.all()


def _compressed(n: int, seed: int) -> Structure:
    """n atoms packed at about 0.5 Å spacing, none closer than the readers' 0.1 Å limit."""
    rng = np.random.default_rng(seed)
    pos: list[np.ndarray] = []
    while len(pos) < n:
        p = rng.uniform(0, 1.2, 3)
        if all(np.linalg.norm(p - q) > 0.15 for q in pos):
            pos.append(p)
    return Structure(numbers=rng.choice([1, 6, 8], n).astype(np.int64), positions=np.array(pos))


def _sparse(n: int, spacing: float = 40.0) -> Structure:
    """n atoms far beyond the cutoff from each other (no edges at all)."""
    return Structure(numbers=np.array([1, 6, 8] * n)[:n],
                     positions=np.arange(n)[:, None] * np.array([[spacing, 0.0, 0.0]]))


def _dense_box() -> Structure:
    rng = np.random.default_rng(2)
    cell = np.eye(3) * 3.0
    return Structure(numbers=rng.choice([1, 6, 8], 60).astype(np.int64),
                     positions=rng.uniform(0, 3.0, (60, 3)), cell=cell,
                     pbc=np.ones(3, dtype=bool))


@pytest.mark.parametrize("head", UNCERTAINTY_HEADS)
def test_float32_covariances_stay_spd_on_extreme_structures(head):
    torch.manual_seed(0)
    model = PotentialModel(elements=[1, 6, 8], cutoff=5.0, head=head, force_scale=0.5,
                           energy_scale=0.5,
                           backbone_options={"num_features": 16, "num_layers": 2})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    model = model.float().eval()
    structures = {
        "compressed": [_compressed(40, seed=0)],
        "sparse": [_sparse(5)],
        "isolated": [_sparse(1)],
        "dense periodic box (2.2 atoms/Å^3)": [_dense_box()],
        "mixed batch": [_compressed(20, 1), _sparse(3), _dense_box()],
    }
    for name, batch in structures.items():
        graph = graph_from_structures(batch, model.cutoff, torch.float32)
        out = model(graph, create_graph=False)
        assert torch.isfinite(out["forces"]).all() and torch.isfinite(out["energy"]).all(), name
        for form in model.available_forms():
            for key, value in model.covariances(out["params"], out["forces"], form).items():
                if key == "epistemic" and not model.head.has_epistemic:  # aleatoric only
                    assert not value.any(), f"{head} {name} {form} {key}"
                elif head == "cholesky":  # the ablation: finite, SPD only in exact arithmetic
                    assert torch.isfinite(value).all(), f"{head} {name} {form} {key}"
                else:
                    _assert_spd(value, f"{head} {name} {form} {key}")
        if head == "e2ip":
            cond = _condition_numbers(model.head.sigma0(out["params"]))
            assert cond.max() <= math.exp(math.sqrt(2) * model.head.hparams.cmax2) * 1.001


def test_cholesky_ablation_fails_softly_where_float32_loses_definiteness():
    """L L^T + eps I with a huge condition number is not SPD once rounded to float32: the
    ablation's NLL is then NaN for that atom (a skipped training step), never an exception."""
    head = HEADS["cholesky"](FeatureDims(4, 2, 0), force_scale=1.0,
                             hparams=HEADS["cholesky"].Hyperparameters())
    chol = torch.tensor([[[1e3, 0, 0], [1e3 + 0.01, 1e-4, 0], [1e3 - 0.01, 1e-4, 1e-4]],
                         [[1.0, 0, 0], [0.1, 1.0, 0], [0.2, 0.3, 1.0]]], dtype=torch.float32)
    sigma0 = chol @ chol.transpose(1, 2) + 1e-6 * torch.eye(3)
    assert np.linalg.eigvalsh(sigma0.numpy())[0].min() <= 0  # rounded: no longer SPD
    params = {"sigma0": sigma0, "kappa": torch.ones(2), "nu": torch.full((2,), 6.0)}
    loss = head.loss(params, torch.zeros(2, 3), torch.ones(2, 3))["nll"]
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])
