"""Distributed training (issue 10): two CPU processes (gloo) through Lightning's DDP hold the same
weights, match one process on the same global batch, and only rank 0 writes the run's files."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from e2ip.cli import main
from e2ip.errors import ConfigError
from e2ip.train.config.yaml_io import load_config
from e2ip.train.fit import make_trainer
from e2ip.train.ranks import is_global_zero
from e2ip.train.run import check_run_folder

#: one step per epoch: 8 training structures, 4 per rank on 2 ranks or 8 in one process; every
#: structure is the same molecule (ethanol), so per-atom means of the two halves average exactly
TINY = [
    "data.n_train=8", "data.n_validation=8", "data.n_test=4", "data.eval_batch_size=4",
    "model.dtype=float64", "model.cutoff=4.0", "model.painn.num_features=8",
    "model.painn.num_layers=1", "model.painn.num_radial=6", "head.hidden=8",
    "head.tensor_channels=2", "training.progress_bar=false", "training.num_threads=1",
    "training.scheduler_patience=0", "training.lr=0.01",
]
EPOCHS = 4

#: the epoch whose step is made non-finite on the last rank only (every rank must skip it)
POISONED_EPOCH = 1

#: `e2ip train` (the real entry point, argv as given) with three additions: every process
#: records the files it writes under the run folder (an audit hook) and dumps its weights, epoch
#: metrics and learning rates at the end of training into $E2IP_TEST_DUMP (outside the run); the
#: last rank's loss is NaN in epoch $E2IP_TEST_POISON. Lightning's launcher re-runs this script
#: for rank 1, so that process has them too.
DRIVER = textwrap.dedent('''
    import atexit, json, os, sys

    import torch
    from lightning.pytorch.callbacks import Callback

    import e2ip.train.run
    from e2ip.cli import main
    from e2ip.train.module import PotentialModule

    DUMP = os.environ["E2IP_TEST_DUMP"]
    RUN = os.path.abspath(sys.argv[sys.argv.index("--out") + 1])
    state = {"rank": None, "writes": [], "recording": True}


    def under_run(path):
        try:
            path = os.path.abspath(os.fsdecode(path))
        except TypeError:  # a file descriptor
            return None
        return path if path == RUN or path.startswith(RUN + os.sep) else None


    def audit(event, args):
        if not state["recording"]:
            return
        paths = ()
        if event == "open":
            path, mode, flags = args
            writing = any(c in (mode or "") for c in "wax+") if mode is not None else (
                flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))
            paths = (path,) if writing else ()
        elif event == "os.rename":
            paths = args[:2]
        elif event in ("os.remove", "os.mkdir", "os.rmdir", "os.truncate", "shutil.rmtree"):
            paths = args[:1]
        for path in paths:
            hit = under_run(path)
            if hit:
                state["writes"].append([event, os.path.relpath(hit, RUN)])


    sys.addaudithook(audit)


    class Dump(Callback):
        def __init__(self):
            self.epochs = []

        def on_train_epoch_end(self, trainer, pl_module):
            row = {k: float(v) for k, v in trainer.callback_metrics.items()}
            row["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
            self.epochs.append(row)

        def on_train_end(self, trainer, pl_module):
            state["rank"] = trainer.global_rank
            weights = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
            torch.save({"weights": weights, "epochs": self.epochs, "world": trainer.world_size},
                       os.path.join(DUMP, f"rank{trainer.global_rank}.pt"))


    @atexit.register
    def save_writes():
        state["recording"] = False
        rank = state["rank"] if state["rank"] is not None else "unknown"
        with open(os.path.join(DUMP, f"writes_rank{rank}.json"), "w") as fh:
            json.dump(state["writes"], fh)


    compute_loss = PotentialModule.compute_loss


    def poisoned(self, model, batch, create_graph):
        loss, logs = compute_loss(self, model, batch, create_graph)
        last = self.global_rank == self.trainer.world_size - 1
        if create_graph and last and self.current_epoch == int(os.environ["E2IP_TEST_POISON"]):
            loss = loss * float("nan")
        return loss, logs


    PotentialModule.compute_loss = poisoned
    original = e2ip.train.run.run_training
    e2ip.train.run.run_training = lambda *a, **k: original(*a, extra_callbacks=[Dump()], **k)
    sys.exit(main(sys.argv[1:]))
''')


def _clean_env(dump: Path) -> dict[str, str]:
    """This environment less any launcher's or scheduler's rank variables, one thread each."""
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
                "MASTER_PORT", "PL_GLOBAL_SEED")
    env = {k: v for k, v in os.environ.items()
           if k not in launcher and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    return {**env, "OMP_NUM_THREADS": "1", "E2IP_TEST_DUMP": str(dump),
            "E2IP_TEST_POISON": str(POISONED_EPOCH)}


def _train(tmp_path: Path, name: str, devices: int, batch_size: int, *extra: str):
    """Run the driver; return (run folder, per-rank dumps, per-rank writes, stdout)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    dump = tmp_path / f"{name}_ranks"
    dump.mkdir()
    run = tmp_path / name
    args = [sys.executable, str(driver), "train", "--out", str(run), "--max-epochs", str(EPOCHS),
            "--accelerator", "cpu", "--devices", str(devices), *extra]
    for option in [*TINY, f"data.batch_size={batch_size}"]:
        args += ["--set", option]
    proc = subprocess.run(args, env=_clean_env(dump), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]  # nor in rank 1
    dumps = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in range(devices)]
    writes = {p.stem.removeprefix("writes_"): json.loads(p.read_text())
              for p in dump.glob("writes_*.json")}
    return run, dumps, writes, proc.stdout


