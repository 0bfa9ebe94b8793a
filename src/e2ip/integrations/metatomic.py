"""Export a model to metatomic: one TorchScript file that LAMMPS (``pair_style metatomic``), ASE
(``metatomic-ase``), i-PI and other engines load, with per-atom force covariances.

    e2ip export MODEL --format metatomic --out model-mta.pt
    e2ip.integrations.metatomic.to_metatomic(model).save("model-mta.pt")

Outputs (eV, Å; the calibration form and scales are baked in):

=============================  ============  =================================================
name                           per           values
=============================  ============  =================================================
``energy``                     system, atom  eV; forces and stress by the engine's autograd
``e2ip::forces_uncertainty``   atom          (N, 1) sqrt(tr U_epi / 3), eV/Å (what
                                             `e2ip md --max-uncertainty` watches)
``e2ip::forces_covariance``    atom          (N, 3, 3) predictive covariance, (eV/Å)^2
``e2ip::forces_covariance_6``  atom          (N, 6) xx, yy, zz, xy, xz, yz of the same (a LAMMPS
                                             compute takes one component axis)
``e2ip::forces_epistemic``     atom          (N, 3, 3) epistemic covariance, (eV/Å)^2
=============================  ============  =================================================

The engine's full, strict neighbour list is used as is (no second neighbour search), and
``selected_atoms`` (domain decomposition) limits the per-atom outputs and the energy to the
selected atoms while every atom still acts as a neighbour.

Single models and ensembles (plain and heteroskedastic; ``energy_uncertainty``: the spread of
the members' atomic energies) export with every built-in backbone and head (the tensor-product
backbone through e3nn's own compiler, :meth:`~e2ip.backbones.base.Backbone.for_torchscript`); a
model that does not compile is refused with one line.
Needs the optional ``metatomic-torch`` package (``pip install e2ip[metatomic]``).
"""

import math

import torch
from torch import nn

from e2ip.errors import ModelError, first_line
from e2ip.integrations.scripted import ScriptedEnsemble, ScriptedPotential
from e2ip.models.ensemble import Ensemble
from e2ip.models.potential import Potential
from e2ip.models.single import PotentialModel

#: per-atom outputs beside the energy: name -> (description, unit)
UNCERTAINTY_OUTPUTS = {
    "e2ip::forces_uncertainty": ("sqrt(tr U_epi / 3), the scalar force uncertainty", "eV/Angstrom"),
    "e2ip::forces_covariance": ("predictive covariance of the force, (N, 3, 3)",
                                "(eV/Angstrom)^2"),
    "e2ip::forces_covariance_6": ("predictive covariance as xx, yy, zz, xy, xz, yz",
                                  "(eV/Angstrom)^2"),
    "e2ip::forces_epistemic": ("epistemic covariance of the force, (N, 3, 3)",
                               "(eV/Angstrom)^2"),
}


def _check_exportable(model: Potential) -> None:
    if not isinstance(model, (PotentialModel, Ensemble)):
        raise ModelError(f"{model.label()}: this model kind does not export to metatomic")


def _scriptable(core: nn.Module, label: str) -> None:
    """A one-line ModelError when `core` does not compile with TorchScript (a backbone or head
    registered from outside e2ip, say), instead of TorchScript's many-line report."""
    try:
        torch.jit.script(core)
    except Exception as exc:  # noqa: BLE001 - TorchScript's errors come in several types
        raise ModelError(f"{label}: does not compile with TorchScript, so it cannot be "
                         f"exported ({first_line(exc, 160)})") from None


def to_metatomic(model: Potential, form: str | None = None, name: str = "e2ip model"):
    """`model` wrapped as a metatomic ``AtomisticModel`` (save it with ``.save(path)``).

    form: the uncertainty form baked in ('raw' or 'cal'; None: 'cal' when calibrated). The
    exported model runs in the model's dtype, on CPU and CUDA."""
    from metatomic.torch import AtomisticModel, ModelCapabilities, ModelMetadata, ModelOutput

    _check_exportable(model)
    form = model.resolve_form(form) if model.has_uncertainty else "raw"
    model = model.eval()
    core = (ScriptedEnsemble(model, form) if isinstance(model, Ensemble)
            else ScriptedPotential(model, form))
    _scriptable(core, model.label())
    from e2ip.integrations.metatomic_interface import MetatomicPotential

    interface = MetatomicPotential(core, model.cutoff)
    outputs = {"energy": ModelOutput(unit="eV", sample_kind="system",
                                     description="potential energy")}
    if model.has_uncertainty:
        for key, (text, unit) in UNCERTAINTY_OUTPUTS.items():
            outputs[key] = ModelOutput(unit=unit, sample_kind="atom",
                                       description=f"{text} ({form} form)")
    if isinstance(model, Ensemble):
        outputs["energy_uncertainty"] = ModelOutput(
            unit="eV", sample_kind="atom",
            description="spread (std) of the members' energies, per atom or per system")
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    capabilities = ModelCapabilities(
        outputs=outputs, atomic_types=list(model.elements),
        interaction_range=_interaction_range(model), length_unit="angstrom",
        supported_devices=["cuda", "cpu"] if torch.cuda.is_available() else ["cpu", "cuda"],
        dtype=dtype)
    metadata = ModelMetadata(name=name, description=f"{model.label()} exported by e2ip "
                             f"(uncertainty form {form!r})")
    return AtomisticModel(interface.eval(), metadata, capabilities)


def _interaction_range(model: Potential) -> float:
    """How far an atom's energy feels other atoms: the cutoff times the message-passing depth."""
    single = model.fine_tuning_members()[0]
    layers = getattr(single.backbone.hparams, "num_layers", None)
    return float(model.cutoff) * (int(layers) + 1 if layers else math.inf)
