"""The training configuration's schema: one dataclass per section, each key with its default."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataConfig:
    """Where the structures come from, how they are split, their units, and how they are batched."""

    #: Training data file (extxyz, npz, ...); None: the built-in demo set.
    train: str | None = None
    #: Separate validation file; None: cut from `train` by `split`.
    validation: str | None = None
    #: Separate test file; None: cut from `train` by `split`.
    test: str | None = None
    #: Fractions train/validation/test used to cut `train` (shuffled with `seed`).
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    #: Cap on the number of training structures (None: all).
    n_train: int | None = None
    #: Cap on the number of validation structures (None: all).
    n_validation: int | None = None
    #: Cap on the number of test structures (None: all).
    n_test: int | None = None
    #: Seed of the shuffle before the split.
    seed: int = 0
    #: extxyz key of the energies; null: train on forces alone (no energy loss, zero reference
    #: energies, so predicted energies are defined up to a constant).
    energy_key: str | None = "energy"
    #: extxyz key of the forces (required: the uncertainty heads learn from force labels).
    forces_key: str = "forces"
    #: Energy unit in the files: eV, meV, kcal/mol, kJ/mol, Hartree, Rydberg (None: kcal/mol for
    #: npz, eV otherwise).
    energy_unit: str | None = None
    #: Length unit in the files: Å, Bohr, nm (None: Å).
    length_unit: str | None = None
    #: Per-element reference energies: 'fit' (least squares on train), 'zero', or a file of
    #: isolated atoms (one atom per frame, eV).
    reference_energies: str = "fit"
    #: Structures per training step and per process (under DDP the global batch is
    #: batch_size x the number of processes).
    batch_size: int = 8
    #: Structures per batch for validation, calibration and evaluation.
    eval_batch_size: int = 32
    #: Energy unit of the reported metrics: eV, meV, kcal/mol or kJ/mol.
    report_units: str = "eV"
    #: Accept structures that occur twice in one data file (same atoms at the same positions);
    #: false: an error naming both frames, since a copy can land in both train and test.
    allow_duplicates: bool = False
    #: DataLoader worker processes per training process (0: load in the training process).
    num_workers: int = 0


@dataclass
class ModelConfig:
    """The architecture: a backbone and an uncertainty head. Backbone hyperparameters go in a
    sub-section named after the backbone (e.g. `model.painn.num_features`), the head's in the
    top-level `head` section."""

    #: Backbone: painn, tensor_product or alphanet.
    backbone: str = "painn"
    #: Uncertainty head: e2ip, eip, cholesky, mve or none (a plain potential).
    head: str = "e2ip"
    #: Radial cutoff of the neighbour graph (Å).
    cutoff: float = 5.0
    #: Floating-point precision of the model: float32 or float64.
    dtype: str = "float32"
    #: Per-backbone hyperparameter sub-sections (`model.<backbone>.<key>`), listed below.
    backbone_options: dict[str, dict] = field(default_factory=dict)


@dataclass
class TrainingConfig:
    """Optimisation, loss weights, early stopping, checkpointing and the Lightning Trainer
    (multi-GPU and multi-node runs: docs/distributed.md)."""

    #: Maximum number of epochs.
    max_epochs: int = 200
    #: Wall-clock limit of the training (minutes; None: no limit).
    max_time: float | None = None
    #: Learning rate of AdamW.
    lr: float = 1e-3
    #: Weight decay of AdamW.
    weight_decay: float = 0.0
    #: Weight of the per-atom energy MSE (in units of sigma_F^2).
    energy_weight: float = 1.0
    #: Weight of the head's per-atom force loss (NLL + regulariser for uncertainty heads, MSE
    #: otherwise).
    force_weight: float = 1.0
    #: Weight of an extra force MSE for uncertainty heads.
    mse_weight: float = 1.0
    #: Gradient-norm clip (None: no clipping).
    grad_clip: float | None = 10.0
    #: Decay of the weights' exponential moving average used for validation, checkpoints and the
    #: saved model, ramped up as min(ema_decay, (1 + n) / (10 + n)) after n updates (None: off).
    ema_decay: float | None = 0.99
    #: Early stopping: epochs without improvement of the validation loss.
    patience: int = 40
    #: After training, fit the post-hoc calibration on the validation set (variance scale for single
    #: models, coverage-fitted floor for ensembles); metrics are then reported as 'cal' beside raw.
    recalibrate: bool = True
    #: ReduceLROnPlateau on the validation loss: epochs without improvement before the LR drops.
    scheduler_patience: int = 10
    #: ReduceLROnPlateau: factor the learning rate is multiplied by on a plateau.
    scheduler_factor: float = 0.5
    #: ReduceLROnPlateau: lower bound of the learning rate.
    min_lr: float = 1e-5
    #: Seed of the weights and data order (ensemble member k uses seed + k).
    seed: int = 0
    #: Lightning Trainer accelerator, e.g. 'auto', 'cpu', 'gpu'.
    accelerator: str = "auto"
    #: Devices per node: a count, -1 (all), 'auto' or a list of device indices.
    devices: Any = 1
    #: Lightning Trainer strategy, e.g. 'auto' or 'ddp'.
    strategy: str = "auto"
    #: Number of nodes (e.g. devices 4, num_nodes 2: four GPUs on each of two nodes).
    num_nodes: int = 1
    #: torch intra-op threads (None: torch's default).
    num_threads: int | None = None
    #: Show the progress bar.
    progress_bar: bool = True
    #: Write TensorBoard logs into the run folder (needs the tensorboard package).
    tensorboard: bool = False
    #: A trained model file (or run folder) to fine-tune: its weights, architecture, elements,
    #: scales and reference energies are used (the model and head sections are ignored).
    init_from: str | None = None
    #: Steps with a NaN/inf loss or gradient are skipped; after this many in a row the run stops
    #: with an error naming the batch's structures (its last good checkpoint kept for --resume).
    max_bad_steps: int = 10
    #: Run the energy-and-forces path through torch.compile (the first steps pay tens of seconds
    #: of compilation; see docs/performance.md).
    compile: bool = False


@dataclass
class EnsembleConfig:
    """Deep ensembles: members are trained one after another and differ in seed (and data order)."""

    #: Number of ensemble members (1: a single model).
    size: int = 1
    #: Calibration of the ensemble's form 'cal': 'nll' (N(mu, t U_epi + s^2 I), t and s by the
    #: NLL on the validation set; heteroskedastic: t U_epi + s U_ale) or 'paper_floor' (the
    #: paper's t = 1 and s^2 chosen for Coverage@95 = 0.95; plain ensembles only).
    calibration: str = "nll"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: dict[str, Any] = field(default_factory=dict)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        options = out["model"].pop("backbone_options")
        out["model"].update(options)
        return out


SECTIONS = {"data": DataConfig, "model": ModelConfig, "training": TrainingConfig,
             "ensemble": EnsembleConfig}
