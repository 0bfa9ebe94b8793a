"""Training one potential with Lightning: checkpoints, CSV log, weight average, early stopping."""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, TQDMProgressBar

from e2ip.data.graph import GraphDataset
from e2ip.errors import ConfigError, first_line
from e2ip.models.ensemble import Ensemble
from e2ip.models.io import load_model
from e2ip.models.single import PotentialModel
from e2ip.models.state import portable_state_dict
from e2ip.train.callbacks import EpochCSVLogger, WarmupEMA
from e2ip.train.config.schema import Config, TrainingConfig
from e2ip.train.datasets import PreparedData, prepare_data
from e2ip.train.module import PotentialModule
from e2ip.train.ranks import is_global_zero


class AtomicModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose files are written to a temporary name and renamed into place, so a
    crash never leaves a truncated checkpoint behind.

    Every rank calls `trainer.save_checkpoint` (it gathers the state and ends in a barrier), but
    only global rank 0 writes the file, so only rank 0 has a temporary file to rename."""

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        tmp = f"{filepath}.tmp"
        trainer.save_checkpoint(tmp, self.save_weights_only)
        if trainer.is_global_zero:
            os.replace(tmp, filepath)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath


def model_spec(cfg: Config, data: PreparedData, member: int = 0,
               base: PotentialModel | None = None) -> dict[str, Any]:
    """The PotentialModel keyword arguments for this run. With `base` (fine-tuning) the
    architecture, elements, scales and reference energies are the base model's."""
    metadata = {"units": {"energy": "eV", "length": "Å", "forces": "eV/Å"},
                "report_units": cfg.data.report_units,
                "train_data": str(cfg.data.train or "demo"), "seed": cfg.training.seed + member,
                "n_train": len(data.train)}
    if base is not None:
        spec = base.spec()
        metadata["init_from"] = str(cfg.training.init_from)
        return {**spec, "metadata": metadata}
    return {
        "elements": data.elements,
        "cutoff": cfg.model.cutoff,
        "backbone": cfg.model.backbone,
        "backbone_options": cfg.model.backbone_options.get(cfg.model.backbone, {}),
        "head": cfg.model.head,
        "head_options": cfg.head,
        "reference_energies": data.reference_energies,
        "energy_scale": data.energy_scale,
        "force_scale": data.force_scale,
        "metadata": metadata,
    }


def load_base_members(cfg: Config) -> list[PotentialModel] | None:
    """The single models that fine-tuning starts from (`training.init_from`: one model, or each
    member of an ensemble, fine-tuned member by member: `ensemble.size` must match), or None."""
    if not cfg.training.init_from:
        return None
    path = cfg.training.init_from
    base = load_model(path).train()
    members = base.fine_tuning_members()
    if members is None:
        raise ConfigError(f"'training.init_from': {path} holds a {base.label()}, which cannot be "
                          "fine-tuned")
    if isinstance(base, Ensemble) and (cfg.ensemble.size < 2 or len(members) != cfg.ensemble.size):
        raise ConfigError(f"'training.init_from': {path} is an ensemble of {len(members)}; set "
                          f"ensemble.size: {len(members)} to fine-tune it member by member")
    return members


