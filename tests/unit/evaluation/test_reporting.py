"""Reports against independent references: the head's loss, the NLL in report units, calibrated
vs raw metrics, the form every report states, and strict JSON.

Every expected value here is computed with scipy (float64) from the model's raw parameters, never
from the code path under test."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy import stats

from e2ip import Ensemble, PotentialModel
from e2ip.data.graph import graph_from_structures
from e2ip.data.read import read_structures
from e2ip.data.units import energy_factor
from e2ip.evaluation.evaluate import evaluate, json_ready, write_metrics_json
from e2ip.train.datasets import demo_data_path

SMALL = {"num_features": 8, "num_layers": 1, "num_radial": 6}


def _e2ip(seed: int = 0) -> PotentialModel:
    torch.manual_seed(seed)
    model = PotentialModel(elements=[1, 6, 8], cutoff=4.0, force_scale=0.6,
                           backbone_options=SMALL).double().eval()
    with torch.no_grad():  # anisotropic Sigma0, evidence away from its initial values
        model.head.scalar_mlp[-1].weight.normal_(0, 0.4)
        model.head.scalar_mlp[-1].bias.normal_(0, 0.4)
    return model


@pytest.fixture(scope="module")
def structures():
    return read_structures(demo_data_path(test=True), index=":12")


def _scipy_student_t(model, structures):
    """(mu (N,3), shape S (N,3,3), dof (N,), y (N,3)) of the predictive Student-t, built with
    scipy.linalg.expm from the head's raw A, kappa, nu (docs/maths.md §4)."""
    g = graph_from_structures(structures, model.cutoff, torch.float64)
    out = model(g, create_graph=False)
    p = {k: v.detach().numpy() for k, v in out["params"].items()}
    a, kappa, nu = p["A"], p["kappa"], p["nu"]
    dof = nu - 2
    shape = np.stack([(kappa[i] + 1) * nu[i] / (kappa[i] * dof[i]) * scipy.linalg.expm(a[i])
                      for i in range(len(a))])
    return out["forces"].detach().numpy(), shape, dof, g.forces.numpy(), out, g


def _nll(mu, shape, dof, y, factor: float = 1.0) -> np.ndarray:
    return np.array([-stats.multivariate_t.logpdf(y[i], loc=mu[i], shape=factor * shape[i],
                                                  df=dof[i]) for i in range(len(y))])


def test_head_loss_nll_is_the_student_t_predictive_of_expm_a(structures):
    """The training NLL uses expm(-A) = Sigma0^-1: any other matrix (e.g. expm(+A)) fails."""
    model = _e2ip()
    mu, shape, dof, y, out, g = _scipy_student_t(model, structures[:4])
    loss = model.head.loss(out["params"], out["forces"], g.forces)
    np.testing.assert_allclose(loss["nll"].detach().numpy(), _nll(mu, shape, dof, y), rtol=1e-9)
    # the regulariser (nu + kappa) |e|^2 / sigma_F^2, detached error (docs/maths.md §5)
    p = out["params"]
    reg = ((p["nu"] + p["kappa"]).detach().numpy() * ((y - mu) ** 2).sum(-1) / 0.6**2)
    np.testing.assert_allclose(loss["reg"].detach().numpy(), reg, rtol=1e-9)


@pytest.mark.parametrize("units", ["eV", "kcal/mol", "meV"])
def test_reported_nll_is_the_density_in_report_units(structures, units):
    """A density of forces in units/Å: -log p(y') with y' = c y, S' = c^2 S (c = eV -> units)."""
    model = _e2ip()
    mu, shape, dof, y, _, _ = _scipy_student_t(model, structures)
    c = 1.0 / energy_factor(units)
    metrics, _ = evaluate(model, structures, units=units, form="raw")
    ref = _nll(c * mu, c * c * shape, dof, c * y).mean()
    assert metrics["nll"] == pytest.approx(ref, rel=1e-9)
    assert metrics["form"] == "raw" and "raw" not in metrics and "variance_scale" not in metrics


