"""The Head interface: per-atom uncertainty from backbone features, independent of the backbone."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..backbones.base import BackboneOutput
from ..losses import force_mse
from ..predictive import Predictive


@dataclass
class FeatureDims:
    num_scalars: int
    num_vectors: int = 0
    num_tensors: int = 0


class Head(nn.Module):
    """A head reads :class:`BackboneOutput` and the force mean (N, 3), and offers:

    - ``forward(features) -> dict`` of per-atom parameters,
    - ``loss(params, forces, forces_ref) -> dict`` with per-atom ``loss`` (N,) and its parts,
    - ``predictive(params, forces) -> Predictive`` (None for a head without uncertainty),
    - ``covariances(params, forces) -> dict`` of (N, 3, 3) ``aleatoric``, ``epistemic``,
      ``predictive`` covariances (eV/Å)^2 (empty without uncertainty).
    """

    name: ClassVar[str] = ""
    Hyperparameters: ClassVar[type] = object
    has_uncertainty: ClassVar[bool] = True

    def __init__(self, dims: FeatureDims, force_scale: float, hparams):
        super().__init__()
        self.dims = dims
        self.force_scale = float(force_scale)
        self.hparams = hparams

    @classmethod
    def hparams_from_dict(cls, options: dict | None):
        return cls.Hyperparameters(**(options or {}))

    @classmethod
    def hparams_to_dict(cls, hparams) -> dict:
        return dataclasses.asdict(hparams)

    def forward(self, features: BackboneOutput) -> dict[str, torch.Tensor]:
        return {}

    def loss(self, params, forces, forces_ref) -> dict[str, torch.Tensor]:
        mse = force_mse(forces_ref - forces, self.force_scale)
        return {"loss": mse, "mse": mse}

    def predictive(self, params, forces) -> Predictive | None:
        return None

    def covariances(self, params, forces) -> dict[str, torch.Tensor]:
        return {}


@dataclass
class NoHeadHyperparameters:
    pass


class NoHead(Head):
    """Plain potential: force mean only, trained with the force MSE."""

    name = "none"
    Hyperparameters = NoHeadHyperparameters
    has_uncertainty = False
