"""Metrics against closed forms, brute force and scipy; plots write files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from e2ip.stats import metrics
from e2ip.stats.predictive import Gaussian, Samples, StudentT

D = 3


def _spd(rng, n, jitter=0.3):
    b = rng.normal(size=(n, D, D)) * 0.5
    return b @ b.transpose(0, 2, 1) + jitter * np.eye(D)


def _draw_student(rng, loc, scale, dof):
    """y ~ t_dof(loc, scale) by numpy (independent of Predictive.sample)."""
    n = len(loc)
    chol = np.linalg.cholesky(scale)
    z = np.einsum("nij,nj->ni", chol, rng.normal(size=(n, D)))
    g = rng.chisquare(dof)
    return loc + z * np.sqrt(dof / g)[:, None]


@pytest.fixture(scope="module")
def student_world():
    rng = np.random.default_rng(0)
    n = 20000
    loc = rng.normal(size=(n, D))
    scale = _spd(rng, n)
    dof = rng.uniform(3.0, 15.0, n)
    y = _draw_student(rng, loc, scale, dof)
    return [torch.tensor(a) for a in (loc, scale, dof, y)]


@pytest.fixture(scope="module")
def gaussian_world():
    rng = np.random.default_rng(1)
    n = 20000
    loc = rng.normal(size=(n, D))
    cov = _spd(rng, n)
    y = loc + np.einsum("nij,nj->ni", np.linalg.cholesky(cov), rng.normal(size=(n, D)))
    return [torch.tensor(a) for a in (loc, cov, y)]


# ------------------------------------------------------------------------------- calibration
def test_true_student_t_is_calibrated(student_world):
    loc, scale, dof, y = student_world
    pit = metrics.pit_values(StudentT(loc, scale, dof), y)
    assert pit.shape == (len(y),)
    assert metrics.calibration_error(pit) < 0.02
    assert 0.94 <= metrics.coverage_at(pit, 0.95) <= 0.96


def test_true_gaussian_is_calibrated(gaussian_world):
    loc, cov, y = gaussian_world
    pit = metrics.pit_values(Gaussian(loc, cov), y)
    assert metrics.calibration_error(pit) < 0.02
    assert 0.94 <= metrics.coverage_at(pit) <= 0.96


def test_overconfident_models_are_flagged(student_world, gaussian_world):
    loc, scale, dof, y = student_world
    pit = metrics.pit_values(StudentT(loc, 0.3**2 * scale, dof), y)
    assert metrics.calibration_error(pit) > 0.1
    assert metrics.coverage_at(pit) < 0.9
    loc, cov, y = gaussian_world
    pit = metrics.pit_values(Gaussian(loc, 0.3**2 * cov), y)
    assert metrics.calibration_error(pit) > 0.1
    # underconfident (too wide) is flagged as well, with coverage above nominal
    pit = metrics.pit_values(Gaussian(loc, 3.0**2 * cov), y)
    assert metrics.calibration_error(pit) > 0.1
    assert metrics.coverage_at(pit) > 0.99


def test_coverage_and_ce_closed_forms():
    levels = np.arange(1, 100) / 100
    # a perfectly uniform grid: coverage(p_k) = p_k exactly
    grid = (np.arange(1000) + 0.5) / 1000
    lv, cov = metrics.coverage_curve(grid)
    np.testing.assert_allclose(lv, levels)
    np.testing.assert_allclose(cov, levels, atol=1e-12)
    assert metrics.calibration_error(grid) == pytest.approx(0.0, abs=1e-12)
    # all PIT at 0.5: coverage is a step at 0.5, CE = (sum_{k<50} k + sum_{k>=50} (100-k)) / 9900
    half = np.full(10, 0.5)
    assert metrics.calibration_error(half) == pytest.approx(25 / 99, abs=1e-12)
    assert metrics.coverage_at(half, 0.49) == 0.0
    assert metrics.coverage_at(half, 0.5) == 1.0
    # all mass at 0 or at 1: CE = 1/2
    assert metrics.calibration_error(np.zeros(7)) == pytest.approx(0.5)
    assert metrics.calibration_error(np.ones(7)) == pytest.approx(0.5)
    # mixed hand-made array, counted by hand
    pit = np.array([0.02, 0.1, 0.5, 0.95, 0.96])
    assert metrics.coverage_at(pit, 0.95) == pytest.approx(0.8)
    assert metrics.coverage_at(pit, 0.01) == 0.0
    assert metrics.coverage_at(pit, 0.1) == pytest.approx(0.4)
    cov_ref = np.array([np.mean(pit <= p) for p in levels])
    ce_ref = np.mean(np.abs(cov_ref - levels))
    assert metrics.calibration_error(pit) == pytest.approx(ce_ref, abs=1e-12)
    assert metrics.coverage_curve(torch.tensor(pit))[1] == pytest.approx(cov_ref)


# ---------------------------------------------------------------------------------- scores
def test_mean_nll_and_force_errors():
    rng = np.random.default_rng(2)
    loc = rng.normal(size=(6, D))
    cov = _spd(rng, 6)
    y = rng.normal(size=(6, D))
    ref = np.mean([-stats.multivariate_normal.logpdf(y[i], loc[i], cov[i]) for i in range(6)])
    pred = Gaussian(torch.tensor(loc), torch.tensor(cov))
    assert metrics.mean_nll(pred, torch.tensor(y)) == pytest.approx(ref, rel=1e-10)
    err = loc - y
    out = metrics.force_errors(torch.tensor(loc), torch.tensor(y))
    assert out["force_mae"] == pytest.approx(np.abs(err).sum() / err.size)
    assert out["force_rmse"] == pytest.approx(math.sqrt((err**2).sum() / err.size))


def _energy_score_brute(x, y):
    """x (M, N, 3) samples, y (N, 3): double loop, unbiased pair term."""
    m, n, _ = x.shape
    out = []
    for a in range(n):
        first = sum(np.linalg.norm(x[i, a] - y[a]) for i in range(m)) / m
        pair = sum(np.linalg.norm(x[i, a] - x[j, a]) for i in range(m) for j in range(m)
                   if i != j) / (m * (m - 1))
        out.append(first - 0.5 * pair)
    return np.array(out)


@pytest.mark.parametrize("family", ["student", "samples"])
def test_energy_score_matches_brute_force(family):
    rng = np.random.default_rng(3)
    n, m = 5, 6
    loc = torch.tensor(rng.normal(size=(n, D)))
    y = torch.tensor(rng.normal(size=(n, D)))
    if family == "student":
        pred = StudentT(loc, torch.tensor(_spd(rng, n)), torch.tensor(rng.uniform(3, 9, n)))
    else:
        pred = Samples(torch.tensor(rng.normal(size=(40, n, D))))
    x = pred.sample(m, torch.Generator().manual_seed(11)).numpy()
    ref = _energy_score_brute(x, y.numpy())
    # a tiny chunk forces the chunked path through several iterations
    got = metrics.energy_score_per_atom(pred, y, n_samples=m, seed=11, chunk_elements=2 * m * m)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    assert metrics.energy_score(pred, y, n_samples=m, seed=11) == pytest.approx(ref.mean())


def test_energy_score_of_point_mass_is_distance():
    rng = np.random.default_rng(4)
    loc = rng.normal(size=(8, D))
    y = rng.normal(size=(8, D))
    pred = Gaussian(torch.tensor(loc), torch.tensor(np.tile(1e-14 * np.eye(D), (8, 1, 1))))
    got = metrics.energy_score_per_atom(pred, torch.tensor(y), n_samples=20)
    np.testing.assert_allclose(got, np.linalg.norm(loc - y, axis=1), atol=1e-5)


def test_energy_score_prefers_the_true_distribution(student_world):
    loc, scale, dof, y = (t[:1500] for t in student_world)
    true = metrics.energy_score(StudentT(loc, scale, dof), y, n_samples=50)
    narrow = metrics.energy_score(StudentT(loc, 0.3**2 * scale, dof), y, n_samples=50)
    wide = metrics.energy_score(StudentT(loc, 3.0**2 * scale, dof), y, n_samples=50)
    assert true < narrow and true < wide


# --------------------------------------------------------------------------------- ranking
def test_spearman_matches_scipy_and_is_nan_safe():
    rng = np.random.default_rng(5)
    u = rng.lognormal(size=200)
    err = u * rng.lognormal(size=200)
    assert metrics.spearman(u, err) == pytest.approx(stats.spearmanr(u, err)[0], abs=1e-12)
    assert metrics.spearman(torch.tensor(u), torch.tensor(-err)) == pytest.approx(
        -stats.spearmanr(u, err)[0], abs=1e-12)
    assert math.isnan(metrics.spearman(np.ones(10), np.arange(10.0)))
    assert math.isnan(metrics.spearman(np.arange(10.0), np.zeros(10)))
    with_nan = np.append(u, np.nan)
    assert metrics.spearman(with_nan, np.append(err, 1.0)) == pytest.approx(
        stats.spearmanr(u, err)[0])


def _atoms_in_structures(seed: int, sizes: list[int]):
    """(batch (N,), uncertainty u (N,), force errors (N, 3)) for structures of `sizes` atoms."""
    rng = np.random.default_rng(seed)
    batch = np.repeat(np.arange(len(sizes)), sizes)
    return batch, rng.uniform(size=batch.size), rng.normal(size=(batch.size, D))


def test_spearman_per_structure_by_hand():
    sizes = [3, 5, 2, 4, 6, 3]
    batch, u, err = _atoms_in_structures(6, sizes)
    mean_u = [u[batch == b].mean() for b in range(len(sizes))]
    rmse = [np.sqrt((err[batch == b] ** 2).mean()) for b in range(len(sizes))]
    ref = stats.spearmanr(mean_u, rmse)[0]
    got = metrics.spearman_per_structure(torch.tensor(u), torch.tensor(err), torch.tensor(batch))
    assert got == pytest.approx(ref, abs=1e-12)


def test_per_structure_aggregates_by_loops():
    sizes = [3, 5, 2, 4, 6, 1]
    batch, u, err = _atoms_in_structures(16, sizes)
    reference = {"mean": np.mean, "max": np.max, "sum": np.sum}
    for aggregate, fn in reference.items():
        u_struct, rmse = metrics.per_structure(u, err, batch, aggregate)
        np.testing.assert_allclose(u_struct, [fn(u[batch == b]) for b in range(len(sizes))],
                                   rtol=1e-14)
        np.testing.assert_allclose(rmse, [np.sqrt((err[batch == b] ** 2).mean())
                                          for b in range(len(sizes))], rtol=1e-14)
    with pytest.raises(ValueError, match="aggregate"):
        metrics.per_structure(u, err, batch, "median")


def _auc_by_pairs(scores, labels):
    """P(score of a positive > score of a negative) + 1/2 P(tie), by counting every pair."""
    pos, neg = scores[labels], scores[~labels]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_roc_auc_counts_pairs_with_ties():
    rng = np.random.default_rng(17)
    for _ in range(20):
        n = int(rng.integers(4, 40))
        scores = rng.integers(0, 6, size=n).astype(float)  # many ties
        labels = rng.uniform(size=n) < 0.3
        if labels.all() or not labels.any():
            continue
        assert metrics.roc_auc(scores, labels) == pytest.approx(_auc_by_pairs(scores, labels),
                                                                abs=1e-14)
    assert math.isnan(metrics.roc_auc([1.0, 2.0], [True, True]))
    # the reference-set AUC: evaluated structures are the positives
    a, b = rng.normal(size=30) + 1.0, rng.normal(size=50)
    both = np.concatenate([a, b])
    is_a = np.r_[np.ones(30, bool), np.zeros(50, bool)]
    assert metrics.auc_reference(a, b) == pytest.approx(_auc_by_pairs(both, is_a), abs=1e-14)
    assert metrics.auc_reference(b, b) == pytest.approx(0.5)
    assert metrics.auc_reference(b + 100, b) == 1.0


def test_auc_worst10_flags_the_largest_errors():
    rng = np.random.default_rng(18)
    rmse = rng.uniform(size=35)
    worst = np.zeros(35, bool)
    worst[np.argsort(-rmse)[:4]] = True  # ceil(0.1 * 35) = 4
    u = rng.uniform(size=35)
    assert metrics.auc_worst(u, rmse, 0.1) == pytest.approx(_auc_by_pairs(u, worst), abs=1e-14)
    assert metrics.auc_worst(rmse, rmse) == 1.0
    assert metrics.auc_worst(-rmse, rmse) == 0.0
    assert math.isnan(metrics.auc_worst([1.0], [1.0]))


def _ause_by_loops(u, err):
    """Remove k = 0..n-1 items (most uncertain first; the oracle: largest error first), average
    the rest, and average the gap over k."""
    n = len(err)
    order_u = sorted(range(n), key=lambda i: (-u[i], err[i]))
    order_e = sorted(range(n), key=lambda i: -err[i])
    gap = [np.mean(err[order_u[k:]]) - np.mean(err[order_e[k:]]) for k in range(n)]
    return float(np.mean(gap))


def test_ause_against_loops_and_limits():
    rng = np.random.default_rng(19)
    for n in (2, 7, 40):
        err, u = rng.uniform(size=n), rng.uniform(size=n)
        assert metrics.ause(u, err) == pytest.approx(_ause_by_loops(u, err), abs=1e-14)
    err = rng.uniform(size=50)
    assert metrics.ause(err, err) == pytest.approx(0.0, abs=1e-15)  # the oracle itself
    assert metrics.ause(3 * err + 1, err) == pytest.approx(0.0, abs=1e-15)  # any monotone map
    assert metrics.ause(-err, err) > metrics.ause(rng.uniform(size=50), err) > 0
    # a constant uncertainty gains nothing: its curve stays at the mean error... at best
    flat = metrics.ause(np.ones(50), err)
    assert flat == pytest.approx(_ause_by_loops(np.ones(50), err), abs=1e-14)
    # a hand example: errors 1, 2, 3; uncertainty ranks 2 above 3 above 1
    # model curve: mean(1,2,3)=2, mean(1,3)=2, mean(1)=1; oracle: 2, 1.5, 1 -> gaps 0, .5, 0
    assert metrics.ause([0.0, 2.0, 1.0], [1.0, 2.0, 3.0]) == pytest.approx(0.5 / 3)
    assert math.isnan(metrics.ause([1.0], [1.0]))


def test_random_rotations_are_proper_and_uniform():
    r = metrics.random_rotations(2000, 0)
    assert r.shape == (2000, 3, 3) and r.dtype == torch.float64
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(r @ r.transpose(-1, -2), eye.expand_as(r), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(2000, dtype=torch.float64))
    # Haar moments: E[R] = 0, E[R_ij^2] = 1/3, E[tr R] = 0
    assert r.mean(0).abs().max() < 0.05
    assert (r**2).mean(0).sub(1 / 3).abs().max() < 0.03
    # a rotated fixed vector is uniform on the sphere: each coordinate ~ U(-1, 1)
    v = (r @ torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)).numpy()
    assert stats.kstest(v[:, 0], "uniform", args=(-1, 2)).pvalue > 1e-3
    assert torch.equal(metrics.random_rotations(5, 1), metrics.random_rotations(5, 1))
    assert metrics.random_rotations(2, torch.Generator().manual_seed(0), torch.float32).dtype == (
        torch.float32)
    assert metrics.rotation_stability(0.7, 0.65) == pytest.approx(-0.05)


def test_uncertainty_metrics_summary(student_world):
    loc, scale, dof, y = (t[:2000] for t in student_world)
    pred = StudentT(loc, scale, dof)
    u = torch.einsum("nii->n", pred.covariance())
    batch = torch.arange(2000) // 10
    out = metrics.uncertainty_metrics(pred, y, u, batch, n_samples=20)
    pit = metrics.pit_values(pred, y)
    np.testing.assert_array_equal(out["pit"], pit)
    assert out["coverage_95"] == metrics.coverage_at(pit)
    assert out["calibration_error"] == metrics.calibration_error(pit)
    assert out["nll"] == pytest.approx(pred.nll(y).mean().item())
    assert out["energy_score"] == metrics.energy_score(pred, y, n_samples=20)
    assert len(out["coverage_curve"]) == 99
    assert out["spearman"] > 0.2  # wider predictives do see larger errors
    assert -1 <= out["spearman_per_structure"] <= 1
    u_struct, rmse = metrics.per_structure(u, y - loc, batch)
    assert out["ause_per_structure"] == metrics.ause(u_struct, rmse)
    assert out["auc_worst10"] == metrics.auc_worst(u_struct, rmse)
    np.testing.assert_array_equal(out["u_structure"], u_struct)
    no_batch = metrics.uncertainty_metrics(pred, y, u, None, n_samples=4)
    for key in ("spearman_per_structure", "ause_per_structure", "auc_worst10"):
        assert math.isnan(no_batch[key])


# ------------------------------------------------------------------------------------ plots
def _is_png(path):
    return path.exists() and path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_plots_write_png(tmp_path):
    from e2ip.evaluation import plots

    rng = np.random.default_rng(7)
    pit = rng.uniform(size=2000)
    curves = {"calibrated": metrics.coverage_curve(pit),
              "overconfident": metrics.coverage_curve(pit**0.3)}
    assert _is_png(plots.plot_calibration(curves, tmp_path / "cal.png", title="test"))
    assert _is_png(plots.plot_calibration({"one": curves["calibrated"]}, tmp_path / "one.png"))
    assert _is_png(plots.plot_pit(pit, tmp_path / "sub" / "pit.png"))
    u = rng.lognormal(size=2000)
    err = np.sqrt(u) * rng.lognormal(size=2000)
    assert _is_png(plots.plot_error_vs_uncertainty(u, err, tmp_path / "hex.png"))
    assert _is_png(plots.plot_error_vs_uncertainty(u[:50], err[:50], tmp_path / "sc.png",
                                                   unit="kcal/mol/Å"))
