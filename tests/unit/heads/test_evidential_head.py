"""The e2IP head's outputs against closed forms (docs/maths.md §4): decomposition and predictive Student-t."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from e2ip.data.read import read_structures
from e2ip.models.single import PotentialModel
from e2ip.train.datasets import demo_data_path


@pytest.fixture(scope="module")
def predicted():
    torch.manual_seed(3)
    model = PotentialModel(elements=[1, 6, 8], cutoff=4.0, force_scale=0.7,
                           backbone_options={"num_features": 16, "num_layers": 2,
                                             "num_radial": 8}).double()
    with torch.no_grad():  # anisotropic, non-trivial evidence
        model.head.scalar_mlp[-1].weight.normal_(0, 0.5)
    structures = read_structures(demo_data_path(test=True), index=":3")
    return model, model.predict(structures)


def test_decomposition_matches_spec(predicted):
    _, out = predicted
    nu, kappa, sigma0 = out["nu"], out["kappa"], out["sigma0"]
    assert np.all(nu > 5) and np.all(kappa > 0)
    ale = (nu / (nu - 4))[:, None, None] * sigma0
    np.testing.assert_allclose(out["aleatoric"], ale, rtol=1e-12)
    np.testing.assert_allclose(out["epistemic"], ale / kappa[:, None, None], rtol=1e-12)
    np.testing.assert_allclose(out["predictive"], ale * (1 + 1 / kappa)[:, None, None], rtol=1e-12)
    # predictive Student-t: dof nu - 2, scale (kappa+1) nu / (kappa (nu-2)) Sigma0, and its
    # covariance dof/(dof-2) * scale equals U_ale + U_epi
    np.testing.assert_allclose(out["t_dof"], nu - 2, rtol=1e-12)
    scale = ((kappa + 1) * nu / (kappa * (nu - 2)))[:, None, None] * sigma0
    np.testing.assert_allclose(out["t_scale"], scale, rtol=1e-12)
    dof = out["t_dof"][:, None, None]
    np.testing.assert_allclose(dof / (dof - 2) * out["t_scale"], out["predictive"], rtol=1e-12)
    np.testing.assert_allclose(out["u_epi"], np.trace(out["epistemic"], axis1=1, axis2=2))
    np.testing.assert_allclose(out["sigma_epi"], np.sqrt(out["u_epi"] / 3))


def test_sigma0_is_scipy_expm_of_a(predicted):
    model, _ = predicted
    structures = read_structures(demo_data_path(test=True), index=":1")
    from e2ip.data.graph import graph_from_structures

    out = model(graph_from_structures(structures, model.cutoff, torch.float64),
                create_graph=False)
    a = out["params"]["A"].detach().numpy()
    sigma0 = model.head.sigma0(out["params"]).detach().numpy()
    for k in range(len(a)):
        np.testing.assert_allclose(sigma0[k], scipy.linalg.expm(a[k]), rtol=1e-12)
        assert np.allclose(a[k], a[k].T)
        # log det Sigma0 = tr A
        assert np.linalg.slogdet(sigma0[k])[1] == pytest.approx(np.trace(a[k]), abs=1e-10)
