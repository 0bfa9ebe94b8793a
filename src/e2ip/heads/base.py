"""The Head interface: per-atom uncertainty from backbone features, independent of the backbone."""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from e2ip.backbones.base import BackboneOutput
from e2ip.registry import Configurable
from e2ip.stats.losses import force_mse
from e2ip.stats.predictive import Predictive


@dataclass
class FeatureDims:
    num_scalars: int
    num_vectors: int = 0
    num_tensors: int = 0
    #: number of elements the model knows (the range of BackboneOutput.species)
    num_species: int = 1


class Head(Configurable, nn.Module, ABC):
    """A head reads :class:`BackboneOutput` and the force mean (N, 3), and offers:

    - ``forward(features) -> dict`` of per-atom parameters,
    - ``loss(params, forces, forces_ref) -> dict`` with per-atom ``loss`` (N,) and its parts,
    - ``predictive(params, forces) -> Predictive`` (None for a head without uncertainty),
    - ``covariances(params, forces) -> dict`` of (N, 3, 3) ``aleatoric``, ``epistemic``,
      ``predictive`` covariances (eV/Å)^2 (empty without uncertainty);
    - for heads whose uncertainty needs statistics of the training data (``uses_feature_statistics``):
      ``fit_feature_statistics(batches)`` with the training atoms' backbone features;
    - for heads whose epistemic part the calibration scales on its own (``scales_epistemic``):
      ``scale_epistemic(params, t)``, the parameters with the epistemic covariance times t;
    - for heads whose calibration also bins the feature distance (``r_bins`` >= 2):
      ``r_bin_factor(params)`` (N,) and ``set_r_bins(edges, factors)``.
    """

    name: ClassVar[str] = ""
    #: the method's name in tables and plots (:meth:`describe` may refine it per instance)
    label: ClassVar[str] = ""
    has_uncertainty: ClassVar[bool] = True
    #: whether the head can take the feature-distance evidence (:meth:`feature_distance_options`)
    supports_feature_distance: ClassVar[bool] = False
    #: False for a head with aleatoric uncertainty only (its epistemic covariance is zero)
    has_epistemic: ClassVar[bool] = True
    uses_feature_statistics: bool = False
    scales_epistemic: bool = False
    r_bins: int = 0

    def __init__(self, dims: FeatureDims, force_scale: float, hparams):
        super().__init__()
        self.dims = dims
        self.force_scale = float(force_scale)
        self.hparams = hparams



    def describe(self) -> str:
        """The method's name for this instance's settings (default: :attr:`label`)."""
        return self.label or self.name

    @classmethod
    def feature_distance_options(cls, options: dict) -> dict:
        """`options` switched to the feature-distance evidence (heads that support it)."""
        raise NotImplementedError(f"the {cls.name!r} head has no feature-distance evidence")

    @abstractmethod
    def forward(self, features: BackboneOutput) -> dict[str, torch.Tensor]:
        """Per-atom head parameters from the backbone's features."""

    def loss(self, params, forces, forces_ref) -> dict[str, torch.Tensor]:
        mse = force_mse(forces_ref - forces, self.force_scale)
        return {"loss": mse, "mse": mse}

    def predictive(self, params, forces) -> Predictive | None:
        return None

    def covariances(self, params: dict[str, torch.Tensor],
                    forces: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {}

    def fit_feature_statistics(self, batches) -> int:
        """Fit what the head needs from the training atoms' features (an iterable of
        :class:`BackboneOutput`); returns the number of atoms seen."""
        raise NotImplementedError(f"the {self.name!r} head uses no training statistics")

    def feature_statistics_fitted(self) -> bool:
        """Whether :meth:`fit_feature_statistics` has run (True for heads that need none)."""
        return True

    def scale_epistemic(self, params: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
        """`params` with the epistemic covariance multiplied by `factor`."""
        raise NotImplementedError("this head cannot scale its epistemic part (scales_epistemic "
                                  "is False)")


@dataclass
class NoHeadHyperparameters:
    pass


class NoHead(Head):
    """Plain potential: force mean only, trained with the force MSE."""

    name = "none"
    label = "plain"
    Hyperparameters = NoHeadHyperparameters
    has_uncertainty = False

    def forward(self, features: BackboneOutput) -> dict[str, torch.Tensor]:
        return {}
