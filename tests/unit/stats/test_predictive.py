"""Predictive families against scipy (float64): densities, PIT, sampling, rotation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from e2ip.stats.metrics import random_rotations
from e2ip.stats.predictive import Gaussian, IndependentStudentT, Samples, StudentT, concatenate

D = 3


def _spd(rng, n, jitter=0.3):
    b = rng.normal(size=(n, D, D))
    return b @ b.transpose(0, 2, 1) + jitter * np.eye(D)


def _student_case(seed=0, n=5):
    rng = np.random.default_rng(seed)
    loc = rng.normal(size=(n, D))
    scale = _spd(rng, n)
    dof = rng.uniform(3.0, 12.0, n)
    y = loc + rng.normal(scale=2.0, size=(n, D))
    return loc, scale, dof, y


def _t(*arrays):
    return [torch.tensor(a) for a in arrays]


def _mc_pit(samples, y, inv):
    """P(d(X) <= d(y)) with d the Mahalanobis distance, from samples (M, 3)."""
    def dist(x):
        return np.einsum("...i,ij,...j->...", x, inv, x)
    return np.mean(dist(samples) <= dist(y))


def test_student_t_nll_matches_scipy():
    loc, scale, dof, y = _student_case(0)
    pred = StudentT(*_t(loc, scale, dof))
    ref = [-stats.multivariate_t.logpdf(y[i], loc=loc[i], shape=scale[i], df=dof[i])
           for i in range(len(y))]
    np.testing.assert_allclose(pred.nll(torch.tensor(y)).numpy(), ref, rtol=1e-10, atol=1e-10)


def test_student_t_pit_matches_monte_carlo_of_scipy_samples():
    loc, scale, dof, y = _student_case(1, n=4)
    pit = StudentT(*_t(loc, scale, dof)).pit(torch.tensor(y)).numpy()
    m = 40000
    for i in range(len(y)):
        xs = stats.multivariate_t.rvs(loc=np.zeros(D), shape=scale[i], df=dof[i], size=m,
                                      random_state=100 + i)
        ref = _mc_pit(xs, y[i] - loc[i], np.linalg.inv(scale[i]))
        assert abs(pit[i] - ref) < 4 * np.sqrt(0.25 / m) + 1e-3


def test_gaussian_nll_and_pit_match_scipy():
    rng = np.random.default_rng(2)
    n = 4
    loc = rng.normal(size=(n, D))
    cov = _spd(rng, n)
    y = loc + rng.normal(scale=1.5, size=(n, D))
    pred = Gaussian(*_t(loc, cov))
    ref = [-stats.multivariate_normal.logpdf(y[i], mean=loc[i], cov=cov[i]) for i in range(n)]
    np.testing.assert_allclose(pred.nll(torch.tensor(y)).numpy(), ref, rtol=1e-10, atol=1e-10)
    pit = pred.pit(torch.tensor(y)).numpy()
    m = 40000
    for i in range(n):
        xs = stats.multivariate_normal.rvs(mean=np.zeros(D), cov=cov[i], size=m,
                                           random_state=200 + i)
        ref = _mc_pit(xs, y[i] - loc[i], np.linalg.inv(cov[i]))
        assert abs(pit[i] - ref) < 4 * np.sqrt(0.25 / m) + 1e-3


def test_student_t_sample_moments():
    rng = np.random.default_rng(3)
    loc = rng.normal(size=(2, D))
    scale = _spd(rng, 2, jitter=0.5)
    dof = np.array([9.0, 14.0])
    pred = StudentT(*_t(loc, scale, dof))
    m = 200000
    x = pred.sample(m, torch.Generator().manual_seed(0)).numpy()
    assert x.shape == (m, 2, D)
    for i in range(2):
        cov_true = dof[i] / (dof[i] - 2) * scale[i]
        sd = np.sqrt(np.diag(cov_true))
        assert np.all(np.abs(x[:, i].mean(0) - loc[i]) < 5 * sd / np.sqrt(m))
        cov_mc = np.cov(x[:, i].T)
        np.testing.assert_allclose(cov_mc, cov_true, atol=0.04 * np.abs(cov_true).max())
    # the variance factor dof/(dof-2) is resolved: a Gaussian with cov=scale is clearly off
    assert abs(np.trace(np.cov(x[:, 0].T)) / np.trace(scale[0]) - dof[0] / (dof[0] - 2)) < 0.04


def test_gaussian_sample_moments():
    rng = np.random.default_rng(4)
    loc = rng.normal(size=(1, D))
    cov = _spd(rng, 1)
    x = Gaussian(*_t(loc, cov)).sample(100000, torch.Generator().manual_seed(1)).numpy()[:, 0]
    np.testing.assert_allclose(x.mean(0), loc[0], atol=5 * np.sqrt(cov[0].diagonal().max() / 1e5))
    np.testing.assert_allclose(np.cov(x.T), cov[0], atol=0.03 * np.abs(cov[0]).max())


@pytest.mark.parametrize("family", ["student", "gaussian", "independent"])
def test_sample_reproducible_and_leaves_global_rng(family):
    loc, scale, dof, _ = _student_case(5, n=3)
    if family == "student":
        pred = StudentT(*_t(loc, scale, dof))
    elif family == "gaussian":
        pred = Gaussian(*_t(loc, scale))
    else:
        pred = IndependentStudentT(*_t(loc, np.sqrt(scale.diagonal(0, 1, 2)),
                                       np.repeat(dof[:, None], 3, 1)))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = pred.sample(50, torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), before)
    b = pred.sample(50, torch.Generator().manual_seed(7))
    c = pred.sample(50, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_independent_student_t_nll_matches_scipy():
    rng = np.random.default_rng(6)
    n = 5
    loc = rng.normal(size=(n, D))
    scale = rng.uniform(0.2, 2.0, (n, D))
    dof = rng.uniform(2.5, 15.0, (n, D))
    y = loc + rng.normal(size=(n, D))
    pred = IndependentStudentT(*_t(loc, scale, dof))
    ref = -stats.t.logpdf(y, df=dof, loc=loc, scale=scale).sum(-1)
    np.testing.assert_allclose(pred.nll(torch.tensor(y)).numpy(), ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(pred.covariance().numpy(),
                               np.stack([np.diag(s**2 * d / (d - 2)) for s, d in zip(scale, dof)]))


def test_independent_student_t_pit_is_uniform_for_its_own_draws():
    rng = np.random.default_rng(7)
    n = 1000
    loc = rng.normal(size=(n, D))
    scale = rng.uniform(0.2, 2.0, (n, D))
    dof = rng.uniform(3.0, 10.0, (n, D))
    y = loc + scale * stats.t.rvs(df=dof, random_state=rng)
    pred = IndependentStudentT(*_t(loc, scale, dof), n_mc=200)
    pit = pred.pit(torch.tensor(y), chunk_elements=100000).numpy()
    assert pit.shape == (n,)
    assert stats.kstest(pit, "uniform").pvalue > 1e-3
    # chunking does not change the statistic's law; a shrunk scale is clearly miscalibrated
    shrunk = IndependentStudentT(*_t(loc, 0.5 * scale, dof), n_mc=200)
    assert np.mean(shrunk.pit(torch.tensor(y)).numpy() > 0.95) > 0.2


@pytest.mark.parametrize("family", ["student", "gaussian"])
def test_rotate_keeps_nll_and_pit(family):
    loc, scale, dof, y = _student_case(8, n=6)
    pred = StudentT(*_t(loc, scale, dof)) if family == "student" else Gaussian(*_t(loc, scale))
    r = random_rotations(len(y), 3)
    yt = torch.tensor(y)
    ry = torch.einsum("nij,nj->ni", r, yt)
    rot = pred.rotate(r)
    torch.testing.assert_close(rot.nll(ry), pred.nll(yt), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rot.pit(ry), pred.pit(yt), rtol=1e-10, atol=1e-10)
    cov_rot = r @ pred.covariance() @ r.transpose(-1, -2)
    torch.testing.assert_close(rot.covariance(), cov_rot, rtol=1e-10, atol=1e-10)
    # rotating y alone (not the predictive) changes the density of an anisotropic predictive
    assert not torch.allclose(pred.nll(ry), pred.nll(yt), atol=1e-6)


def test_samples_predictive_and_concatenate():
    rng = np.random.default_rng(9)
    loc, scale, dof, y = _student_case(9, n=4)
    parts = [StudentT(*_t(loc[:2], scale[:2], dof[:2])), StudentT(*_t(loc[2:], scale[2:], dof[2:]))]
    joined = concatenate(parts)
    whole = StudentT(*_t(loc, scale, dof))
    torch.testing.assert_close(joined.nll(torch.tensor(y)), whole.nll(torch.tensor(y)))
    draws = torch.tensor(rng.normal(size=(5000, 4, D)))
    emp = Samples(draws)
    torch.testing.assert_close(emp.loc, draws.mean(0))
    np.testing.assert_allclose(emp.covariance()[1].numpy(), np.cov(draws[:, 1].numpy().T),
                               atol=1e-9)
    pit = emp.pit(torch.zeros(4, D)).numpy()
    assert np.all(pit < 0.05)  # the origin is the centre: few samples are closer
