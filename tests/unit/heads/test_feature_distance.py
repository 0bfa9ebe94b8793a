"""The feature-distance evidence of e2IP (heads/feature_distance.py, `evidence: feature_distance`)
against numpy closed forms: the leverage, kappa / r, the two-scale calibration, rotations."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from e2ip import ModelError, PotentialModel, load_model
from e2ip.cli import main
from e2ip.data.graph import graph_from_structures
from e2ip.data.read import read_structures
from e2ip.evaluation.evaluate import collect
from e2ip.heads.feature_distance import FeatureDistance
from e2ip.train.datasets import demo_data_path


def _leverage_reference(train: np.ndarray, query: np.ndarray, ridge: float,
                        centred: bool = True) -> np.ndarray:
    """Centred: d(h) = 1 + (h - mu)^T C^-1 (h - mu), C = S + ridge tr(S) / F I with mu, S the
    training mean and (1/N) covariance; uncentred (0.2): d(h) = h^T C^-1 h with S = H^T H / N.
    Returns d(query) / mean d(train)."""
    mu = train.mean(0) if centred else np.zeros(train.shape[1])
    spread = (train - mu).T @ (train - mu) / len(train)
    c_inv = np.linalg.inv(spread + ridge * np.trace(spread) / len(spread) * np.eye(len(spread)))

    def d(h):
        return (1.0 if centred else 0.0) + (h - mu) @ c_inv @ (h - mu)

    return np.array([d(h) for h in query]) / np.mean([d(h) for h in train])


@pytest.mark.parametrize("centred", [True, False])
def test_distance_is_the_normalised_leverage(centred):
    gen = np.random.default_rng(0)
    train = gen.normal(size=(300, 6)) @ gen.normal(size=(6, 6)) + 0.3
    query = np.concatenate([gen.normal(size=(20, 6)), 4.0 * train[:5]])
    fd = FeatureDistance(6, ridge=1e-2, centred=centred)
    np.testing.assert_array_equal(fd(torch.tensor(query)).numpy(), 1.0)  # not fitted: ones
    assert fd.fit((torch.tensor(train[k:k + 64]), None) for k in range(0, 300, 64)) == 300
    r = fd(torch.tensor(query)).numpy()
    np.testing.assert_allclose(r, _leverage_reference(train, query, 1e-2, centred), rtol=1e-9)
    assert fd(torch.tensor(train)).numpy().mean() == pytest.approx(1.0, rel=1e-10)
    if not centred:  # quadratic in the features: 4x a training atom's features, 16x its distance
        np.testing.assert_allclose(r[20:], 16 * fd(torch.tensor(train[:5])).numpy(), rtol=1e-10)


def test_centred_distance_ignores_a_common_offset():
    """The issue's toy case: a 5-sigma step along a low-variance direction. With a large common
    offset of every feature the uncentred ridge (relative to |mu|^2) swamps that direction; the
    centred distance does not see the offset at all."""
    gen = np.random.default_rng(1)
    scales = np.array([1.0, 1.0, 1.0, 0.1, 0.1, 0.1])
    train = gen.normal(size=(2000, 6)) * scales
    step = np.zeros(6)
    step[3] = 5 * scales[3]
    r = {}
    for offset in (0.0, 30.0):
        for centred in (True, False):
            fd = FeatureDistance(6, ridge=1e-3, centred=centred)
            fd.fit([(torch.tensor(train + offset), None)])
            r[offset, centred] = float(fd(torch.tensor(step + offset)[None]))
    assert r[0.0, True] == pytest.approx(r[30.0, True], rel=1e-6)  # offset-free
    assert r[30.0, True] > 3.0  # (1 + 24) / (1 + 5.9): ~3.6
    assert r[30.0, False] < 1.2 < r[0.0, False]  # the 0.2 design: the offset hides the step


def test_per_element_distance_is_normalised_per_element():
    gen = np.random.default_rng(2)
    groups = np.where(np.arange(1000) < 10, 1, 0)  # a 1 % element with features of its own
    train = gen.normal(size=(1000, 4))
    train[groups == 1] = 5.0 + 0.1 * gen.normal(size=(10, 4))
    query = np.concatenate([train[:3], train[995:], gen.normal(size=(3, 4)) * 2])
    query_groups = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    fd = FeatureDistance(4, ridge=1e-3, num_groups=2)
    fd.fit([(torch.tensor(train[:500]), torch.tensor(groups[:500])),
            (torch.tensor(train[500:]), torch.tensor(groups[500:]))])
    r = fd(torch.tensor(query), torch.tensor(query_groups)).numpy()
    for g in (0, 1):
        mine = groups == g
        expected = _leverage_reference(train[mine], query[query_groups == g], 1e-3)
        np.testing.assert_allclose(r[query_groups == g], expected, rtol=1e-9)
        r_train = fd(torch.tensor(train[mine]), torch.tensor(groups[mine])).numpy()
        assert r_train.mean() == pytest.approx(1.0, rel=1e-10)
    pooled = FeatureDistance(4, ridge=1e-3)
    pooled.fit([(torch.tensor(train), None)])
    # pooled, the rare element's own atoms look far from the training data
    assert pooled(torch.tensor(train[groups == 1])).numpy().mean() > 3.0


def test_an_element_with_fewer_atoms_than_features_gets_the_pooled_fit():
    """3 atoms of element 1 in 4 dimensions (a singular covariance): pooled statistics for it,
    its own for element 0 (reference: the leverage of the closed form on each atom set)."""
    gen = np.random.default_rng(3)
    train = gen.normal(size=(200, 4))
    groups = np.where(np.arange(200) < 3, 1, 0)
    query = gen.normal(size=(4, 4)) * 1.5
    fd = FeatureDistance(4, ridge=1e-3, num_groups=2)
    fd.fit([(torch.tensor(train), torch.tensor(groups))])
    for g, atoms in ((0, train[groups == 0]), (1, train)):
        r = fd(torch.tensor(query), torch.full((4,), g)).numpy()
        np.testing.assert_allclose(r, _leverage_reference(atoms, query, 1e-3), rtol=1e-9)


def _model(per_element: bool = True):
    """The paper's e2IP (learned evidence), small, float64, with non-trivial evidence."""
    torch.manual_seed(0)
    model = PotentialModel(elements=[1, 6, 8], cutoff=4.0, force_scale=0.5,
                           head_options={"evidence": "learned",
                                         "feature_per_element": per_element},
                           backbone_options={"num_features": 8, "num_layers": 1,
                                             "num_radial": 6}).double()
    with torch.no_grad():  # non-trivial evidence per atom
        model.head.scalar_mlp[-1].weight.normal_(0, 0.3)
    return model.eval()


