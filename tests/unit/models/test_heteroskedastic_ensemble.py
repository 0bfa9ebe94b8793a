"""The mean-variance head and the heteroskedastic deep ensemble against closed forms (scipy)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import stats

from e2ip import Ensemble, PotentialModel, load_model
from e2ip.data.graph import graph_from_structures
from e2ip.data.read import read_structures
from e2ip.train.datasets import demo_data_path

SMALL = {"num_features": 8, "num_layers": 1, "num_radial": 6}


def _member(seed: int) -> PotentialModel:
    torch.manual_seed(seed)
    model = PotentialModel(elements=[1, 6, 8], cutoff=4.0, head="mve", force_scale=0.5,
                           backbone_options=SMALL).double()
    with torch.no_grad():  # a variance that differs between atoms
        model.head.variance_mlp[-1].weight.normal_(0, 0.5)
    return model.eval()


def test_mve_head_is_an_isotropic_gaussian_with_its_nll_as_loss():
    model = _member(0)
    structures = read_structures(demo_data_path(test=True), index=":3")
    out = model(graph_from_structures(structures, 4.0, torch.float64), create_graph=False)
    params = {k: v.detach() for k, v in out["params"].items()}
    forces = out["forces"].detach()
    ref = torch.from_numpy(np.concatenate([s.forces for s in structures]))
    variance = 0.25 * np.exp(params["log_variance"].numpy())
    pred = model.predictive(params, forces)
    expected = [-stats.multivariate_normal.logpdf(ref[i], forces[i], variance[i] * np.eye(3))
                for i in range(len(ref))]
    np.testing.assert_allclose(pred.nll(ref).numpy(), expected, rtol=1e-10)
    # the loss is that NLL in units of sigma_F = 0.5, without its constant 3/2 log(2 pi sigma_F^2)
    loss = model.head.loss(params, forces, ref)["nll"].numpy()
    np.testing.assert_allclose(loss, np.array(expected) - 1.5 * np.log(2 * np.pi * 0.25),
                               rtol=1e-10)
    covs = model.covariances(params, forces)
    np.testing.assert_allclose(covs["aleatoric"].numpy(), variance[:, None, None] * np.eye(3))
    assert float(covs["epistemic"].abs().max()) == 0.0


def test_heteroskedastic_ensemble_adds_member_variances_to_their_spread(tmp_path):
    members = [_member(k) for k in range(3)]
    ensemble = Ensemble(members).eval()
    assert ensemble.label() == "Het. ensemble x3 (painn)"
    assert ensemble.calibration_method == "variance_scale" and not ensemble.can_batch()
    structures = read_structures(demo_data_path(test=True), index=":4")
    p = ensemble.predict(structures)
    each = [m.predict(structures) for m in members]
    mu = np.mean([e["forces"] for e in each], axis=0)
    dev = np.stack([e["forces"] for e in each]) - mu
    epistemic = np.einsum("mni,mnj->nij", dev, dev) / 3
    aleatoric = np.mean([e["aleatoric"] for e in each], axis=0) + 1e-8 * np.eye(3)
    np.testing.assert_allclose(p["forces"], mu, rtol=1e-12)
    np.testing.assert_allclose(p["epistemic"], epistemic, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(p["aleatoric"], aleatoric, rtol=1e-12)
    np.testing.assert_allclose(p["predictive"], epistemic + aleatoric, rtol=1e-10)
    # calibration: t U_epi + s U_ale by NLL; s recovered from draws of a scaled predictive
    graph = graph_from_structures(read_structures(demo_data_path(test=True), index=":200"), 4.0,
                                  torch.float64)
    out = ensemble(graph, create_graph=False)
    truth = ensemble.predictive({k: v.detach() for k, v in out["params"].items()},
                                out["forces"].detach(), "raw").scaled(2.5)
    draws = truth.sample(3, torch.Generator().manual_seed(0))
    labelled = []
    for d in draws:
        k = 0
        for s in read_structures(demo_data_path(test=True), index=":200"):
            labelled.append(dataclasses.replace(s, forces=d[k:k + s.n_atoms].numpy()))
            k += s.n_atoms
    assert ensemble.calibrate(labelled, batch_size=200) == pytest.approx(2.5, rel=0.1)
    t = ensemble.calibration()["epistemic_scale"]  # (these untrained members barely differ)
    cal = ensemble.predict(structures, form="cal")
    s = ensemble.calibration_value()
    np.testing.assert_allclose(cal["predictive"], s * p["aleatoric"] + t * p["epistemic"],
                               rtol=1e-10)
    ensemble.save(tmp_path / "het.pt")
    again = load_model(tmp_path / "het.pt")
    assert again.label() == ensemble.label() and again.calibration_value() == s
    np.testing.assert_allclose(again.predict(structures)["predictive"], cal["predictive"],
                               rtol=1e-12)


def test_heteroskedastic_ensemble_trained_by_one_command(tmp_path):
    from e2ip.train.config.yaml_io import load_config
    from e2ip.train.run import run_training
    from tests.integration.test_train import TINY

    plain = [o for o in TINY if not o.startswith("head.")]
    cfg = load_config(None, plain + ["training.max_epochs=1", "ensemble.size=2",
                                     "model.head=mve"])
    metrics = run_training(cfg, tmp_path / "het")
    model = load_model(tmp_path / "het" / "model.pt")
    assert model.label().startswith("Het. ensemble x2")
    assert metrics["calibration"]["method"] == "variance_scale"
    assert metrics["variance_scale"] == pytest.approx(model.calibration_value(), rel=1e-6)


def test_ensembles_of_full_uncertainty_heads_stay_the_papers_deep_ensemble():
    """e2IP members (the default head) are ensembled on their means, with the coverage floor,
    as before the heteroskedastic ensemble existed; only aleatoric-only members make one."""
    torch.manual_seed(0)
    members = [PotentialModel(elements=[1, 6, 8], cutoff=4.0, backbone_options=SMALL).double()
               for _ in range(2)]
    ensemble = Ensemble(members)
    assert not ensemble.heteroskedastic and ensemble.calibration_method == "nll_floor"
    assert ensemble.can_batch() and ensemble.label() == "Ensemble x2 (painn)"


def test_models_without_an_epistemic_part_refuse_the_bias_and_thresholds():
    from e2ip.dynamics.md import run_md
    from e2ip.errors import ConfigError, ModelError
    from e2ip.models.bias import UncertaintyBias

    model = _member(0)
    assert model.has_uncertainty and not model.has_epistemic
    assert Ensemble([_member(1), _member(2)]).has_epistemic
    graph = graph_from_structures(read_structures(demo_data_path(test=True), index=":1"), 4.0,
                                  torch.float64)
    with pytest.raises(ModelError, match="needs an uncertainty head with an epistemic part"):
        model(graph, bias=UncertaintyBias(0.1, 0.1))
    atoms = read_structures(demo_data_path(test=True), index=":1")[0].to_atoms()
    with pytest.raises(ConfigError, match="needs a model with epistemic uncertainty"):
        run_md(atoms, model, steps=1, max_uncertainty=0.1)
