"""Baselines (docs/maths.md §6): deep ensemble, eIP (per-axis NIG), e2IP w/o equivariance, w/o damping."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.stats import multivariate_normal

import e2ip
from e2ip.backbones.base import BackboneOutput
from e2ip.data.graph import graph_from_structures
from e2ip.data.structures import Structure
from e2ip.errors import ModelError
from e2ip.heads import HEADS, FeatureDims
from e2ip.heads.cholesky import CholeskyHead
from e2ip.heads.eip import EIPHead
from e2ip.heads.evidential import E2IPHead
from e2ip.heads.spd import damp_norm, damp_scalar
from e2ip.models.ensemble import Ensemble
from e2ip.models.io import MODEL_KINDS
from e2ip.models.single import PotentialModel
from e2ip.nn.irreps import l2_basis_tensor, sym_outer_l2
from e2ip.stats.calibration import fit_calibration_floor
from e2ip.stats.losses import nig_nll
from e2ip.stats.predictive import Gaussian, IndependentStudentT, StudentT


def gaussian_coverage(errors, epistemic, variance: float, level: float = 0.95) -> float:
    """Reference Coverage(level) of N(0, U + variance I): mean(chi2_3.cdf(e^T C^-1 e) <= level),
    with scipy, in float64."""
    errors = np.asarray(errors, dtype=np.float64)
    cov = np.asarray(epistemic, dtype=np.float64) + variance * np.eye(3)
    quad = np.einsum("ni,ni->n", errors, np.linalg.solve(cov, errors[..., None])[..., 0])
    return float(np.mean(stats.chi2.cdf(quad, 3) <= level))

BACKBONE = {"num_features": 16, "num_layers": 2, "num_radial": 8}


def small_model(head: str, seed: int = 0, **kwargs) -> PotentialModel:
    torch.manual_seed(seed)
    return PotentialModel(elements=[1, 6, 8], cutoff=4.0, backbone="painn",
                          backbone_options=BACKBONE, head=head, force_scale=0.5, **kwargs).double()


def molecule(seed: int = 0, n: int = 8) -> Structure:
    """A random ~8-atom C/O/H cluster with no two atoms closer than 0.95 Å."""
    rng = np.random.default_rng(seed)
    positions: list[np.ndarray] = []
    while len(positions) < n:
        p = rng.uniform(-1.8, 1.8, size=3)
        if all(np.linalg.norm(p - q) > 0.95 for q in positions):
            positions.append(p)
    numbers = np.array(([6, 6, 8] + [1] * n)[:n])
    forces = rng.normal(scale=0.5, size=(n, 3))
    return Structure(numbers=numbers, positions=np.array(positions), energy=-1.0, forces=forces)


def random_rotation(seed: int) -> torch.Tensor:
    return torch.from_numpy(stats.special_ortho_group.rvs(3, random_state=seed))


def rotated(s: Structure, r: torch.Tensor) -> Structure:
    rn = r.numpy()
    return Structure(numbers=s.numbers, positions=s.positions @ rn.T, energy=s.energy,
                     forces=s.forces @ rn.T)


def graph(*structures: Structure):
    return graph_from_structures(list(structures), 4.0, torch.float64)


def ensemble(m: int = 3, head: str = "none", **kwargs) -> Ensemble:
    members = []
    for k in range(m):
        member = small_model(head, seed=100 + k, energy_scale=0.7 + 0.1 * k,
                             reference_energies=[-0.5 - k, -1.0, -2.0 + 0.1 * k])
        members.append(member)
    return Ensemble(members, **kwargs)


# --- registry --------------------------------------------------------------------------------

@pytest.mark.parametrize("head", ["eip", "cholesky"])
def test_heads_registered_train_step(head):
    assert HEADS[head].name == head and HEADS[head].equivariant is False
    model = small_model(head).train()
    g = graph(molecule(0), molecule(1))
    out = model(g)
    parts = model.head.loss(out["params"], out["forces"], g.forces)
    assert parts["loss"].shape == (16,) and torch.isfinite(parts["loss"]).all()
    parts["loss"].mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    covs = model.head.covariances(out["params"], out["forces"])
    eig = torch.linalg.eigvalsh(covs["predictive"])
    assert (eig > 0).all()
    # the predictive distribution's covariance is the predictive covariance of the head
    pred = model.head.predictive(out["params"], out["forces"])
    torch.testing.assert_close(pred.covariance(), covs["predictive"], rtol=1e-10, atol=1e-12)


# --- eIP -------------------------------------------------------------------------------------

def test_nig_nll_is_per_axis_student_t():
    rng = np.random.default_rng(0)
    n = 50
    v = rng.uniform(0.05, 5.0, (n, 3))
    alpha = 1.0 + rng.uniform(0.01, 5.0, (n, 3))
    beta = rng.uniform(0.01, 2.0, (n, 3))
    e = rng.normal(scale=0.7, size=(n, 3))
    ref = -stats.t.logpdf(e, df=2 * alpha, loc=0.0,
                          scale=np.sqrt(beta * (1 + v) / (v * alpha))).sum(-1)
    t = [torch.from_numpy(x) for x in (e, v, alpha, beta)]
    np.testing.assert_allclose(nig_nll(*t).numpy(), ref, rtol=1e-10, atol=1e-10)


def test_eip_head_loss_predictive_and_covariances():
    model = small_model("eip").eval()
    g = graph(molecule(2))
    out = model(g)
    p = out["params"]
    assert set(p) == {"v", "alpha", "beta"} and (p["alpha"] > 1).all()
    pred = model.head.predictive(p, out["forces"])
    assert isinstance(pred, IndependentStudentT)
    nll = model.head.loss(p, out["forces"], g.forces)["nll"]
    torch.testing.assert_close(pred.nll(g.forces), nll, rtol=1e-10, atol=1e-10)
    scale = np.sqrt((p["beta"] * (1 + p["v"]) / (p["v"] * p["alpha"])).detach().numpy())
    ref = -stats.t.logpdf((g.forces - out["forces"]).detach().numpy(),
                          df=2 * p["alpha"].detach().numpy(), scale=scale).sum(-1)
    np.testing.assert_allclose(nll.detach().numpy(), ref, rtol=1e-10)
    covs = model.head.covariances(p, out["forces"])
    ale = p["beta"] / (p["alpha"] - 1)
    torch.testing.assert_close(covs["aleatoric"], torch.diag_embed(ale))
    torch.testing.assert_close(covs["epistemic"], torch.diag_embed(ale / p["v"]))
    # diagonal in the lab frame whatever the structure's orientation
    off = covs["predictive"] - torch.diag_embed(covs["predictive"].diagonal(dim1=-2, dim2=-1))
    assert off.abs().max() == 0


# --- e2IP w/o equivariance (Cholesky) --------------------------------------------------------

def test_cholesky_nll_is_multivariate_t():
    model = small_model("cholesky").eval()
    g = graph(molecule(3))
    out = model(g)
    p, mu = out["params"], out["forces"]
    sigma0 = p["sigma0"]
    torch.testing.assert_close(sigma0, 0.25 * (p["L"] @ p["L"].transpose(-1, -2))
                               + 0.25 * 1e-6 * torch.eye(3, dtype=torch.float64))
    assert (torch.tril(p["L"]) == p["L"]).all() and (p["L"].diagonal(dim1=-2, dim2=-1) > 0).all()
    nll = model.head.loss(p, mu, g.forces)["nll"].detach().numpy()
    pred = model.head.predictive(p, mu)
    assert isinstance(pred, StudentT)
    np.testing.assert_allclose(pred.nll(g.forces).detach().numpy(), nll, rtol=1e-10)
    kappa, nu = p["kappa"].detach().numpy(), p["nu"].detach().numpy()
    for i in range(len(nll)):
        dof = nu[i] - 2
        shape = (kappa[i] + 1) * nu[i] / (kappa[i] * dof) * sigma0[i].detach().numpy()
        ref = -stats.multivariate_t.logpdf(g.forces[i].numpy(), loc=mu[i].detach().numpy(),
                                           shape=shape, df=dof)
        assert nll[i] == pytest.approx(ref, rel=1e-10)


def _covariance_equivariance_error(model: PotentialModel, s: Structure, seed: int) -> float:
    r = random_rotation(seed)
    out = model(graph(s), create_graph=False)
    out_r = model(graph(rotated(s, r)), create_graph=False)
    cov = model.head.covariances(out["params"], out["forces"])["predictive"]
    cov_r = model.head.covariances(out_r["params"], out_r["forces"])["predictive"]
    torch.testing.assert_close(out_r["forces"], out["forces"] @ r.T, rtol=0, atol=1e-9)
    return float((cov_r - r @ cov @ r.T).abs().max())


@pytest.mark.parametrize("seed", [0, 1])
def test_cholesky_ablation_is_not_equivariant_but_e2ip_is(seed):
    s = molecule(4 + seed)
    e2 = small_model("e2ip", seed=seed).eval()
    ch = small_model("cholesky", seed=seed).eval()
    eip = small_model("eip", seed=seed).eval()
    for rot in range(3):
        assert _covariance_equivariance_error(e2, s, 10 * seed + rot) < 1e-9
        assert _covariance_equivariance_error(ch, s, 10 * seed + rot) > 1e-3
        assert _covariance_equivariance_error(eip, s, 10 * seed + rot) > 1e-4


# --- e2IP w/o damping ------------------------------------------------------------------------

def test_no_damping_switch_removes_damping():
    torch.manual_seed(0)
    f = 6
    dims = FeatureDims(num_scalars=f, num_vectors=f)
    damped = E2IPHead(dims, 0.5, E2IPHead.hparams_from_dict({})).double()
    free = E2IPHead(dims, 0.5, E2IPHead.hparams_from_dict({"damping": False})).double()
    with torch.no_grad():  # large outputs: c0 ~ +-10 and ||c2|| >> cmax2 = 5
        last = damped.scalar_mlp[-1]
        last.weight.normal_()
        last.bias[0] = 25.0
        last.bias[3:] = 20.0
    free.load_state_dict(damped.state_dict())
    n = 40
    feats = BackboneOutput(scalars=torch.randn(n, f, dtype=torch.float64),
                           atomic_energy=torch.zeros(n, dtype=torch.float64),
                           vectors=torch.randn(n, f, 3, dtype=torch.float64))
    # raw (undamped) coefficients, computed independently of the head's forward
    out = damped.scalar_mlp(feats.scalars)
    basis = l2_basis_tensor(torch.float64)  # the constant map T
    v = feats.vectors.transpose(1, 2)
    a = damped.mix_a(v).transpose(1, 2)
    b = damped.mix_b(v).transpose(1, 2)
    c0_raw = out[:, 0]
    c2_raw = (out[:, 3:, None] * sym_outer_l2(a, b, basis)).sum(1)
    hp = damped.hparams
    assert c0_raw.abs().max() > hp.cmax0 + 3 and torch.linalg.vector_norm(c2_raw, dim=-1).min() > 5

    p_free, p_damped = free(feats), damped(feats)
    torch.testing.assert_close(p_free["c0"], c0_raw, rtol=0, atol=0)
    torch.testing.assert_close(p_free["c2"], c2_raw, rtol=0, atol=0)
    torch.testing.assert_close(p_damped["c0"], damp_scalar(c0_raw, hp.tau0, hp.cmax0))
    torch.testing.assert_close(p_damped["c2"], damp_norm(c2_raw, hp.tau2, hp.cmax2))
    assert p_damped["c0"].abs().max() <= hp.cmax0
    assert torch.linalg.vector_norm(p_damped["c2"], dim=-1).max() <= hp.cmax2 + 1e-12
    # the spectrum of A is unbounded without damping and bounded (|c0| + sqrt(2/3) ||c2||) with it
    s_ref = 2 * math.log(0.5)
    spread = lambda p: (torch.linalg.eigvalsh(p["A"]) - s_ref).abs().max()  # noqa: E731
    bound = hp.cmax0 + math.sqrt(2 / 3) * hp.cmax2
    assert spread(p_damped) <= bound + 1e-9
    assert spread(p_free) > 2 * bound


# --- deep ensemble ---------------------------------------------------------------------------

def test_ensemble_statistics_against_numpy():
    ens = ensemble(3)
    rng = np.random.default_rng(1)
    mf = rng.normal(size=(5, 7, 3))
    params = {"member_forces": torch.from_numpy(mf), "member_energy": torch.zeros(5, 2)}
    mu = mf.mean(0)
    ref = np.stack([np.cov(mf[:, i, :].T, bias=True) for i in range(7)])
    covs = ens.covariances(params, torch.from_numpy(mu), form="raw")
    np.testing.assert_allclose(covs["epistemic"].numpy(), ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(covs["aleatoric"].numpy(),
                               np.broadcast_to(1e-8 * np.eye(3), ref.shape))
    pred = ens.predictive(params, torch.from_numpy(mu), form="raw")
    assert isinstance(pred, Gaussian)
    np.testing.assert_allclose(pred.loc.numpy(), mu)
    np.testing.assert_allclose(pred.covariance().numpy(), ref + 1e-8 * np.eye(3), rtol=1e-12)
    with pytest.raises(ModelError, match="not calibrated"):
        ens.predictive(params, torch.from_numpy(mu), form="cal")
    ens.set_calibration_variance(0.04)
    pred = ens.predictive(params, torch.from_numpy(mu))  # default form: "cal" once fitted
    np.testing.assert_allclose(pred.covariance().numpy(), ref + 0.04 * np.eye(3), rtol=1e-12)
    y = mu + rng.normal(size=mu.shape)
    nll = [-stats.multivariate_normal.logpdf(y[i], mu[i], ref[i] + 0.04 * np.eye(3))
           for i in range(7)]
    np.testing.assert_allclose(pred.nll(torch.from_numpy(y)).numpy(), nll, rtol=1e-10)

    # forward: means of the members' own outputs
    g = graph(molecule(0), molecule(1))
    out = ens(g)
    member_outs = [m(g, create_graph=False) for m in ens.members]
    e = torch.stack([o["energy"] for o in member_outs])
    f = torch.stack([o["forces"] for o in member_outs])
    torch.testing.assert_close(out["energy"], e.mean(0))
    torch.testing.assert_close(out["forces"], f.mean(0))
    torch.testing.assert_close(out["params"]["member_forces"], f)
    torch.testing.assert_close(out["params"]["member_energy"], e)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_ensemble_vmap_equals_loop(chunk_size):
    ens = ensemble(3, chunk_size=chunk_size).eval()
    assert ens.can_batch()
    g = graph(molecule(0), molecule(5, n=6))
    a = ens(g, batched=True)
    b = ens(g, batched=False)
    for key in ("energy", "forces", "atomic_energies"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-10)
    for key in ("member_forces", "member_energy"):
        torch.testing.assert_close(a["params"][key], b["params"][key], rtol=0, atol=1e-10)
    c = ens(g, compute_forces=False, batched=True)
    assert c["forces"] is None
    torch.testing.assert_close(c["energy"], b["energy"], rtol=0, atol=1e-10)
    # the cached stack follows in-place parameter updates
    with torch.no_grad():
        next(ens.members[1].parameters()).add_(0.1)
    torch.testing.assert_close(ens(g, batched=True)["forces"], ens(g, batched=False)["forces"],
                               rtol=0, atol=1e-10)


def test_ensemble_falls_back_to_loop_when_vmap_fails(monkeypatch):
    ens = ensemble(2).eval()
    g = graph(molecule(0))
    ref = ens(g, batched=False)

    def broken(*args, **kwargs):
        raise RuntimeError("vmap: data-dependent control flow")

    monkeypatch.setattr(ens, "_forward_batched", broken)
    with pytest.warns(UserWarning, match="one by one"):
        out = ens(g, batched=True)
    torch.testing.assert_close(out["forces"], ref["forces"])
    assert ens._vmap_failed


def test_ensemble_batched_gradients_reach_members():
    ens = ensemble(2)
    g = graph(molecule(0))
    out = ens(g, create_graph=True, batched=True)
    (out["forces"] ** 2).sum().backward()

    def grads():  # None (no path to the loss, e.g. the energy readout's bias) counts as zero
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in ens.parameters()]

    grads_vmap = grads()
    assert sum(float(gr.abs().sum()) for gr in grads_vmap) > 0
    ens.zero_grad(set_to_none=True)
    out = ens(g, create_graph=True, batched=False)
    (out["forces"] ** 2).sum().backward()
    for gv, gl in zip(grads_vmap, grads()):
        torch.testing.assert_close(gv, gl, rtol=1e-8, atol=1e-12)


def test_calibration_recovers_known_floor():
    rng = np.random.default_rng(0)
    n, s_true = 20000, 0.3
    a = rng.normal(scale=0.25, size=(n, 3, 3))
    u = a @ np.swapaxes(a, 1, 2)  # random PSD epistemic covariances, comparable to s^2
    cov = u + s_true**2 * np.eye(3)
    errors = np.einsum("nij,nj->ni", np.linalg.cholesky(cov), rng.normal(size=(n, 3)))
    s = fit_calibration_floor(errors, u, target=0.95)
    assert s == pytest.approx(s_true, rel=0.03)
    assert gaussian_coverage(errors, u, s**2) == pytest.approx(0.95, abs=1e-3)
    assert gaussian_coverage(errors, u, 1e-8) < 0.9  # raw: under-covers
    # torch inputs, and another target
    s80 = fit_calibration_floor(torch.from_numpy(errors), torch.from_numpy(u), target=0.8)
    assert s80 < s and gaussian_coverage(errors, u, s80**2) == pytest.approx(0.8, abs=1e-3)


def test_ensemble_paper_floor_calibration_on_structures():
    ens = ensemble(3).eval()
    ens.calibration_form = "paper_floor"
    val = [molecule(k) for k in range(4)]
    s2 = ens.calibrate(val)
    assert ens.calibrated and float(ens.calibration_variance) == pytest.approx(s2)
    cal = ens.calibration()
    assert cal["method"] == "variance_floor" and cal["value"] == pytest.approx(s2)
    assert cal["epistemic_scale"] == 1.0
    raw = ens.predict(val, form="raw")
    errors = np.concatenate([s.forces for s in val]) - raw["forces"]
    assert gaussian_coverage(errors, raw["epistemic"], s2) >= 0.95
    assert gaussian_coverage(errors, raw["epistemic"], 0.98 * s2) < 0.95


def _scipy_nll(errors, covariances) -> float:
    return -float(np.mean([multivariate_normal(np.zeros(3), c).logpdf(e)
                           for e, c in zip(errors, covariances)]))


def _labelled_by(ens, structures, t_true: float, s2_true: float, seed: int = 0,
                 aleatoric_scale: float = 0.0):
    """The structures with forces drawn from N(mu, t U_epi + s^2 I + a U_ale) of the ensemble."""
    rng = np.random.default_rng(seed)
    out = []
    for structure in structures:
        p = ens.predict([structure], form="raw")
        cov = t_true * p["epistemic"] + s2_true * np.eye(3) + aleatoric_scale * p["aleatoric"]
        noise = np.einsum("nij,nj->ni", np.linalg.cholesky(cov), rng.normal(size=(len(cov), 3)))
        out.append(dataclasses.replace(structure, forces=p["forces"] + noise))
    return out


def test_ensemble_nll_calibration_on_structures_is_the_nll_minimum():
    """The default 'cal' form N(mu, t U_epi + s^2 I): its NLL (scipy) at the fitted (s^2, t) is
    below that of every nearby pair, and below the paper floor's."""
    ens = ensemble(3).eval()
    val = _labelled_by(ens, [molecule(k, n=12) for k in range(30)], 400.0, 1e-3)
    s2 = ens.calibrate(val)
    cal = ens.calibration()
    assert cal["method"] == "nll_floor" and cal["value"] == pytest.approx(s2)
    t = cal["epistemic_scale"]
    raw, fitted = ens.predict(val, form="raw"), ens.predict(val, form="cal")
    errors = np.concatenate([s.forces for s in val]) - raw["forces"]
    np.testing.assert_allclose(fitted["predictive"], t * raw["epistemic"] + s2 * np.eye(3),
                               rtol=1e-6)
    best = _scipy_nll(errors, fitted["predictive"])
    for ds, dt in [(1.1, 1), (0.9, 1), (1, 1.1), (1, 0.9)]:
        assert best <= _scipy_nll(errors, dt * t * raw["epistemic"] + ds * s2 * np.eye(3)) + 1e-9
    floor = fit_calibration_floor(errors, raw["epistemic"]) ** 2
    assert best < _scipy_nll(errors, raw["epistemic"] + floor * np.eye(3))


