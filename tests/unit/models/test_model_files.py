"""The model file (:mod:`e2ip.models.io`): files written by earlier releases load through the
numbered upgrades and predict what the code that wrote them predicted; the current format is
pinned by a fingerprint, so a change without a version bump fails here.

The files under tests/data/model_files/ were written by `make_files.py` beside them: `v1-823660d`
by the release before the calibration buffers, `v2-e87c727` by the one before the evidence
option (both labelled "version 1" inside, as every release before 0.2 wrote), `v3` by this one.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from e2ip import load_model
from e2ip.data.read import read_structures
from e2ip.errors import ModelError
from e2ip.models.io import MODEL_VERSION, UPGRADES, read_model_payload, upgrade_payload
from tests.support import REPO

FILES = REPO / "tests/data/model_files"
TAGS = ["v1-823660d", "v2-e87c727", "v3", "v4", f"v{MODEL_VERSION}"]
DEMO = REPO / "src/e2ip/data/demo/rmd17_ethanol_demo_test.npz"


def _maker():
    spec = importlib.util.spec_from_file_location("make_files", FILES / "make_files.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("name", ["e2ip_painn", "ensemble_x2"])
def test_files_of_every_release_load_and_predict_as_when_written(name, tag):
    model = load_model(FILES / f"{name}_{tag}.pt")
    expected = np.load(FILES / f"{name}_{tag}_predictions.npz")
    got = model.predict(read_structures(DEMO, index=":2"))
    for key in expected.files:
        # float32 files: equal to float32 precision (the code that computes them has been reordered)
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-7, err_msg=key)
    if name == "e2ip_painn":
        # files from before the evidence option (versions 1, 2) had the paper's learned
        # evidence; since version 3 the feature-distance default is written
        before_option = tag.startswith(("v1", "v2"))
        assert model.head.hparams.evidence == ("learned" if before_option else "feature_distance")
        assert model.head.r_bins == 0
        assert not model.calibrated


def test_old_files_are_upgraded_one_version_at_a_time():
    assert sorted(UPGRADES) == list(range(1, MODEL_VERSION)), "an upgrade for every older version"
    payload = read_model_payload(FILES / "e2ip_painn_v1-823660d.pt")
    assert payload["version"] == MODEL_VERSION
    assert payload["spec"]["head_options"]["evidence"] == "learned"
    for key in ("variance_scale", "epistemic_scale"):
        assert float(payload["state_dict"][key]) == 1.0
    raw = torch.load(FILES / "e2ip_painn_v1-823660d.pt", weights_only=True)
    assert raw["version"] == 1 and "variance_scale" not in raw["state_dict"]


def test_upgrades_reach_every_member_of_an_ensemble_and_keep_what_is_there():
    member = {"head": "e2ip", "head_options": {"hidden": 8}}
    calibrated = {"head": "e2ip", "head_options": {"evidence": "feature_distance"}}
    payload = {"version": 1, "kind": "ensemble",
               "spec": {"members": [member, calibrated, {"head": "none", "head_options": {}}]},
               "state_dict": {"members.1.variance_scale": torch.tensor(2.5, dtype=torch.float64)}}
    upgrade_payload(payload)
    members = payload["spec"]["members"]
    legacy_distance = {"feature_centred": False, "feature_per_element": False,  # version 4
                       "calibration_r_bins": 0}  # version 5
    assert members[0]["head_options"] == {"evidence": "learned", "hidden": 8, **legacy_distance}
    assert members[1]["head_options"] == {"evidence": "feature_distance", **legacy_distance}
    assert "evidence" not in members[2]["head_options"]  # only the e2IP head has the option
    state = payload["state_dict"]
    assert float(state["members.1.variance_scale"]) == 2.5  # kept
    assert {f"members.{k}.{b}" for k in range(3) for b in ("variance_scale", "epistemic_scale")} \
        <= set(state)
    assert payload["version"] == MODEL_VERSION
    assert payload["spec"]["calibration_form"] == "paper_floor"  # version 4: a plain ensemble


def test_version_4_upgrade_keeps_what_older_files_predicted():
    """A version-3 feature distance (one uncentred (F, F) whitening) becomes group 0 of the new
    buffers with no centre and no intercept; a heteroskedastic ensemble's one scale becomes
    t = s; a plain one keeps the paper's floor."""
    w = torch.randn(4, 4, dtype=torch.float64)
    single = {"version": 3, "kind": "model", "spec": {"head": "e2ip", "head_options": {}},
              "state_dict": {"head.feature_distance.whitening": w}}
    upgrade_payload(single)
    state = single["state_dict"]
    assert torch.equal(state["head.feature_distance.whitening"], w[None])
    assert not state["head.feature_distance.center"].any()
    assert not state["head.feature_distance.offset"].any()
    assert single["spec"]["head_options"]["feature_centred"] is False
    assert torch.isnan(state["uncertainty_threshold"])
    het = {"version": 3, "kind": "ensemble", "spec": {"members": [{"head": "mve"}] * 2},
           "state_dict": {"calibration_variance": torch.tensor(2.5, dtype=torch.float64)}}
    upgrade_payload(het)
    assert het["spec"]["calibration_form"] == "nll"
    assert float(het["state_dict"]["epistemic_scale"]) == 2.5


def test_the_format_does_not_change_without_a_version_bump():
    maker = _maker()
    pinned = FILES / f"format_v{MODEL_VERSION}.json"
    assert pinned.exists(), (f"no fingerprint for format version {MODEL_VERSION}: run "
                             "python tests/data/model_files/make_files.py")
    expected = json.loads(pinned.read_text())
    for name, model in maker.build():
        assert maker.fingerprint(model) == expected[name], (
            f"the model file format of {name!r} changed: bump MODEL_VERSION in "
            "e2ip/models/io.py, add the upgrade from the previous version to UPGRADES, and run "
            "python tests/data/model_files/make_files.py to commit files of the new version")


def test_a_newer_format_is_refused_with_one_line(tmp_path):
    payload = torch.load(FILES / f"e2ip_painn_v{MODEL_VERSION}.pt", weights_only=True)
    payload["version"] = MODEL_VERSION + 1
    torch.save(payload, tmp_path / "new.pt")
    with pytest.raises(ModelError, match="newer than this e2ip reads") as info:
        load_model(tmp_path / "new.pt")
    assert "\n" not in str(info.value)


def test_a_run_folder_loads_its_model_file(tmp_path):
    (tmp_path / "run").mkdir()
    model = load_model(FILES / f"e2ip_painn_v{MODEL_VERSION}.pt")
    model.save(tmp_path / "run")  # a folder gets its model.pt
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["model.pt"]
    assert load_model(tmp_path / "run").spec() == model.spec()
    with pytest.raises(ModelError, match="is a directory without a model.pt"):
        load_model(tmp_path)
