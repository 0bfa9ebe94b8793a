"""Callbacks: an EMA of the weights with a warm-up, and an append-only per-epoch CSV log."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging

from e2ip.models.state import is_fx_constant, portable_state_dict


def ema_decay_at(decay: float, num_averaged: int) -> float:
    """Decay used for the update after `num_averaged` earlier ones: min(decay, (1 + n) / (10 + n)).

    The ramp (as TensorFlow's ExponentialMovingAverage with `num_updates`) keeps the average close
    to the recent weights early on, so a short run never exports (nearly) its initialisation:
    with a constant 0.99 the weights after the first step still weigh 0.99^k after k steps."""
    n = float(num_averaged)
    return min(float(decay), (1.0 + n) / (10.0 + n))


def warmup_ema_multi_avg_fn(decay: float):
    """A `multi_avg_fn` for torch.optim.swa_utils.AveragedModel: avg <- avg + (1 - d_n)(p - avg)
    with the ramped decay d_n of :func:`ema_decay_at` (one host sync per step, none per tensor)."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        weight = 1.0 - ema_decay_at(decay, int(num_averaged))
        for avg, cur in zip(averaged, current):
            avg.lerp_(cur, weight)

    return update


class WarmupEMA(WeightAveraging):
    """Lightning's weight averaging (validation, checkpoints and the exported model use the
    average) with an exponential moving average whose decay ramps up (:func:`ema_decay_at`).

    Lightning's `EMAWeightAveraging` has a fixed decay (or a hard start step); this passes the ramp
    as `multi_avg_fn`. Only parameters are averaged (the buffers are constants or integer lookup
    tables, which an average would corrupt). The fx constants that deep-copying e3nn modules adds
    to the averaged copy are kept out of checkpoints."""

    def __init__(self, decay: float):
        super().__init__(use_buffers=False, multi_avg_fn=warmup_ema_multi_avg_fn(decay))
        self.decay = float(decay)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        for key in ("state_dict", "current_model_state"):
            if key in checkpoint:
                checkpoint[key] = portable_state_dict(checkpoint[key])

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self._average_model is not None and "state_dict" in checkpoint:
            prefix = "module."
            for key, value in self._average_model.state_dict().items():
                name = key[len(prefix):]
                if key.startswith(prefix) and is_fx_constant(name):
                    checkpoint["state_dict"].setdefault(name, value)
        super().on_load_checkpoint(trainer, pl_module, checkpoint)


class EpochCSVLogger(Callback):
    """Appends one row per epoch to `path` (epoch, time, lr, train_* and val_* metrics).

    On resume, rows of epochs at or after the resumed epoch are dropped first, so a run killed and
    resumed has exactly one row per epoch and nothing lost."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._start = time.perf_counter()
        self._elapsed_before = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._start = time.perf_counter()
        if not trainer.is_global_zero or not self.path.exists():
            return
        with open(self.path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        kept = [r for r in rows if int(r["epoch"]) < trainer.current_epoch]
        self._elapsed_before = float(kept[-1]["elapsed_s"]) if kept else 0.0
        self._write(kept, rows[0].keys() if rows else None, mode="w")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step,
               "elapsed_s": round(self._elapsed_before + time.perf_counter() - self._start, 2),
               "lr": trainer.optimizers[0].param_groups[0]["lr"]}
        for key, value in sorted(trainer.callback_metrics.items()):
            if key.startswith(("train_", "val_")):
                row[key] = float(value)
        self._write([row], row.keys(), mode="a")

    def _write(self, rows, fields, mode: str) -> None:
        exists = self.path.exists() and mode == "a"
        if exists:
            with open(self.path, newline="") as fh:
                header = next(csv.reader(fh), None)
            fields = header or fields
        if fields is None:
            return
        with open(self.path, mode, newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(fields), extrasaction="ignore")
            if not exists:
                writer.writeheader()
            writer.writerows(rows)
