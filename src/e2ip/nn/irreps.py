"""The constant change of basis between e3nn's ``2e`` irreps and traceless symmetric 3x3 matrices.

Conventions (e3nn 0.6, checked in the tests): ``1o`` is (x, y, z); the ``2e`` basis of
``CartesianTensor("ij=ji")`` is
``[(xz+zx)/sqrt2, (xy+yx)/sqrt2, (2yy-xx-zz)/sqrt6, (yz+zy)/sqrt2, (zz-xx)/sqrt2]``.
The basis is precomputed once per dtype and device.
"""

import functools
import math

import torch

# e3nn 0.6's ``2e`` of ``CartesianTensor("ij=ji")`` (polar axis y) as 3x3 matrices E_k, used by
# the backbones (native 2e features) and the heads (T(c) = sum_k c_k E_k)
_S2 = 1.0 / math.sqrt(2.0)
_S6 = 1.0 / math.sqrt(6.0)
L2_BASIS = (
    ((0.0, 0.0, _S2), (0.0, 0.0, 0.0), (_S2, 0.0, 0.0)),
    ((0.0, _S2, 0.0), (_S2, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ((-_S6, 0.0, 0.0), (0.0, 2 * _S6, 0.0), (0.0, 0.0, -_S6)),
    ((0.0, 0.0, 0.0), (0.0, 0.0, _S2), (0.0, _S2, 0.0)),
    ((-_S2, 0.0, 0.0), (0.0, 0.0, 0.0), (0.0, 0.0, _S2)),
)


@functools.lru_cache(maxsize=16)
def _cached_l2_basis(dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
    return torch.tensor(L2_BASIS, dtype=torch.float64).to(dtype=dtype, device=device)


@torch.jit.unused  # scripted code passes the basis (a buffer of the module) explicitly
def l2_basis_tensor(dtype: torch.dtype | None = None,
                    device: torch.device | None = None) -> torch.Tensor:
    """The (5, 3, 3) basis E_k of traceless symmetric matrices (T(c) = sum_k c_k E_k), built once
    per dtype and device from float64 values (exact to the dtype's precision; do not modify)."""
    return _cached_l2_basis(dtype or torch.get_default_dtype(),
                            torch.device(device) if device is not None else None)


def traceless_sym_to_l2(m: torch.Tensor, basis: torch.Tensor | None = None) -> torch.Tensor:
    """``2e`` coefficients tr(E_k M) of a 3x3 matrix (..., 3, 3) -> (..., 5).

    Only the symmetric traceless part of M contributes (E_k is symmetric and traceless), so this
    is the projection M -> sym(M) - tr(M)/3 I expressed in e3nn's ``2e`` basis; for a rotation or
    reflection R, ``M -> R M R^T`` maps the result to ``D2(R) c``.
    """
    basis = l2_basis_tensor(m.dtype, m.device) if basis is None else basis
    return torch.einsum("...ij,kij->...k", m, basis)


def sym_outer_l2(a: torch.Tensor, b: torch.Tensor, basis: torch.Tensor | None = None) -> torch.Tensor:
    """2e coefficients of sym(a (x) b) - tr/3 I for vectors (..., 3): a^T E_k b, shape (..., 5).

    The outer product then one matmul with the flattened basis (9 -> 5): a three-operand einsum
    ran opt_einsum's path search on every call (~0.4 ms, 5 % of a 21-atom forward pass)."""
    basis = l2_basis_tensor(a.dtype, a.device) if basis is None else basis
    outer = (a.unsqueeze(-1) * b.unsqueeze(-2)).flatten(-2)  # (..., 9)
    return outer @ basis.reshape(5, 9).T


def l2_to_matrix(c2: torch.Tensor, basis: torch.Tensor | None = None) -> torch.Tensor:
    """T(c): (..., 5) -> (..., 3, 3) traceless symmetric."""
    basis = l2_basis_tensor(c2.dtype, c2.device) if basis is None else basis
    return torch.einsum("...k,kij->...ij", c2, basis)
