"""i-PI runs MD with an e2ip model through `e2ip.integrations.ipi_driver` (a real i-PI server
and driver talking over a UNIX socket) and writes the force uncertainty, sent as extras, to
its output; the values are the calculator's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms

from e2ip.integrations.ase_calculator import E2IPCalculator
from e2ip.testing.model_suite import MOLECULE, small_model
from tests.support import REPO

pytest.importorskip("ipi")
pytestmark = pytest.mark.skipif(shutil.which("i-pi") is None or shutil.which("i-pi-py_driver")
                                is None, reason="i-PI's command-line programs are not installed")


def test_ipi_md_writes_the_force_uncertainty(tmp_path):
    model = small_model("painn", "e2ip")
    model.fit_training_statistics([MOLECULE])
    model.float().save(tmp_path / "model.pt")
    atoms = Atoms(numbers=MOLECULE.numbers, positions=MOLECULE.positions + 5.0)
    lines = [str(len(atoms)), "# CELL(abcABC): 20.0 20.0 20.0 90.0 90.0 90.0 "
             "positions{angstrom} cell{angstrom}"]
    lines += [f"{s} {x:.10f} {y:.10f} {z:.10f}" for s, (x, y, z) in
              zip(atoms.get_chemical_symbols(), atoms.positions)]
    (tmp_path / "start.xyz").write_text("\n".join(lines) + "\n")
    address = f"e2ip-test-{uuid.uuid4().hex[:8]}"
    xml = (REPO / "examples/ipi/input.xml").read_text()
    xml = xml.replace("<total_steps> 100 </total_steps>", "<total_steps> 4 </total_steps>")
    xml = xml.replace("<address> e2ip </address>", f"<address> {address} </address>")
    (tmp_path / "input.xml").write_text(xml)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(["i-pi", "input.xml"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        socket = Path(f"/tmp/ipi_{address}")
        deadline = time.monotonic() + 60
        while not socket.exists() and time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.2)
        assert socket.exists(), server.communicate(timeout=10)[0][-2000:]
        driver_path = subprocess.run(
            [sys.executable, "-m", "e2ip.integrations.ipi_driver"], capture_output=True,
            text=True, check=True).stdout.strip()
        driver = subprocess.run(
            ["i-pi-py_driver", "-u", "-a", address, "-m", "custom", "-P", driver_path,
             "-o", "start.xyz,model.pt"], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=300)
        output = server.communicate(timeout=120)[0]
    finally:
        if server.poll() is None:
            server.kill()
        Path(f"/tmp/ipi_{address}").unlink(missing_ok=True)
    assert server.returncode == 0, output[-2000:]
    assert driver.returncode == 0, driver.stderr[-2000:]
    values = []
    output_file = next(tmp_path.glob("md.unc*"))  # i-PI adds the bead index: md.unc_0
    for line in output_file.read_text().splitlines():
        if line.strip() and not line.strip().startswith("#"):
            values.append([float(x) for x in line.split()])
    assert len(values) >= 4  # one row per step, from step 0
    atoms.calc = E2IPCalculator(tmp_path / "model.pt")
    expected = atoms.calc.get_property("forces_uncertainty", atoms)
    np.testing.assert_allclose(np.ravel(values[0]), expected, rtol=1e-5)
    assert np.isfinite(np.array(values)).all()


def test_the_driver_serves_slabs_without_stress(tmp_path):
    """A template periodic in two directions only: the calculator gives no stress there, so the
    driver answers with a zero virial instead of failing."""
    from ase.io import write
    from ipi.utils.units import unit_to_internal

    from e2ip.integrations.ipi_driver import E2IPDriver

    model = small_model("painn", "e2ip")
    model.save(tmp_path / "model.pt")
    slab = Atoms(numbers=MOLECULE.numbers, positions=MOLECULE.positions + 2.0,
                 cell=[8.0, 8.0, 30.0], pbc=[True, True, False])
    write(tmp_path / "slab.xyz", slab)
    driver = E2IPDriver(str(tmp_path / "slab.xyz"), str(tmp_path / "model.pt"))
    assert "stress" not in driver.capabilities
    energy, forces, virial, extras = driver.compute_structure(
        unit_to_internal("length", "angstrom", slab.cell[:].T),
        unit_to_internal("length", "angstrom", slab.positions))
    assert np.isfinite(energy) and forces.shape == (len(slab), 3)
    assert not virial.any() and "forces_uncertainty" in extras
