"""An i-PI driver for e2ip models that passes the force uncertainty to i-PI as "extras".

    i-pi input.xml &
    i-pi-py_driver -u -a ADDRESS -m custom -P "$(python -m e2ip.integrations.ipi_driver)" \\
        -o start.xyz,runs/x/model.pt[,device=cpu,form=cal]

i-PI calls this module's :class:`E2IPDriver` for each structure. It answers with the energy,
forces and virial of :class:`~e2ip.integrations.ase_calculator.E2IPCalculator` (any model kind)
and a JSON "extras" string holding ``forces_uncertainty`` (N,) in eV/Å, ``forces_covariance``
(N, 3, 3) in (eV/Å)^2 and, for ensembles, ``energy_uncertainty`` (eV). i-PI writes them with
``<trajectory filename="unc" extra_type="forces_uncertainty"> extras </trajectory>``
(examples/ipi/input.xml). It needs the optional ``ipi`` package (``pip install ipi``). The
ASE-level alternative, i-PI's own ``-m ase`` driver, gets only energy, forces and stress.
(Not named ``ipi.py``: i-PI registers a custom driver module under its file's stem, which
would hide i-PI's own package.)
"""

import json

import numpy as np
from ase.io import read
from ipi.pes._ase import ASEDriver
from ipi.utils.units import unit_to_internal

from e2ip.integrations.ase_calculator import E2IPCalculator

__DRIVER_NAME__ = "e2ip"
__DRIVER_CLASS__ = "E2IPDriver"

#: the calculator results sent to i-PI as extras (those the model has)
EXTRAS = ("forces_uncertainty", "forces_covariance", "energy_uncertainty")


class E2IPDriver(ASEDriver):
    """i-PI's ASE driver with an :class:`E2IPCalculator` and the uncertainty as extras.

    template: a structure file ASE reads (atom types, periodicity); model: an e2ip model file or
    run folder; device: cpu, cuda, cuda:N; form: 'raw' or 'cal' (default: cal if calibrated)."""

    def __init__(self, template, model, device="cpu", form=None, *args, **kwargs):
        self.model_path, self.device, self.form = model, device, form
        kwargs.setdefault("has_stress", bool(read(template).pbc.all()))  # as E2IPCalculator
        super().__init__(template, *args, **kwargs)

    def check_parameters(self):
        super().check_parameters()
        self.ase_calculator = E2IPCalculator(self.model_path, device=self.device, form=self.form)

    def post_process(self, properties, structure):
        """Energy, forces and virial in i-PI's units, and the extras. Written here rather than
        taken from ASEDriver: i-PI 3.3's version fails without stress (gas-phase molecules)."""
        energy = unit_to_internal("energy", "electronvolt", properties["energy"])
        forces = unit_to_internal("force", "ev/ang", np.asarray(properties["forces"]))
        virial = np.zeros((3, 3))
        if "stress" in self.capabilities:  # ASE's Voigt order xx yy zz yz xz xy
            stress = np.asarray(properties["stress"])[[0, 5, 4, 5, 1, 3, 4, 3, 2]].reshape(3, 3)
            virial = unit_to_internal("energy", "electronvolt",
                                      (-stress * structure.get_volume()).T)
        results = self.ase_calculator.results
        extras = {key: np.asarray(results[key], dtype=float).tolist()
                  for key in EXTRAS if key in results}
        return (np.asarray(energy, np.float64), np.asarray(forces, np.float64),
                np.asarray(virial, np.float64), json.dumps(extras) if extras else "")


if __name__ == "__main__":  # `python -m e2ip.integrations.ipi_driver` prints the path for `-P`
    print(__file__)
