"""Uncertainty-driven bias: an energy that pulls dynamics toward configurations the model is
unsure about (uncertainty-driven dynamics, Kulichenko et al., Nat. Comput. Sci. 3, 230 (2023),
there with the energy variance of an ensemble).

Here the collective variable is the model's mean per-component force epistemic variance over the
atoms of a structure,

    s2(R) = 1 / (3 N) sum_i tr U_epi,i(R)                       (eV/Å)^2,

and the bias energy is

    E_bias(R) = A [exp(-s2 / B^2) - 1]                          eV,

with strength A > 0 (eV) and width B > 0 (eV/Å). E_bias lies in (-A, 0]: it is lowest where the
model is uncertain, so the biased force -grad(E + E_bias) pushes the system up the gradient of the
epistemic variance, and it saturates once s2 >> B^2 (the push fades, so the system cannot run away
to arbitrarily uncertain, unphysical regions). A sets how many eV the dynamics may gain by going
uncertain (compare with k_B T: 0.026 eV at 300 K); B is the uncertainty scale at which the pull is
strongest (take it near the model's typical in-distribution `forces_uncertainty`).

For an e2IP head U_epi is a function of the backbone features only, so grad s2 comes from the same
backward pass as the forces; for an ensemble it needs the derivative of the member forces (a
second-order pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from e2ip.nn.scatter import scatter_sum


@dataclass(frozen=True)
class UncertaintyBias:
    """E_bias = strength [exp(-s2 / width^2) - 1]; strength in eV, width in eV/Å (see module doc).
    form: which uncertainty form drives it ('raw', 'cal', None: the model's default)."""

    strength: float
    width: float
    form: str | None = None

    def __post_init__(self):
        if not self.strength > 0 or not self.width > 0:
            raise ValueError(f"bias strength and width must be positive, got {self.strength}, "
                             f"{self.width}")

    def mean_variance(self, u_epi: torch.Tensor, batch: torch.Tensor, n_atoms: torch.Tensor,
                      num_graphs: int) -> torch.Tensor:
        """s2 per structure (B,) from the per-atom traces tr U_epi (N,) in (eV/Å)^2."""
        return scatter_sum(u_epi, batch, num_graphs) / (3 * n_atoms.to(u_epi.dtype))

    def energy(self, u_epi: torch.Tensor, batch: torch.Tensor, n_atoms: torch.Tensor,
               num_graphs: int) -> torch.Tensor:
        """E_bias per structure (B,) in eV."""
        s2 = self.mean_variance(u_epi, batch, n_atoms, num_graphs)
        return self.strength * (torch.exp(-s2 / self.width**2) - 1.0)