def test_calibrated_report_uses_the_scaled_covariance_and_keeps_raw_beside_it(structures):
    model = _e2ip()
    mu, shape, dof, y, _, _ = _scipy_student_t(model, structures)
    factor = 0.37
    model.variance_scale.fill_(factor)
    metrics, _ = evaluate(model, structures)  # default form of a calibrated model: cal
    assert metrics["form"] == "cal"
    assert metrics["variance_scale"] == pytest.approx(factor)
    assert metrics["calibration"] == {"method": "variance_scale", "value": pytest.approx(factor),
                                      "epistemic_scale": 1.0}  # the default feature distance
    assert metrics["nll"] == pytest.approx(_nll(mu, shape, dof, y, factor).mean(), rel=1e-9)
    assert metrics["raw"]["nll"] == pytest.approx(_nll(mu, shape, dof, y).mean(), rel=1e-9)
    # coverage@95 from the F(3, dof) distribution of the scaled Mahalanobis distance
    e = y - mu
    for key, f in (("coverage_95", factor), ("raw", 1.0)):
        quad = np.einsum("ni,nij,nj->n", e, np.linalg.inv(f * shape), e)
        cov95 = float(np.mean(stats.f.cdf(quad / 3, 3, dof) <= 0.95))
        got = metrics["coverage_95"] if key == "coverage_95" else metrics["raw"]["coverage_95"]
        assert got == pytest.approx(cov95)
    raw_only, _ = evaluate(model, structures, form="raw")
    assert raw_only["form"] == "raw" and raw_only["nll"] == pytest.approx(metrics["raw"]["nll"])
    assert raw_only["nll"] != pytest.approx(metrics["nll"])


def test_ensemble_reports_its_floor_through_the_same_interface(structures):
    members = []
    for k in range(3):
        torch.manual_seed(k)
        members.append(PotentialModel(elements=[1, 6, 8], cutoff=4.0, head="none",
                                      backbone_options=SMALL).double())
    ens = Ensemble(members).eval()
    ens.set_calibration_variance(0.05)
    ens.epistemic_scale.fill_(3.0)
    metrics, _ = evaluate(ens, structures)
    assert metrics["form"] == "cal" and metrics["nll_floor"] == pytest.approx(0.05)
    assert metrics["calibration"]["method"] == "nll_floor"
    assert metrics["calibration"]["epistemic_scale"] == 3.0
    out = ens.predict(structures, form="raw")
    y = np.concatenate([s.forces for s in structures])
    nll = [-stats.multivariate_normal.logpdf(y[i], out["forces"][i],
                                             3.0 * out["epistemic"][i] + 0.05 * np.eye(3))
           for i in range(len(y))]
    assert metrics["nll"] == pytest.approx(np.mean(nll), rel=1e-8)
    assert metrics["raw"]["nll"] > metrics["nll"]  # the raw floor 1e-8 is far too narrow


def test_metrics_json_is_strict_and_says_why_a_value_is_missing(structures, tmp_path):
    model = _e2ip()
    metrics, _ = evaluate(model, structures[:1])  # one structure: no per-structure ranking
    assert math.isnan(metrics["spearman_per_structure"])
    write_metrics_json(metrics, tmp_path / "new" / "metrics.json")

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    data = json.loads((tmp_path / "new" / "metrics.json").read_text(), parse_constant=refuse)
    assert data["spearman_per_structure"] is None
    assert "fewer than 3 structures" in data["undefined"]["spearman_per_structure"]
    nested = json_ready({"raw": {"spearman": float("nan")}, "nll": 1.0})
    assert nested["raw"]["spearman"] is None and "raw.spearman" in nested["undefined"]
    assert nested["nll"] == 1.0


def test_plain_model_report_has_no_form_and_no_uncertainty(structures, tmp_path):
    torch.manual_seed(0)
    plain = PotentialModel(elements=[1, 6, 8], cutoff=4.0, head="none", backbone_options=SMALL)
    metrics, arrays = evaluate(plain, structures)
    assert metrics["form"] is None and "nll" not in metrics and arrays == {}


