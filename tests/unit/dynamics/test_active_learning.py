"""Active learning: two tiny rounds end to end with GFN2-xTB (tblite) through a process pool,
resume after a crash between rounds, the selection rule, and configuration errors."""

from __future__ import annotations

import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

import e2ip.dynamics.active_learning.loop as al
from e2ip.cli import main
from e2ip.dynamics.active_learning.config import load_al_config
from e2ip.dynamics.active_learning.loop import run_active_learning
from e2ip.dynamics.active_learning.selection import select_diverse
from e2ip.dynamics.oracle import label, make_oracle
from e2ip.errors import ConfigError
from tests.support import REPO

TINY = ["rounds=2", "per_round=3", "md.steps=30", "md.interval=5", "md.trajectories=2",
        "training.training.max_epochs=4", "training.training.num_threads=1",
        "training.model.cutoff=4.0", "training.model.painn.num_features=16",
        "training.model.painn.num_layers=1", "training.head.hidden=8",
        "training.data.batch_size=8"]


def ethanol_frames(n: int):
    from e2ip.data.read import read_structures

    path = REPO / "src/e2ip/data/demo/rmd17_ethanol_demo_test.npz"
    return [s.to_atoms() for s in read_structures(path, index=f":{n}")]


def labelled_file(path: Path, frames, calc_factory) -> Path:
    out = []
    for a in frames:
        a = a.copy()
        a.calc = calc_factory()
        e, f = a.get_potential_energy(), a.get_forces()
        b = a.copy()
        b.calc = SinglePointCalculator(b, energy=e, forces=f)
        out.append(b)
    write(path, out)
    return path


@pytest.fixture
def emt_data(tmp_path):
    frames = ethanol_frames(24)
    return (labelled_file(tmp_path / "train.extxyz", frames[:16], EMT),
            labelled_file(tmp_path / "test.extxyz", frames[16:], EMT))


def test_two_rounds_with_xtb_through_a_process_pool(tmp_path):
    tblite = pytest.importorskip("tblite.ase", reason="tblite (GFN2-xTB) cannot be installed here")
    frames = ethanol_frames(20)
    train = labelled_file(tmp_path / "train.extxyz", frames[:12],
                          lambda: tblite.TBLite(method="GFN2-xTB", verbosity=0))
    test = labelled_file(tmp_path / "test.extxyz", frames[12:],
                         lambda: tblite.TBLite(method="GFN2-xTB", verbosity=0))
    cfg = load_al_config(None, TINY + [f"train={train}", f"test=[{test}]", "oracle=xtb",
                                       "workers=1"])
    table = run_active_learning(cfg, tmp_path / "al")
    out = tmp_path / "al"
    counts = [len(read(out / f"data/labelled_{r:02d}.extxyz", index=":")) for r in range(3)]
    assert counts == [12, 15, 18]
    # the labels are GFN2-xTB's: recompute one independently in this process
    new = read(out / "round_00/labelled.extxyz", index=":")
    check = new[0].copy()
    check.calc = tblite.TBLite(method="GFN2-xTB", verbosity=0)
    np.testing.assert_allclose(new[0].get_forces(), check.get_forces(), atol=1e-6)
    np.testing.assert_allclose(new[0].get_potential_energy(), check.get_potential_energy(),
                               atol=1e-6)
    # the selected frames are the most uncertain candidates' (within the diverse pool)
    cands = read(out / "round_00/candidates.extxyz", index=":")
    scores = sorted((float(np.mean(c.arrays["forces_uncertainty"])) for c in cands), reverse=True)
    selected = read(out / "round_00/selected.extxyz", index=":")
    assert max(float(np.mean(s.arrays["forces_uncertainty"])) for s in selected) == pytest.approx(
        scores[0])
    # a model, an evaluation and a learning-curve row per round; round 1+ fine-tuned
    for r in range(3):
        ev = json.loads((out / f"round_{r:02d}/evaluation.json").read_text())
        assert ev["labelled"] == counts[r] and ev["test"]["force_mae"] > 0
    rows = (out / "learning_curve.csv").read_text().strip().splitlines()
    assert len(rows) == 4 and rows[0] == "round,labelled,test_force_mae"
    assert "init_from" in (out / "round_01/model/config.yaml").read_text()
    assert "test_force_mae" in table


