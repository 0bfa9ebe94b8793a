"""Training under faults: non-finite steps are skipped, repeated ones stop the run with the
batch's structures named, and a run killed with SIGKILL anywhere (also while writing a
checkpoint) resumes with nothing lost."""

from __future__ import annotations

import csv
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from e2ip import load_model
from e2ip.cli import main
from e2ip.train.config.yaml_io import load_config
from e2ip.train.module import PotentialModule
from e2ip.train.run import run_training

TINY = [
    "data.n_train=24", "data.n_validation=8", "data.batch_size=8",
    "model.cutoff=4.0", "model.painn.num_features=8", "model.painn.num_layers=1",
    "model.painn.num_radial=6", "head.hidden=8", "head.tensor_channels=2",
    "training.progress_bar=false", "training.num_threads=1", "training.recalibrate=false",
]
BATCHES_PER_EPOCH = 3  # 24 training structures in batches of 8


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _poison(monkeypatch, when) -> list[tuple[str, ...]]:
    """Make the training loss NaN for batches where `when(module, batch)` holds; returns the
    list of poisoned batches' structures."""
    original = PotentialModule.compute_loss
    poisoned: list[tuple[str, ...]] = []

    def compute_loss(self, model, batch, create_graph):
        loss, logs = original(self, model, batch, create_graph)
        if create_graph and when(self, batch):
            poisoned.append(batch.frames)
            loss = loss * float("nan")
        return loss, logs

    monkeypatch.setattr(PotentialModule, "compute_loss", compute_loss)
    return poisoned


def _adam_steps(checkpoint: Path) -> int:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return int(next(iter(state["optimizer_states"][0]["state"].values()))["step"])


def test_non_finite_steps_are_skipped_and_logged(tmp_path, monkeypatch, caplog):
    poisoned = _poison(monkeypatch, lambda module, batch: any(
        f.endswith("frame 5") for f in batch.frames))
    cfg = load_config(None, TINY + ["training.max_epochs=3", "training.ema_decay=null"])
    with caplog.at_level("WARNING", logger="e2ip"):
        metrics = run_training(cfg, tmp_path / "run")
    assert len(poisoned) == 3  # frame 5 is in one batch per epoch
    rows = _rows(tmp_path / "run/metrics.csv")
    assert [float(r["train_skipped_steps"]) for r in rows] == [1.0, 1.0, 1.0]
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)  # skipped losses not averaged
    # the optimiser took exactly the kept steps (AdamW's step counter: independent of the logs)
    assert _adam_steps(tmp_path / "run/checkpoints/last.ckpt") == 3 * BATCHES_PER_EPOCH - 3
    model = load_model(tmp_path / "run/model.pt")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(metrics["force_mae"])
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 3 and "frame 5" in warnings[0]


def test_repeated_failures_stop_with_the_frames_named(tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, lambda module, batch: module.current_epoch >= 1)
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--max-epochs", "4", "--set",
            "training.max_bad_steps=2"]
    for option in TINY:
        args += ["--set", option]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # progress logs, then one error line
    assert "Traceback" not in "".join(lines) and lines[-1].startswith("e2ip train: error: ")
    assert sum("error" in line for line in lines) == 1
    err = lines[-1]
    assert "training stopped at epoch 1" in err and "2 steps in a row" in err
    assert "rmd17_ethanol_demo.npz, frame" in err and "last.ckpt is kept" in err
    assert not (out / "model.pt").exists() and not (out / "metrics.json").exists()
    last = out / "checkpoints/last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and all(torch.isfinite(v).all()
                                       for k, v in state["state_dict"].items()
                                       if v.is_floating_point()
                                       and not k.endswith("uncertainty_threshold"))  # NaN: unfitted
    assert [int(r["epoch"]) for r in _rows(out / "metrics.csv")] == [0]
    # the run resumes from the good checkpoint once the fault is gone
    monkeypatch.undo()
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert [int(r["epoch"]) for r in _rows(out / "metrics.csv")] == [0, 1, 2, 3]


# --- SIGKILL at random points ------------------------------------------------------------------