def _scalars(model, structures) -> np.ndarray:
    graph = graph_from_structures(structures, model.cutoff, torch.float64)
    features = model.backbone(model.species(graph.numbers), graph.edge_index,
                              graph.edge_vectors(graph.positions), graph.batch, graph.num_graphs)
    return features.scalars.detach().numpy()


def _numbers(structures) -> np.ndarray:
    return np.concatenate([s.numbers for s in structures])


@pytest.mark.parametrize("per_element", [True, False])
def test_feature_distance_model_divides_the_learned_evidence(tmp_path, per_element):
    base = _model(per_element)
    train = read_structures(demo_data_path(), index=":40")
    test = read_structures(demo_data_path(test=True), index=":4")
    model = base.with_feature_distance(train)
    assert model.label() == "e2IP-FD (painn)" and not model.calibrated
    h_train, h_test = _scalars(base, train), _scalars(base, test)
    if per_element:  # every element (H, C, O: 240, 80, 40 training atoms) on its own atoms
        z_train, z_test = _numbers(train), _numbers(test)
        r = np.empty(len(h_test))
        for z in (1, 6, 8):
            r[z_test == z] = _leverage_reference(h_train[z_train == z], h_test[z_test == z], 1e-3)
    else:
        r = _leverage_reference(h_train, h_test, 1e-3)
    p, p0 = model.predict(test), base.predict(test)
    np.testing.assert_allclose(p["feature_distance"], r, rtol=1e-8)
    np.testing.assert_allclose(p["kappa"], p0["kappa"] / r, rtol=1e-8)
    np.testing.assert_allclose(p["forces"], p0["forces"], rtol=1e-12)
    np.testing.assert_allclose(p["aleatoric"], p0["aleatoric"], rtol=1e-12)
    np.testing.assert_allclose(p["epistemic"], p0["aleatoric"] * (r / p0["kappa"])[:, None, None],
                               rtol=1e-8)
    # a rotated structure: the same distances, covariances R U R^T
    rot = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(2),
                                      dtype=torch.float64))[0].numpy()
    turned = read_structures(demo_data_path(test=True), index=":1")
    turned[0].positions = turned[0].positions @ rot.T
    pr = model.predict(turned)
    np.testing.assert_allclose(pr["feature_distance"], p["feature_distance"][:9], rtol=1e-8)
    np.testing.assert_allclose(pr["epistemic"], rot @ p["epistemic"][:9] @ rot.T, atol=1e-12)
    # saved and loaded: the fitted distance travels with the model
    model.save(tmp_path / "fd.pt")
    again = load_model(tmp_path / "fd.pt").predict(test)
    np.testing.assert_allclose(again["epistemic"], p["epistemic"], rtol=1e-12)


