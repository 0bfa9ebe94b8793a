"""Training, resume after a crash, the CLI contract and configuration errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from e2ip import load_model
from e2ip.cli import main
from e2ip.errors import ConfigError
from e2ip.train.config.yaml_io import load_config
from e2ip.train.run import run_training

TINY = [
    "data.n_train=24", "data.n_validation=8", "data.batch_size=8",
    "model.cutoff=4.0", "model.painn.num_features=8", "model.painn.num_layers=1",
    "model.painn.num_radial=6", "head.hidden=8", "head.tensor_channels=2",
    "training.progress_bar=false", "training.num_threads=1",
]


class Crash(Callback):
    """Simulates a killed run: raises at the end of epoch `after`."""

    def __init__(self, after: int):
        self.after = after

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.after:
            raise RuntimeError("simulated crash")


def _epochs(path):
    with open(path) as fh:
        return [int(r["epoch"]) for r in csv.DictReader(fh)]


def test_resume_after_crash_loses_nothing(tmp_path):
    cfg = load_config(None, TINY + ["training.max_epochs=4"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(cfg, tmp_path / "run", extra_callbacks=[Crash(after=1)])
    assert (tmp_path / "run/checkpoints/last.ckpt").exists()
    assert not list((tmp_path / "run/checkpoints").glob("*.tmp"))
    assert _epochs(tmp_path / "run/metrics.csv") == [0, 1]
    with pytest.raises(ConfigError, match="--resume"):
        run_training(cfg, tmp_path / "run")
    resumed = run_training(cfg, tmp_path / "run", resume=True)
    assert _epochs(tmp_path / "run/metrics.csv") == [0, 1, 2, 3]
    straight = run_training(cfg, tmp_path / "straight")
    assert _epochs(tmp_path / "straight/metrics.csv") == [0, 1, 2, 3]
    # as good as an uninterrupted run (same epochs; data order after resume may differ)
    assert resumed["force_mae"] < 1.5 * straight["force_mae"]
    model = load_model(tmp_path / "run/model.pt")
    assert model.metadata["trained_epochs"] == 4


def test_cli_train_and_evaluate_contract(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--out", str(out), "--max-epochs", "1"]
    for o in TINY:
        args += ["--set", o]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("force_mae", "force_rmse", "energy_mae", "energy_rmse", "n_structures", "n_atoms",
                "units", "nll", "energy_score", "coverage_95", "calibration_error", "spearman",
                "spearman_per_structure", "mean_epistemic", "mean_aleatoric"):
        assert key in metrics, key
    assert metrics["form"] == "cal" and metrics["variance_scale"] > 0
    assert "calibration_error" in metrics["raw"]
    for png in ("calibration.png", "pit.png", "error_vs_uncertainty.png"):
        assert (out / png).stat().st_size > 1000
    model = load_model(out / "model.pt")
    assert model.head_name == "e2ip" and model.elements == [1, 6, 8]
    from e2ip.train.datasets import demo_data_path

    ev = tmp_path / "ev"
    assert main(["evaluate", str(out / "model.pt"), "--data", str(demo_data_path(test=True)),
                 "--index", ":20", "--units", "kcal/mol", "--out", str(ev)]) == 0
    em = json.loads((ev / "metrics.json").read_text())
    assert em["n_structures"] == 20 and em["n_atoms"] == 180
    assert em["units"] == {"energy": "kcal/mol", "forces": "kcal/mol/Å"}
    # kcal/mol figures are the eV figures times 23.06
    ev2 = tmp_path / "ev2"
    main(["evaluate", str(out), "--data", str(demo_data_path(test=True)), "--index", ":20",
          "--out", str(ev2)])
    em2 = json.loads((ev2 / "metrics.json").read_text())
    assert em["force_mae"] == pytest.approx(em2["force_mae"] * 23.0605, rel=1e-4)
    assert em["calibration_error"] == pytest.approx(em2["calibration_error"])


@pytest.mark.parametrize("override, message", [
    ("trainin.lr=1", "unknown key 'trainin' (did you mean 'training'?)"),
    ("training.lrr=1", "unknown key 'training.lrr' (did you mean 'lr'?)"),
    ("training.lr=fast", "'training.lr' must be float"),
    ("model.backbone=schnet", "'model.backbone' must be one of"),
    ("model.painn.width=3", "unknown key 'model.painn.width'"),
    ("head.dampin=false", "unknown key 'head.dampin' (did you mean 'damping'?)"),
    ("data.train=/no/such/file.xyz", "'data.train': file not found: /no/such/file.xyz"),
])
def test_config_errors_are_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_r_bins_on_an_ensemble_are_refused():
    """An ensemble is calibrated on its members' spread: bins of r would be silently ignored."""
    load_config(None, ["head.calibration_r_bins=5"])  # a single model bins r
    with pytest.raises(ConfigError) as err:
        load_config(None, ["head.calibration_r_bins=5", "ensemble.size=3"])
    assert "'head.calibration_r_bins'" in str(err.value) and "\n" not in str(err.value)