DRIVER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from e2ip.train import fit

    if os.environ.get("E2IP_TEST_HANG_IN_SAVE"):
        # simulate being killed while a checkpoint is written: leave a half-written temporary
        # file, tell the test, and wait to be killed
        original = fit.AtomicModelCheckpoint._save_checkpoint
        target = int(os.environ["E2IP_TEST_HANG_IN_SAVE"])

        def save(self, trainer, filepath):
            if trainer.current_epoch == target and filepath.endswith("last.ckpt"):
                tmp = filepath + ".tmp"
                trainer.save_checkpoint(tmp, self.save_weights_only)
                data = Path(tmp).read_bytes()
                Path(tmp).write_bytes(data[: len(data) // 2])
                Path(os.environ["E2IP_TEST_MARKER"]).touch()
                time.sleep(60)
            original(self, trainer, filepath)

        fit.AtomicModelCheckpoint._save_checkpoint = save
    from e2ip.cli import main
    sys.exit(main(sys.argv[1:]))
""")
#: long enough that the kills below always land while epochs remain (16 was not: on a fast
#: machine a run could finish every epoch before a kill, and the next resume had nothing to do)
EPOCHS = 40


def _start(args: list[str], env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-c", DRIVER, *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _completed_epochs(out: Path) -> int:
    path = out / "metrics.csv"
    return len(_rows(path)) if path.exists() else 0


def _checkpoint_epochs(out: Path) -> int:
    """Epochs the last checkpoint holds (its `epoch` is the last finished one)."""
    last = out / "checkpoints/last.ckpt"
    if not last.exists():
        return 0
    return int(torch.load(last, map_location="cpu", weights_only=True)["epoch"]) + 1


def _wait_for(predicate, proc, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read().decode()}")
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_sigkill_anywhere_then_resume_loses_nothing(tmp_path):
    out = tmp_path / "run"
    train = ["train", "--out", str(out), "--max-epochs", str(EPOCHS)]
    for option in TINY:
        train += ["--set", option]
    resume = ["train", "--out", str(out), "--resume"]
    rng = random.Random(7)
    kills = []

    def kill(proc) -> None:
        before = _completed_epochs(out)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        held = _checkpoint_epochs(out)
        # the checkpoint holds every epoch the log had finished, but the one in flight
        assert held >= before - 1, (before, held)
        kills.append((before, held))

    # 1) during the first checkpoint write of epoch 2 (half-written temporary file)
    marker = tmp_path / "in_save"
    proc = _start(train, {"E2IP_TEST_HANG_IN_SAVE": "2", "E2IP_TEST_MARKER": str(marker)})
    _wait_for(marker.exists, proc)
    kill(proc)
    assert list((out / "checkpoints").glob("*.tmp"))  # the torn write is there ...
    # 2) at a random moment of the start-up, then three times at random moments of training
    proc = _start(resume)
    time.sleep(rng.uniform(0.5, 3.0))
    kill(proc)
    for _ in range(3):
        proc = _start(resume)
        start_epochs = _checkpoint_epochs(out)
        _wait_for(lambda s=start_epochs: _checkpoint_epochs(out) > s, proc)
        time.sleep(rng.uniform(0.0, 0.6))
        assert proc.poll() is None, "finished before it could be killed: lengthen EPOCHS"
        kill(proc)
        assert kills[-1][1] < EPOCHS, "every epoch done before the kill: lengthen EPOCHS"
    # 3) resume to the end
    proc = _start(resume)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    assert not list((out / "checkpoints").glob("*.tmp"))  # ... and cleared on resume
    epochs = [int(r["epoch"]) for r in _rows(out / "metrics.csv")]
    assert epochs == list(range(EPOCHS)), epochs  # one row per epoch, none lost or repeated
    for ckpt in (out / "checkpoints").glob("*.ckpt"):  # every checkpoint file is whole
        torch.load(ckpt, map_location="cpu", weights_only=True)
    model = load_model(out / "model.pt")
    assert model.metadata["trained_epochs"] == EPOCHS
    assert (out / "metrics.json").exists()
    print("kills (epochs logged, epochs checkpointed):", kills)
    assert len(kills) == 5 and kills[-1][1] > kills[0][1], kills


@pytest.mark.parametrize("value", [0, -1])
def test_max_bad_steps_must_be_positive(value, capsys):
    assert main(["train", "--out", "/nonexistent/x", "--set",
                 f"training.max_bad_steps={value}"]) == 2
    assert "'training.max_bad_steps' must be >= 1" in capsys.readouterr().err