def test_ensembles_and_other_heads_refuse_the_feature_distance():
    model = PotentialModel(elements=[1, 6, 8], cutoff=4.0, head="eip",
                           backbone_options={"num_features": 8, "num_layers": 1, "num_radial": 6})
    with pytest.raises(ModelError, match="needs an e2IP head"):
        model.with_feature_distance(read_structures(demo_data_path(), index=":2"))


@pytest.mark.parametrize("variance, epistemic", [(0.5, 4.0), (2.0, 0.5)])
def test_calibration_recovers_known_variance_and_epistemic_scales(variance, epistemic):
    model = _model().with_feature_distance(read_structures(demo_data_path(), index=":40"))
    structures = read_structures(demo_data_path(test=True), index=":200")
    graph = graph_from_structures(structures, model.cutoff, torch.float64)
    out = model(graph, create_graph=False)
    params = {k: v.detach() for k, v in out["params"].items()}
    r = params["feature_distance"]
    assert float(r.max() / r.min()) > 5  # the two scales are told apart by how r varies
    truth = model.head.predictive(model.head.scale_epistemic(params, epistemic),
                                  out["forces"].detach()).scaled(variance)
    labelled = []
    for draws in truth.sample(6, torch.Generator().manual_seed(1)):  # 6 copies, 10,800 atoms
        k = 0
        for s in structures:  # these draws become the reference forces
            labelled.append(dataclasses.replace(s, forces=draws[k:k + s.n_atoms].numpy()))
            k += s.n_atoms
    assert model.calibrate(labelled, batch_size=200) == pytest.approx(variance, rel=0.15)
    assert float(model.epistemic_scale) == pytest.approx(epistemic, rel=0.2)
    assert model.calibration()["epistemic_scale"] == float(model.epistemic_scale)
    # form 'cal': aleatoric x s, epistemic x s t, from the raw covariances of the same pass
    c = collect(model, structures[:5], 8, ["raw", "cal"]).forms
    s, t = float(model.variance_scale), float(model.epistemic_scale)
    raw, cal = c["raw"], c["cal"]
    torch.testing.assert_close(cal.u_ale, s * raw.u_ale)
    torch.testing.assert_close(cal.u_epi, s * t * raw.u_epi)