def test_heteroskedastic_ensemble_nll_calibration_scales_both_parts():
    ens = ensemble(2, head="mve").eval()
    val = _labelled_by(ens, [molecule(k, n=12) for k in range(30)], 400.0, 0.0,
                       aleatoric_scale=0.5)
    s = ens.calibrate(val)
    t = ens.calibration()["epistemic_scale"]
    raw, fitted = ens.predict(val, form="raw"), ens.predict(val, form="cal")
    np.testing.assert_allclose(fitted["epistemic"], t * raw["epistemic"], rtol=1e-6)
    np.testing.assert_allclose(fitted["aleatoric"], s * raw["aleatoric"], rtol=1e-6)
    errors = np.concatenate([x.forces for x in val]) - raw["forces"]
    best = _scipy_nll(errors, fitted["predictive"])
    for ds, dt in [(1.1, 1), (0.9, 1), (1, 1.2), (1, 0.8)]:
        cov = dt * t * raw["epistemic"] + ds * s * raw["aleatoric"]
        assert best <= _scipy_nll(errors, cov) + 1e-9


def test_ensemble_save_load_round_trip(tmp_path):
    ens = ensemble(3).eval()
    ens.set_calibration_variance(0.0123)
    path = tmp_path / "ensemble.pt"
    ens.save(path)
    assert MODEL_KINDS["ensemble"] is Ensemble
    loaded = e2ip.load_model(path)
    assert isinstance(loaded, Ensemble) and loaded.num_members == 3
    assert loaded.elements == [1, 6, 8] and loaded.cutoff == 4.0 and loaded.has_uncertainty
    assert float(loaded.calibration_variance) == pytest.approx(0.0123)
    structures = [molecule(0), molecule(6)]
    a, b = ens.predict(structures), loaded.predict(structures)
    assert set(a) == {"energy", "forces", "aleatoric", "epistemic", "predictive", "u_epi",
                      "u_ale", "sigma_epi"}
    assert a["forces"].shape == (16, 3) and a["predictive"].shape == (16, 3, 3)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(a["u_ale"], 3 * 0.0123)
    u_epi = np.trace(a["epistemic"], axis1=1, axis2=2)
    np.testing.assert_allclose(a["sigma_epi"], np.sqrt(u_epi / 3))
    raw = loaded.predict(structures, form="raw")
    np.testing.assert_allclose(raw["aleatoric"][:, 0, 0], 1e-8)


