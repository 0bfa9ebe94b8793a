"""Callbacks: an append-only per-epoch CSV log that survives crashes and resumes."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback


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