def test_cli_calibrate_switches_a_trained_model_to_the_feature_distance(tmp_path, capsys):
    _model().save(tmp_path / "m.pt")
    data = str(demo_data_path(test=True))
    assert main(["calibrate", str(tmp_path / "m.pt"), "--data", data, "--index", ":30",
                 "--feature-distance", str(demo_data_path()), "--out",
                 str(tmp_path / "fd.pt")]) == 0
    printed = capsys.readouterr().out
    assert "feature distance fitted on" in printed and "epistemic_scale" in printed
    model = load_model(tmp_path / "fd.pt")
    assert model.label() == "e2IP-FD (painn)" and bool(model.head.feature_distance.fitted)
    assert model.calibration()["epistemic_scale"] > 0
    assert model.head.r_bins == 0
    # with bins of r: fitted, stored, printed; and a model that has bins can be rebinned
    for source, bins in (("m.pt", 3), ("binned.pt", 4)):
        assert main(["calibrate", str(tmp_path / source), "--data", data, "--index", ":30",
                     "--feature-distance", str(demo_data_path()), "--r-bins", str(bins),
                     "--out", str(tmp_path / "binned.pt")]) == 0
        assert "factors per bin of r" in capsys.readouterr().out
        binned = load_model(tmp_path / "binned.pt")
        factors = binned.calibration()["r_bin_factors"]
        assert len(factors) == bins and len(set(factors)) == bins  # fitted, not the ones
    from e2ip import Ensemble

    Ensemble([_model(), _model()]).save(tmp_path / "ensemble.pt")
    for path, bad, message in (("m.pt", ["--r-bins", "3"], "needs --feature-distance"),
                               ("m.pt", ["--feature-distance", str(demo_data_path()), "--r-bins",
                                         "1"], "calibration_r_bins must be"),
                               ("ensemble.pt", ["--feature-distance", str(demo_data_path())],
                                "needs an e2IP head"),
                               ("ensemble.pt", ["--feature-distance", str(demo_data_path()),
                                                "--r-bins", "3"], "needs an e2IP head")):
        assert main(["calibrate", str(tmp_path / path), "--data", data, *bad]) != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_training_with_the_default_feature_distance_fits_it_and_reports_both_scales(tmp_path):
    from e2ip.train.config.yaml_io import load_config
    from e2ip.train.run import run_training
    from tests.integration.test_train import TINY

    cfg = load_config(None, TINY + ["training.max_epochs=1"])  # the default evidence
    metrics = run_training(cfg, tmp_path / "run")
    model = load_model(tmp_path / "run" / "model.pt")
    assert model.label() == "e2IP-FD (painn)" and bool(model.head.feature_distance.fitted)
    assert metrics["calibration"]["epistemic_scale"] == float(model.epistemic_scale) != 1.0
    # the distance is ~1 on the training data it was fitted on (24 structures here)
    from e2ip.train.datasets import prepare_data

    train = prepare_data(cfg.data).train
    assert model.predict(train)["feature_distance"].mean() == pytest.approx(1.0, rel=1e-4)


def test_an_unfitted_feature_distance_is_refused_at_calibration_and_ensembles_fit_members():
    from e2ip import Ensemble

    spec = {**_model().spec(), "head_options": {"evidence": "feature_distance"}}
    unfitted = PotentialModel.from_spec(spec).double()
    validation = read_structures(demo_data_path(test=True), index=":4")
    with pytest.raises(ModelError, match="never fitted"):
        unfitted.calibrate(validation)
    ensemble = Ensemble([PotentialModel.from_spec(spec).double() for _ in range(2)])
    assert ensemble.fit_training_statistics(read_structures(demo_data_path(), index=":10")) == 90
    assert all(bool(m.head.feature_distance.fitted) for m in ensemble.members)


def test_new_models_get_the_feature_distance_evidence():
    # files from before the option load as the paper's e2IP: tests/unit/models/test_model_files.py
    assert PotentialModel(elements=[1], cutoff=4.0).head.hparams.evidence == "feature_distance"


def _binned_model(bins: int = 4):
    base = _model()
    spec = base.spec()
    spec["head_options"] = {**spec["head_options"], "evidence": "feature_distance",
                            "calibration_r_bins": bins}
    model = type(base).from_spec(spec).double()
    missing, _ = model.load_state_dict(base.state_dict(), strict=False)  # the same weights
    assert all(k.startswith(("head.feature_distance.", "head.r_bin_")) for k in missing)
    model.fit_training_statistics(read_structures(demo_data_path(), index=":40"))
    return model.eval()