def test_ensemble_covariance_is_equivariant():
    ens = ensemble(3).eval()
    s = molecule(7)
    r = random_rotation(3)
    out = ens(graph(s))
    out_r = ens(graph(rotated(s, r)))
    u = ens.covariances(out["params"], out["forces"], form="raw")["epistemic"]
    u_r = ens.covariances(out_r["params"], out_r["forces"], form="raw")["epistemic"]
    assert float((u_r - r @ u @ r.T).abs().max()) < 1e-9


def test_eip_readout_is_per_axis():
    """The eIP per-axis inputs are exactly (scalars, k-th Cartesian component of each vector)."""
    head = EIPHead(FeatureDims(4, 5), 0.5, EIPHead.hparams_from_dict({})).double()
    feats = BackboneOutput(scalars=torch.randn(3, 4, dtype=torch.float64),
                           atomic_energy=torch.zeros(3, dtype=torch.float64),
                           vectors=torch.randn(3, 5, 3, dtype=torch.float64))
    x = head.axis_features(feats)
    assert x.shape == (3, 3, 9)
    for k in range(3):
        torch.testing.assert_close(x[:, k, :4], feats.scalars)
        torch.testing.assert_close(x[:, k, 4:], feats.vectors[:, :, k])
    assert CholeskyHead.equivariant is False
