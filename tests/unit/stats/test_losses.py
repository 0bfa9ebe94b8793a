"""Losses against independent scipy references (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy import stats

from e2ip.stats.losses import force_mse, nig_nll, nig_regularizer, niw_nll, niw_regularizer
from e2ip.stats.predictive import StudentT

D = 3


def _random_sym(rng, n, scale=0.8):
    a = rng.normal(scale=scale, size=(n, D, D))
    return (a + a.transpose(0, 2, 1)) / 2


def _niw_case(seed=0, n=7):
    rng = np.random.default_rng(seed)
    a = _random_sym(rng, n)
    kappa = rng.uniform(0.1, 5.0, n)
    nu = rng.uniform(5.0, 20.0, n)
    mu = rng.normal(size=(n, D))
    y = mu + rng.normal(scale=1.5, size=(n, D))
    return a, kappa, nu, mu, y


def _niw_torch(a, kappa, nu, mu, y):
    at = torch.tensor(a)
    return dict(error=torch.tensor(y - mu), trace_a=at.diagonal(dim1=-2, dim2=-1).sum(-1),
                expm_neg_a=torch.linalg.matrix_exp(-at), kappa=torch.tensor(kappa),
                nu=torch.tensor(nu))


@pytest.mark.parametrize("seed", [0, 1])
def test_niw_nll_matches_scipy_multivariate_t(seed):
    a, kappa, nu, mu, y = _niw_case(seed)
    got = niw_nll(**_niw_torch(a, kappa, nu, mu, y)).numpy()
    ref = []
    for i in range(len(y)):
        shape = (kappa[i] + 1) * nu[i] / (kappa[i] * (nu[i] - 2)) * scipy.linalg.expm(a[i])
        ref.append(-stats.multivariate_t.logpdf(y[i], loc=mu[i], shape=shape, df=nu[i] - 2))
    np.testing.assert_allclose(got, np.array(ref), rtol=1e-10, atol=1e-10)


def test_niw_nll_with_spd_expm():
    """The head passes expm(-A) from its own matmul-only exponential: same value."""
    from e2ip.heads import spd

    a, kappa, nu, mu, y = _niw_case(3)
    args = _niw_torch(a, kappa, nu, mu, y)
    ref = niw_nll(**args)
    args["expm_neg_a"] = spd.expm_symmetric(-torch.tensor(a))
    torch.testing.assert_close(niw_nll(**args), ref, rtol=1e-10, atol=1e-10)


def test_niw_nll_equals_student_t_predictive():
    a, kappa, nu, mu, y = _niw_case(4)
    args = _niw_torch(a, kappa, nu, mu, y)
    factor = torch.tensor((kappa + 1) * nu / (kappa * (nu - 2)))
    scale = factor[:, None, None] * torch.linalg.matrix_exp(torch.tensor(a))
    pred = StudentT(torch.tensor(mu), scale, torch.tensor(nu - 2))
    torch.testing.assert_close(niw_nll(**args), pred.nll(torch.tensor(y)), rtol=1e-10, atol=1e-10)


def test_niw_nll_gradcheck():
    a, kappa, nu, mu, y = _niw_case(5, n=2)
    error = torch.tensor(y - mu, requires_grad=True)
    a_t = torch.tensor(a, requires_grad=True)
    kappa_t = torch.tensor(kappa, requires_grad=True)
    nu_t = torch.tensor(nu, requires_grad=True)

    def f(err, a_raw, k, n):
        a_sym = (a_raw + a_raw.transpose(-1, -2)) / 2
        tr = a_sym.diagonal(dim1=-2, dim2=-1).sum(-1)
        return niw_nll(err, tr, torch.linalg.matrix_exp(-a_sym), k, n)

    assert torch.autograd.gradcheck(f, (error, a_t, kappa_t, nu_t), eps=1e-6, atol=1e-7)


def test_niw_predictive_is_the_hierarchical_marginal():
    """Sigma ~ IW(nu Sigma0, nu), m ~ N(mu, Sigma/kappa), y ~ N(m, Sigma): the NIW Student-t
    predictive must give uniform PIT (docs/maths.md §4 derivation checked by simulation)."""
    rng = np.random.default_rng(11)
    a = _random_sym(rng, 1)[0]
    kappa, nu, n = 0.7, 7.5, 4000
    sigma0 = scipy.linalg.expm(a)
    mu = np.array([0.3, -1.0, 2.0])
    sig = stats.invwishart.rvs(df=nu, scale=nu * sigma0, size=n, random_state=rng)
    chol = np.linalg.cholesky(sig)
    m = mu + np.einsum("nij,nj->ni", chol, rng.normal(size=(n, D))) / np.sqrt(kappa)
    y = m + np.einsum("nij,nj->ni", chol, rng.normal(size=(n, D)))
    factor = (kappa + 1) * nu / (kappa * (nu - 2))
    pred = StudentT(torch.tensor(mu).expand(n, D), torch.tensor(factor * sigma0).expand(n, D, D),
                    torch.full((n,), nu - 2, dtype=torch.float64))
    pit = pred.pit(torch.tensor(y)).numpy()
    assert stats.kstest(pit, "uniform").pvalue > 1e-3
    # the wrong degrees of freedom (nu instead of nu - 2) must be detectable
    wrong = StudentT(pred.loc, torch.tensor(sigma0).expand(n, D, D),
                     torch.full((n,), nu, dtype=torch.float64))
    assert stats.kstest(wrong.pit(torch.tensor(y)).numpy(), "uniform").pvalue < 1e-3


def test_nig_nll_matches_scipy_t():
    rng = np.random.default_rng(2)
    n = 6
    err = rng.normal(size=(n, D))
    v = rng.uniform(0.1, 5, (n, D))
    alpha = rng.uniform(1.2, 6, (n, D))
    beta = rng.uniform(0.1, 3, (n, D))
    got = nig_nll(*(torch.tensor(x) for x in (err, v, alpha, beta))).numpy()
    scale = np.sqrt(beta * (1 + v) / (v * alpha))
    ref = -stats.t.logpdf(err, df=2 * alpha, loc=0.0, scale=scale).sum(-1)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)


def test_regularizers_values_and_detached_error():
    rng = np.random.default_rng(4)
    err = torch.tensor(rng.normal(size=(4, D)), requires_grad=True)
    kappa = torch.tensor(rng.uniform(0.1, 2, 4), requires_grad=True)
    nu = torch.tensor(rng.uniform(5, 9, 4))
    sf = 0.7
    reg = niw_regularizer(err, kappa, nu, sf)
    e = err.detach().numpy()
    np.testing.assert_allclose(reg.detach().numpy(),
                               (nu.numpy() + kappa.detach().numpy()) * (e**2).sum(-1) / sf**2)
    reg.sum().backward()
    assert err.grad is None or torch.all(err.grad == 0)
    assert kappa.grad is not None and torch.all(kappa.grad > 0)

    v = torch.tensor(rng.uniform(0.1, 2, (4, D)))
    alpha = torch.tensor(rng.uniform(1.1, 3, (4, D)))
    ref = (np.abs(e) / sf * (2 * v.numpy() + alpha.numpy())).sum(-1)
    np.testing.assert_allclose(nig_regularizer(err, v, alpha, sf).detach().numpy(), ref)
    np.testing.assert_allclose(force_mse(err, sf).detach().numpy(), (e**2).mean(-1) / sf**2)
