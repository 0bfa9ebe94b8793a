"""The Lightning module: loss, optimiser and scheduler (the weight average is a callback,
:class:`e2ip.train.callbacks.WarmupEMA`, which swaps the averaged weights in for validation)."""

from __future__ import annotations

import lightning as L
import torch

from ..data.graph import AtomicGraph
from ..model import PotentialModel


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

    def compute_loss(self, model: PotentialModel, batch: AtomicGraph, create_graph: bool):
        opts = self.training_options
        out = model(batch, create_graph=create_graph)
        scale = model.force_scale
        e_err = (out["energy"] - batch.energy) / batch.n_atoms / scale
        energy_loss = (e_err**2).mean()
        head_loss = model.head.loss(out["params"], out["forces"], batch.forces)
        force_loss = head_loss["loss"].mean()
        loss = opts["energy_weight"] * energy_loss + opts["force_weight"] * force_loss
        f_err = out["forces"] - batch.forces
        if model.has_uncertainty and opts["mse_weight"]:
            loss = loss + opts["mse_weight"] * ((f_err**2).mean() / scale**2)
        logs = {
            "loss": loss.detach(),
            "energy_mae": ((out["energy"] - batch.energy) / batch.n_atoms).abs().mean().detach(),
            "force_mae": f_err.abs().mean().detach(),
        }
        for key in ("nll", "reg"):
            if key in head_loss:
                logs[key] = head_loss[key].mean().detach()
        return loss, logs

    def training_step(self, batch, batch_idx):
        loss, logs = self.compute_loss(self.model, batch, create_graph=True)
        self.log_dict({f"train_{k}": v for k, v in logs.items()}, on_step=False, on_epoch=True,
                      batch_size=batch.num_graphs, prog_bar=False)
        return loss

    def validation_step(self, batch, batch_idx):
        _, logs = self.compute_loss(self.model, batch, create_graph=False)
        for k, v in logs.items():
            self.log(f"val_{k}", v, on_step=False, on_epoch=True, batch_size=batch.num_graphs,
                     prog_bar=k in ("loss", "force_mae"))

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
