"""Bad and unusual input (docs/reliability.md, "Bad input"): every bad data file, configuration or
model file gives one line naming the file, frame and field and exit status 2, with nothing
written; unusual but valid input (an isolated atom, a huge periodic cell, periodicity along one
axis, duplicate frames in `e2ip evaluate`) is evaluated correctly."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms

from e2ip import PotentialModel, load_model
from e2ip.cli import main
from e2ip.data import DataError, Structure, read_structures, validate_structure
from e2ip.data.neighbors import neighbor_list
from e2ip.data.validate import check_duplicates
from e2ip.train.config.schema import DataConfig
from tests.support import REPO, brute_force_neighbor_list

SMALL = {"num_features": 8, "num_layers": 1, "num_radial": 6}
WATER = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
SYMBOLS = {1: "H", 6: "C", 8: "O"}


def frame(positions=WATER, numbers=(8, 1, 1), *, energy="-1.0", forces=None, cell=None,
          pbc="F F F", force_columns: int = 3) -> str:
    """One extended-XYZ frame; values are written as given (strings pass through)."""
    forces = np.ones((len(numbers), force_columns)) if forces is None else forces
    head = f'Properties=species:S:1:pos:R:3:forces:R:{force_columns} energy={energy} pbc="{pbc}"'
    if cell is not None:
        head = 'Lattice="' + " ".join(str(x) for x in np.ravel(cell)) + '" ' + head
    rows = [" ".join([SYMBOLS[z], *map(str, r), *map(str, f)])
            for z, r, f in zip(numbers, np.asarray(positions, dtype=object),
                               np.asarray(forces, dtype=object))]
    return "\n".join([str(len(numbers)), head, *rows]) + "\n"


def write_frames(path: Path, *frames: str) -> str:
    """Write a good first frame followed by `frames` (so the bad one is frame 1)."""
    path.write_text(frame() + "".join(frames))
    return str(path)


def water_npz(path: Path, n: int = 2, **fields) -> str:
    data = dict(z=np.array([8, 1, 1]), R=np.stack([WATER] * n) + 0.01 * np.arange(n)[:, None, None],
                E=np.full(n, -1.0), F=np.zeros((n, 3, 3)))
    data.update(fields)
    np.savez(path, **data)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    torch.manual_seed(0)
    PotentialModel(elements=[1, 6, 8], cutoff=4.0, backbone_options=SMALL).save(root / "m.pt")
    (root / "folder").mkdir()
    return root


def _run(capsys, args):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err.strip()


def _check_refused(capsys, args, message, *, names=()):
    code, err = _run(capsys, args)
    assert code == 2, (args, err)
    assert message in err, (args, err)
    for part in names:
        assert part in err, (part, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, (args, err)


# --- bad data files: through `e2ip evaluate` and `e2ip train` ------------------------------------

def _bad_data(root: Path) -> list[tuple[str, str]]:
    """(data file, expected message) pairs; the bad frame is frame 1 where the file has frames."""
    inf_r = WATER.astype(object).copy()
    inf_r[2, 1] = "inf"
    inf_f = np.ones((3, 3), dtype=object)
    inf_f[0, 2] = "-inf"
    r_inf = np.stack([WATER, WATER])
    r_inf[1, 0, 0] = np.inf
    f_inf = np.zeros((2, 3, 3))
    f_inf[1, 2, 1] = np.inf
    w = root
    return [
        # mismatched shapes
        (write_frames(w / "width.xyz", frame(force_columns=2)),
         "width.xyz, frame 1: field 'forces' has shape (3, 2), expected (3, 3)"),
        (write_frames(w / "count.xyz", frame().replace("3\n", "1000000000000\n", 1)),
         "count.xyz, frame 1: line 6 announces 1000000000000 atoms, but the file ends"),
        (write_frames(w / "count_low.xyz", frame().replace("3\n", "2\n", 1)),
         "count_low.xyz, frame 2: line 10 should give the number of atoms"),
        (write_frames(w / "short_row.xyz", frame().rstrip().rsplit(" ", 1)[0] + "\n"),
         "short_row.xyz, frame 1: could not be read by ASE"),
        (water_npz(w / "f_shape.npz", F=np.zeros((2, 3, 2))),
         "f_shape.npz: field 'F' has shape (2, 3, 2), expected (2, 3, 3)"),
        (water_npz(w / "f_frames.npz", F=np.zeros((3, 3, 3))),
         "f_frames.npz: field 'F' has shape (3, 3, 3), expected (2, 3, 3)"),
        (water_npz(w / "e_len.npz", E=np.zeros(3)), "e_len.npz: field 'E' has 3 values for 2 frames"),
        (water_npz(w / "z_len.npz", z=np.array([8, 1])),
         "z_len.npz: field 'R' has shape (2, 3, 3), expected (frames, 2, 3)"),
        # NaN / inf anywhere
        (write_frames(w / "inf_pos.xyz", frame(positions=inf_r)),
         "inf_pos.xyz, frame 1: field 'positions' contains NaN or inf"),
        (write_frames(w / "inf_energy.xyz", frame(energy="inf")),
         "inf_energy.xyz, frame 1: field 'energy' is NaN or inf"),
        (write_frames(w / "inf_forces.xyz", frame(forces=inf_f)),
         "inf_forces.xyz, frame 1: field 'forces' contains NaN or inf"),
        (write_frames(w / "inf_cell.xyz", frame(cell=[8, 0, 0, 0, "inf", 0, 0, 0, 8], pbc="T T T")),
         "inf_cell.xyz, frame 1: field 'cell' contains NaN or inf"),
        (write_frames(w / "nan_cell.xyz", frame(cell=[8, 0, 0, 0, "nan", 0, 0, 0, 8])),
         "nan_cell.xyz, frame 1: field 'cell' contains NaN or inf"),
        (water_npz(w / "inf_r.npz", R=r_inf), "inf_r.npz, frame 1: field 'positions' contains NaN"),
        (water_npz(w / "inf_e.npz", E=np.array([-1.0, -np.inf])),
         "inf_e.npz, frame 1: field 'energy' is NaN or inf"),
        (water_npz(w / "inf_f.npz", F=f_inf), "inf_f.npz, frame 1: field 'forces' contains NaN"),
        (write_frames(w / "far.xyz", frame(positions=WATER + 1e9)),
         "far.xyz, frame 1: field 'positions' has values up to 1e+09 Å"),
        # values that are not numbers
        (write_frames(w / "word_energy.xyz", frame(energy="abc")),
         "word_energy.xyz, frame 1: field 'energy' must be one number, got 'abc'"),
        (write_frames(w / "array_energy.xyz", frame(energy='"1 2 3"')),
         "array_energy.xyz, frame 1: field 'energy' must be one number"),
        (water_npz(w / "z_text.npz", z=np.array(["O", "H", "H"])),
         "z_text.npz: field 'z' holds <U1 values, expected numbers"),
        (water_npz(w / "z_object.npz", z=np.array([8, 1, 1], dtype=object)),
         "z_object.npz: field 'z' cannot be read"),
        (water_npz(w / "z_big.npz", z=np.array([8, 1, 300])),
         "z_big.npz: field 'z' has unknown element(s) [300]"),
        # singular, zero-volume and too thin periodic cells
        (write_frames(w / "zero_row.xyz", frame(cell=[8, 0, 0, 0, 0, 0, 0, 0, 8], pbc="T T T")),
         "zero_row.xyz, frame 1: field 'cell' is singular but pbc=[True, True, True]"),
        (write_frames(w / "zero_cell.xyz", frame(cell=np.zeros(9), pbc="T F F")),
         "zero_cell.xyz, frame 1: field 'cell' is singular but pbc=[True, False, False]"),
        (write_frames(w / "flat_cell.xyz", frame(cell=[8, 0, 0, 0, 8, 0, 8, 8, 0], pbc="T T T")),
         "flat_cell.xyz, frame 1: field 'cell' is singular but pbc=[True, True, True]"),
        (write_frames(w / "thin_cell.xyz",
                      frame(cell=[8, 0, 0, 0, 8, 0, 0, 0, 1e-3], pbc="T T T")),
         "thin_cell.xyz, frame 1: field 'cell' is only 0.001 Å wide along periodic axis 2"),
        (write_frames(w / "self_image.xyz", frame(cell=np.diag([0.05, 8, 8]), pbc="T T T")),
         "self_image.xyz, frame 1: field 'cell' is only 0.05 Å wide along periodic axis 0: every "
         "atom is closer than 0.1 Å to its own periodic image"),
        # unit entries of an npz file
        (water_npz(w / "e_unit.npz", e_unit=np.array("bananas")),
         "e_unit.npz: field 'e_unit': unknown energy unit 'bananas'"),
        (water_npz(w / "r_unit.npz", r_unit=np.array("furlong")),
         "r_unit.npz: field 'r_unit': unknown length unit 'furlong'"),
        (water_npz(w / "r_unit_num.npz", r_unit=np.array(3.0)),
         "r_unit_num.npz: field 'r_unit' holds float64 values"),
        # text that is not UTF-8 (a Latin-1 byte in the last line of frame 1)
        (_latin1(w / "latin1.xyz"), "latin1.xyz, frame 1: line 10 is not UTF-8 text"),
    ]


def _latin1(path: Path) -> str:
    text = (frame() + frame()).encode()
    at = text.rindex(b"\nH ") + 2
    path.write_bytes(text[:at] + b"\xe9" + text[at:])
    return str(path)


def test_bad_data_files_are_one_line_through_evaluate_and_train(files, capsys):
    cases = _bad_data(files)
    model = str(files / "m.pt")
    for k, (path, message) in enumerate(cases):
        out = files / f"eval_{k}"
        _check_refused(capsys, ["evaluate", model, "--data", path, "--out", str(out)], message,
                       names=(path,))
        assert not out.exists()
    # training reads the same files the same way (a few, each an own kind of failure)
    some = ("width.xyz", "count.xyz", "f_shape.npz", "inf_cell.xyz", "zero_row.xyz", "e_unit.npz")
    for path, message in [c for c in cases if Path(c[0]).name in some]:
        out = files / "train_out"
        _check_refused(capsys, ["train", "--out", str(out), "--max-epochs", "1", "--set",
                                f"data.train={path}"], message, names=(path,))
        assert not out.exists()


def test_frame_selection_errors(files, capsys):
    model, npz = str(files / "m.pt"), water_npz(files / "ok.npz")
    for index, message in (("foo", "index 'foo': expected a frame number or a slice"),
                           ("1:2:3:4", "index '1:2:3:4'"),
                           ("7", "ok.npz: frame 7 asked for (index), but the file has 2 frames"),
                           ("::0", "the step of a slice cannot be 0")):
        _check_refused(capsys, ["evaluate", model, "--data", npz, "--index", index], message)


# --- bad configuration ----------------------------------------------------------------------------

def test_bad_configuration_is_one_line(files, capsys):
    root = files
    (root / "latin1.yaml").write_bytes(b"data:\n  train: caf\xe9.xyz\n")
    (root / "int_key.yaml").write_text("1: 2\n")
    (root / "list_data.yaml").write_text("data: [1, 2]\n")
    (root / "date.yaml").write_text("data:\n  train: 2020-13-45\n")
    (root / "recursive.yaml").write_text("training:\n  devices: &x [*x]\n")
    out = root / "cfg_out"
    base = ["train", "--out", str(out)]
    for args, message in (
        ([str(root / "latin1.yaml")], "latin1.yaml: not a UTF-8 text file (byte 18: b'\\xe9')"),
        ([str(root / "folder")], "folder: is a directory, expected a YAML config file"),
        ([str(root / "int_key.yaml")], "unknown key '1'"),
        ([str(root / "list_data.yaml"), "--set", "data.train=x"],
         "override 'data.train=x': 'data' is a list ([1, 2]), not a section of keys"),
        ([str(root / "date.yaml")], "date.yaml: not valid YAML (month must be in 1..12)"),
        ([str(root / "recursive.yaml")], "'training.devices' refers to itself"),
        (["--set", "model.cutoff=.nan"], "'model.cutoff' must be finite, got nan"),
        (["--set", "data.split=[0.5, .inf, 0]"], "'data.split' must be finite"),
        (["--set", "data..train=x"], "has an empty part"),
        (["--set", "data.energy_unit=bananas"],
         "'data.energy_unit': unknown energy unit 'bananas'"),
        (["--set", "data.length_unit=furlong"], "'data.length_unit': unknown length unit"),
        (["--set", f"data.reference_energies={root / 'folder'}"],
         "'data.reference_energies': " + str(root / "folder") + " is a directory, expected a file"),
        (["--set", f"data.train={root / 'folder'}"], "'data.train': " + str(root / "folder")
         + " is a directory"),
    ):
        _check_refused(capsys, base + args, message)
        assert not out.exists()
    # the same unit mistakes on the command line name the flag
    _check_refused(capsys, ["evaluate", str(root / "m.pt"), "--data", water_npz(root / "u.npz"),
                            "--energy-unit", "bananas"], "argument --energy-unit: unknown energy unit")


# --- bad model files ------------------------------------------------------------------------------

def _bad_models(root: Path) -> list[tuple[str, str]]:
    good = (root / "m.pt").read_bytes()
    flipped = bytearray(good)
    with zipfile.ZipFile(root / "m.pt") as archive:  # inside the largest tensor's stored bytes
        largest = max(archive.infolist(), key=lambda item: item.file_size)
    middle = good.index(largest.filename.encode(), largest.header_offset) + largest.file_size // 2
    flipped[middle:middle + 16] = bytes(b ^ 0x5A for b in flipped[middle:middle + 16])
    (root / "flipped.pt").write_bytes(bytes(flipped))
    with zipfile.ZipFile(root / "m.pt") as zin, zipfile.ZipFile(root / "garbage.pt", "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8))
            zout.writestr(item, data)
    payload = torch.load(root / "m.pt", weights_only=True)
    first = next(iter(payload["state_dict"]))

    def variant(name, change):
        p = copy.deepcopy(payload)
        change(p)
        torch.save(p, root / f"{name}.pt")
        return str(root / f"{name}.pt")

    (root / "run").mkdir(exist_ok=True)
    (root / "run" / "model.pt").mkdir(exist_ok=True)
    return [
        (str(root / "flipped.pt"), "flipped.pt: corrupted e2ip model file (checksum mismatch in"),
        (str(root / "garbage.pt"), "garbage.pt: not a readable e2ip model file (corrupted"),
        (variant("spec_list", lambda p: p.update(spec=[1, 2])),
         "spec_list.pt: inconsistent e2ip model file ('spec' must be a dictionary, got list)"),
        (variant("missing", lambda p: p["state_dict"].pop(first)),
         f'missing.pt: inconsistent e2ip model file (Error(s) in loading state_dict for '
         f'PotentialModel: Missing key(s) in state_dict: "{first}"'),
        (variant("shape", lambda p: p["state_dict"].update({first: torch.zeros(7, 7)})),
         f"shape.pt: inconsistent e2ip model file (Error(s) in loading state_dict for "
         f"PotentialModel: size mismatch for {first}"),
        (variant("not_tensor", lambda p: p["state_dict"].update({first: 3})),
         "not_tensor.pt: inconsistent e2ip model file ('state_dict' must map names to tensors)"),
        (variant("kind_list", lambda p: p.update(kind=[1])), "kind_list.pt: unknown model kind [1]"),
        (variant("elements", lambda p: p["spec"].update(elements=[1, 6, 200])),
         "elements.pt: inconsistent e2ip model file (index 200 is out of bounds"),
        (variant("dtype", lambda p: p.update(dtype="int64")),
         "dtype.pt: inconsistent e2ip model file ('dtype' must be float32 or float64"),
        (variant("version", lambda p: p.update(version="2")),
         "version.pt: not a valid e2ip model file (format version '2')"),
        (str(root / "run"), "run: is a directory without a model.pt, expected a model file or a run"),
    ]


def test_bad_model_files_are_one_line(files, capsys):
    data = water_npz(files / "for_models.npz")
    for path, message in _bad_models(files):
        out = files / "model_out"
        _check_refused(capsys, ["evaluate", path, "--data", data, "--out", str(out)], message)
        assert not out.exists()


# --- valid but unusual input ----------------------------------------------------------------------

def test_isolated_atom_is_evaluated(files, capsys):
    """An atom with no neighbour inside the cutoff: finite energy, exactly zero force, finite
    covariances (here a positive-definite one), through the API and the CLI."""
    model = load_model(files / "m.pt")
    positions = np.vstack([WATER, [[20.0, 0.0, 0.0]]])
    out = model.predict(Atoms(numbers=[8, 1, 1, 1], positions=positions))
    assert np.isfinite(out["energy"]).all()
    assert np.all(out["forces"][3] == 0.0) and np.abs(out["forces"][:3]).sum() > 0
    for key in ("aleatoric", "epistemic", "predictive"):
        assert np.isfinite(out[key]).all(), key
    assert np.linalg.eigvalsh(out["predictive"][3]).min() > 0
    single = model.predict(Atoms("H", positions=[[0.0, 0.0, 0.0]]))
    assert np.isfinite(single["energy"]).all() and np.all(single["forces"] == 0.0)
    path = files / "isolated.xyz"
    path.write_text(frame(positions=positions, numbers=(8, 1, 1, 1)))
    code, err = _run(capsys, ["evaluate", str(files / "m.pt"), "--data", str(path)])
    assert code == 0, err


def test_huge_periodic_cell_is_fast_and_equals_the_molecule(files):
    """3 atoms in a 1e5 Å periodic cube: no image within the cutoff, so the same energy and
    forces as without periodicity, in well under a second."""
    model = load_model(files / "m.pt")
    molecule = Atoms(numbers=[8, 1, 1], positions=WATER + 5.0)
    periodic = Atoms(numbers=[8, 1, 1], positions=WATER + 5.0, cell=np.eye(3) * 1e5, pbc=True)
    start = time.perf_counter()
    got = model.predict(periodic)
    assert time.perf_counter() - start < 5.0
    ref = model.predict(molecule)
    np.testing.assert_allclose(got["energy"], ref["energy"], rtol=1e-6)
    np.testing.assert_allclose(got["forces"], ref["forces"], atol=1e-6)


def as_set(i, j, shifts) -> set[tuple[int, ...]]:
    return {(int(a), int(b), *map(int, s)) for a, b, s in zip(i, j, shifts)}


@pytest.mark.parametrize("zero_open_rows", [False, True])
def test_periodic_along_one_axis(files, zero_open_rows):
    """pbc=[True, False, False]: the neighbour list equals the brute-force one (also when the
    open axes' cell rows are zero, as ASE allows), and the model evaluates it."""
    rng = np.random.default_rng(3)
    cell = np.array([[3.1, 0.0, 0.0], [0.4, 6.0, 0.0], [0.3, -0.2, 5.5]])
    if zero_open_rows:
        cell[1:] = 0.0
    positions = rng.uniform(0, 1, (6, 3)) * [3.1, 6.0, 5.5]
    pbc = [True, False, False]
    got = as_set(*neighbor_list(positions, cell, pbc, 4.0))
    assert got == set(brute_force_neighbor_list(positions, cell, pbc, 4.0, max_shift=3))
    assert all(s[3] == s[4] == 0 for s in got) and any(s[2] != 0 for s in got)
    chain = Structure(numbers=np.array([8, 1, 1]), positions=WATER + 1.0, cell=cell,
                      pbc=np.array(pbc), energy=-1.0, forces=np.zeros((3, 3)))
    validate_structure(chain)
    out = load_model(files / "m.pt").predict(chain)
    assert np.isfinite(out["energy"]).all() and np.isfinite(out["predictive"]).all()


def test_extreme_geometries_are_exact_or_refused_without_crashing():
    """vesin 0.6 dies of SIGFPE on very long or flat boxes and on singular or non-finite
    periodic cells, and is quadratic in the open extent with one periodic axis. Long and flat
    boxes go to the k-d tree (same pairs as the brute force, fast); singular, non-finite and
    absurdly thin cells raise DataError in neighbor_list itself (the calculator has no
    validate_structure). Run in a subprocess: a regression kills that process, not pytest."""
    script = textwrap.dedent("""
        import time
        import numpy as np
        from e2ip.data.neighbors import neighbor_list
        from e2ip.errors import DataError
        from tests.support import REPO, brute_force_neighbor_list
        water = np.array([[0.0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
        exact = [
            (np.vstack([water, [[0, 1e6, 0]]]), np.zeros((3, 3)), False),   # was SIGFPE
            (water, np.diag([3.0, 3.0, 1e6]), True),                         # was SIGFPE
            (water, np.diag([2000.0, 2000.0, 3.0]), True),                   # was SIGFPE
            (np.vstack([water, [[0, 5e4, 0]]]), np.diag([3.0, 0, 0]), [True, False, False]),  # 21 s
            (water, np.eye(3) * 1e5, True),
        ]
        start = time.perf_counter()
        for positions, cell, pbc in exact:
            i, j, s = neighbor_list(positions, cell, pbc, 5.0)
            got = {(int(a), int(b), *map(int, x)) for a, b, x in zip(i, j, s)}
            ref = set(brute_force_neighbor_list(positions, cell, pbc, 5.0, max_shift=2))
            assert got == ref, (cell, len(got), len(ref))
        assert time.perf_counter() - start < 10
        refused = [(np.diag([3.0, 0, 0]), [True, False, True]),              # was SIGFPE
                   (np.array([[3.0, 0, 0], [6.0, 0, 0], [0, 0, 5]]), True),  # was SIGFPE
                   (np.diag([8.0, np.inf, 8.0]), True),                      # was SIGFPE
                   (np.diag([3.0, 3.0, 1e-9]), True)]
        for cell, pbc in refused:
            try:
                neighbor_list(water, cell, pbc, 5.0)
            except DataError as exc:
                assert "neighbour list: the" in str(exc), exc
            else:
                raise AssertionError(cell)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_duplicate_frames(files, capsys):
    """check_duplicates names both frames (for prepare_data, unless data.allow_duplicates);
    `e2ip evaluate` accepts duplicates."""
    path = files / "dups.xyz"
    other = WATER + 0.01
    path.write_text(frame() + frame(positions=other) + frame(positions=other + 0.01)
                    + frame(positions=other, energy="-2.0"))
    structures = read_structures(path)
    with pytest.raises(DataError, match=r"dups\.xyz, frame 3: field 'positions' duplicates "
                                        r"frame 1 \(same atoms at the same positions\)"):
        check_duplicates(structures)
    check_duplicates(structures[:3])
    # rounding: -0.0 and 1e-12 Å differences are the same position; 1e-6 Å is not
    first = Structure(numbers=np.array([8, 1, 1]), positions=WATER, source="m.xyz", frame=0)
    copy_ = Structure(numbers=first.numbers, positions=np.where(WATER == 0, -0.0, WATER + 1e-12),
                      source="m.xyz", frame=1)
    with pytest.raises(DataError, match="frame 1: field 'positions' duplicates frame 0"):
        check_duplicates([first, copy_])
    copy_.positions = WATER + 1e-6
    check_duplicates([first, copy_])
    # across files the message names the other file
    a = Structure(numbers=np.array([8, 1, 1]), positions=WATER, source="a.xyz", frame=4)
    b = Structure(numbers=np.array([8, 1, 1]), positions=WATER.copy(), source="b.xyz", frame=0)
    with pytest.raises(DataError, match=r"b\.xyz, frame 0: .* duplicates a\.xyz, frame 4"):
        check_duplicates([a, b])
    # the same positions in another periodic cell are another structure
    c = Structure(numbers=b.numbers, positions=WATER, cell=np.eye(3) * 9.0,
                  pbc=np.ones(3, dtype=bool), source="c.xyz")
    check_duplicates([a, c])
    assert DataConfig().allow_duplicates is False
    code, err = _run(capsys, ["evaluate", str(files / "m.pt"), "--data", str(path)])
    assert code == 0, err
