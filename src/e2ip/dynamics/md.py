"""Molecular dynamics that watches its own uncertainty (ASE integrators + :class:`E2IPCalculator`).

Every step the calculator's per-atom ``forces_uncertainty`` (sqrt(tr U_epi / 3), eV/Å) is
compared with ``max_uncertainty``: when the largest atom passes it the run stops
(``on_exceed='stop'``) or saves the frame for labelling and goes on (``on_exceed='save'``).
Written to ``out``: ``md.csv`` (a row per ``log_interval`` steps), ``trajectory.extxyz`` (every
``traj_interval`` steps, with per-atom ``forces_uncertainty`` and ``forces_std`` arrays and the
model's ``e2ip_energy``/``e2ip_forces``, so OVITO can colour atoms by uncertainty and the frames are
never mistaken for reference labels), ``exceeded.extxyz`` (the frames that passed the threshold)
and ``summary.json``.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.io import write

from e2ip.data.read import read_structures
from e2ip.errors import ConfigError
from e2ip.files import atomic_write_text
from e2ip.integrations.ase_calculator import E2IPCalculator
from e2ip.models.bias import UncertaintyBias

ENSEMBLES = ("nve", "langevin", "nvt", "npt")
ON_EXCEED = ("stop", "save")


@dataclass
class MDResult:
    """What a run did. stop_reason: 'completed', 'uncertainty' (threshold passed with
    on_exceed='stop') or 'non-finite' (energy or forces not finite)."""

    steps: int
    stop_reason: str
    exceeded: int
    first_exceeded_step: int | None
    max_uncertainty: float
    steps_per_second: float
    out: str | None = None
    frames: list[Atoms] = field(default_factory=list, repr=False)
    #: the threshold the run used (eV/Å; None: none)
    threshold: float | None = None


def read_start_structure(path: str, index: str = "-1") -> Atoms:
    """The one frame MD starts from (read and checked as any data file; energy and forces not
    needed), with the file's momenta when it has them."""
    from ase.io import read

    structures = read_structures(path, index=index, require_energy=False, require_forces=False)
    if len(structures) != 1:
        raise ConfigError(f"--index {index!r} selects {len(structures)} frames of {path}; MD "
                          "starts from one")
    atoms = structures[0].to_atoms()
    try:
        source = read(path, index=index)
        if source.has("momenta"):
            atoms.set_momenta(source.get_momenta())
    except Exception:  # noqa: BLE001 - momenta are optional; the structure itself was read above
        pass
    return atoms


def bias_from_options(strength: float | None, width: float | None,
                      form: str | None = None) -> UncertaintyBias | None:
    """The uncertainty bias of `e2ip md --bias-strength A --bias-width B` (None when neither is
    given; width defaults to 0.05 eV/Å, strength to 0), or a one-line ConfigError."""
    if strength is None and width is None:
        return None
    try:
        return UncertaintyBias(strength if strength is not None else 0.0,
                               width if width is not None else 0.05, form=form)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def make_integrator(atoms: Atoms, ensemble: str, timestep_fs: float, temperature_K: float,
                    friction_per_fs: float = 0.01, pressure_GPa: float = 0.0, seed: int = 0):
    """An ASE integrator: nve VelocityVerlet; langevin Langevin (friction in 1/fs); nvt
    Nose-Hoover chain (damping 100 time steps); npt isotropic MTK barostat + Nose-Hoover chain
    (pressure in GPa, periodic cells only)."""
    dt = timestep_fs * units.fs
    rng = np.random.default_rng(seed)
    if ensemble == "nve":
        from ase.md.verlet import VelocityVerlet

        return VelocityVerlet(atoms, dt)
    if ensemble == "langevin":
        from ase.md.langevin import Langevin

        return Langevin(atoms, dt, temperature_K=temperature_K, friction=friction_per_fs / units.fs,
                        fixcm=False, rng=rng)
    if ensemble == "nvt":
        from ase.md.nose_hoover_chain import NoseHooverChainNVT

        return NoseHooverChainNVT(atoms, dt, temperature_K=temperature_K, tdamp=100 * dt)
    if ensemble == "npt":
        if not np.all(atoms.pbc):
            raise ConfigError("ensemble npt needs a periodic cell")
        from ase.md.nose_hoover_chain import IsotropicMTKNPT

        return IsotropicMTKNPT(atoms, dt, temperature_K=temperature_K,
                               pressure_au=pressure_GPa * units.GPa, tdamp=100 * dt,
                               pdamp=1000 * dt)
    raise ConfigError(f"unknown MD ensemble {ensemble!r}; choose from {', '.join(ENSEMBLES)}")


