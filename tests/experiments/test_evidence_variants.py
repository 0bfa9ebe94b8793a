"""The candidate evidences of experiments/evidence_variants.py against independent references
(numpy float64, closed forms), so the figures reported from it rest on tested arithmetic."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from e2ip.heads.feature_distance import FeatureDistance
from e2ip.stats.calibration import fit_r_bin_factors
from e2ip.stats.predictive import StudentT

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def _load_experiment():
    """experiments/evidence_variants.py as a module (its own imports, runner and report_shift,
    are found beside it: the folder goes last on sys.path, so it shadows nothing installed)."""
    if str(EXPERIMENTS) not in sys.path:
        sys.path.append(str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location("evidence_variants",
                                                  EXPERIMENTS / "evidence_variants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ev = _load_experiment()

F = 5


def batches_of(rng: np.random.Generator, n_batches: int = 4, n_atoms: int = 12, n_structs: int = 3):
    out = []
    for _ in range(n_batches):
        h = torch.from_numpy(rng.normal(size=(n_atoms, F)) * np.arange(1, F + 1) + 3.0)
        index = torch.from_numpy(rng.integers(0, n_structs, n_atoms))
        out.append((h, torch.zeros(n_atoms, dtype=torch.long), index, n_structs))
    return out


def test_llpr_is_the_structure_level_leverage():
    rng = np.random.default_rng(0)
    batches = batches_of(rng)
    distance = FeatureDistance(F, centred=True, num_groups=1).double()
    ev.fit_llpr(distance, batches)
    # reference: z^T (sum_s f_s f_s^T / S + ridge I)^-1 z, z = [h, 1], in numpy, mean 1
    fs = []
    for h, _, index, n in batches:
        z = np.hstack([h.numpy(), np.ones((len(h), 1))])
        f = np.zeros((n, F + 1))
        np.add.at(f, index.numpy(), z)
        fs.append(f)
    fs = np.vstack(fs)
    centred = fs[:, :F] - fs[:, :F].mean(0)
    ridge = ev.RIDGE * np.mean(np.sum(centred**2, 1)) / F
    q = np.linalg.inv(fs.T @ fs / len(fs) + ridge * np.eye(F + 1))
    h_all = np.vstack([b[0].numpy() for b in batches])
    z = np.hstack([h_all, np.ones((len(h_all), 1))])
    ref = np.einsum("ni,ij,nj->n", z, q, z)
    got = distance(torch.from_numpy(h_all)).numpy()
    np.testing.assert_allclose(got, ref / ref.mean(), rtol=1e-9)


def test_last_layer_llpr_is_the_leverage_of_the_readout_hidden_layer():
    """LLPR on the energy readout's last hidden layer: r_i = z_iᵀ Q z_i, z = [act(W1 h + b1), 1],
    Q = (Σ_s f_s f_sᵀ / S + ridge I)⁻¹, normalised to mean 1; the hidden layer by numpy."""
    from e2ip.nn.mlp import mlp

    rng = np.random.default_rng(3)
    batches = batches_of(rng)
    torch.manual_seed(0)
    readout = mlp([F, 3, 1]).double()
    distance = ev.last_layer_llpr(readout, batches)
    w1, b1 = readout[0].weight.detach().numpy(), readout[0].bias.detach().numpy()

    def hidden(h):
        x = h @ w1.T + b1
        return x / (1 + np.exp(-x))  # SiLU

    fs, zs = [], []
    for h, _, index, n in batches:
        z = np.hstack([hidden(h.numpy()), np.ones((len(h), 1))])
        f = np.zeros((n, 4))
        np.add.at(f, index.numpy(), z)
        fs.append(f)
        zs.append(z)
    fs, z = np.vstack(fs), np.vstack(zs)
    centred = fs[:, :3] - fs[:, :3].mean(0)
    ridge = ev.RIDGE * np.mean(np.sum(centred**2, 1)) / 3
    q = np.linalg.inv(fs.T @ fs / len(fs) + ridge * np.eye(4))
    ref = np.einsum("ni,ij,nj->n", z, q, z)
    h_all = torch.cat([b[0] for b in batches])
    got = distance(h_all).numpy()
    np.testing.assert_allclose(got, ref / ref.mean(), rtol=1e-9)
    assert not any(p.requires_grad for p in distance.hidden.parameters())  # frozen copy
    assert distance.hidden[0].weight is not readout[0].weight


def test_merge_adds_a_variant_and_keeps_the_others():
    written = {"seeds": {"0": {"calibration": {"a": 1}, "sets": {"id": {"a": {"x": 1.0}}}}}}
    new = {"0": {"calibration": {"b": 2}, "sets": {"id": {"b": {"x": 2.0}}}}}
    merged = ev.merge(written, new)
    assert merged["seeds"]["0"]["sets"]["id"] == {"a": {"x": 1.0}, "b": {"x": 2.0}}
    assert merged["seeds"]["0"]["calibration"] == {"a": 1, "b": 2}
    with pytest.raises(SystemExit):
        ev.merge(written, {"1": new["0"]})


def test_one_component_mixture_is_the_mahalanobis_distance(monkeypatch):
    monkeypatch.setattr(ev, "COMPONENTS", 1)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, F)) @ rng.normal(size=(F, F)) + 1.0
    groups = torch.zeros(len(x), dtype=torch.long)
    dist, sizes = ev.fit_mixture(1, [(torch.from_numpy(x), groups, None, 0)])
    assert sizes == [1]
    cov = np.cov(x.T, bias=True)
    cov += ev.RIDGE * np.trace(cov) / F * np.eye(F)
    # whitened coordinates w = L^-1 (x - mu); their covariance plus the component ridge
    white = np.linalg.solve(np.linalg.cholesky(cov), (x - x.mean(0)).T).T
    comp = np.cov(white.T, bias=True) + ev.RIDGE * np.eye(F)

    def m(v):
        w = np.linalg.solve(np.linalg.cholesky(cov), (v - x.mean(0)).T).T - white.mean(0)
        return np.einsum("ni,ij,nj->n", w, np.linalg.inv(comp), w)

    y = rng.normal(size=(7, F)) * 3
    got = dist(torch.from_numpy(y), torch.zeros(7, dtype=torch.long)).numpy()
    np.testing.assert_allclose(got, (1 + m(y)) / (1 + m(x).mean()), rtol=1e-8)


def test_two_components_see_the_gap_between_modes(monkeypatch):
    monkeypatch.setattr(ev, "COMPONENTS", 2)
    monkeypatch.setattr(ev, "ATOMS_PER_COMPONENT_FEATURE", 1)
    rng = np.random.default_rng(2)
    x = np.vstack([rng.normal(size=(1000, F)) + 5, rng.normal(size=(1000, F)) - 5])
    groups = torch.zeros(len(x), dtype=torch.long)
    dist, sizes = ev.fit_mixture(1, [(torch.from_numpy(x), groups, None, 0)])
    points = torch.tensor([[5.0] * F, [-5.0] * F, [0.0] * F], dtype=torch.float64)
    r = dist(points, torch.zeros(3, dtype=torch.long))
    assert sizes == [2]
    assert r[0] < 1 and r[1] < 1 and r[2] > 10  # one Gaussian would put the midpoint at its mean


def student_t(rng, n, scale, dof):
    loc = torch.zeros(n, 3, dtype=torch.float64)
    cov = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1) * torch.as_tensor(scale)[:, None, None]
    return StudentT(loc, cov, torch.full((n,), float(dof), dtype=torch.float64))


def test_conformal_factor_per_bin_restores_the_95_percent_level():
    rng = np.random.default_rng(3)
    n = 20000
    r = rng.uniform(0, 10, n)
    true_scale = np.where(r > 8, 4.0, 1.0)  # the top bin's errors are 2x wider than predicted
    dof = 7.0
    draws = stats.multivariate_t(np.zeros(3), np.eye(3), df=dof).rvs(n, random_state=rng)
    y = torch.from_numpy(draws * np.sqrt(true_scale)[:, None])
    pred = student_t(rng, n, np.ones(n), dof)
    edges, factors = ev.conformal_factors(pred, y, r)
    np.testing.assert_allclose(edges, np.quantile(r, [0.2, 0.4, 0.6, 0.8]))
    assert np.all(np.abs(factors[:4] - 1) < 0.1) and abs(factors[4] - 4) < 0.4
    fixed = pred.scaled(torch.from_numpy(factors[np.searchsorted(edges, r)]))
    pit = fixed.pit(y).numpy()
    which = np.searchsorted(edges, r)
    for b in range(ev.BINS):  # the split-conformal guarantee on the fitting set itself
        assert np.mean(pit[which == b] <= 0.95) >= 0.95


def test_nll_factor_per_bin_is_the_gaussian_closed_form():
    rng = np.random.default_rng(4)
    n = 3000
    r = rng.uniform(0, 1, n)
    y = torch.from_numpy(rng.normal(size=(n, 3)) * np.where(r > 0.5, 3.0, 1.0)[:, None])
    pred = student_t(rng, n, np.ones(n), 1e7)  # dof -> infinity: a Gaussian
    edges = np.quantile(r, [0.2, 0.4, 0.6, 0.8])
    _, factors = fit_r_bin_factors(pred, y, torch.from_numpy(r), 5)  # what the experiment calls
    which = np.searchsorted(edges, r)
    closed = [float((y[torch.from_numpy(which == b)] ** 2).sum(1).mean() / 3) for b in range(5)]
    np.testing.assert_allclose(factors, closed, rtol=1e-3)