class Crash(Exception):
    pass


def test_resume_after_a_crash_between_rounds(emt_data, tmp_path, monkeypatch):
    train, test = emt_data
    cfg = load_al_config(None, TINY + [f"train={train}", f"test=[{test}]", "oracle=emt",
                                       "workers=0"])
    real_label = al._label
    calls = itertools.count()

    def crashing(cfg_, rnd, selected, executor):
        if rnd.index == 1 and next(calls) == 0:
            raise Crash("killed while labelling round 1")
        return real_label(cfg_, rnd, selected, executor)

    monkeypatch.setattr(al, "_label", crashing)
    with pytest.raises(Crash):
        run_active_learning(cfg, tmp_path / "al")
    out = tmp_path / "al"
    model0 = (out / "round_00/model/model.pt").stat().st_mtime_ns
    model1 = (out / "round_01/model/model.pt").stat().st_mtime_ns
    assert not (out / "data/labelled_02.extxyz").exists()
    cands = (out / "round_01/candidates.extxyz").read_text()
    run_active_learning(cfg, out)
    # nothing done twice: earlier models and candidates untouched; the loop finished
    assert (out / "round_00/model/model.pt").stat().st_mtime_ns == model0
    assert (out / "round_01/model/model.pt").stat().st_mtime_ns == model1
    assert (out / "round_01/candidates.extxyz").read_text() == cands
    assert len(read(out / "data/labelled_02.extxyz", index=":")) == 22
    assert (out / "round_02/evaluation.json").exists()
    # a loop recorded before `pool` and `md.start` existed resumes (they take their defaults)
    recorded = out / "active_learning.yaml"
    text = recorded.read_text()
    assert "pool: null" in text and "start: seeds" in text
    recorded.write_text(text.replace("pool: null\n", "").replace("  start: seeds\n", ""))
    run_active_learning(cfg, out)
    # a different configuration in the same folder is refused
    other = load_al_config(None, TINY + [f"train={train}", "oracle=emt", "per_round=4"])
    with pytest.raises(ConfigError, match="different configuration"):
        run_active_learning(other, out)


def test_a_training_that_died_before_its_first_checkpoint_starts_again(emt_data, tmp_path):
    train, _ = emt_data
    cfg = load_al_config(None, TINY + [f"train={train}", "oracle=emt", "rounds=0"])
    dead = tmp_path / "al/round_00/model"
    dead.mkdir(parents=True)
    (dead / "config.yaml").write_text("data: {}\n")  # written before the crash, no checkpoint
    run_active_learning(cfg, tmp_path / "al")
    assert (dead / "model.pt").exists() and (dead / "checkpoints/last.ckpt").exists()


def test_an_ensemble_is_fine_tuned_member_by_member(emt_data, tmp_path):
    train, _ = emt_data
    cfg = load_al_config(None, TINY + [f"train={train}", "oracle=emt", "rounds=1",
                                       "training.ensemble.size=2", "training.model.head=none",
                                       "training.head={}"])
    run_active_learning(cfg, tmp_path / "al")
    from e2ip import load_model

    first = load_model(tmp_path / "al/round_00/model/model.pt")
    second = load_model(tmp_path / "al/round_01/model/model.pt")
    assert second.label().startswith("Ensemble x2")
    # member k of round 1 starts from member k of round 0 (fine-tuning keeps the scales)
    for k in range(2):
        assert second.members[k].force_scale == first.members[k].force_scale
    selected = read(tmp_path / "al/round_00/selected.extxyz", index=":")
    assert all(s.arrays["forces_uncertainty"].max() > 0 for s in selected)  # the member spread


def test_random_selection_and_a_user_executor(emt_data, tmp_path):
    train, _ = emt_data
    cfg = load_al_config(None, TINY + [f"train={train}", "oracle=emt", "rounds=1",
                                       "selection=random"])
    with ThreadPoolExecutor(2) as pool:
        run_active_learning(cfg, tmp_path / "al", executor=pool)
    assert len(read(tmp_path / "al/data/labelled_01.extxyz", index=":")) == 19