def train_model(cfg: Config, out_dir: str | Path, *, data: PreparedData | None = None,
                resume: bool = False, member: int = 0,
                extra_callbacks: list[Callback] | None = None,
                base: PotentialModel | None = None) -> PotentialModel:
    """Train one model into `out_dir` (checkpoints/, metrics.csv); return the best model (its
    weight average when `training.ema_decay` is set). `base`: start from its weights.

    Under DDP every process calls this; only global rank 0 writes (checkpoints, metrics.csv) and
    returns the best model; the other ranks return their final weights, which are not saved."""
    out_dir = Path(out_dir)
    t = cfg.training
    ckpt_dir = out_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if resume and not last.exists():
        raise ConfigError(f"--resume: no checkpoint to resume from at {last}")
    if not resume and last.exists():
        raise ConfigError(f"{out_dir} already holds a run; use --resume to continue it or "
                          f"choose another --out")
    rank_zero = is_global_zero()
    if rank_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob("*.tmp") if resume and rank_zero else ():
        stale.unlink()  # a checkpoint write torn by a crash; the real file is the previous one
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    L.seed_everything(t.seed + member, workers=True, verbose=False)
    data = data or prepare_data(cfg.data, base)
    dtype = getattr(torch, cfg.model.dtype)
    initial_state = None
    if base is not None:
        initial_state = {**base.state_dict(), "variance_scale": torch.ones((), dtype=torch.float64),
                         "epistemic_scale": torch.ones((), dtype=torch.float64)}
        if "head.feature_distance.fitted" in initial_state:  # refitted after fine-tuning
            initial_state["head.feature_distance.fitted"] = torch.zeros((), dtype=torch.bool)
    module = PotentialModule(model_spec(cfg, data, member, base), dataclasses.asdict(t),
                             cfg.model.dtype, initial_state=initial_state)
    train_set = GraphDataset(data.train, module.model.cutoff)
    val_set = GraphDataset(data.validation, module.model.cutoff)
    # under DDP Lightning replaces the samplers by DistributedSamplers (shuffled with the seed
    # set above for training): each rank then sees its own share of every epoch
    workers = cfg.data.num_workers
    train_loader = train_set.loader(cfg.data.batch_size, shuffle=True, dtype=dtype,
                                    seed=t.seed + member, num_workers=workers)
    val_loader = val_set.loader(cfg.data.eval_batch_size, dtype=dtype, num_workers=workers)
    best = AtomicModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_loss",
                                 mode="min", save_last=False, save_top_k=1,
                                 enable_version_counter=False, save_on_train_epoch_end=True)
    last_cb = AtomicModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1,
                                    every_n_epochs=1, enable_version_counter=False,
                                    save_on_train_epoch_end=True)
    callbacks: list[Callback] = [best, last_cb, EpochCSVLogger(out_dir / "metrics.csv"),
                                 EarlyStopping(monitor="val_loss", patience=t.patience, mode="min")]
    if t.ema_decay:
        callbacks.insert(0, WarmupEMA(t.ema_decay))
    if t.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    callbacks += extra_callbacks or []
    loggers: list = []
    if t.tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("'training.tensorboard' needs the tensorboard package "
                              "(pip install tensorboard)") from None
        loggers.append(TensorBoardLogger(out_dir, name="tensorboard", version=""))
    trainer = make_trainer(
        t, max_epochs=t.max_epochs,
        max_time={"minutes": t.max_time} if t.max_time else None,
        gradient_clip_val=t.grad_clip, callbacks=callbacks, logger=loggers or False,
        enable_progress_bar=t.progress_bar, inference_mode=False, enable_model_summary=False,
        log_every_n_steps=max(1, min(50, len(train_loader))), num_sanity_val_steps=0,
        default_root_dir=out_dir,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*GPU available but not used.*")
        trainer.fit(module, train_loader, val_loader, ckpt_path=str(last) if resume else None)
    if not trainer.is_global_zero:  # only rank 0 is sure to see the checkpoint files
        return module.model.cpu().eval()
    best_path = Path(best.best_model_path) if best.best_model_path else last
    state = torch.load(best_path, map_location="cpu", weights_only=True)
    # the checkpoint's state_dict holds the averaged weights (WarmupEMA puts them there)
    module.load_state_dict(portable_state_dict(state["state_dict"]))
    model = module.model.cpu().eval()
    model.metadata["epochs"] = int(state.get("epoch", 0)) + 1
    model.metadata["trained_epochs"] = int(trainer.current_epoch)
    return model


def make_trainer(t: TrainingConfig, **kwargs: Any) -> L.Trainer:
    """An L.Trainer on `training.accelerator/devices/strategy/num_nodes`; a setting Lightning
    refuses (an unknown strategy, a GPU this machine lacks, devices x num_nodes other than the
    processes torchrun or srun started) is a one-line ConfigError, here rather than in fit."""
    try:
        trainer = L.Trainer(accelerator=t.accelerator, devices=t.devices, strategy=t.strategy,
                            num_nodes=t.num_nodes, **kwargs)
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if environment is not None:  # what the launcher checks when fit starts
            environment.validate_settings(num_devices=trainer.num_devices,
                                          num_nodes=trainer.num_nodes)
        return trainer
    except (MisconfigurationException, ValueError, TypeError, RuntimeError) as exc:
        raise ConfigError(f"training.accelerator={t.accelerator!r}, devices={t.devices!r}, "
                          f"strategy={t.strategy!r}, num_nodes={t.num_nodes}: "
                          f"{first_line(exc)}") from None


def check_trainer_settings(t: TrainingConfig) -> None:
    """Build (and drop) a Trainer on `t`'s accelerator/devices/strategy/num_nodes, so that a
    setting Lightning refuses is a ConfigError before anything of the run is written."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)  # the device summary is logged by the real Trainer
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_trainer(t, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    finally:
        logging.disable(previous)
