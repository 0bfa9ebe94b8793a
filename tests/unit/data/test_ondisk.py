"""On-disk data (issue 10): `e2ip data convert` writes HDF5, training and evaluation read it
lazily, with the same structures, splits, scales and batches as the source file in memory."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from functools import partial

import h5py
import numpy as np
import pytest
import torch

from e2ip.cli import main
from e2ip.data.convert import convert
from e2ip.data.formats.hdf5 import OnDiskStructures
from e2ip.data.graph import GraphDataset, collate
from e2ip.data.read import iter_structures, read_structures
from e2ip.data.structures import DataError
from e2ip.train.config.yaml_io import load_config
from e2ip.train.datasets import demo_data_path, prepare_data
from tests.support import SHARED

WATER = SHARED / "water_cheng2019/water_cheng2019.extxyz"
BOHR = 0.529177210903  # Å (CODATA 2018, as in ../shared/data/README.md)
HARTREE = 27.211386245988  # eV
KCAL_MOL = 0.04336410390059322  # eV

TINY = [
    "data.n_train=24", "data.n_validation=8", "data.batch_size=8",
    "model.cutoff=4.0", "model.painn.num_features=8", "model.painn.num_layers=1",
    "model.painn.num_radial=6", "head.hidden=8", "head.tensor_channels=2",
    "training.progress_bar=false", "training.num_threads=1",
]


def _fields(s):
    return (s.numbers, s.positions, s.cell, s.pbc, s.energy, s.forces, s.source, s.frame)


def assert_same_structures(a, b):
    """Exactly the same arrays, energies and labels (dtype included)."""
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for u, v in zip(_fields(x), _fields(y)):
            if isinstance(u, np.ndarray):
                assert u.dtype == v.dtype and u.shape == v.shape and np.array_equal(u, v), x.where()
            else:
                assert u == v, x.where()


@pytest.fixture(scope="module")
def periodic_xyz(tmp_path_factory):
    """An extxyz in Bohr and Hartree with its own keys: 6 periodic water boxes (192 atoms, 3 of
    them in a skewed cell) and 4 molecules (ethanol, open boundaries), interleaved."""
    from ase.io import write

    if not WATER.exists():
        pytest.skip(f"{WATER} not available")
    path = tmp_path_factory.mktemp("xyz") / "mixed_bohr.xyz"
    frames = []
    molecules = read_structures(demo_data_path(), index=":4")
    for k, s in enumerate(read_structures(WATER, index=":6") + molecules):
        atoms = s.to_atoms()
        if s.pbc.any() and k % 2:
            atoms.set_cell(atoms.cell.array + np.array([[0, 0, 0], [1.5, 0, 0], [0, 0.7, 0]]),
                           scale_atoms=False)
        atoms.positions = atoms.positions / BOHR
        atoms.set_cell(atoms.cell.array / BOHR, scale_atoms=False)
        atoms.info["REF_energy"] = s.energy / HARTREE
        atoms.arrays["REF_forces"] = s.forces / (HARTREE / BOHR)
        frames.append(atoms)
    order = [f for pair in zip(frames[:4], frames[-4:]) for f in pair] + frames[4:-4]
    write(path, order, format="extxyz")
    return path


XYZ_OPTIONS = {"energy_key": "REF_energy", "forces_key": "REF_forces", "energy_unit": "Hartree",
               "length_unit": "Bohr"}


@pytest.fixture(scope="module")
def demo_h5(tmp_path_factory):
    path = tmp_path_factory.mktemp("h5") / "demo.h5"
    convert([demo_data_path()], path)
    return path


# --- round trip -------------------------------------------------------------------------------

def test_round_trip_periodic_extxyz_with_units(periodic_xyz, tmp_path):
    from ase.io import read

    out = tmp_path / "mixed.h5"
    summary = convert([periodic_xyz], out, chunk_frames=3, **XYZ_OPTIONS)
    expected = read_structures(periodic_xyz, **XYZ_OPTIONS)
    assert summary.n_frames == len(expected) and summary.n_atoms == sum(s.n_atoms
                                                                         for s in expected)
    on_disk = read_structures(out)
    assert isinstance(on_disk, OnDiskStructures)
    assert_same_structures(on_disk, expected)
    # the units, against ASE's raw numbers and the CODATA factors (not e2ip's tables)
    raw = read(periodic_xyz, index=":")
    assert any(s.pbc.all() for s in on_disk) and any(not s.pbc.any() for s in on_disk)
    for s, atoms in zip(on_disk, raw):
        np.testing.assert_allclose(s.positions, atoms.positions * BOHR, rtol=1e-15)
        np.testing.assert_allclose(s.cell, atoms.cell.array * BOHR, rtol=1e-15)
        np.testing.assert_allclose(s.forces, atoms.arrays["REF_forces"] * HARTREE / BOHR,
                                   rtol=1e-15)
        assert s.energy == pytest.approx(atoms.info["REF_energy"] * HARTREE, rel=1e-15)
        assert s.source == str(periodic_xyz)
    with h5py.File(out) as f:
        assert f.attrs["format"] == "e2ip-structures" and f.attrs["format_version"] == 1
        assert (f.attrs["energy_unit"], f.attrs["length_unit"]) == ("eV", "Å")
        assert f["atoms/positions"].chunks is not None
        assert f["atoms/positions"].compression == "gzip"
        inputs = json.loads(f.attrs["inputs"])
        assert inputs == [{"path": str(periodic_xyz), "frames": len(expected),
                           "energy_unit": "Hartree", "length_unit": "Bohr"}]


def test_round_trip_npz_in_kcal_per_mol(demo_h5):
    expected = read_structures(demo_data_path())
    assert_same_structures(read_structures(demo_h5), expected)
    with np.load(demo_data_path()) as raw:
        s = read_structures(demo_h5)[7]
        assert s.energy == pytest.approx(raw["energies"][7] * KCAL_MOL, rel=1e-15)
        np.testing.assert_allclose(s.forces, raw["forces"][7] * KCAL_MOL, rtol=1e-15)
        np.testing.assert_array_equal(s.positions, raw["coords"][7])
        np.testing.assert_array_equal(s.numbers, raw["nuclear_charges"])


def test_several_inputs_index_and_streaming(periodic_xyz, tmp_path):
    """Each input gets --index; frames keep their own file and frame number; the streamed
    reader (iter_structures) gives read_structures' structures, negative slices included."""
    for index in ("1::3", "-4:", "::-2", "5"):
        streamed = [s for chunk in iter_structures(periodic_xyz, index=index, chunk_size=2,
                                                   **XYZ_OPTIONS) for s in chunk]
        assert_same_structures(streamed, read_structures(periodic_xyz, index=index,
                                                         **XYZ_OPTIONS))
    out = tmp_path / "two.h5"
    convert([periodic_xyz], out, index="::2", **XYZ_OPTIONS)
    shutil.copy(periodic_xyz, tmp_path / "other.xyz")
    both = tmp_path / "both.h5"
    convert([periodic_xyz, tmp_path / "other.xyz"], both, index="1::4", allow_duplicates=True,
            **XYZ_OPTIONS)
    expected = (read_structures(periodic_xyz, index="1::4", **XYZ_OPTIONS)
                + read_structures(tmp_path / "other.xyz", index="1::4", **XYZ_OPTIONS))
    assert_same_structures(read_structures(both), expected)
    assert [s.frame for s in read_structures(both)] == [1, 5, 9, 1, 5, 9][:len(expected)]
    assert_same_structures(read_structures(out), read_structures(periodic_xyz, index="::2",
                                                                 **XYZ_OPTIONS))


