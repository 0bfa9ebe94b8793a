"""Bad input on the command line: one clear line on stderr, exit status 2, never a traceback."""

from __future__ import annotations

import io
import json
import pickle
import zipfile

import pytest
import torch

from e2ip import PotentialModel
from e2ip.cli import main
from e2ip.models.io import MODEL_VERSION
from e2ip.train.datasets import demo_data_path

SMALL = {"num_features": 8, "num_layers": 1, "num_radial": 6}
DEMO = str(demo_data_path(test=True))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    plain = PotentialModel(elements=[1, 6, 8], cutoff=4.0, head="none", backbone_options=SMALL)
    plain.save(root / "plain.pt")
    e2ip_model = PotentialModel(elements=[1, 6, 8], cutoff=4.0, backbone_options=SMALL)
    e2ip_model.save(root / "e2ip.pt")
    good = (root / "e2ip.pt").read_bytes()
    (root / "truncated.pt").write_bytes(good[: len(good) // 2])
    payload = torch.load(root / "e2ip.pt", weights_only=True)
    payload["version"] = MODEL_VERSION + 1
    torch.save(payload, root / "future.pt")

    class Payload:  # a pickle that would run code if loaded without weights_only
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "e2ip-model", "x": Payload()}, root / "pickle.pt")
    (root / "list.yaml").write_text("training: [1, 2]\n")
    (root / "number.yaml").write_text("data: 3\n")
    from ase import Atoms
    from ase.io import write

    atoms = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    atoms.info["energy"] = -1.0
    write(root / "noforces.xyz", [atoms])
    (root / "notutf8.xyz").write_bytes(b"\xff\xfe\x00garbage\n\x80\x81")
    return root


def _run(capsys, args):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err.strip()


def _bad_inputs(root):
    m = str(root / "e2ip.pt")
    return [
        (["evaluate", m, "--data", DEMO, "--units", "furlong"], "unknown unit 'furlong'"),
        (["evaluate", m, "--data", DEMO, "--energy-unit", "kcal"], "unknown energy unit 'kcal'"),
        (["evaluate", m, "--data", DEMO, "--length-unit", "parsec"], "unknown length unit"),
        (["evaluate", m, "--data", DEMO, "--batch-size", "0"], "must be a positive integer, got 0"),
        (["train", str(root / "list.yaml"), "--out", str(root / "x")],
         "'training' must be a mapping of keys, got list [1, 2]"),
        (["train", str(root / "number.yaml"), "--out", str(root / "x")],
         "'data' must be a mapping of keys, got int 3"),
        (["train", "--out", str(root / "x"), "--set", "data.split=[0.5, 0.5, 0.5]"],
         "'data.split' fractions must be >= 0 and sum to at most 1"),
        (["calibrate", str(root / "plain.pt"), "--data", DEMO],
         "cannot calibrate a plain (painn) model: it has no uncertainty head"),
        (["evaluate", m, "--data", DEMO, "--form", "cal"], "not calibrated"),
        (["evaluate", str(root / "truncated.pt"), "--data", DEMO],
         "not a readable e2ip model file (corrupted or truncated?"),
        (["evaluate", str(root / "future.pt"), "--data", DEMO],
         f"model file format version {MODEL_VERSION + 1} is newer than this e2ip reads"),
        (["evaluate", str(root / "pickle.pt"), "--data", DEMO],
         "refused: the file holds pickled Python objects"),
        (["evaluate", str(root / "nothing.pt"), "--data", DEMO], "model file not found"),
        (["evaluate", str(root), "--data", DEMO], "is a directory without a model.pt"),
        (["evaluate", m, "--data", str(root / "noforces.xyz")],
         "set data.forces_key in the config or --forces-key on the command line"),
        (["evaluate", m, "--data", str(root / "notutf8.xyz")], "notutf8.xyz"),
        (["evaluate", m, "--data", str(root)], "is a directory, expected a data file"),
        (["train", "--out", str(root / "x"), "--init-from", str(root / "nothing.pt")],
         "'training.init_from': file not found"),
    ]


def test_every_bad_input_is_one_line_and_exit_2(files, capsys):
    for args, message in _bad_inputs(files):
        code, err = _run(capsys, args)
        assert code == 2, (args, err)
        assert message in err, (args, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (args, err)
    assert not (files / "x").exists()  # refused trainings wrote nothing


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_named(files, capsys):
    code, err = _run(capsys, ["evaluate", str(files / "e2ip.pt"), "--data", DEMO,
                              "--device", "cuda"])
    assert code == 2 and "CUDA is not available on this machine" in err
    assert len(err.splitlines()) == 1


def test_plain_model_evaluates_into_a_new_folder(files, capsys, tmp_path):
    out = tmp_path / "new" / "eval"
    code, err = _run(capsys, ["evaluate", str(files / "plain.pt"), "--data", DEMO, "--index",
                              ":4", "--out", str(out)])
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["form"] is None and metrics["n_structures"] == 4 and metrics["plots"] == []


def test_pickle_payload_never_runs(files, capsys):
    code, err = _run(capsys, ["evaluate", str(files / "pickle.pt"), "--data", DEMO])
    assert code == 2 and "pwned" not in capsys.readouterr().out


def test_evaluate_states_its_form(files, capsys, tmp_path):
    from e2ip import load_model

    model = load_model(files / "e2ip.pt")
    model.variance_scale.fill_(0.5)
    model.save(tmp_path / "cal.pt")
    for form, expect in ((None, "cal"), ("raw", "raw")):
        out = tmp_path / f"ev_{form}"
        args = ["evaluate", str(tmp_path / "cal.pt"), "--data", DEMO, "--index", ":4",
                "--out", str(out)] + (["--form", form] if form else [])
        code, err = _run(capsys, args)
        assert code == 0, err
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["form"] == expect
        assert ("raw" in metrics) == (expect == "cal")
        assert ("variance_scale" in metrics) == (expect == "cal")


def test_model_file_is_a_zip_of_plain_data(files):
    """The saved file loads with weights_only (no code) and holds only plain types."""
    with zipfile.ZipFile(files / "e2ip.pt") as z:
        names = z.namelist()
    assert any(n.endswith("data.pkl") for n in names)
    payload = torch.load(files / "e2ip.pt", weights_only=True)
    assert payload["format"] == "e2ip-model" and payload["version"] == MODEL_VERSION
    buf = io.BytesIO()
    pickle.dump(payload["spec"], buf)  # the spec is plain Python data


def test_model_with_nan_weights_is_named_not_a_traceback(files, capsys, tmp_path):
    from e2ip import load_model

    model = load_model(files / "e2ip.pt")
    with torch.no_grad():
        next(model.head.parameters()).fill_(float("nan"))
    model.save(tmp_path / "nan.pt")
    code, err = _run(capsys, ["evaluate", str(tmp_path / "nan.pt"), "--data", DEMO, "--index",
                              ":4", "--out", str(tmp_path / "ev")])
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "predicts non-finite raw covariances for a batch holding" in err
    assert "rmd17_ethanol_demo_test.npz, frame 0" in err
    assert not (tmp_path / "ev").exists()