def prediction_frame(atoms: Atoms, results: dict, step: int, time_fs: float) -> Atoms:
    """A copy of `atoms` with the model's predictions under e2ip_* keys and the uncertainties."""
    frame = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    frame.info.update({"step": step, "time_fs": round(time_fs, 6),
                       "e2ip_energy": results["energy"]})
    frame.arrays["e2ip_forces"] = results["forces"].copy()
    for key in ("forces_uncertainty", "forces_std"):
        if key in results:
            frame.arrays[key] = results[key].copy()
    if "forces_uncertainty" in results:
        frame.info["max_forces_uncertainty"] = float(results["forces_uncertainty"].max())
    return frame


def resolve_threshold(max_uncertainty: float | str | None, calc: E2IPCalculator) -> float | None:
    """A threshold in eV/Å from a number, None, or "auto" (the model's stored stop_threshold,
    which holds for the form "cal" only)."""
    if max_uncertainty != "auto":
        return None if max_uncertainty is None else float(max_uncertainty)
    threshold = calc.model.stop_threshold
    if threshold is None:
        raise ConfigError(f"max_uncertainty 'auto': {calc.model.label()} stores no threshold "
                          "(written before e2ip 0.3, or never calibrated: `e2ip calibrate`)")
    if calc.form != "cal":
        raise ConfigError("max_uncertainty 'auto': the stored threshold is for the form 'cal', "
                          f"the calculator reports {calc.form!r}")
    return threshold


def run_md(atoms: Atoms, model, *, steps: int = 1000, temperature_K: float = 300.0,
           timestep_fs: float = 0.5, ensemble: str = "langevin", friction_per_fs: float = 0.01,
           pressure_GPa: float = 0.0, max_uncertainty: float | str | None = None,
           on_exceed: str = "stop", bias: UncertaintyBias | None = None,
           out: str | Path | None = None, log_interval: int = 1, traj_interval: int = 10,
           save_interval: int = 10, seed: int = 0, device: str = "cpu", skin: float = 1.0,
           keep_frames: bool = False, progress: bool = True,
           check_from_step: int = 0) -> MDResult:
    """Run MD from `atoms` (a copy is used) with a model (file, run folder, Potential or an
    E2IPCalculator). Velocities are drawn at `temperature_K` unless `atoms` has momenta.
    save_interval: with on_exceed='save', at least this many steps between saved frames.
    keep_frames: also return the trajectory frames in memory (`MDResult.frames`).
    max_uncertainty: eV/Å, or "auto": the model's stored `stop_threshold` (form "cal").
    check_from_step: the first step compared with the threshold (1: not the start structure,
    e.g. an already labelled one in active learning)."""
    if on_exceed not in ON_EXCEED:
        raise ConfigError(f"on_exceed must be one of {', '.join(ON_EXCEED)}, got {on_exceed!r}")
    if steps < 0 or log_interval < 1 or traj_interval < 1 or save_interval < 1:
        raise ConfigError("steps must be >= 0 and intervals >= 1")
    if timestep_fs <= 0 or (ensemble != "nve" and temperature_K <= 0) or friction_per_fs < 0:
        raise ConfigError("the timestep must be > 0, the temperature > 0 (except for nve) and "
                          "the friction >= 0")
    atoms = atoms.copy()
    if isinstance(model, E2IPCalculator):
        if bias is not None:
            raise ConfigError("pass the bias to the E2IPCalculator (or pass a model, not a "
                              "calculator)")
        calc = model
    else:
        calc = E2IPCalculator(model, device=device, skin=skin, bias=bias)
    bias = calc.bias
    if max_uncertainty is not None and not calc.model.has_epistemic:
        raise ConfigError(f"--max-uncertainty needs a model with epistemic uncertainty; "
                          f"{calc.model.label()} has none")
    max_uncertainty = resolve_threshold(max_uncertainty, calc)
    atoms.calc = calc
    if not atoms.get_momenta().any() and temperature_K > 0:
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K,
                                     rng=np.random.default_rng(seed))
        Stationary(atoms)
    dyn = make_integrator(atoms, ensemble, timestep_fs, temperature_K, friction_per_fs,
                          pressure_GPa, seed)
    out_dir = Path(out) if out is not None else None
    writer = _Outputs(out_dir, bias is not None) if out_dir is not None else None
    frames: list[Atoms] = []
    exceeded, first_exceeded, last_saved = 0, None, -save_interval
    max_seen, stop_reason = 0.0, "completed"
    bar = _progress(steps, progress)
    t0 = time.perf_counter()
    try:
        for _ in dyn.irun(steps):  # yields at step 0 (the start) and after every step
            step = dyn.nsteps
            results = calc.results
            energy = results["energy"]
            if not math.isfinite(energy) or not np.isfinite(results["forces"]).all():
                stop_reason = "non-finite"
                break
            unc = results.get("forces_uncertainty")
            top = float(unc.max()) if unc is not None else float("nan")
            max_seen = max(max_seen, top) if unc is not None else max_seen
            time_fs = step * timestep_fs
            if writer and step % log_interval == 0:
                writer.log(step, time_fs, atoms, results, top)
            frame = None
            if step % traj_interval == 0 and (writer or keep_frames):
                frame = prediction_frame(atoms, results, step, time_fs)
                if writer:
                    writer.trajectory(frame)
                if keep_frames:
                    frames.append(frame)
            over = (max_uncertainty is not None and top > max_uncertainty
                    and step >= check_from_step)
            if over:
                if keep_frames and frame is None:  # the frame that passed is always kept
                    frame = prediction_frame(atoms, results, step, time_fs)
                    frames.append(frame)
                exceeded += 1
                first_exceeded = step if first_exceeded is None else first_exceeded
                if writer and (on_exceed == "stop" or step - last_saved >= save_interval):
                    writer.exceeded(frame or prediction_frame(atoms, results, step, time_fs))
                    last_saved = step
                if on_exceed == "stop":
                    stop_reason = "uncertainty"
                    break
            if bar is not None and step:
                bar.update(1)
                bar.set_postfix_str(f"max σ_epi {top:.3f} eV/Å", refresh=False)
    finally:
        if bar is not None:
            bar.close()
        if writer:
            writer.close()
    done = dyn.nsteps
    elapsed = time.perf_counter() - t0
    result = MDResult(steps=done, stop_reason=stop_reason, exceeded=exceeded,
                      first_exceeded_step=first_exceeded, max_uncertainty=max_seen,
                      steps_per_second=done / elapsed if elapsed > 0 else float("nan"),
                      out=str(out_dir) if out_dir else None, frames=frames,
                      threshold=max_uncertainty)
    if out_dir is not None:
        summary = {k: v for k, v in asdict(result).items() if k != "frames"}
        summary.update({"ensemble": ensemble, "temperature_K": temperature_K,
                        "timestep_fs": timestep_fs, "max_uncertainty_threshold": max_uncertainty,
                        "on_exceed": on_exceed, "bias": None if bias is None else asdict(bias)})
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    return result


