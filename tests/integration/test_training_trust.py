"""The model we export is the model we trained: the weight average against its recurrence, short
runs against their initialisation, and runs that are refused without touching anything."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from e2ip import PotentialModel, load_model
from e2ip.data.read import read_structures
from e2ip.errors import ConfigError, DataError
from e2ip.evaluation.evaluate import collect
from e2ip.train.callbacks import ema_decay_at
from e2ip.train.config.yaml_io import load_config
from e2ip.train.run import run_training

TINY = [
    "data.n_train=24", "data.n_validation=8", "data.n_test=8", "data.batch_size=8",
    "model.cutoff=4.0", "model.painn.num_features=8", "model.painn.num_layers=1",
    "model.painn.num_radial=6", "head.hidden=8", "head.tensor_channels=2",
    "training.progress_bar=false", "training.num_threads=1",
]


class RecordWeights(Callback):
    """The trained (not averaged) parameters after every optimizer step."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: v.detach().clone() for k, v in pl_module.model.named_parameters()})


def test_ema_decay_ramp_values():
    assert ema_decay_at(0.99, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.99, 17) == pytest.approx(18 / 27)
    assert ema_decay_at(0.99, 10_000) == 0.99


def test_exported_weights_are_the_ramped_average_of_the_trained_ones(tmp_path):
    """Recompute the average from the recorded trajectory: w_1, then
    avg <- d_n avg + (1 - d_n) w, d_n = min(0.99, (1 + n) / (10 + n)) after n updates."""
    recorder = RecordWeights()
    cfg = load_config(None, TINY + ["training.max_epochs=1", "training.ema_decay=0.99"])
    run_training(cfg, tmp_path / "run", extra_callbacks=[recorder])
    steps = recorder.steps
    assert len(steps) == 3  # 24 structures / batch 8
    expected = {k: v.double().clone() for k, v in steps[0].items()}
    for n, weights in enumerate(steps[1:], start=1):
        d = min(0.99, (1 + n) / (10 + n))
        for k in expected:
            expected[k] = d * expected[k] + (1 - d) * weights[k].double()
    exported = dict(load_model(tmp_path / "run/model.pt").named_parameters())
    differs_from_last = 0.0
    for k, v in expected.items():
        torch.testing.assert_close(exported[k].double(), v, rtol=1e-5, atol=1e-6)
        differs_from_last = max(differs_from_last,
                                float((exported[k] - steps[-1][k]).abs().max()))
    assert differs_from_last > 1e-6  # it is an average, not the last weights


def test_short_training_ends_far_better_than_its_initialisation(tmp_path):
    """A few epochs on 64 real ethanol frames: the exported model's force MAE on held-out frames
    is well below that of an untrained model of the same spec (which the old EMA exported)."""
    from e2ip.train.datasets import demo_data_path

    opts = [o for o in TINY if not o.startswith(("data.n_", "model.painn"))] + [
        "data.n_train=64", "data.n_validation=16", "data.batch_size=8", "training.max_epochs=4",
        "model.painn.num_features=16", "model.painn.num_layers=2", "model.painn.num_radial=8",
        "training.lr=5e-3", "training.recalibrate=false"]
    cfg = load_config(None, opts)
    run_training(cfg, tmp_path / "run")
    trained = load_model(tmp_path / "run/model.pt")
    torch.manual_seed(123)
    untrained = PotentialModel(**trained.spec()).eval()
    held_out = read_structures(demo_data_path(test=True), index=":40")

    def mae(model):
        c = collect(model, held_out, 40, [])
        return float((c.forces - c.forces_ref).abs().mean())

    assert mae(trained) < 0.7 * mae(untrained)  # measured: 0.47 vs 0.85 eV/Å


@pytest.mark.parametrize("split", ["[0.5, 0.5, 0.5]", "[0.9, 0.2, 0.0]", "[1.2, -0.1, -0.1]"])
def test_split_fractions_over_one_are_an_error(split):
    with pytest.raises(ConfigError, match="'data.split' fractions must be >= 0 and sum to at most 1"):
        load_config(None, [f"data.split={split}"])


def _water_and_methane(tmp_path, where: str):
    """An xyz training file of H2O molecules and a validation file where one frame has C."""
    from ase import Atoms
    from ase.io import write

    rng = np.random.default_rng(0)

    def mol(symbols, k):
        pos = np.array([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0], [0, 0, 1.1], [0, 1.2, 0.5]])
        atoms = Atoms(symbols, positions=pos[:len(symbols)] + 0.02 * rng.normal(size=(len(symbols), 3)))
        atoms.info["energy"] = -10.0 + 0.1 * k
        atoms.arrays["forces"] = rng.normal(size=(len(symbols), 3))
        return atoms

    train = [mol("OHH", k) for k in range(12)]
    other = [mol("OHH", k) for k in range(4)] + [mol("CHHHH", 9)]
    write(tmp_path / "train.xyz", train)
    write(tmp_path / f"{where}.xyz", other)
    return tmp_path / "train.xyz", tmp_path / f"{where}.xyz"