def _close(a: dict, b: dict, what: str, tol: float) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), rtol=tol, atol=tol,
                              equal_nan=True), (what, key)  # NaN: not fitted yet


def test_two_processes_train_like_one_and_only_rank_0_writes(tmp_path):
    run, (rank0, rank1), writes, stdout = _train(
        tmp_path, "ddp", 2, 4, "--strategy", "ddp", "--set", "data.num_workers=1")
    single_run, (single,), _, _ = _train(tmp_path, "single", 1, 8)
    assert rank0["world"] == 2 and rank1["world"] == 2 and single["world"] == 1

    # both ranks hold the same weights, and so does one process on the same global batch
    _close(rank0["weights"], rank1["weights"], "rank 0 vs rank 1", 1e-12)
    _close(rank0["weights"], single["weights"], "2 ranks vs 1 process", 1e-5)
    # every rank saw the metrics of the whole validation set (sync_dist), as one process does:
    # the checkpoints, early stopping and the learning-rate schedule follow the same val_loss;
    # rank 1's NaN step was skipped by both ranks and counted once
    assert len(rank0["epochs"]) == len(single["epochs"]) == EPOCHS
    keys = [k for k in single["epochs"][0] if k.startswith(("val_", "train_")) or k == "lr"]
    assert "val_loss" in keys and "train_loss" in keys
    for e, (r0, r1, one) in enumerate(zip(rank0["epochs"], rank1["epochs"], single["epochs"])):
        assert r0.keys() == r1.keys() == one.keys(), e
        for key in keys:
            assert r0[key] == pytest.approx(r1[key], rel=1e-12, abs=1e-12), (e, key, "ranks")
            assert r0[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), (e, key, "1 process")
        assert r0["train_skipped_steps"] == (e == POISONED_EPOCH), e
    # the saved model (rank 0's best checkpoint, calibrated) is the single process's
    saved = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    _close(saved, torch.load(single_run / "model.pt", weights_only=True)["state_dict"],
           "model.pt", 1e-5)

    # only rank 0 wrote: each file once, nothing left half-written, one metrics.csv row per epoch
    assert writes["rank1"] == [], writes["rank1"]
    written = {path for _, path in writes["rank0"]}
    for name in ("config.yaml", "model.pt", "metrics.json", "metrics.csv",
                 os.path.join("checkpoints", "last.ckpt")):
        assert name in written, (name, sorted(written))
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert not [f for f in files if ".tmp" in f], files
    assert {"config.yaml", "model.pt", "metrics.json", "metrics.csv"} <= set(files)
    with open(run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS))
    assert [float(r["train_skipped_steps"]) for r in rows] == [
        float(e == POISONED_EPOCH) for e in range(EPOCHS)]
    assert stdout.count("model written to") == 1  # rank 1's `e2ip train` printed nothing
    assert json.loads((run / "metrics.json").read_text())["n_structures"] == 4