# --- lazy views ---------------------------------------------------------------------------------

def test_lazy_views_slicing_and_pickling(demo_h5):
    full = read_structures(demo_data_path())
    lazy = read_structures(demo_h5)
    assert len(lazy) == len(full) == 400
    assert_same_structures([lazy[-1], lazy[3]], [full[-1], full[3]])
    view = lazy[10:100:7]
    assert isinstance(view, OnDiskStructures) and len(view) == len(full[10:100:7])
    assert_same_structures(view, full[10:100:7])
    picked = view[[4, 0, -1, 4]]
    assert_same_structures(picked, [full[10:100:7][k] for k in (4, 0, -1, 4)])
    assert list(picked.frame_indices) == [38, 10, 94, 38]
    assert_same_structures(view[::-1][2:5], full[10:100:7][::-1][2:5])
    assert len(lazy[400:]) == 0 and not lazy[400:]
    with pytest.raises(IndexError):
        lazy[400]
    with pytest.raises(IndexError):
        lazy[[0, 400]]
    assert_same_structures(read_structures(demo_h5, index="-3:"), full[-3:])
    assert_same_structures(read_structures(demo_h5, index=5), [full[5]])
    blob = pickle.dumps(picked)
    assert len(blob) < 2000  # the path and frame numbers, no data
    assert_same_structures(pickle.loads(blob), picked)
    forces_only = view.without_energies()
    assert all(s.energy is None for s in forces_only) and view[0].energy is not None


