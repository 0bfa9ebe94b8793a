"""`e2ip compare`: several models (an ensemble among them) on the same data, paper-table layout."""

from __future__ import annotations

import csv

import torch

from e2ip.cli import main
from e2ip.data.structures import Structure
from e2ip.models.ensemble import Ensemble
from e2ip.models.single import PotentialModel
from e2ip.train.datasets import demo_data_path

SMALL = {"num_features": 8, "num_layers": 1, "num_radial": 6}


def _model(head: str, seed: int) -> PotentialModel:
    torch.manual_seed(seed)
    return PotentialModel(elements=[1, 6, 8], cutoff=4.0, backbone_options=SMALL, head=head,
                          force_scale=1.0, energy_scale=1.0)


def _unlabelled_reference(path) -> str:
    """Eight demo frames without energies or forces, as an extxyz file."""
    from ase import Atoms
    from ase.io import write

    from e2ip.data.read import read_structures

    frames = read_structures(demo_data_path(test=True), index="6:14")
    write(path, [Atoms(s.numbers, s.positions) for s in frames])
    return str(path)


def test_evaluate_reports_per_structure_metrics_and_plots(tmp_path):
    import json

    path = tmp_path / "m.pt"
    _model("e2ip", 0).save(path)
    out = tmp_path / "eval"
    assert main(["evaluate", str(path), "--data", str(demo_data_path(test=True)), "--index",
                 ":10", "--reference", _unlabelled_reference(tmp_path / "ref.xyz"),
                 "--aggregate", "sum", "--out", str(out)]) == 0
    data = json.loads((out / "metrics.json").read_text())
    assert data["aggregate"] == "sum" and data["reference"].endswith("ref.xyz")
    for key in ("spearman_per_structure", "ause_per_structure", "auc_worst10", "auc_reference"):
        assert isinstance(data[key], float), key
    for name in ("sparsification.png", "error_vs_uncertainty_per_structure.png"):
        assert name in data["plots"] and (out / name).stat().st_size > 1000


def test_compare_writes_tables_and_plot(tmp_path):
    paths = []
    for head in ("e2ip", "eip", "cholesky"):
        path = tmp_path / head / "model.pt"
        model = _model(head, 0)
        if head == "e2ip":
            model.variance_scale.fill_(1.5)  # a calibrated model is listed raw and recalibrated
        model.save(path)
        paths.append(str(path.parent))  # a run directory works as well as a file
    ens = Ensemble([_model("none", k) for k in range(3)])
    ens.set_calibration_variance(0.04)
    ens.save(tmp_path / "ens.pt")
    paths.append(str(tmp_path / "ens.pt"))
    out = tmp_path / "cmp"
    reference = _unlabelled_reference(tmp_path / "reference.xyz")
    assert main(["compare", *paths, "--data", str(demo_data_path(test=True)), "--index", ":6",
                 "--rotate", "--timing", "--out", str(out), "--reference", reference,
                 "--aggregate", "max"]) == 0
    with open(out / "comparison.csv") as fh:
        rows = list(csv.DictReader(fh))
    methods = [r["method"] for r in rows]
    assert methods == ["e2IP-FD (painn) raw", "e2IP-FD (painn) cal", "eIP (painn)",
                       "e2IP w/o equiv. (painn)", "Ensemble x3 (painn) raw",
                       "Ensemble x3 (painn) cal"]
    assert [r["form"] for r in rows] == ["raw", "cal", "raw", "raw", "raw", "cal"]
    for r in rows:
        for key in ("force_mae", "energy_score", "coverage_95", "calibration_error", "nll",
                    "spearman", "delta_rho", "time_per_atom_ms", "spearman_per_structure",
                    "ause_per_structure", "auc_worst10", "auc_reference"):
            assert r[key] not in ("", "nan"), (r["method"], key)
        assert 0 <= float(r["auc_reference"]) <= 1 and float(r["ause_per_structure"]) >= 0
    # the calibrated ensemble is wider than the raw one, so it covers more
    raw, cal = rows[4], rows[5]
    assert float(cal["coverage_95"]) >= float(raw["coverage_95"])
    table = (out / "comparison.md").read_text()
    assert table.startswith("| Method | Form | Force MAE (eV/Å) | ES | Cov@95 | CE | NLL |")
    assert (out / "calibration.png").stat().st_size > 1000


def test_delta_rho_is_zero_for_equivariant_head_in_float64(tmp_path):
    """Rotating every structure leaves e2IP's per-atom uncertainty ranking unchanged."""
    from e2ip.data.read import read_structures
    from e2ip.evaluation.evaluate import evaluate

    model = _model("e2ip", 1).double()
    structures = read_structures(demo_data_path(test=True), index=":5")
    metrics, _ = evaluate(model, structures, rotate=True)
    assert abs(metrics["delta_rho"]) < 1e-9
    assert metrics["equivariance_error_forces"] < 1e-9
    assert metrics["equivariance_error_covariance"] < 1e-9
    chol = _model("cholesky", 1).double()
    metrics, _ = evaluate(chol, structures, rotate=True)
    assert metrics["equivariance_error_covariance"] > 1e-6
    assert isinstance(structures[0], Structure)