def test_rank_from_the_environment(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    assert is_global_zero()
    cases = [({"RANK": "1"}, False), ({"RANK": "0", "SLURM_PROCID": "3"}, True),
             ({"LOCAL_RANK": "1"}, False), ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),
             ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True),
             ({"LOCAL_RANK": "1", "SLURM_PROCID": "0"}, False),  # launched from a SLURM shell
             ({"SLURM_PROCID": "2"}, False), ({"SLURM_PROCID": "0"}, True),
             ({"NODE_RANK": "1"}, False)]
    for env, expected in cases:
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            assert is_global_zero() is expected, env


def test_other_ranks_do_not_mistake_rank_0s_config_for_a_run(tmp_path):
    cfg = load_config(None, [])
    (tmp_path / "config.yaml").write_text("{}\n")  # rank 0 got here first
    with pytest.raises(ConfigError, match="already holds a run"):
        check_run_folder(cfg, tmp_path, resume=False, force=False, rank_zero=True)
    check_run_folder(cfg, tmp_path, resume=False, force=False, rank_zero=False)
    (tmp_path / "checkpoints").mkdir()  # an earlier run: every rank refuses
    with pytest.raises(ConfigError, match="already holds a run"):
        check_run_folder(cfg, tmp_path, resume=False, force=False, rank_zero=False)


def test_distributed_flags_and_keys(tmp_path, monkeypatch, capsys):
    import e2ip.train.run

    seen = []
    monkeypatch.setattr(e2ip.train.run, "run_training",
                        lambda cfg, out, **kw: seen.append(cfg) or {"data": "test"})
    assert main(["train", "--out", str(tmp_path / "x"), "--devices", "4", "--num-nodes", "2",
                 "--strategy", "ddp", "--accelerator", "cpu"]) == 0
    t = seen[0].training
    assert (t.devices, t.num_nodes, t.strategy, t.accelerator) == (4, 2, "ddp", "cpu")
    assert main(["train", "--num-nodes", "0"]) == 2
    for override, key in (("training.num_nodes=0", "training.num_nodes"),
                          ("data.num_workers=-1", "data.num_workers"),
                          ("training.devices=0", "training.devices"),
                          ("training.devices=two", "training.devices")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [override])
    assert load_config(None, ["training.devices=0,1"]).training.devices == "0,1"
    assert load_config(None, ["training.devices=[0, 1]"]).training.devices == [0, 1]
    with pytest.raises(ConfigError, match="strategy='nonsense'.*invalid strategy"):
        make_trainer(load_config(None, ["training.strategy=nonsense"]).training, logger=False)
    monkeypatch.undo()  # the real run_training: a refused setting writes nothing
    assert main(["train", "--out", str(tmp_path / "y"), "--strategy", "nonsense"]) == 2
    assert "invalid strategy" in capsys.readouterr().err and not (tmp_path / "y").exists()
    # started by torchrun with 4 processes in all, but devices x num_nodes says 2
    for key, value in (("TORCHELASTIC_RUN_ID", "test"), ("WORLD_SIZE", "4"), ("RANK", "0"),
                       ("LOCAL_RANK", "0"), ("GROUP_RANK", "0"), ("LOCAL_WORLD_SIZE", "2"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(key, value)
    cfg = load_config(None, ["training.devices=2", "training.strategy=ddp",
                             "training.accelerator=cpu"])
    with pytest.raises(ConfigError, match="num_nodes=1: .*does not match the world size"):
        make_trainer(cfg.training, logger=False)