def test_select_diverse_matches_a_brute_force_reference():
    rng = np.random.default_rng(0)
    scores = rng.uniform(size=40)
    desc = rng.normal(size=(40, 5))
    chosen = select_diverse(scores, desc, k=4, pool_factor=3)
    pool = list(np.argsort(-scores)[:12])
    # reference: start at the best score, then repeatedly the pool member farthest from the chosen
    ref = [pool[0]]
    while len(ref) < 4:
        rest = [p for p in pool if p not in ref]
        ref.append(max(rest, key=lambda p: min(np.linalg.norm(desc[p] - desc[q]) for q in ref)))
    assert chosen == [int(r) for r in ref]
    assert select_diverse(scores[:3], desc[:3], k=5, pool_factor=2) == list(np.argsort(-scores[:3]))
    # identical descriptors: still k different frames
    same = select_diverse(scores, np.zeros((40, 5)), k=4, pool_factor=3)
    assert len(set(same)) == 4


def test_oracle_failures_are_reported_not_raised():
    atoms = ethanol_frames(1)[0]
    atoms.positions[1] = atoms.positions[0]  # two atoms on top of each other
    result = label(("tests.unit.dynamics.oracle_helpers:broken", {}, atoms))
    assert isinstance(result, str) and "RuntimeError" in result
    energy, forces = label(("emt", {}, ethanol_frames(1)[0]))
    assert forces.shape == (9, 3) and np.isfinite(energy)


@pytest.mark.parametrize("override, message", [
    (["oracle=nonsense"], "unknown oracle"),
    (["oracle=no_such_module:f"], "cannot import"),
    (["selection=best"], "selection"),
    (["per_round=0"], "per_round"),
    (["md.steps=0"], "md.steps"),
    (["md.tempreature=10"], "did you mean 'temperature'"),
    (["training.model.backbone=nope"], "model.backbone"),
    (["train=/no/such/file.xyz"], "not found"),
    (["oracle=json:loads", "oracle_options={bad: 1}"], "cannot be built"),
    (["md.temperature=0"], "md.temperature"),
    (["md.max_uncertainty=autox"], "md.max_uncertainty"),
    (["md.max_uncertainty=-1"], "md.max_uncertainty"),
])
def test_config_errors_are_one_line(emt_data, override, message):
    train, _ = emt_data
    with pytest.raises(ConfigError, match=message):
        load_al_config(None, [f"train={train}", "oracle=emt", *override])