def test_summaries_match_the_structures(periodic_xyz, demo_h5, tmp_path):
    """Elements, composition, energies, force RMS and atom counts of any view come from the
    stored summaries and agree with the structures themselves."""
    out = tmp_path / "mixed.h5"
    convert([periodic_xyz, demo_data_path()], out, index=":", **{**XYZ_OPTIONS,
                                                                  "energy_unit": None})
    lazy = read_structures(out)
    view = lazy[[3, 1, 20, 8]]
    structures = list(view)
    elements = [1, 6, 8, 9]  # fluorine never occurs
    counts = np.array([[np.sum(s.numbers == z) for z in elements] for s in structures])
    np.testing.assert_array_equal(view.composition(elements), counts)
    assert view.elements_present() == sorted({int(z) for s in structures for z in s.numbers})
    np.testing.assert_array_equal(view.energies(), [s.energy for s in structures])
    np.testing.assert_array_equal(view.n_atoms(), [s.n_atoms for s in structures])
    forces = np.concatenate([s.forces for s in structures])
    assert view.force_rms() == pytest.approx(np.sqrt(np.mean(forces**2)), rel=1e-13)
    water_only = lazy[[0, 2]]
    assert all(s.pbc.all() for s in water_only)
    assert water_only.elements_present() == [1, 8]
    assert water_only.first_outside({1, 8}) is None
    assert lazy[[0, 2, 1]].first_outside({1, 8}) == 2


# --- training data ----------------------------------------------------------------------------

def _batches(dataset, **kwargs):
    return list(dataset.loader(5, dtype=torch.float64, **kwargs))