def test_r_bin_factors_are_each_bins_nll_minimum_and_scale_the_calibrated_form(tmp_path):
    from scipy.optimize import minimize_scalar

    from e2ip.integrations.scripted import ScriptedPotential

    model = _binned_model(4)
    structures = read_structures(demo_data_path(test=True), index=":120")
    graph = graph_from_structures(structures, model.cutoff, torch.float64)
    out = model(graph, create_graph=False)
    params = {k: v.detach() for k, v in out["params"].items()}
    r = params["feature_distance"].numpy()
    truth = model.head.predictive(model.head.scale_epistemic(params, 2.0), out["forces"].detach())
    inflate = np.where(r > np.quantile(r, 0.75), 4.0, 1.0)  # the farthest quarter: 4x wider
    draws = truth.scaled(torch.from_numpy(inflate)).sample(5, torch.Generator().manual_seed(3))
    labelled = []
    for copy in draws:
        k = 0
        for s in structures:
            labelled.append(dataclasses.replace(s, forces=copy[k:k + s.n_atoms].numpy()))
            k += s.n_atoms
    model.calibrate(labelled, batch_size=200)
    s, t = float(model.variance_scale), float(model.epistemic_scale)
    edges, factors = model.head.r_bin_edges.numpy(), model.head.r_bin_factors.numpy()
    r_all = np.tile(r, 5)
    np.testing.assert_allclose(edges, np.quantile(r_all, [0.25, 0.5, 0.75]), rtol=1e-12)
    # reference: per bin, the Student-t NLL minimum over c of the two-scale predictive x c
    two = model.head.predictive(model.head.scale_epistemic(params, t), out["forces"]).scaled(s)
    y = torch.cat([torch.from_numpy(np.asarray(c)) for c in draws])
    m = torch.cat([two.mahalanobis(y[k * len(r):(k + 1) * len(r)]) for k in range(5)]).numpy()
    nu = np.tile(two.dof.detach().numpy(), 5)
    which = np.searchsorted(edges, r_all)
    for b in range(4):
        mb, nb = m[which == b], nu[which == b]
        res = minimize_scalar(lambda x, mb=mb, nb=nb: np.mean(
            1.5 * x + (nb + 3) / 2 * np.log1p(mb / (np.exp(x) * nb))), bounds=(-7, 7),
            method="bounded", options={"xatol": 1e-8})
        assert factors[b] == pytest.approx(np.exp(res.x), rel=2e-3)
    assert factors[3] > 2 * factors[:3].mean()  # the inflated quarter is seen
    assert model.calibration()["r_bin_factors"] == pytest.approx(factors.tolist())
    # form 'cal': the two-scale covariances times the factor of each atom's bin; 'raw' unchanged
    cal = model.covariances(out["params"], out["forces"], "cal")
    two_cal = two.covariance().detach().numpy()
    per_atom = factors[np.searchsorted(edges, r)]
    np.testing.assert_allclose(cal["predictive"].detach().numpy(),
                               two_cal * per_atom[:, None, None], rtol=1e-10)
    raw = model.covariances(out["params"], out["forces"], "raw")["predictive"].detach()
    torch.testing.assert_close(raw, model.head.covariances(params, out["forces"])["predictive"])
    pred = model.predictive(out["params"], out["forces"], "cal")
    torch.testing.assert_close(pred.covariance(), cal["predictive"])
    # saved and loaded, and in the TorchScript form engines run: the same binned covariances
    model.save(tmp_path / "binned.pt")
    again = load_model(tmp_path / "binned.pt")
    torch.testing.assert_close(again.covariances(again(graph, create_graph=False)["params"],
                                                 None, "cal")["predictive"], cal["predictive"])
    scripted = torch.jit.script(ScriptedPotential(model, "cal"))
    species_graph = graph
    _, covs = scripted(species_graph.numbers, species_graph.edge_index,
                       species_graph.edge_vectors(species_graph.positions), species_graph.batch,
                       species_graph.num_graphs)
    torch.testing.assert_close(covs["predictive"], cal["predictive"].detach())


@pytest.mark.parametrize("options", [{"calibration_r_bins": 1},
                                     {"calibration_r_bins": 3, "evidence": "learned"}])
def test_r_bins_need_two_bins_and_the_feature_distance(options):
    with pytest.raises(ValueError, match="calibration_r_bins"):
        PotentialModel(elements=[1, 6, 8], cutoff=4.0, head_options=options,
                       backbone_options={"num_features": 8, "num_layers": 1, "num_radial": 6})
