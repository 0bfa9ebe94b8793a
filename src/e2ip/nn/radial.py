"""Radial basis functions and smooth cutoff envelopes of interatomic distances (Å)."""

import math

import torch
from torch import nn


class BesselBasis(nn.Module):
    """sqrt(2/rc) sin(n pi r / rc) / r, n = 1..num_radial (Klicpera et al. 2020); (E,) -> (E, K)."""

    def __init__(self, num_radial: int, cutoff: float):
        super().__init__()
        self.cutoff = cutoff
        self.register_buffer("freq", torch.arange(1, num_radial + 1) * math.pi / cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        r = r.unsqueeze(-1)
        return math.sqrt(2.0 / self.cutoff) * torch.sin(self.freq.to(r.dtype) * r) / r


def cosine_cutoff(r: torch.Tensor, cutoff: float) -> torch.Tensor:
    """0.5 (cos(pi r / rc) + 1) inside the cutoff, 0 outside; smooth at rc."""
    return torch.where(r < cutoff, 0.5 * (torch.cos(math.pi * r / cutoff) + 1.0),
                       torch.zeros_like(r))


def polynomial_cutoff(r: torch.Tensor, cutoff: float, p: int = 6) -> torch.Tensor:
    """NequIP's polynomial envelope: smooth to order p at rc."""
    x = r / cutoff
    out = (1.0 - 0.5 * (p + 1) * (p + 2) * x**p + p * (p + 2) * x ** (p + 1)
           - 0.5 * p * (p + 1) * x ** (p + 2))
    return out * (x < 1.0)