@pytest.mark.parametrize("where", ["validation", "test"])
def test_element_only_outside_the_training_set_is_named(tmp_path, where):
    from e2ip.train.datasets import prepare_data

    train, other = _water_and_methane(tmp_path, where)
    cfg = load_config(None, [f"data.train={train}", f"data.{where}={other}"])
    with pytest.raises(DataError) as err:
        prepare_data(cfg.data)
    msg = str(err.value)
    assert f"element(s) C occur in the {where} set but not in the training set" in msg
    assert f"{where}.xyz, frame 4" in msg and "\n" not in msg


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rejected_runs_touch_nothing_and_resume_checks_the_config(tmp_path, capsys):
    from e2ip.cli import main

    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--max-epochs", "1"]
    for o in TINY + ["training.recalibrate=false"]:
        args += ["--set", o]
    assert main(args) == 0
    before = _digest(out)
    # a second train into the same folder, with another config: refused, nothing rewritten
    assert main(args + ["--set", "training.lr=0.5"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert _digest(out) == before
    # resume with a changed key: refused, the change named, nothing rewritten
    assert main(["train", "--out", str(out), "--resume", "--set", "training.lr=0.5",
                 "--set", "training.max_epochs=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "training.lr: 0.001 -> 0.5" in err and "training.max_epochs: 1 -> 2" in err
    assert "--force" in err and len(err.splitlines()) == 1
    assert _digest(out) == before
    # resume with the recorded config (no config file given) and only run-control keys changed
    assert main(["train", "--out", str(out), "--resume", "--set",
                 "training.progress_bar=false"]) == 0
    # --force accepts the change and keeps the old config beside the new one
    assert main(["train", "--out", str(out), "--resume", "--force",
                 "--set", "training.max_epochs=2"]) == 0
    assert (out / "config.previous.yaml").exists()
    assert load_config(out / "config.yaml").training.max_epochs == 2
    assert load_model(out / "model.pt").metadata["trained_epochs"] == 2


def test_fine_tuning_starts_from_the_trained_model(tmp_path):
    base_cfg = load_config(None, TINY + ["training.max_epochs=1"])
    run_training(base_cfg, tmp_path / "base")
    base = load_model(tmp_path / "base/model.pt")
    # the architecture and scales come from the file, not from the (different) config
    cfg = load_config(None, TINY + ["training.max_epochs=1", "model.painn.num_features=16",
                                    f"training.init_from={tmp_path / 'base/model.pt'}",
                                    "training.lr=1e-12", "training.ema_decay=null",
                                    "training.recalibrate=false"])
    run_training(cfg, tmp_path / "tuned")
    tuned = load_model(tmp_path / "tuned/model.pt")
    assert tuned.spec()["backbone_options"] == base.spec()["backbone_options"]
    assert tuned.elements == base.elements and tuned.force_scale == base.force_scale
    assert tuned.reference_energies.tolist() == base.reference_energies.tolist()
    assert tuned.metadata["init_from"].endswith("base/model.pt")
    assert not tuned.calibrated  # the base's calibration is for the base's weights
    for (name, p), q in zip(base.named_parameters(), tuned.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)  # lr ~ 0: unchanged
    # a new element is an error naming it
    from ase import Atoms
    from ase.io import write

    atoms = Atoms("NH3", positions=[[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    atoms.info["energy"] = -1.0
    atoms.arrays["forces"] = np.zeros((4, 3))
    frames = [atoms.copy() for _ in range(6)]
    for k, frame in enumerate(frames):  # distinct frames (duplicates are an error of their own)
        frame.positions[0, 0] += 0.01 * k
        frame.info["energy"], frame.arrays["forces"] = -1.0, np.zeros((4, 3))
    write(tmp_path / "nh3.xyz", frames)
    cfg = load_config(None, TINY + [f"training.init_from={tmp_path / 'base'}",
                                    f"data.train={tmp_path / 'nh3.xyz'}"])
    with pytest.raises(DataError, match="element.s. N unknown to the model being fine-tuned"):
        run_training(cfg, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("members, size", [(2, 1), (2, 3), (1, 1)])
def test_fine_tuning_an_ensemble_needs_its_member_count(tmp_path, members, size):
    from e2ip import Ensemble

    models = [PotentialModel(elements=[1, 6, 8], cutoff=4.0, head="none") for _ in range(members)]
    Ensemble(models).save(tmp_path / "ensemble.pt")
    cfg = load_config(None, TINY + [f"training.init_from={tmp_path / 'ensemble.pt'}",
                                    f"ensemble.size={size}"])
    with pytest.raises(ConfigError, match=f"set ensemble.size: {members}"):
        run_training(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