def _progress(steps: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, unit="step", desc="MD", leave=False)


class _Outputs:
    """md.csv, trajectory.extxyz and exceeded.extxyz in `out_dir` (flushed as they grow)."""

    COLUMNS = ["step", "time_fs", "epot_eV", "ekin_eV", "etot_eV", "temperature_K",
               "max_forces_uncertainty", "mean_forces_uncertainty"]

    def __init__(self, out_dir: Path, biased: bool):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self.columns = self.COLUMNS + (["bias_energy_eV"] if biased else [])
        self._csv_file = open(out_dir / "md.csv", "w", newline="")
        self._csv = csv.writer(self._csv_file)
        self._csv.writerow(self.columns)
        for name in ("trajectory.extxyz", "exceeded.extxyz"):
            (out_dir / name).unlink(missing_ok=True)

    def log(self, step: int, time_fs: float, atoms: Atoms, results: dict, top: float) -> None:
        epot, ekin = results["energy"], atoms.get_kinetic_energy()
        unc = results.get("forces_uncertainty")
        mean = float(unc.mean()) if unc is not None else float("nan")
        row = [step, f"{time_fs:.4f}", f"{epot:.8f}", f"{ekin:.8f}", f"{epot + ekin:.8f}",
               f"{atoms.get_temperature():.3f}", f"{top:.6g}", f"{mean:.6g}"]
        if "bias_energy_eV" in self.columns:
            row.append(f"{results.get('bias_energy', 0.0):.8f}")
        self._csv.writerow(row)
        self._csv_file.flush()

    def trajectory(self, frame: Atoms) -> None:
        write(self.out_dir / "trajectory.extxyz", frame, format="extxyz", append=True)

    def exceeded(self, frame: Atoms) -> None:
        write(self.out_dir / "exceeded.extxyz", frame, format="extxyz", append=True)

    def close(self) -> None:
        self._csv_file.close()
