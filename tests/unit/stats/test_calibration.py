"""Post-hoc variance calibration of a single model (PotentialModel.calibrate, form raw/cal)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from e2ip import ModelError, PotentialModel, load_model
from e2ip.data.read import read_structures
from e2ip.evaluation.evaluate import collect
from e2ip.models.potential import trace
from e2ip.stats.predictive import Gaussian, IndependentStudentT, StudentT
from e2ip.train.datasets import demo_data_path


def _model(head="e2ip", **head_options):
    torch.manual_seed(0)
    return PotentialModel(elements=[1, 6, 8], cutoff=4.0, head=head, force_scale=0.5,
                          head_options=head_options,
                          backbone_options={"num_features": 8, "num_layers": 1,
                                            "num_radial": 6}).double()


@pytest.mark.parametrize("evidence", ["learned", "feature_distance"])
@pytest.mark.parametrize("true_factor", [0.25, 3.0])
def test_calibrate_recovers_a_known_variance_factor(true_factor, evidence):
    """Reference forces drawn from the raw predictive widened by a known factor: the fit finds
    it (and, with the feature distance, leaves the epistemic part's own scale near 1)."""
    model = _model(evidence=evidence)
    if evidence == "feature_distance":
        model.fit_training_statistics(read_structures(demo_data_path(), index=":100"))
    structures = read_structures(demo_data_path(test=True), index=":150")
    c = collect(model, structures, 64, ["raw"]).forms["raw"]
    gen = torch.Generator().manual_seed(1)
    draws = c.predictive.scaled(true_factor).sample(1, gen)[0]  # (N, 3) from the wider/narrower t
    k = 0
    for s in structures:  # make these draws the reference forces
        s.forces = draws[k:k + s.n_atoms].numpy()
        k += s.n_atoms
    factor = model.calibrate(structures, batch_size=64)
    assert model.calibrated
    c_cal = collect(model, structures, 64, ["cal"]).forms["cal"]
    widening = trace(c_cal.predictive.covariance()) / trace(c.predictive.covariance())
    if evidence == "learned":  # one scale: the predictive and u_epi scale by it exactly
        assert factor == pytest.approx(true_factor, rel=0.1)
        torch.testing.assert_close(widening, torch.full_like(widening, factor))
        torch.testing.assert_close(c_cal.u_epi, c.u_epi * factor)
    else:  # two scales, which trade off where the epistemic part dominates: the predictive
        assert float(widening.median()) == pytest.approx(true_factor, rel=0.1)
        torch.testing.assert_close(c_cal.u_epi, c.u_epi * factor * float(model.epistemic_scale))


def test_forms_and_save_load(tmp_path):
    model = _model()
    structures = read_structures(demo_data_path(test=True), index=":3")
    with pytest.raises(ModelError, match="not calibrated"):
        collect(model, structures, 8, ["cal"])
    model.variance_scale.fill_(2.5)
    raw = model.predict(structures)  # default form is 'cal' once calibrated
    model.save(tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    assert float(loaded.variance_scale) == 2.5
    again = loaded.predict(structures)
    np.testing.assert_allclose(again["epistemic"], raw["epistemic"], rtol=1e-12)
    from e2ip.data.graph import graph_from_structures

    out = model(graph_from_structures(structures, 4.0, torch.float64), create_graph=False)
    r = model.covariances(out["params"], out["forces"], form="raw")
    c = model.covariances(out["params"], out["forces"])
    torch.testing.assert_close(c["predictive"], 2.5 * r["predictive"])


def test_scaled_predictives_against_scipy():
    gen = torch.Generator().manual_seed(0)
    n = 5
    loc = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    m = torch.randn(n, 3, 3, generator=gen, dtype=torch.float64)
    cov = m @ m.transpose(1, 2) + 0.5 * torch.eye(3, dtype=torch.float64)
    y = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    dof = torch.full((n,), 7.0, dtype=torch.float64)
    f = 1.7
    t = StudentT(loc, cov, dof).scaled(f)
    g = Gaussian(loc, cov).scaled(f)
    for i in range(n):
        ref_t = -stats.multivariate_t.logpdf(y[i], loc[i], f * cov[i].numpy(), df=7.0)
        ref_g = -stats.multivariate_normal.logpdf(y[i], loc[i], f * cov[i].numpy())
        assert float(t.nll(y)[i]) == pytest.approx(ref_t, rel=1e-10)
        assert float(g.nll(y)[i]) == pytest.approx(ref_g, rel=1e-10)
    scale = torch.rand(n, 3, generator=gen, dtype=torch.float64) + 0.2
    it = IndependentStudentT(loc, scale, torch.full((n, 3), 5.0, dtype=torch.float64)).scaled(f)
    ref = -stats.t.logpdf(y.numpy(), 5.0, loc.numpy(), scale.numpy() * math.sqrt(f)).sum(-1)
    np.testing.assert_allclose(it.nll(y).numpy(), ref, rtol=1e-10)
