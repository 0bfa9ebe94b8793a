"""docs/maths.md §2: damping, the constant map T from 2e coefficients to matrices, and expm of symmetric
3x3 matrices (values and gradients), all in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from e3nn import o3
from e3nn.io import CartesianTensor

from e2ip.heads.evidential import E2IPHyperparameters
from e2ip.heads.spd import damp_norm, damp_scalar, expm_symmetric, linear_tanh, squarings_for
from e2ip.nn.irreps import l2_basis_tensor, l2_to_matrix, sym_outer_l2, traceless_sym_to_l2

F64 = torch.float64
TAU, CMAX = 4.0, 5.0


def sym(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x + x.transpose(-1, -2))


def random_symmetric(n: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * sym(torch.randn(n, 3, 3, dtype=F64, generator=g))


def rotations(n: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return o3.rand_matrix(n, dtype=F64)


class float64_default:
    """e3nn builds its constants (so3 generators, change of basis) in the default dtype: under
    float32 they are rounded and D2 from `D_from_matrix` is only good to ~1e-6 even for float64
    rotations. Build them under a float64 default for the 1e-9 checks."""

    def __enter__(self):
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.old)


def wigner_d2(rots: torch.Tensor) -> torch.Tensor:
    with float64_default():
        return o3.Irrep("2e").D_from_matrix(rots)


# --- damping -------------------------------------------------------------------------------------

def test_damper_identity_below_tau_and_saturation():
    x = torch.linspace(-10, TAU, 201, dtype=F64)
    assert torch.equal(linear_tanh(x, TAU, CMAX), x)
    big = torch.tensor([6.0, 10.0, 100.0, 1e6], dtype=F64)
    y = linear_tanh(big, TAU, CMAX)
    assert (y <= CMAX).all() and (y > TAU).all()
    assert y[0] < CMAX
    assert y[-1] == pytest.approx(CMAX, abs=1e-12)
    assert torch.all(torch.diff(y) >= 0)  # monotone up to saturation
    # the scalar damper is two-sided and odd
    c0 = torch.linspace(-50, 50, 1001, dtype=F64)
    d0 = damp_scalar(c0, TAU, CMAX)
    assert d0.abs().max() <= CMAX
    torch.testing.assert_close(damp_scalar(-c0, TAU, CMAX), -d0, rtol=0, atol=0)
    inside = c0.abs() <= TAU
    assert torch.equal(d0[inside], c0[inside])


def test_damper_continuity_and_slope_at_tau():
    eps = 1e-7
    x = torch.tensor([TAU - eps, TAU, TAU + eps], dtype=F64, requires_grad=True)
    y = linear_tanh(x, TAU, CMAX)
    assert abs(float(y[2] - y[1])) < 2 * eps and abs(float(y[1] - y[0])) < 2 * eps
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, torch.ones(3, dtype=F64), rtol=0, atol=1e-10)
    # one-sided finite-difference slopes agree (C^1): both = 1
    h = 1e-6
    t = torch.tensor(TAU, dtype=F64)
    left = (linear_tanh(t, TAU, CMAX) - linear_tanh(t - h, TAU, CMAX)) / h
    right = (linear_tanh(t + h, TAU, CMAX) - linear_tanh(t, TAU, CMAX)) / h
    assert float(left) == pytest.approx(1.0, abs=1e-9)
    assert float(right) == pytest.approx(1.0, abs=1e-5)
    # derivative 1 - tanh^2((x - tau)/(c - tau)) above tau: continuous and decaying to 0
    xs = torch.linspace(TAU, 20.0, 500, dtype=F64, requires_grad=True)
    (gs,) = torch.autograd.grad(linear_tanh(xs, TAU, CMAX).sum(), xs)
    expected = 1 - torch.tanh((xs.detach() - TAU) / (CMAX - TAU)) ** 2
    torch.testing.assert_close(gs, expected, rtol=0, atol=1e-12)
    # no jump on a 0.032-spaced grid: |g'| <= 4/(3 sqrt 3)/(c - tau) = 0.77, so steps < 0.025
    assert torch.diff(gs).abs().max() < 0.03
    assert float(gs[-1]) < 1e-10
    # the scalar and norm dampers are C^1 too (gradcheck across tau, both signs)
    c0 = torch.tensor([-TAU - 0.3, -TAU + 0.2, TAU - 0.1, TAU + 0.4, 7.0], dtype=F64,
                      requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: damp_scalar(c, TAU, CMAX), (c0,))


def test_damp_norm_saturates_and_keeps_direction():
    c2 = torch.randn(100, 5, dtype=F64) * 10
    out = damp_norm(c2, TAU, CMAX)
    n_in, n_out = c2.norm(dim=-1), out.norm(dim=-1)
    assert (n_out <= CMAX + 1e-12).all()
    torch.testing.assert_close(n_out, linear_tanh(n_in, TAU, CMAX))
    cos = (out * c2).sum(-1) / (n_in * n_out)
    torch.testing.assert_close(cos, torch.ones_like(cos))


def test_damp_norm_exact_identity_below_tau_and_zero():
    c2 = torch.randn(50, 5, dtype=F64)
    c2 = c2 / c2.norm(dim=-1, keepdim=True) * torch.rand(50, 1, dtype=F64) * TAU
    c2 = torch.cat([c2, torch.zeros(1, 5, dtype=F64)])
    c2.requires_grad_(True)
    out = damp_norm(c2, TAU, CMAX)
    assert torch.equal(out, c2)
    (g,) = torch.autograd.grad(out.sum(), c2)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, torch.ones_like(g), rtol=0, atol=0)
    # the Jacobian at c2 = 0 is the identity and finite (no 0/0)
    zero = torch.zeros(5, dtype=F64, requires_grad=True)
    jac = torch.autograd.functional.jacobian(lambda c: damp_norm(c, TAU, CMAX), zero)
    torch.testing.assert_close(jac, torch.eye(5, dtype=F64), rtol=0, atol=0)
    # gradients across the threshold are finite and match finite differences
    c = torch.randn(6, 5, dtype=F64)
    c = c / c.norm(dim=-1, keepdim=True) * torch.tensor([0.5, 3.9, 4.1, 4.6, 6.0, 30.0],
                                                        dtype=F64)[:, None]
    c.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: damp_norm(x, TAU, CMAX), (c,))


def test_damp_norm_equivariant():
    c2 = torch.randn(64, 5, dtype=F64) * 6.0  # mostly above tau
    rots = rotations(64, seed=1)
    d2 = wigner_d2(rots)  # (64, 5, 5)
    lhs = damp_norm(torch.einsum("nab,nb->na", d2, c2), TAU, CMAX)
    rhs = torch.einsum("nab,nb->na", d2, damp_norm(c2, TAU, CMAX))
    assert (lhs - rhs).abs().max() < 1e-12


# --- the constant map T --------------------------------------------------------------------------

def test_T_matches_e3nn_cartesian_tensor():
    m = random_symmetric(20, seed=2)
    c2 = torch.randn(20, 5, dtype=F64)
    full = torch.cat([torch.zeros(20, 1, dtype=F64), c2], dim=1)
    with float64_default():  # e3nn computes its change of basis in the default dtype
        ct = CartesianTensor("ij=ji")
        coeffs = ct.from_cartesian(m)  # (20, 6): 0e, then 2e in slots 1..5
        back = ct.to_cartesian(full)
    assert str(ct) == "1x0e+1x2e"
    torch.testing.assert_close(traceless_sym_to_l2(m), coeffs[:, 1:6], rtol=0, atol=1e-12)
    torch.testing.assert_close(coeffs[:, 0], m.diagonal(dim1=-2, dim2=-1).sum(-1) / math.sqrt(3))
    torch.testing.assert_close(l2_to_matrix(c2), back, rtol=0, atol=1e-12)
    # the documented basis: 2e = [(xz+zx)/s2, (xy+yx)/s2, (2yy-xx-zz)/s6, (yz+zy)/s2, (zz-xx)/s2]
    x = m
    s2, s6 = math.sqrt(2), math.sqrt(6)
    manual = torch.stack([
        (x[:, 0, 2] + x[:, 2, 0]) / s2, (x[:, 0, 1] + x[:, 1, 0]) / s2,
        (2 * x[:, 1, 1] - x[:, 0, 0] - x[:, 2, 2]) / s6, (x[:, 1, 2] + x[:, 2, 1]) / s2,
        (x[:, 2, 2] - x[:, 0, 0]) / s2,
    ], dim=1)
    torch.testing.assert_close(traceless_sym_to_l2(m), manual, rtol=0, atol=1e-12)


def test_T_is_isometry_onto_traceless_symmetric():
    basis = l2_basis_tensor(F64)
    gram = torch.einsum("aij,bij->ab", basis, basis)
    torch.testing.assert_close(gram, torch.eye(5, dtype=F64), rtol=0, atol=1e-15)
    c2 = torch.randn(100, 5, dtype=F64)
    m = l2_to_matrix(c2)
    torch.testing.assert_close(m, m.transpose(-1, -2), rtol=0, atol=0)
    assert m.diagonal(dim1=-2, dim2=-1).sum(-1).abs().max() < 1e-14
    torch.testing.assert_close(torch.linalg.matrix_norm(m), c2.norm(dim=-1), rtol=1e-14, atol=0)
    torch.testing.assert_close(traceless_sym_to_l2(m), c2, rtol=0, atol=1e-14)
    # on a general symmetric matrix, T T^T removes the trace
    a = random_symmetric(10, seed=3)
    traceless = a - a.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(3, dtype=F64)
    torch.testing.assert_close(l2_to_matrix(traceless_sym_to_l2(a)), traceless, rtol=0, atol=1e-14)
    # eigenvalues of T(c) lie in +-sqrt(2/3)|c| (docs/maths.md §2.3)
    ev = torch.linalg.eigvalsh(m)
    assert (ev.abs().max(-1).values <= math.sqrt(2 / 3) * c2.norm(dim=-1) + 1e-12).all()


def test_T_equivariance_300_rotations():
    n = 300
    rots = rotations(n, seed=4)
    d2 = wigner_d2(rots)
    c2 = torch.randn(n, 5, dtype=F64) * 3
    lhs = l2_to_matrix(torch.einsum("nab,nb->na", d2, c2))
    rhs = rots @ l2_to_matrix(c2) @ rots.transpose(-1, -2)
    assert (lhs - rhs).abs().max() < 1e-9
    # and the inverse direction
    m = random_symmetric(n, seed=5)
    lhs = traceless_sym_to_l2(rots @ m @ rots.transpose(-1, -2))
    rhs = torch.einsum("nab,nb->na", d2, traceless_sym_to_l2(m))
    assert (lhs - rhs).abs().max() < 1e-9


def test_sym_outer_l2():
    a, b = torch.randn(30, 3, dtype=F64), torch.randn(30, 3, dtype=F64)
    outer = sym(a[:, :, None] * b[:, None, :])
    torch.testing.assert_close(sym_outer_l2(a, b), traceless_sym_to_l2(outer), rtol=0, atol=1e-14)
    rots = rotations(30, seed=6)
    d2 = wigner_d2(rots)
    ra, rb = torch.einsum("nij,nj->ni", rots, a), torch.einsum("nij,nj->ni", rots, b)
    torch.testing.assert_close(sym_outer_l2(ra, rb), torch.einsum("nab,nb->na", d2,
                                                                 sym_outer_l2(a, b)))


# --- expm of symmetric matrices ------------------------------------------------------------------

def special_matrices() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=F64, generator=g))
    near = q @ torch.diag(torch.tensor([0.7, 0.7 + 1e-9, -1.3], dtype=F64)) @ q.T
    exact_deg = q @ torch.diag(torch.tensor([2.0, 2.0, -1.0], dtype=F64)) @ q.T
    return {
        "random": random_symmetric(1, seed=8)[0],
        "large_norm": random_symmetric(1, scale=8.0, seed=9)[0],
        "damped_extreme": torch.eye(3, dtype=F64) * 5.0 + l2_to_matrix(
            torch.tensor([5.0, 0.0, 0.0, 0.0, 0.0], dtype=F64)),
        "cI": 1.7 * torch.eye(3, dtype=F64),
        "zero": torch.zeros(3, 3, dtype=F64),
        "negative_cI": -3.2 * torch.eye(3, dtype=F64),
        "near_degenerate": sym(near),
        "degenerate": sym(exact_deg),
        "small": 1e-8 * random_symmetric(1, seed=10)[0],
    }


@pytest.mark.parametrize("name", list(special_matrices()))
def test_expm_values(name):
    a = special_matrices()[name]
    ours = expm_symmetric(a)
    ref_torch = torch.linalg.matrix_exp(a)
    ref_scipy = torch.from_numpy(scipy.linalg.expm(a.numpy()))
    scale = float(ref_scipy.abs().max())
    assert float((ours - ref_scipy).abs().max()) < 1e-13 * max(scale, 1.0)
    assert float((ours - ref_torch).abs().max()) < 1e-13 * max(scale, 1.0)
    torch.testing.assert_close(ours, ours.T, rtol=0, atol=1e-14 * max(scale, 1.0))


def test_expm_batched_random():
    a = torch.cat([random_symmetric(200, scale=s, seed=11 + k)
                   for k, s in enumerate([0.1, 1.0, 3.0, 6.0])])
    ours = expm_symmetric(a)
    ref = torch.linalg.matrix_exp(a)
    rel = (ours - ref).abs().amax((-1, -2)) / ref.abs().amax((-1, -2))
    assert float(rel.max()) < 1e-11
    # scipy is slow per matrix: a few of each scale
    few = a[::40]
    ref_scipy = torch.from_numpy(np.stack([scipy.linalg.expm(x) for x in few.numpy()]))
    rel = (ours[::40] - ref_scipy).abs().amax((-1, -2)) / ref_scipy.abs().amax((-1, -2))
    assert float(rel.max()) < 1e-11
    # empty batch
    assert expm_symmetric(torch.zeros(0, 3, 3, dtype=F64)).shape == (0, 3, 3)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_expm_fixed_squarings_over_the_damped_range(dtype, tol):
    """With `max_norm` (the damper's bound |B|_F <= cmax2) the squaring count is fixed in advance:
    every |B|_F from 1e-8 to cmax2 must still match scipy to the dtype's precision."""
    cmax2 = E2IPHyperparameters().cmax2
    g = torch.Generator().manual_seed(21)
    c2 = torch.randn(400, 5, dtype=F64, generator=g)
    norms = torch.logspace(-8, math.log10(cmax2 * 0.999), 400, dtype=F64)
    c2 = c2 / torch.linalg.vector_norm(c2, dim=-1, keepdim=True) * norms[:, None]
    a = l2_to_matrix(c2) + torch.randn(400, dtype=F64, generator=g)[:, None, None] * torch.eye(3)
    ref = torch.from_numpy(np.stack([scipy.linalg.expm(x) for x in a.numpy()]))
    ours = expm_symmetric(a.to(dtype), max_norm=cmax2).double()
    rel = (ours - ref).abs().amax((-1, -2)) / ref.abs().amax((-1, -2))
    assert float(rel.max()) < tol
    assert squarings_for(cmax2) == 4  # 5 / 2^4 <= 0.5


def test_expm_logdet_and_inverse():
    a = torch.cat([random_symmetric(100, scale=2.0, seed=20), special_matrices()["cI"][None]])
    e = expm_symmetric(a)
    _, logdet = torch.linalg.slogdet(e)
    torch.testing.assert_close(logdet, a.diagonal(dim1=-2, dim2=-1).sum(-1), rtol=1e-12,
                               atol=1e-12)
    eye = torch.eye(3, dtype=F64).expand_as(e)
    torch.testing.assert_close(expm_symmetric(-a) @ e, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(expm_symmetric(-a), torch.linalg.inv(e), rtol=1e-11, atol=1e-12)
    # SPD
    assert (torch.linalg.eigvalsh(e) > 0).all()
    # equivariance: expm(R A R^T) = R expm(A) R^T
    rots = rotations(101, seed=21)
    lhs = expm_symmetric(rots @ a @ rots.transpose(-1, -2))
    rhs = rots @ e @ rots.transpose(-1, -2)
    assert float(((lhs - rhs).abs().amax((-1, -2)) / e.abs().amax((-1, -2))).max()) < 1e-12


@pytest.mark.parametrize("name", ["random", "large_norm", "cI", "zero", "near_degenerate",
                                  "degenerate", "negative_cI"])
def test_expm_gradcheck(name):
    a = special_matrices()[name].clone().requires_grad_(True)
    # symmetrise inside so that the finite differences stay on symmetric matrices
    assert torch.autograd.gradcheck(lambda x: expm_symmetric(sym(x)), (a,), eps=1e-6, atol=1e-6,
                                    rtol=1e-6)


def daleckii_krein(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """d/dA <W, expm(A)> for symmetric A, W: Q (F o Q^T W Q) Q^T with the divided differences
    F_ij = (e^li - e^lj) / (li - lj), F_ii = e^li (exact where eigenvalues are well separated)."""
    lam, q = np.linalg.eigh(a.numpy())
    e = np.exp(lam)
    d = lam[:, None] - lam[None, :]
    same = np.abs(d) < 1e-6
    f = np.where(same, e[:, None] + 0 * d, (e[:, None] - e[None, :]) / np.where(same, 1.0, d))
    return torch.from_numpy(q @ (f * (q.T @ w.numpy() @ q)) @ q.T)


@pytest.mark.parametrize("name", ["random", "large_norm", "cI", "near_degenerate", "degenerate"])
def test_expm_gradient_matches_reference(name):
    """Gradient of <W, expm(A)> against the Daleckii-Krein formula, torch.linalg.matrix_exp's
    gradient and central finite differences, including A = cI and (near-)degenerate A."""
    a0 = special_matrices()[name]
    w = random_symmetric(1, seed=30)[0]

    def f(fn, x):
        return (fn(sym(x)) * w).sum()

    a = a0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(expm_symmetric, a), a)
    assert torch.isfinite(g).all()
    ref = daleckii_krein(a0, w)
    scale = max(float(ref.abs().max()), 1.0)
    tol = 1e-8 if name == "near_degenerate" else 1e-13  # divided differences lose digits there
    assert float((g - ref).abs().max()) < tol * scale
    a = a0.clone().requires_grad_(True)
    (g_torch,) = torch.autograd.grad(f(torch.linalg.matrix_exp, a), a)
    # (torch's matrix_exp backward is itself only good to ~1e-9 relative on large norms)
    assert float((g - g_torch).abs().max()) < 1e-8 * scale
    h = 1e-5
    fd = torch.zeros(3, 3, dtype=F64)
    for i in range(3):
        for j in range(3):
            e = torch.zeros(3, 3, dtype=F64)
            e[i, j] = h
            fd[i, j] = (f(expm_symmetric, a0 + e) - f(expm_symmetric, a0 - e)) / (2 * h)
    assert float((g - fd).abs().max()) < 1e-7 * scale


def test_expm_gradient_of_trace_square_large_norm():
    """A nonlinear loss of expm at a large-norm A: d tr(e^A)^2 / dA = 2 tr(e^A) e^A exactly."""
    a0 = special_matrices()["large_norm"]
    a = a0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(expm_symmetric(sym(a)).trace() ** 2, a)
    lam, q = np.linalg.eigh(a0.numpy())
    ref = torch.from_numpy(2 * np.exp(lam).sum() * (q @ np.diag(np.exp(lam)) @ q.T))
    assert float((g - ref).abs().max() / ref.abs().max()) < 1e-13


def test_eigh_gradient_fails_where_expm_symmetric_does_not():
    """Why expm_symmetric avoids the eigendecomposition: its gradient at A = cI is NaN/inf."""
    a = (2.0 * torch.eye(3, dtype=F64)).requires_grad_(True)
    evals, evecs = torch.linalg.eigh(a)
    eig_expm = evecs @ torch.diag_embed(evals.exp()) @ evecs.transpose(-1, -2)
    w = random_symmetric(1, seed=31)[0]
    (g_eigh,) = torch.autograd.grad((eig_expm * w).sum(), a)
    assert not torch.isfinite(g_eigh).all()
    b = (2.0 * torch.eye(3, dtype=F64)).requires_grad_(True)
    (g,) = torch.autograd.grad((expm_symmetric(b) * w).sum(), b)
    assert torch.isfinite(g).all()
    # at A = cI the derivative of expm in direction W is exp(c) W
    torch.testing.assert_close(g, math.exp(2.0) * w, rtol=1e-13, atol=1e-13)


def test_expm_float32_close():
    a = random_symmetric(200, scale=2.0, seed=40)
    ours = expm_symmetric(a.float()).double()
    ref = torch.linalg.matrix_exp(a)
    rel = (ours - ref).abs().amax((-1, -2)) / ref.abs().amax((-1, -2))
    assert float(rel.max()) < 1e-5