def test_accuracy_and_summary_metrics_in_report_units(structures):
    """Every accuracy figure recomputed with numpy from the predictions, in kcal/mol."""
    model = _e2ip()
    c = 1.0 / energy_factor("kcal/mol")
    metrics, arrays = evaluate(model, structures, units="kcal/mol", form="raw")
    pred = model.predict(structures, form="raw")
    f_ref = np.concatenate([s.forces for s in structures])
    e_ref = np.array([s.energy for s in structures])
    n = np.array([s.n_atoms for s in structures])
    f_err, e_err = c * (pred["forces"] - f_ref), c * np.abs(pred["energy"] - e_ref)
    assert metrics["n_structures"] == len(structures) and metrics["n_atoms"] == n.sum()
    assert metrics["units"] == {"energy": "kcal/mol", "forces": "kcal/mol/Å"}
    expected = {
        "force_mae": np.abs(f_err).mean(), "force_rmse": np.sqrt((f_err**2).mean()),
        "energy_mae": e_err.mean(), "energy_rmse": np.sqrt((e_err**2).mean()),
        "energy_mae_per_atom": (e_err / n).mean(),
        "mean_epistemic": c * np.sqrt(pred["u_epi"] / 3).mean(),
        "mean_aleatoric": c * np.sqrt(pred["u_ale"] / 3).mean(),
    }
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-9), key
    err_norm = np.linalg.norm(f_err, axis=-1)
    assert metrics["spearman"] == pytest.approx(stats.spearmanr(pred["u_epi"], err_norm)[0])
    owner = np.repeat(np.arange(len(structures)), n)
    u_struct = np.bincount(owner, pred["u_epi"]) / n
    rmse_struct = np.sqrt(np.bincount(owner, (f_err**2).mean(-1)) / n)
    assert metrics["spearman_per_structure"] == pytest.approx(
        stats.spearmanr(u_struct, rmse_struct)[0])
    np.testing.assert_allclose(arrays["sigma_epi"], c * pred["sigma_epi"], rtol=1e-9)
    np.testing.assert_allclose(arrays["error_norm"], err_norm, rtol=1e-9)
    # the energy score is a distance: same samples, so exactly c times the eV figure
    in_ev, _ = evaluate(model, structures, units="eV", form="raw")
    assert metrics["energy_score"] == pytest.approx(c * in_ev["energy_score"], rel=1e-9)
    # PIT of the Student-t (F(3, dof) of the Mahalanobis distance / 3) and its coverage curve
    mu, shape, dof, y, _, _ = _scipy_student_t(model, structures)
    e = y - mu
    quad = np.einsum("ni,nij,nj->n", e, np.linalg.inv(shape), e)
    pit = stats.f.cdf(quad / 3, 3, dof)
    np.testing.assert_allclose(arrays["pit"], pit, rtol=1e-9, atol=1e-12)
    levels, coverage = arrays["coverage_curve"]
    np.testing.assert_allclose(coverage, [(pit <= p).mean() for p in levels])


def test_per_structure_metrics_and_reference_auc_from_predictions(structures):
    """spearman/ause per structure, auc_worst10 and auc_reference recomputed from model.predict
    with scipy and pair counting, for each aggregate; the reference set needs no labels."""
    model = _e2ip()
    reference = read_structures(demo_data_path(test=True), index="12:30")
    unlabelled = [type(s)(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc)
                  for s in reference]
    pred, pred_ref = model.predict(structures, form="raw"), model.predict(reference, form="raw")
    n = np.array([s.n_atoms for s in structures])
    n_ref = np.array([s.n_atoms for s in reference])
    f_err = pred["forces"] - np.concatenate([s.forces for s in structures])
    rmse = np.sqrt(np.bincount(np.repeat(np.arange(len(n)), n), (f_err**2).mean(-1)) / n)
    for aggregate, fn in {"mean": np.mean, "max": np.max, "sum": np.sum}.items():
        u = [fn(part) for part in np.split(pred["u_epi"], np.cumsum(n)[:-1])]
        u_ref = [fn(part) for part in np.split(pred_ref["u_epi"], np.cumsum(n_ref)[:-1])]
        metrics, arrays = evaluate(model, structures, form="raw", aggregate=aggregate,
                                   reference=unlabelled)
        assert metrics["aggregate"] == aggregate
        assert metrics["spearman_per_structure"] == pytest.approx(stats.spearmanr(u, rmse)[0])
        wins = sum((a > b) + 0.5 * (a == b) for a in u for b in u_ref)
        assert metrics["auc_reference"] == pytest.approx(wins / (len(u) * len(u_ref)))
        worst = np.argsort(-rmse)[:2]  # ceil(0.1 * 12)
        rest = [k for k in range(len(u)) if k not in worst]
        wins = sum((u[a] > u[b]) + 0.5 * (u[a] == u[b]) for a in worst for b in rest)
        assert metrics["auc_worst10"] == pytest.approx(wins / (2 * len(rest)))
        # AUSE: remove structures most uncertain first vs largest RMSE first
        by_u, by_e = np.argsort(-np.asarray(u)), np.argsort(-rmse)
        gaps = [rmse[by_u[k:]].mean() - rmse[by_e[k:]].mean() for k in range(len(u))]
        assert metrics["ause_per_structure"] == pytest.approx(np.mean(gaps))
        np.testing.assert_allclose(arrays["u_structure"], u, rtol=1e-9)
    without, _ = evaluate(model, structures, form="raw")
    assert without["aggregate"] == "mean" and "auc_reference" not in without
