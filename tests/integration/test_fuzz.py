"""Fuzzing (docs/reliability.md, "Fuzzing"): the extended-XYZ and npz readers, the configuration
loader and the model-file loader get random and mutated input from hypothesis. Property: every
call either succeeds with sane objects (structures that pass validate_structure, a configuration
that can be written out, a model that predicts finite energies) or raises one of the project's
own E2IPError subclasses, never another exception type.

CI runs a small derandomized profile (no example database, so every run tries the same cases);
`E2IP_FUZZ_EXAMPLES=<n>` runs n examples per target (a quarter of that for the model-file
targets, which build a model per case) with fresh random cases, for a long run:

    E2IP_FUZZ_EXAMPLES=2000 OMP_NUM_THREADS=1 python -m pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, currently_in_test_context, given, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from e2ip import PotentialModel, load_model
from e2ip.data import Structure, read_structures, validate_structure
from e2ip.errors import E2IPError
from e2ip.models.potential import Potential
from e2ip.train.config.schema import Config
from e2ip.train.config.yaml_io import flat_config, load_config

LONG_RUN = int(os.environ.get("E2IP_FUZZ_EXAMPLES", "0") or 0)


def budget(ci: int, weight: float = 1.0) -> settings:
    """Hypothesis settings for one target: `ci` examples in CI (derandomized), or
    E2IP_FUZZ_EXAMPLES * weight random ones in a long run."""
    common = dict(deadline=None, database=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.filter_too_much, HealthCheck.large_base_example])
    if LONG_RUN:
        return settings(max_examples=max(ci, int(LONG_RUN * weight)), derandomize=False, **common)
    return settings(max_examples=ci, derandomize=True, **common)


def event(text: str) -> None:
    """Record an outcome for `--hypothesis-show-statistics` (no-op outside a fuzz test)."""
    if currently_in_test_context():
        hypothesis_event(text)


def refused(exc: E2IPError, path: Path | None = None) -> None:
    """Check a refusal is one line, and record its kind (message without paths and numbers) for
    `--hypothesis-show-statistics`."""
    text = str(exc)
    assert "\n" not in text, text
    if path is not None:
        text = text.replace(str(path), "FILE")
    event(f"refused ({type(exc).__name__}): " + re.sub(r"[-+.0-9e]{2,}|\d", "#", text)[:60])


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """A strategy that draws from each (weight, strategy) in proportion to its weight (st.one_of
    draws its branches evenly and merges repeated ones)."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(range(len(pool))).flatmap(lambda k: pool[k])


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One folder for the files the fuzzed calls read (overwritten per example)."""
    return tmp_path_factory.mktemp("fuzz")


def read_or_refuse(path: Path, **kwargs) -> list[Structure] | None:
    """read_structures, with the property checked: structures that pass validate_structure,
    or an E2IPError (None); any other exception fails the test."""
    try:
        structures = read_structures(path, **kwargs)
    except E2IPError as exc:
        refused(exc, path)
        return None
    event(f"read {len(structures)} structure(s)")
    assert structures
    for s in structures:
        assert s.numbers.dtype == np.int64 and s.positions.dtype == np.float64
        validate_structure(s, require_energy=kwargs.get("require_energy", True),
                           require_forces=kwargs.get("require_forces", True))
    return structures


# --- (a) extended XYZ --------------------------------------------------------------------------

BASE_XYZ = (
    '3\nProperties=species:S:1:pos:R:3:forces:R:3 energy=-14.25 pbc="F F F"\n'
    "O 0.0 0.0 0.0 0.1 -0.2 0.3\nH 0.96 0.0 0.0 -0.1 0.2 0.0\nH -0.24 0.93 0.0 0.0 0.0 -0.3\n"
    '2\nLattice="6.0 0.0 0.0 0.5 6.5 0.0 0.3 0.2 7.0" Properties=species:S:1:pos:R:3:forces:R:3 '
    'energy=-3.5 pbc="T T T"\nH 1.0 1.0 1.0 0.5 0.0 0.0\nH 1.8 1.0 1.0 -0.5 0.0 0.0\n'
    '1\nProperties=species:S:1:pos:R:3:forces:R:3 energy=-0.5 free_energy=-0.5 pbc="T F F" '
    'Lattice="4.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0 0.0"\nH 0.0 0.0 0.0 0.0 0.0 0.0\n'
)
SPECIAL_TOKENS = ["nan", "NaN", "inf", "-inf", "1e308", "1e400", "-1e400", "-0", "0", "", "abc",
                  '"', "=", "T", "F", "Lattice=", "pbc=", "energy=", "Properties=", "10000000000000",
                  "-3", "H", "Xx", "1.5", "1,5", "0x10", "\t", "\u00e9", "\x00"]
token = st.one_of(st.sampled_from(SPECIAL_TOKENS), st.floats(allow_nan=True).map(repr),
                  st.integers(-10**15, 10**15).map(str), st.text(max_size=8))
number = st.one_of(st.sampled_from(["nan", "inf", "-inf", "1e308", "1e400", "-0", "1e9", "0"]),
                   st.floats(allow_nan=True).map(repr), st.floats(-3, 3).map(repr))
info = st.one_of(
    st.tuples(st.sampled_from(["energy", "free_energy", "pbc", "Lattice", "Properties"]),
              st.one_of(number, st.sampled_from(['"T T T"', '"T F F"', '"F F F"', '"1 2 3"',
                                                 '"0 0 0 0 0 0 0 0 0"', '"9 0 0 0 9 0 0 0 0"',
                                                 '"1e9 0 0 0 1 0 0 0 1"', "species:S:1:pos:R:3",
                                                 "species:S:1:pos:R:3:forces:R:2"]), token)
              ).map("=".join), token)
mutation = weighted(
    (2, st.tuples(st.sampled_from(["drop_line", "dup_line", "replace_line", "swap_lines",
                                   "replace_token", "drop_token", "dup_token", "insert_token",
                                   "count"]), st.integers(0, 40), st.integers(0, 40), token)),
    # structure-preserving: a number of an atom row, or a key=value of a comment line
    (2, st.tuples(st.just("value"), st.integers(0, 40), st.integers(1, 6), number)),
    (1, st.tuples(st.just("info"), st.integers(0, 40), st.integers(0, 6), info)))


def mutate(text: str, mutations) -> str:
    """Apply (kind, a, b, token) mutations to the lines and whitespace-separated tokens."""
    lines = text.split("\n")
    for kind, a, b, tok in mutations:
        k, m = a % len(lines), b % len(lines)
        words = lines[k].split(" ")
        w = b % len(words)
        if kind == "drop_line" and len(lines) > 1:
            del lines[k]
        elif kind == "dup_line":
            lines.insert(k, lines[k])
        elif kind == "replace_line":
            lines[k] = tok
        elif kind == "swap_lines":
            lines[k], lines[m] = lines[m], lines[k]
        elif kind == "replace_token":
            words[w] = tok
        elif kind == "drop_token":
            del words[w]
        elif kind == "dup_token":
            words.insert(w, words[w])
        elif kind == "insert_token":
            words.insert(w, tok)
        elif kind == "count":
            counts = [i for i, line in enumerate(lines) if line.strip().isdigit()]
            if counts:
                lines[counts[a % len(counts)]] = tok
        elif kind == "value":
            rows = [i for i, line in enumerate(lines) if len(line.split(" ")) >= 4]
            if rows:
                k = rows[a % len(rows)]
                words = lines[k].split(" ")
                words[b % len(words)] = tok
                lines[k] = " ".join(words)
        elif kind == "info":
            comments = [i for i, line in enumerate(lines) if "Properties=" in line]
            if comments:
                k = comments[a % len(comments)]
                words = lines[k].split(" ")
                key = tok.split("=")[0]
                kept = [w for w in words if not w.startswith(key + "=")] if key else words
                lines[k] = " ".join(kept + [tok])
        if kind.endswith("token"):
            lines[k] = " ".join(words)
    return "\n".join(lines)


index = weighted((6, st.just(":")), (1, st.integers(-4, 4)),
                 (1, st.sampled_from(["1:", "::2", "-1", "0:2", "::-1", "5:1"])),
                 (1, st.text(alphabet="0123456789:-x ", max_size=6)))


xyz_alphabet = st.sampled_from(list("0123456789 \n\n\n.-e=\"HOCXTFnaifPropertislLtc:RS"))


@budget(ci=100)
@given(data=st.one_of(st.binary(max_size=600), st.text(xyz_alphabet, max_size=400)))
def test_fuzz_xyz_random_bytes(work, data):
    """Random bytes, and random text made of the characters extended XYZ uses."""
    path = work / "random.xyz"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    read_or_refuse(path)


@budget(ci=300)
@given(mutations=st.lists(mutation, min_size=1, max_size=5), idx=index,
       suffix=st.sampled_from(["xyz", "extxyz"]), require=st.booleans())
def test_fuzz_xyz_mutated(work, mutations, idx, suffix, require):
    path = work / f"mutated.{suffix}"
    path.write_text(mutate(BASE_XYZ, mutations), encoding="utf-8", errors="surrogateescape")
    read_or_refuse(path, index=idx, require_energy=require, require_forces=require)


def test_unmutated_base_xyz_reads(work):
    """The mutations start from a file that reads (so they test what they mean to)."""
    path = work / "base.extxyz"
    path.write_text(BASE_XYZ)
    assert [s.n_atoms for s in read_structures(path)] == [3, 2, 1]


# --- (b) npz -------------------------------------------------------------------------------------

DTYPES = st.sampled_from([np.float64, np.float32, np.int64, np.int8, np.uint8, np.bool_,
                          np.complex64, "U3", "S2"])


def any_array(max_dims: int = 4) -> st.SearchStrategy:
    return DTYPES.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=max_dims,
                                                                     min_side=0, max_side=4)))


values = weighted((8, st.floats(-10, 10)), (1, st.floats(allow_nan=True, allow_infinity=True)),
                  (1, st.sampled_from([0.0, 1e308, -1e308, np.nan, np.inf])))
element = weighted((4, st.sampled_from([1, 6, 8])), (1, st.integers(-2, 130)))


@st.composite
def consistent_arrays(draw) -> dict[str, np.ndarray]:
    """Shapes that pass the layout checks, random values (to reach validate_structure)."""
    n = draw(weighted((6, st.integers(1, 4)), (1, st.just(0))))
    f = draw(weighted((6, st.integers(1, 3)), (1, st.just(0))))
    return {"z": draw(hnp.arrays(np.int64, (n,), elements=element)),
            "R": draw(hnp.arrays(np.float64, (f, n, 3), elements=values)),
            "E": draw(hnp.arrays(np.float64, (f,), elements=values)),
            "F": draw(hnp.arrays(np.float64, (f, n, 3), elements=values))}


unit = st.one_of(st.sampled_from(["eV", "kcal/mol", "Ha", "bohr", "Å", "nm"]), st.text(max_size=6),
                 any_array(max_dims=1))
units = weighted((3, st.just({})), (1, st.dictionaries(st.sampled_from(["e_unit", "r_unit"]), unit)))


@budget(ci=150)
@given(layout=st.sampled_from(["rmd17", "sgdml"]), consistent=st.booleans(),
       arrays=st.dictionaries(st.sampled_from(["z", "R", "E", "F"]), any_array(), max_size=4),
       good=consistent_arrays(), units=units, idx=index)
def test_fuzz_npz_arrays(work, layout, consistent, arrays, good, units, idx):
    chosen = good if consistent else arrays
    names = dict(zip("zREF", ("nuclear_charges", "coords", "energies", "forces")))
    if layout == "rmd17":
        chosen = {names[k]: v for k, v in chosen.items()}
    path = work / "arrays.npz"
    np.savez(path, **chosen, **{k: np.asarray(v) for k, v in units.items()})
    read_or_refuse(path, index=idx)


@budget(ci=60)
@given(data=st.binary(max_size=400), flips=st.lists(st.tuples(st.integers(0, 10**6),
                                                                st.integers(1, 255)), max_size=6),
       as_random=st.booleans())
def test_fuzz_npz_bytes(work, data, flips, as_random):
    """Random bytes, and a valid npz file with bytes changed (a damaged zip)."""
    if as_random:
        blob = data
    else:
        buf = io.BytesIO()
        np.savez(buf, z=np.array([8, 1, 1]), R=np.zeros((1, 3, 3)) + [[0, 0, 0], [1, 0, 0], [0, 1, 0]],
                 E=np.zeros(1), F=np.zeros((1, 3, 3)))
        blob = bytearray(buf.getvalue())
        for at, x in flips:
            blob[at % len(blob)] ^= x
        blob = bytes(blob)
    path = work / "bytes.npz"
    path.write_bytes(blob)
    read_or_refuse(path)


# --- (c) configuration ---------------------------------------------------------------------------

SECTIONS = {"data": ["train", "split", "n_train", "seed", "energy_key", "energy_unit", "length_unit",
                     "reference_energies", "batch_size", "report_units", "allow_duplicates"],
            "model": ["backbone", "head", "cutoff", "dtype", "painn", "tensor_product"],
            "training": ["max_epochs", "max_time", "lr", "ema_decay", "devices", "init_from",
                         "patience", "grad_clip"],
            "ensemble": ["size"], "head": ["damping", "reg_weight"]}
scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=10), st.sampled_from(["painn", "e2ip", "float64", "eV", "fit",
                                                          "kcal/mol", ".", "bananas"]))
yaml_value = st.recursive(scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12)
section_name = weighted((6, st.sampled_from(sorted(SECTIONS))), (1, st.text(max_size=8)))


@st.composite
def config_mapping(draw) -> dict:
    raw = {}
    for name in draw(st.lists(section_name, max_size=4)):
        key = weighted((6, st.sampled_from(SECTIONS.get(name, []) + ["x"])),
                       (1, st.text(max_size=6)), (1, st.integers()))
        section = draw(weighted((4, st.dictionaries(key, yaml_value, max_size=4)),
                                (1, yaml_value)))
        raw[name] = section
    return raw


def load_or_refuse(path, overrides) -> Config | None:
    """load_config, with the property checked: a Config that can be flattened and written out,
    or an E2IPError (None)."""
    try:
        cfg = load_config(path, overrides)
    except E2IPError as exc:
        refused(exc, path)
        return None
    event("loaded")
    assert isinstance(cfg, Config)
    yaml.safe_dump(cfg.to_dict())
    flat_config(cfg)
    return cfg


@budget(ci=150)
@given(raw=config_mapping())
def test_fuzz_config_mapping(work, raw):
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    load_or_refuse(path, [])


@budget(ci=80)
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_fuzz_config_text(work, text):
    """Random text and bytes as the config file (YAML syntax, tags, anchors, encodings)."""
    path = work / "text.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
    load_or_refuse(path, [])


real_key = st.sampled_from([f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys])
override_key = weighted((6, real_key),
                        (1, st.text(alphabet="abcdefghijklmnopqrstuvwxyz._", max_size=16)),
                        (1, st.text(max_size=10)))
override_value = weighted(
    (3, st.sampled_from(["1", "0", "-1", "0.5", "5e-3", "true", "null", "painn", "e2ip", "eV",
                         "float64", "[0.8, 0.1, 0.1]", "fit", "zero", "kcal/mol", "100"])),
    (2, yaml_value.map(lambda v: yaml.safe_dump(v).strip().replace("\n", " "))),
    (1, st.text(max_size=12)),
    (1, st.sampled_from(["[", "{a: 1", "&x [*x]", "!!timestamp 2020-13-45", ".nan", ".inf",
                         "[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]"])))


@budget(ci=150)
@given(overrides=st.lists(weighted((6, st.tuples(override_key, override_value).map("=".join)),
                                   (1, st.text(max_size=12))), max_size=3),
       with_file=st.booleans())
def test_fuzz_config_overrides(work, overrides, with_file):
    path = work / "base.yaml"
    path.write_text("data:\n  split: [0.8, 0.1, 0.1]\nmodel:\n  painn:\n    num_features: 8\n")
    load_or_refuse(path if with_file else None, overrides)


# --- (d) model files ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_file(work) -> Path:
    torch.manual_seed(0)
    model = PotentialModel(elements=[1, 8], cutoff=3.0,
                           backbone_options={"num_features": 4, "num_layers": 1, "num_radial": 4})
    model.save(work / "valid.pt")
    return work / "valid.pt"


WATER = Structure(numbers=np.array([8, 1, 1]),
                  positions=np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]]))


def load_or_refuse_model(path: Path) -> Potential | None:
    """load_model, with the property checked: a model that predicts a finite energy for water,
    or an E2IPError (None)."""
    try:
        model = load_model(path)
    except E2IPError as exc:
        refused(exc, path)
        return None
    event("loaded")
    assert isinstance(model, Potential)
    try:
        energy = model.predict(WATER)["energy"]
    except E2IPError as exc:  # e.g. a changed element list that lacks O or H
        refused(exc)
        return model
    assert np.isfinite(energy).all()
    return model


@budget(ci=60, weight=0.25)
@given(edits=st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "delete"]),
                                st.floats(0, 1), st.integers(1, 255)), min_size=1, max_size=4))
def test_fuzz_model_bytes(work, model_file, edits):
    """A valid model file with bytes flipped, inserted or deleted, or truncated."""
    blob = bytearray(model_file.read_bytes())
    for kind, where, x in edits:
        at = int(where * (len(blob) - 1))
        if kind == "flip":
            blob[at] ^= x
        elif kind == "cut":
            del blob[at:]
        elif kind == "insert":
            blob[at:at] = bytes([x]) * (x % 7 + 1)
        elif kind == "delete":
            del blob[at:at + x % 9 + 1]
        if not blob:
            break
    path = work / "mutated.pt"
    path.write_bytes(bytes(blob))
    load_or_refuse_model(path)


def small_tensor() -> st.SearchStrategy:
    return st.sampled_from([np.float32, np.float64, np.int64, np.bool_]).flatmap(
        lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, max_side=5))
    ).map(torch.from_numpy)


# payload values: plain data and tensors; integers stay small (a spec asking for a billion
# features would build a model of that size: see docs/reliability.md)
payload_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True),
              st.text(max_size=8), st.sampled_from(["e2ip-model", "model", "ensemble", "painn",
                                                    "float64", "e2ip", "none"]), small_tensor()),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)


@budget(ci=60, weight=0.25)
@given(changes=st.lists(st.tuples(st.sampled_from([0, 1, 1, 2, 2]), st.integers(0, 10**6),
                                  payload_value, st.sampled_from([False, False, False, True])),
                        min_size=1, max_size=3),
       from_scratch=st.booleans(), scratch=st.dictionaries(st.text(max_size=8), payload_value,
                                                           max_size=5))
def test_fuzz_model_payload(work, model_file, changes, from_scratch, scratch):
    """Payload dictionaries saved by torch.save: a valid one with entries replaced or deleted
    (top level, spec, state_dict), or a random one that claims the e2ip format."""
    if from_scratch:
        payload = {"format": "e2ip-model", "version": 1, **scratch}
    else:
        payload = torch.load(model_file, weights_only=True)
        for where, which, value, delete in changes:
            nodes = [payload] + [payload[k] for k in ("spec", "state_dict")
                                 if isinstance(payload.get(k), dict)]
            node = nodes[where % len(nodes)]
            keys = sorted(node)
            key = keys[which % len(keys)] if keys else "spec"
            if delete:
                node.pop(key, None)
            else:
                node[key] = value
    path = work / "payload.pt"
    torch.save(payload, path)
    load_or_refuse_model(path)


def test_fuzz_targets_start_from_valid_files(work, model_file):
    """The unmutated model file loads (so the mutations test what they mean to)."""
    assert load_or_refuse_model(model_file) is not None
    with zipfile.ZipFile(model_file) as archive:
        assert archive.testzip() is None