def _sorted_edges(g):
    """Edges (i, j, shift) in a canonical order."""
    rows = torch.cat([g.edge_index.T.double(), g.shifts], dim=1).numpy()
    return rows[np.lexsort(rows.T[::-1])]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("numbers", "positions", "cell", "batch", "n_atoms", "energy", "forces"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        np.testing.assert_array_equal(_sorted_edges(x), _sorted_edges(y))
        assert x.frames == y.frames


def test_training_batches_are_the_same_on_disk(periodic_xyz, tmp_path):
    out = tmp_path / "mixed.h5"
    convert([periodic_xyz], out, **XYZ_OPTIONS)
    memory = GraphDataset(read_structures(periodic_xyz, **XYZ_OPTIONS), cutoff=5.0)
    disk = GraphDataset(read_structures(out), cutoff=5.0)
    assert disk.lazy and disk.records is None and not memory.lazy
    assert len(disk) == len(memory)
    for shuffle in (False, True):
        a = _batches(memory, shuffle=shuffle, seed=3)
        b = _batches(disk, shuffle=shuffle, seed=3)
        assert_same_batches(a, b)
        assert sum(int(g.edge_index.shape[1]) for g in b) > 10000  # real periodic edges
    # an independent check of one record: every edge shorter than the cutoff, none missing
    g = disk[0]
    vec = g.positions[g.edge_index[1]] - g.positions[g.edge_index[0]] + g.shifts @ g.cell
    assert np.linalg.norm(vec, axis=1).max() < 5.0


class _WhoOpened(torch.utils.data.Dataset):
    """Reports, per item, the process that reads it and the process that opened its handle."""

    def __init__(self, structures):
        self.structures = structures

    def __len__(self):
        return len(self.structures)

    def __getitem__(self, k):
        self.structures[k]
        store = self.structures._store()
        return os.getpid(), store.pid


def test_loader_with_two_workers(demo_h5):
    """Workers (forked) open the file themselves; the batches are those of the main process.
    A spawned worker gets the dataset pickled (path and frame numbers only)."""
    lazy = read_structures(demo_h5)[:60]
    lazy[0]  # the parent holds an open handle before the workers fork
    parent = lazy._store()
    dataset = GraphDataset(lazy, cutoff=4.0)
    serial = _batches(dataset, shuffle=True, seed=1)
    assert_same_batches(_batches(dataset, shuffle=True, seed=1, num_workers=2), serial)
    seen = list(torch.utils.data.DataLoader(_WhoOpened(lazy), batch_size=None, num_workers=2))
    assert len({pid for pid, _ in seen} - {os.getpid()}) == 2
    assert all(pid == opener != os.getpid() for pid, opener in seen)
    assert lazy._store() is parent and parent.pid == os.getpid()
    spawned = torch.utils.data.DataLoader(
        dataset, batch_size=5, collate_fn=partial(collate, dtype=torch.float64), num_workers=1,
        multiprocessing_context="spawn")
    assert_same_batches(list(spawned), _batches(dataset))


def _cfg(path, *more):
    return load_config(None, [f"data.train={path}", *more]).data


def test_prepare_data_same_as_source(demo_h5):
    for more in ([], ["data.n_train=50", "data.split=[0.5, 0.3, 0.2]", "data.seed=4"]):
        a = prepare_data(_cfg(demo_data_path(), *more))
        b = prepare_data(_cfg(demo_h5, *more))
        assert isinstance(b.train, OnDiskStructures) and isinstance(b.test, OnDiskStructures)
        for part in ("train", "validation", "test"):
            assert ([s.frame for s in getattr(a, part)]
                    == [s.frame for s in getattr(b, part)]), part
        assert_same_structures(b.validation, a.validation)
        assert b.elements == a.elements
        np.testing.assert_array_equal(b.reference_energies, a.reference_energies)
        assert b.force_scale == pytest.approx(a.force_scale, rel=1e-13)
        assert b.energy_scale == pytest.approx(a.energy_scale, rel=1e-13)
    forces_only = prepare_data(_cfg(demo_h5, "data.energy_key=null"))
    assert forces_only.reference_energies == [0.0, 0.0, 0.0]
    assert all(s.energy is None for s in forces_only.train[:5])


def test_prepare_data_element_and_duplicate_checks(demo_h5, periodic_xyz, tmp_path):
    # a validation file with an element the training file lacks: named from the summaries
    water = tmp_path / "water.h5"
    convert([periodic_xyz], water, **XYZ_OPTIONS)
    data = prepare_data(_cfg(water, f"data.validation={demo_h5}"))
    assert data.elements == [1, 6, 8]  # the molecules in the xyz hold carbon
    only_water = tmp_path / "only_water.h5"
    convert([periodic_xyz], only_water, index="8:", **XYZ_OPTIONS)
    with pytest.raises(DataError, match=r"demo\.npz, frame 0: element\(s\) C occur in the "
                                        r"validation set but not in the training set"):
        prepare_data(_cfg(only_water, f"data.validation={demo_h5}"))
    # duplicates: refused at conversion, else checked (streamed) by prepare_data
    twice = tmp_path / "twice.h5"
    with pytest.raises(DataError, match=r"demo\.npz, frame 0: field 'positions' duplicates "
                                        r"frame 0.*--allow-duplicates"):
        convert([demo_data_path(), demo_data_path()], twice, index=":3")
    assert not twice.exists() and not list(tmp_path.glob(".twice*"))
    convert([demo_data_path(), demo_data_path()], twice, index=":30", allow_duplicates=True)
    with pytest.raises(DataError, match="duplicates"):
        prepare_data(_cfg(twice))
    assert len(prepare_data(_cfg(twice, "data.allow_duplicates=true")).train) == 48


# --- bad files ----------------------------------------------------------------------------------

def _one_line_error(path, match):
    with pytest.raises(DataError) as info:
        read_structures(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    assert match in message, message


def test_bad_files_are_one_line_data_errors(demo_h5, tmp_path, capsys):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["positions"] = np.zeros((3, 3))
    _one_line_error(other, "not an e2ip structure file")
    text = tmp_path / "text.h5"
    text.write_text("3\n\nO 0 0 0\n")
    _one_line_error(text, "not a readable HDF5 file")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(demo_h5.read_bytes()[: demo_h5.stat().st_size // 2])
    _one_line_error(truncated, "not a readable HDF5 file")
    for version, advice in ((2, "update e2ip"), (0, "convert the data again")):
        old = tmp_path / f"v{version}.h5"
        shutil.copy(demo_h5, old)
        with h5py.File(old, "a") as f:
            f.attrs["format_version"] = version
        _one_line_error(old, f"format version {version}, this e2ip reads version 1; {advice}")
    broken = tmp_path / "offsets.h5"
    shutil.copy(demo_h5, broken)
    with h5py.File(broken, "a") as f:
        f["frames/offsets"][5] = f["frames/offsets"][7]
    _one_line_error(broken, "field 'frames/offsets' is inconsistent")
    missing = tmp_path / "missing.h5"
    shutil.copy(demo_h5, missing)
    with h5py.File(missing, "a") as f:
        del f["atoms/forces"]
    _one_line_error(missing, "field 'atoms/forces' is missing")
    # a damaged chunk is found when its frame is read: the message names the frame
    damaged = tmp_path / "damaged.h5"
    shutil.copy(demo_h5, damaged)
    with h5py.File(damaged, "r") as f:
        chunk = f["atoms/positions"].id.get_chunk_info(0)
    with open(damaged, "r+b") as fh:
        fh.seek(chunk.byte_offset + 16)
        fh.write(b"\xff" * 64)
    lazy = read_structures(damaged)
    with pytest.raises(DataError, match=r"damaged\.h5, frame 2: cannot be read .*damaged"):
        lazy[2]
    # units other than eV and Å do not apply; energies are required unless asked otherwise
    with pytest.raises(DataError, match=r"demo\.h5: holds energies in eV already .* the energy "
                                        r"unit 'kcal/mol' does not apply"):
        read_structures(demo_h5, energy_unit="kcal/mol")
    read_structures(demo_h5, energy_unit="eV", length_unit="Angstrom")
    forces_only = tmp_path / "forces_only.h5"
    convert([demo_data_path()], forces_only, energy_key="none", index=":5")
    with pytest.raises(DataError, match="has no energies"):
        read_structures(forces_only)
    assert read_structures(forces_only, require_energy=False)[0].energy is None
    # through the CLI: one line on stderr, status 2
    assert main(["data", "info", str(truncated)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("e2ip data: error: ") and "truncated.h5" in err[0]


# --- command line -------------------------------------------------------------------------------

def test_convert_and_info_commands(periodic_xyz, tmp_path, capsys):
    out = tmp_path / "cli.h5"
    args = ["data", "convert", str(periodic_xyz), "--out", str(out), "--energy-key",
            "REF_energy", "--forces-key", "REF_forces", "--energy-unit", "Hartree",
            "--length-unit", "Bohr", "--no-progress"]
    assert main(args) == 0
    n = len(read_structures(periodic_xyz, **XYZ_OPTIONS))
    atoms = sum(s.n_atoms for s in read_structures(periodic_xyz, **XYZ_OPTIONS))
    printed = capsys.readouterr().out
    assert f"{n} frames, {atoms} atoms" in printed and ("MiB" in printed or "KiB" in printed)
    assert main(["data", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert f"frames      {n}" in info and f"atoms {atoms}" in info
    assert "eV, Å, eV/Å" in info and "converted from Hartree, Bohr" in info
    assert str(periodic_xyz) in info
    before = out.read_bytes()
    # an existing output is kept unless --overwrite; a failed conversion leaves it as it was
    assert main(args) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(args[:-1] + ["--overwrite", "--index", "::2"]) == 0
    assert len(read_structures(out)) == (n + 1) // 2
    bad = tmp_path / "bad.xyz"
    bad.write_text(periodic_xyz.read_text().replace("REF_energy=", "energy=", 1))
    assert main(["data", "convert", str(periodic_xyz), str(bad), "--out", str(out),
                 "--overwrite", *args[5:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.xyz, frame 0: no energy under key 'REF_energy'" in err[0]
    assert len(read_structures(out)) == (n + 1) // 2 and out.read_bytes() != before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert main(["data", "convert", str(periodic_xyz), "--out", str(tmp_path / "x.xyz")]) == 2
    assert "must end in .h5" in capsys.readouterr().err


@pytest.mark.slow
def test_train_and_evaluate_on_h5(demo_h5, tmp_path, capsys):
    """`e2ip train --data FILE.h5` trains (lazily read data), `e2ip evaluate --data FILE.h5`
    gives the metrics of the source file."""
    out = tmp_path / "run"
    args = ["train", "--data", str(demo_h5), "--out", str(out), "--max-epochs", "1"]
    for o in TINY + ["training.recalibrate=false"]:
        args += ["--set", o]
    assert main(args) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_structures"] > 0 and np.isfinite(metrics["force_mae"])
    results = []
    for data in (demo_h5, demo_data_path()):
        ev = tmp_path / f"ev_{data.suffix[1:]}"
        assert main(["evaluate", str(out / "model.pt"), "--data", str(data), "--index", "::20",
                     "--out", str(ev)]) == 0
        results.append(json.loads((ev / "metrics.json").read_text()))
    for key in ("n_structures", "force_mae", "energy_mae", "nll", "coverage_95"):
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-12), key