def test_cli_active_learn_errors(tmp_path, capsys):
    code = main(["active-learn", "--oracle", "emt", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "'train' is required" in err and len(err.strip().splitlines()) == 1


def test_make_oracle_builds_calculators():
    assert isinstance(make_oracle("emt"), EMT)


def test_cli_active_learn_from_a_yaml_file(emt_data, tmp_path, capsys):
    import yaml

    train, test = emt_data
    config = {"train": str(train), "test": [str(test)], "oracle": "emt", "rounds": 0,
              "md": {"steps": 10}, "training": {
                  "model": {"cutoff": 4.0, "painn": {"num_features": 8, "num_layers": 1}},
                  "head": {"hidden": 8}, "training": {"max_epochs": 2, "num_threads": 1}}}
    (tmp_path / "al.yaml").write_text(yaml.safe_dump(config))
    code = main(["active-learn", str(tmp_path / "al.yaml"), "--out", str(tmp_path / "al")])
    assert code == 0 and "test_force_mae" in capsys.readouterr().out
    assert (tmp_path / "al/learning_curve.csv").read_text().startswith("round,labelled,")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    code = main(["active-learn", str(tmp_path / "bad.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "not valid YAML" in err and len(err.strip().splitlines()) == 1


def test_config_rejects_an_unknown_md_start(emt_data):
    train, _ = emt_data
    with pytest.raises(ConfigError, match="md.start"):
        load_al_config(None, [f"train={train}", "oracle=emt", "md.start=nowhere"])


@pytest.mark.parametrize("start, later_from", [
    ("seeds", "data/labelled_00.extxyz"),        # the seed structures (= train) every round
    ("labelled", "data/labelled_{r:02d}.extxyz"),  # everything labelled before round r
    ("frontier", "round_{p:02d}/labelled.extxyz"),  # only the frames round r - 1 added
])
def test_md_start_chooses_where_trajectories_begin(emt_data, tmp_path, monkeypatch, start,
                                                   later_from):
    train, _ = emt_data
    cfg = load_al_config(None, TINY + [f"train={train}", "oracle=emt", "workers=0",
                                       f"md.start={start}", "rounds=3"])
    real_sample = al._sample
    starts = {}

    def recording(cfg_, rnd, model_path, seeds):
        starts[rnd.index] = np.stack([s.positions for s in seeds])
        return real_sample(cfg_, rnd, model_path, seeds)

    monkeypatch.setattr(al, "_sample", recording)
    run_active_learning(cfg, tmp_path / "al")
    out = tmp_path / "al"
    initial = np.stack([a.positions for a in read(train, index=":")])
    np.testing.assert_allclose(starts[0], initial)  # round 0 always starts from the seeds
    for r in (1, 2):
        path = out / later_from.format(r=r, p=r - 1)
        expected = np.stack([a.positions for a in read(path, index=":")])
        assert starts[r].shape == expected.shape
        np.testing.assert_allclose(starts[r], expected)


def copper_frames(n: int, seed: int, strain: float = 0.0):
    """Rattled (and optionally strained) periodic fcc copper, 16 atoms."""
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        a = bulk("Cu", "fcc", a=3.6 * (1 + strain), cubic=True).repeat((2, 2, 1))
        a.positions += rng.normal(scale=0.08, size=a.positions.shape)
        frames.append(a)
    return frames


def test_pool_mode_ranks_a_periodic_pool_and_never_selects_a_frame_twice(tmp_path):
    train = labelled_file(tmp_path / "train.extxyz", copper_frames(12, 0), EMT)
    pool = copper_frames(4, 1) + copper_frames(4, 2, strain=0.06)  # 4 alike, 4 strained
    write(tmp_path / "pool.extxyz", pool)
    cfg = load_al_config(None, TINY + [f"train={train}", f"pool={tmp_path / 'pool.extxyz'}",
                                       "oracle=emt", "workers=0", "pool_factor=1",
                                       "training.model.cutoff=3.0"])
    run_active_learning(cfg, tmp_path / "al")
    out = tmp_path / "al"
    first = read(out / "round_00/selected.extxyz", index=":")
    second_candidates = read(out / "round_01/candidates.extxyz", index=":")
    picked = [int(a.info["pool_index"]) for a in first]
    assert len(read(out / "round_00/candidates.extxyz", index=":")) == 8
    assert sorted(int(a.info["pool_index"]) for a in second_candidates) == sorted(
        set(range(8)) - set(picked))
    assert all(a.pbc.all() for a in second_candidates)
    # pool_factor 1: the three most uncertain pool frames, which are the strained ones
    scores = {int(a.info["pool_index"]): float(np.mean(a.arrays["forces_uncertainty"]))
              for a in read(out / "round_00/candidates.extxyz", index=":")}
    assert sorted(picked) == sorted(sorted(scores, key=scores.get)[-3:])
    assert set(picked) <= set(range(4, 8))
    # the labels are EMT's on the pool frames' own positions and cells
    labelled = read(out / "round_00/labelled.extxyz", index=":")
    for atoms, index in zip(labelled, picked):
        reference = pool[index].copy()
        reference.calc = EMT()
        np.testing.assert_allclose(atoms.positions, pool[index].positions, atol=1e-7)  # extxyz
        np.testing.assert_allclose(atoms.cell.array, pool[index].cell.array, atol=1e-7)
        np.testing.assert_allclose(atoms.get_forces(), reference.get_forces(), atol=1e-5)
    assert len(read(out / "data/labelled_02.extxyz", index=":")) == 18
    # a third round finds the pool used up: one clear error
    more = load_al_config(None, TINY + [f"train={train}", f"pool={tmp_path / 'pool.extxyz'}",
                                        "oracle=emt", "workers=0", "rounds=3", "per_round=4",
                                        "training.model.cutoff=3.0"])
    with pytest.raises(ConfigError, match="every pool frame is already selected"):
        run_active_learning(more, tmp_path / "al_used_up")


def test_cli_pool_flag_reaches_the_config(emt_data, tmp_path, capsys):
    train, _ = emt_data
    code = main(["active-learn", "--train", str(train), "--pool", str(tmp_path / "none.xyz"),
                 "--oracle", "emt", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "'pool': file not found" in err and len(err.strip().splitlines()) == 1
