"""Uncertainty-aware MD: outputs, the threshold stop on a stretched bond, save-and-continue, the
uncertainty bias, and the `e2ip md` command."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from ase.io import read, write

from e2ip.cli import main
from e2ip.data.read import read_structures
from e2ip.dynamics.md import run_md
from e2ip.integrations.ase_calculator import E2IPCalculator
from e2ip.models.bias import UncertaintyBias
from e2ip.train.config.yaml_io import load_config
from e2ip.train.run import run_training
from tests.support import REPO

DEMO_TEST = "src/e2ip/data/demo/rmd17_ethanol_demo_test.npz"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """PaiNN + e2IP trained on 64 demo ethanol frames (about 10 s on one thread)."""
    out = tmp_path_factory.mktemp("md") / "run"
    cfg = load_config(None, [
        "data.n_train=64", "data.n_validation=16", "data.batch_size=8", "model.cutoff=4.0",
        "model.painn.num_features=32", "model.painn.num_layers=2", "head.hidden=16",
        "training.progress_bar=false", "training.num_threads=1", "training.max_epochs=40"])
    run_training(cfg, out)
    return out / "model.pt"


def ethanol(k: int = 0):

    path = REPO / DEMO_TEST
    return read_structures(path, index=f"{k}:{k + 1}")[0].to_atoms()


def stretched(atoms, scale: float = 1.5):
    """The first C-H bond stretched by `scale` (an out-of-distribution structure)."""
    atoms = atoms.copy()
    d = atoms.get_all_distances()
    h = next(i for i in range(len(atoms)) if atoms.numbers[i] == 1
             and min(d[i, j] for j in range(len(atoms)) if atoms.numbers[j] == 6) < 1.2)
    c = min((j for j in range(len(atoms)) if atoms.numbers[j] == 6), key=lambda j: d[h, j])
    atoms.positions[h] = atoms.positions[c] + scale * (atoms.positions[h] - atoms.positions[c])
    return atoms


def top_uncertainty(model_path, atoms) -> float:
    atoms = atoms.copy()
    atoms.calc = E2IPCalculator(model_path)
    return float(atoms.calc.get_property("forces_uncertainty", atoms).max())


def test_md_writes_log_trajectory_and_summary(trained, tmp_path):
    result = run_md(ethanol(), trained, steps=20, temperature_K=300, out=tmp_path / "md",
                    traj_interval=5, progress=False)
    assert result.stop_reason == "completed" and result.steps == 20
    with open(tmp_path / "md/md.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == list(range(21))
    # energy bookkeeping: etot = epot + ekin; temperature from ekin (3N/2 k T)
    for r in rows:
        assert float(r["etot_eV"]) == pytest.approx(float(r["epot_eV"]) + float(r["ekin_eV"]))
        assert float(r["temperature_K"]) == pytest.approx(
            float(r["ekin_eV"]) / (1.5 * 9 * 8.617333262e-5), rel=1e-3)
    frames = read(tmp_path / "md/trajectory.extxyz", index=":")
    assert [f.info["step"] for f in frames] == [0, 5, 10, 15, 20]
    f = frames[-1]
    assert f.arrays["forces_uncertainty"].shape == (9,) and f.arrays["forces_std"].shape == (9, 3)
    assert f.info["max_forces_uncertainty"] == pytest.approx(f.arrays["forces_uncertainty"].max())
    # the model's predictions are not stored as reference labels
    assert f.calc is None or "forces" not in f.calc.results
    summary = json.loads((tmp_path / "md/summary.json").read_text())
    assert summary["steps"] == 20 and summary["stop_reason"] == "completed"


def test_threshold_stops_on_a_stretched_bond_and_not_in_distribution(trained, tmp_path):
    normal, ood = ethanol(), stretched(ethanol())
    u_normal = max(top_uncertainty(trained, ethanol(k)) for k in range(0, 50, 5))
    u_ood = top_uncertainty(trained, ood)
    assert u_ood > u_normal  # the trained model is less sure of the stretched bond
    threshold = 0.5 * (u_normal + u_ood)
    calm = run_md(normal, trained, steps=10, temperature_K=30, max_uncertainty=threshold,
                  out=tmp_path / "calm", progress=False)
    assert calm.stop_reason == "completed" and calm.steps == 10 and calm.exceeded == 0
    assert not (tmp_path / "calm/exceeded.extxyz").exists()
    stop = run_md(ood, trained, steps=10, temperature_K=30, max_uncertainty=threshold,
                  out=tmp_path / "stop", progress=False)
    assert stop.stop_reason == "uncertainty" and stop.steps == 0
    assert stop.first_exceeded_step == 0
    saved = read(tmp_path / "stop/exceeded.extxyz", index=":")
    assert len(saved) == 1
    np.testing.assert_allclose(saved[0].positions, ood.positions)
    # active learning starts from labelled structures: the check begins at step 1
    later = run_md(ood, trained, steps=3, temperature_K=30, max_uncertainty=threshold,
                   progress=False, keep_frames=True, check_from_step=1)
    assert later.first_exceeded_step == 1 and later.frames[-1].info["step"] == 1


def test_on_exceed_save_continues_and_spaces_saved_frames(trained, tmp_path):
    result = run_md(ethanol(), trained, steps=12, temperature_K=300, max_uncertainty=0.0,
                    on_exceed="save", save_interval=4, out=tmp_path / "md", progress=False)
    assert result.stop_reason == "completed" and result.steps == 12
    assert result.exceeded == 13  # every step, including the start
    saved = read(tmp_path / "md/exceeded.extxyz", index=":")
    assert [f.info["step"] for f in saved] == [0, 4, 8, 12]


def test_uncertainty_bias_is_logged_and_changes_the_dynamics(trained, tmp_path):
    plain = run_md(ethanol(), trained, steps=15, ensemble="nve", out=tmp_path / "plain",
                   progress=False, keep_frames=True, traj_interval=15)
    biased = run_md(ethanol(), trained, steps=15, ensemble="nve", out=tmp_path / "biased",
                    bias=UncertaintyBias(0.5, 0.2), progress=False, keep_frames=True,
                    traj_interval=15)
    with open(tmp_path / "biased/md.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert all(-0.5 < float(r["bias_energy_eV"]) < 0 for r in rows)
    assert np.abs(biased.frames[-1].positions - plain.frames[-1].positions).max() > 1e-4
    # NVE of the biased Hamiltonian conserves E + E_bias + kinetic (epot includes the bias)
    etot = np.array([float(r["etot_eV"]) for r in rows])
    assert np.ptp(etot) < 0.02


@pytest.mark.parametrize("ensemble", ["nve", "langevin", "nvt"])
def test_every_ensemble_runs(trained, ensemble):
    result = run_md(ethanol(), trained, steps=3, ensemble=ensemble, progress=False)
    assert result.steps == 3 and result.stop_reason == "completed"


def test_npt_needs_a_cell(trained):
    from e2ip.errors import ConfigError

    with pytest.raises(ConfigError, match="periodic"):
        run_md(ethanol(), trained, steps=2, ensemble="npt", progress=False)


def test_cli_md(trained, tmp_path, capsys):
    write(tmp_path / "start.xyz", stretched(ethanol()))
    code = main(["md", str(trained), "--structure", str(tmp_path / "start.xyz"), "--steps", "5",
                 "--out", str(tmp_path / "md"), "--no-progress", "--bias-strength", "0.1"])
    assert code == 0
    assert "MD completed: 5 steps" in capsys.readouterr().out
    with open(tmp_path / "md/md.csv") as fh:  # the bias is logged and recorded
        assert all(float(r["bias_energy_eV"]) < 0 for r in csv.DictReader(fh))
    summary = json.loads((tmp_path / "md/summary.json").read_text())
    assert summary["bias"]["strength"] == 0.1 and summary["bias"]["width"] == 0.05
    code = main(["md", str(trained), "--structure", str(tmp_path / "start.xyz"), "--steps", "5",
                 "--max-uncertainty", "0", "--out", str(tmp_path / "stop"), "--no-progress"])
    assert code == 0 and "stopped at step 0" in capsys.readouterr().out
    # bad input: one line, status 2
    for argv, message in (
            (["--structure", str(tmp_path / "missing.xyz")], "missing.xyz"),
            (["--structure", str(tmp_path / "start.xyz"), "--bias-strength", "-1"], "positive"),
            (["--structure", str(tmp_path / "start.xyz"), "--steps", "-3"], "steps"),
            (["--structure", str(tmp_path / "start.xyz"), "--ensemble", "nvt",
              "--temperature", "0"], "temperature")):
        code = main(["md", str(trained), "--out", str(tmp_path / "x"), *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_md_refuses_a_threshold_without_uncertainty(tmp_path):
    from e2ip import PotentialModel
    from e2ip.errors import ConfigError

    plain = PotentialModel(elements=[1, 6, 8], cutoff=4.0, head="none")
    with pytest.raises(ConfigError, match="uncertainty"):
        run_md(ethanol(), plain, steps=2, max_uncertainty=0.1, progress=False)


def test_auto_threshold_is_the_stored_quantile_of_the_calibration_maxima(trained, tmp_path):
    """calibrate() stores the 0.99 quantile (numpy's, linear) over structures of the largest
    per-atom forces_uncertainty sqrt(tr U_epi / 3) in the form cal; MD's 'auto' uses it."""
    from e2ip.errors import ConfigError
    from e2ip.models.io import load_model
    from e2ip.models.potential import THRESHOLD_QUANTILE

    model = load_model(trained)
    frames = read_structures(REPO / DEMO_TEST, index=":60")
    model.calibrate(frames)
    p = model.predict(frames, form="cal")
    bounds = np.cumsum([0] + [s.n_atoms for s in frames])
    top = [np.sqrt(p["u_epi"][a:b] / 3).max() for a, b in zip(bounds[:-1], bounds[1:])]
    assert THRESHOLD_QUANTILE == 0.99
    assert model.stop_threshold == pytest.approx(np.quantile(top, 0.99), rel=1e-6)
    assert model.calibration()["stop_threshold"] == model.stop_threshold
    model.save(tmp_path / "m.pt")
    run = run_md(ethanol(), tmp_path / "m.pt", steps=3, temperature_K=30,
                 max_uncertainty="auto", progress=False)
    assert run.threshold == pytest.approx(model.stop_threshold)
    with pytest.raises(ConfigError, match="form 'cal'"):
        run_md(ethanol(), E2IPCalculator(tmp_path / "m.pt", form="raw"), steps=1,
               max_uncertainty="auto", progress=False)
    model.uncertainty_threshold.fill_(float("nan"))  # as a file written before 0.3
    with pytest.raises(ConfigError, match="stores no threshold"):
        run_md(ethanol(), model, steps=1, max_uncertainty="auto", progress=False)
    assert main(["md", str(tmp_path / "m.pt"), "--structure", str(REPO / DEMO_TEST),
                 "--steps", "2", "--max-uncertainty", "auto", "--out", str(tmp_path / "md"),
                 "--no-progress"]) == 0
