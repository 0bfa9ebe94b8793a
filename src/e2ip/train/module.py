"""The Lightning module: loss, optimiser and scheduler (the weight average is a callback,
:class:`e2ip.train.callbacks.WarmupEMA`, which swaps the averaged weights in for validation)."""

from __future__ import annotations

import logging

import lightning as L
import torch

from e2ip.data.graph import AtomicGraph, frames_listing
from e2ip.errors import TrainingError
from e2ip.models.single import PotentialModel

log = logging.getLogger("e2ip")


class PotentialModule(L.LightningModule):
    """Trains a :class:`PotentialModel` built from `model_spec` with the `training` options."""

    def __init__(self, model_spec: dict, training: dict, dtype: str = "float32",
                 initial_state: dict | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["initial_state"])
        self.model = PotentialModel(**model_spec).to(getattr(torch, dtype))
        if initial_state is not None:  # fine-tuning: start from a trained model's weights
            self.model.load_state_dict(initial_state)
        self.training_options = training
        if training.get("compile"):
            self.model.enable_compile()
        self._bad_steps = 0  # consecutive skipped steps
        self._step: dict = {}  # the current training step's loss, logs and structures

    def compute_loss(self, model: PotentialModel, batch: AtomicGraph, create_graph: bool):
        opts = self.training_options
        out = model(batch, create_graph=create_graph)
        scale = model.force_scale
        head_loss = model.head.loss(out["params"], out["forces"], batch.forces)
        force_loss = head_loss["loss"].mean()
        loss = opts["force_weight"] * force_loss
        f_err = out["forces"] - batch.forces
        if model.has_uncertainty and opts["mse_weight"]:
            loss = loss + opts["mse_weight"] * ((f_err**2).mean() / scale**2)
        logs = {"force_mae": f_err.abs().mean().detach()}
        if batch.energy is not None:  # data without energies (data.energy_key: null) trains on forces
            e_err = (out["energy"] - batch.energy) / batch.n_atoms
            loss = loss + opts["energy_weight"] * ((e_err / scale) ** 2).mean()
            logs["energy_mae"] = e_err.abs().mean().detach()
        logs["loss"] = loss.detach()
        for key in ("nll", "reg"):
            if key in head_loss:
                logs[key] = head_loss[key].mean().detach()
        return loss, logs

    def training_step(self, batch, batch_idx):
        loss, logs = self.compute_loss(self.model, batch, create_graph=True)
        # logged in on_before_optimizer_step, once it is known whether the step is kept
        self._step = {"loss": loss.detach(), "logs": logs, "frames": batch.frames,
                      "batch_size": batch.num_graphs}
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Skip a step whose gradient (or loss) is NaN or inf: drop the gradients, so AdamW
        leaves every parameter and its moments untouched, and log it (`train_skipped_steps` in
        metrics.csv). After `training.max_bad_steps` such steps in a row, stop with a
        :class:`TrainingError` naming the batch's structures; the last checkpoint, written at
        the end of the previous epoch, is good.

        The skip is decided on the gradient norm alone: under DDP gradients are all-reduced
        before this hook, so every rank takes the same decision (a rank's NaN loss makes every
        rank's gradient NaN). One host sync per step.

        Logging is DDP-safe: the epoch metrics are averaged over all ranks (`sync_dist`), and
        every rank logs the same keys at the same steps (a kept step's, decided on the shared
        gradient), since the epoch-end reduction pairs the ranks' metrics in the order they
        were first logged."""
        step = self._step
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else step["loss"].new_zeros(())
        grad_ok, loss_ok = torch.stack([torch.isfinite(grad_norm),
                                        torch.isfinite(step["loss"])]).tolist()
        if grad_ok:  # a non-finite loss with a finite gradient (barely possible) logs as NaN
            self.log_dict({f"train_{k}": v for k, v in step["logs"].items()}, on_step=False,
                          on_epoch=True, batch_size=step["batch_size"], prog_bar=False,
                          sync_dist=True)
        # summed over the ranks: counted on rank 0 alone, since every rank skips the same steps
        skipped = float(not grad_ok) if self.global_rank == 0 else 0.0
        self.log("train_skipped_steps", skipped, on_step=False, on_epoch=True,
                 reduce_fx="sum", batch_size=1, sync_dist=True)
        if grad_ok:
            self._bad_steps = 0
            return
        optimizer.zero_grad(set_to_none=True)
        self._bad_steps += 1
        listing = frames_listing(step["frames"], 4)
        what = "loss and gradient" if not loss_ok else "gradient"
        log.warning("epoch %d, step %d: skipped, non-finite %s in the batch of %s",
                    self.current_epoch, self.global_step, what, listing)
        limit = self.training_options["max_bad_steps"]
        if self._bad_steps >= limit:
            ckpt = f"{self.trainer.default_root_dir}/checkpoints/last.ckpt"
            kept = (f"the last good checkpoint {ckpt} is kept (--resume continues from it)"
                    if self.current_epoch > 0 else "no checkpoint was written yet")
            raise TrainingError(
                f"training stopped at epoch {self.current_epoch}, step {self.global_step}: "
                f"{limit} steps in a row had a non-finite {what} (training.max_bad_steps); "
                f"the last batch held {listing}; check these structures or lower "
                f"training.lr; {kept}")

    def validation_step(self, batch, batch_idx):
        _, logs = self.compute_loss(self.model, batch, create_graph=False)
        for k, v in logs.items():
            # averaged over every rank's share of the validation set (sync_dist): checkpoints,
            # early stopping and the scheduler then follow the same val_loss on every rank
            self.log(f"val_{k}", v, on_step=False, on_epoch=True, batch_size=batch.num_graphs,
                     prog_bar=k in ("loss", "force_mae"), sync_dist=True)

    def configure_optimizers(self):
        opts = self.training_options
        opt = torch.optim.AdamW(self.model.parameters(), lr=opts["lr"],
                                weight_decay=opts["weight_decay"])
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, factor=opts["scheduler_factor"], patience=opts["scheduler_patience"],
            min_lr=opts["min_lr"])
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": sched, "monitor": "val_loss", "interval": "epoch"}}

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch.to(device)