def test_config_file_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  max_epoch: 3\n")
    assert main(["train", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'training.max_epoch' (did you mean 'max_epochs'?)" in err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "none.pt"), "--data", str(bad)]) == 2


def test_float64_training_option():
    cfg = load_config(None, TINY + ["model.dtype=float64"])
    import dataclasses

    from e2ip.train.datasets import prepare_data
    from e2ip.train.fit import model_spec
    from e2ip.train.module import PotentialModule

    data = prepare_data(cfg.data)
    module = PotentialModule(model_spec(cfg, data), dataclasses.asdict(cfg.training), "float64")
    assert next(module.model.parameters()).dtype == torch.float64


def test_ensemble_trained_by_one_command(tmp_path):
    plain = [o for o in TINY if not o.startswith("head.")]
    cfg = load_config(None, plain + ["training.max_epochs=1", "ensemble.size=2",
                                     "model.head=none"])
    metrics = run_training(cfg, tmp_path / "ens")
    model = load_model(tmp_path / "ens/model.pt")
    assert model.kind == "ensemble" and model.num_members == 2
    assert model.calibrated and float(model.calibration_variance) > 0
    assert metrics["form"] == "cal"
    assert metrics["nll_floor"] == pytest.approx(float(model.calibration_variance))
    seeds = [m.metadata["seed"] for m in model.members]
    assert seeds == [0, 1]
    # the two members differ (different seeds)
    p0, p1 = (next(m.parameters()) for m in model.members)
    assert not torch.equal(p0, p1)


def test_forces_only_data_trains_and_evaluates(tmp_path, capsys):
    """Data without energies trains on forces alone (data.energy_key: null) and evaluates with
    --energy-key none: energy metrics are n/a, force metrics are real. Without the key, the
    missing energy is one line naming the frame."""
    from ase.io import write

    from e2ip.data.read import read_structures
    from e2ip.train.datasets import demo_data_path

    frames = []
    for s in read_structures(demo_data_path())[:40]:
        atoms = s.to_atoms()
        atoms.arrays["forces"] = s.forces
        frames.append(atoms)
    path = tmp_path / "forces_only.xyz"
    write(path, frames, format="extxyz")
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--max-epochs", "2"]
    for o in TINY + ["training.recalibrate=false", f"data.train={path}"]:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "forces_only.xyz, frame 0: no energy under key 'energy'" in err
    assert main(args + ["--set", "data.energy_key=null"]) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["energy_mae"] is None and metrics["force_mae"] > 0
    model = load_model(out / "model.pt")
    assert torch.equal(model.reference_energies, torch.zeros_like(model.reference_energies))
    code = main(["evaluate", str(out / "model.pt"), "--data", str(path), "--energy-key", "none",
                 "--out", str(tmp_path / "ev")])
    assert code == 0
    assert json.loads((tmp_path / "ev/metrics.json").read_text())["energy_mae"] is None


def test_duplicate_frames_are_refused_unless_allowed(tmp_path, capsys):
    from ase.io import write

    from e2ip.data.read import read_structures
    from e2ip.train.datasets import demo_data_path

    frames = []
    for s in read_structures(demo_data_path())[:30]:
        atoms = s.to_atoms()
        atoms.info["energy"], atoms.arrays["forces"] = s.energy, s.forces
        frames.append(atoms)
    path = tmp_path / "twice.xyz"
    write(path, frames + frames[4:5], format="extxyz")  # frame 30 repeats frame 4
    args = ["train", "--out", str(tmp_path / "run"), "--max-epochs", "1"]
    for o in TINY + ["training.recalibrate=false", f"data.train={path}"]:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "twice.xyz, frame 30" in err and "frame 4" in err
    assert not (tmp_path / "run").exists()
    assert main(args + ["--set", "data.allow_duplicates=true"]) == 0
