"""A NequIP/MACE-style tensor-product backbone (Batzner et al. 2022; Batatia et al. 2022).

Node features are e3nn irreps ``F0x0e + F1x1o + F2x2e``. Each interaction block

1. mixes the node features (self-interaction ``o3.Linear``),
2. forms edge messages ``TP(h_j, Y(r_ij); w(r_ij))``: spherical harmonics up to l=2 of the edge
   direction, per-edge ``uvu`` tensor-product weights from a radial MLP on a Bessel basis, times a
   polynomial cutoff (so messages vanish smoothly at the cutoff),
3. sums the messages over neighbours (divided by ``avg_num_neighbors``),
4. optionally (``correlation=2``) adds MACE-style 3-body features: the aggregated (2-body)
   features are mixed to ``A = k x (0e + 1o + 2e)`` and multiplied with themselves channel by
   channel (``uuu`` paths of ``A (x) A``, i <= j, one weight per channel and path), as in MACE's
   symmetric contraction at correlation order 2,
5. mixes to ``scalars + gates + gated`` (plus a species-dependent self-connection), applies the
   gated nonlinearity and adds the result to the block's input (residual, from the second block).

Every e3nn module is built in ``__init__`` (e3nn generates their code once); the forward pass only
calls them and reshapes the irreps layout into (N, mul, 2l+1) views. The network is equivariant
under O(3) (rotations and reflections): ``1o`` rotates as ``R v``, ``2e`` as ``R T R^T``.
"""

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from e3nn import o3
from e3nn.nn import FullyConnectedNet, Gate
from torch import nn

from e2ip.backbones.base import Backbone, BackboneOutput
from e2ip.nn.mlp import mlp
from e2ip.nn.radial import BesselBasis, polynomial_cutoff
from e2ip.nn.scatter import scatter_sum, sum_over_edges


@dataclass
class TensorProductHyperparameters:
    """Tensor-product backbone (NequIP-like, with a MACE-like product at correlation 2) on
    0e + 1o + 2e hidden irreps."""

    #: Multiplicity of scalars (0e) in the hidden irreps.
    num_scalars: int = 32
    #: Multiplicity of vectors (1o) in the hidden irreps.
    num_vectors: int = 16
    #: Multiplicity of rank-2 tensors (2e) in the hidden irreps.
    num_tensors: int = 8
    #: Number of interaction blocks.
    num_layers: int = 3
    #: Number of Bessel radial basis functions.
    num_radial: int = 8
    #: Width of the two hidden layers of the radial MLPs.
    radial_hidden: int = 64
    #: Order p of the polynomial cutoff envelope.
    cutoff_p: int = 6
    #: Messages are divided by this (set it to the data's mean neighbour count).
    avg_num_neighbors: float = 10.0
    #: 1: NequIP-like 2-body messages; 2: adds the MACE-like product A (x) A.
    correlation: int = 2
    #: Channels k of A = k x (0e + 1o + 2e) in the product (correlation 2).
    product_channels: int = 16
    #: Width of the hidden layer of the energy MLP (0: num_scalars // 2).
    readout_hidden: int = 0


def uvu_instructions(irreps_in: o3.Irreps, irreps_sh: o3.Irreps, targets: o3.Irreps):
    """NequIP's message paths: every (mul x ir_in) (x) ir_sh -> ir_out with ir_out in `targets`,
    'uvu' (one weight per channel and path, channels kept). Returns (irreps_mid, instructions)."""
    wanted = {ir for _, ir in targets}
    mid, instructions = [], []
    for i, (mul, ir_in) in enumerate(irreps_in):
        for j, (_, ir_sh) in enumerate(irreps_sh):
            for ir_out in ir_in * ir_sh:
                if ir_out in wanted:
                    instructions.append((i, j, len(mid), "uvu", True))
                    mid.append((mul, ir_out))
    mid = o3.Irreps(mid)
    mid_sorted, perm, _ = mid.sort()
    instructions = [(i, j, perm[k], mode, train) for i, j, k, mode, train in instructions]
    return mid_sorted, instructions


def symmetric_uuu_instructions(irreps: o3.Irreps):
    """Channel-wise products A_i (x) A_j -> A_k (i <= j, same multiplicity everywhere, 'uuu'):
    the symmetric 2-fold product of MACE's atomic basis, one weight per channel and path."""
    instructions = []
    for i1, (_, ir1) in enumerate(irreps):
        for i2, (_, ir2) in enumerate(irreps):
            if i2 < i1:
                continue
            for i_out, (_, ir_out) in enumerate(irreps):
                if ir_out in ir1 * ir2:
                    instructions.append((i1, i2, i_out, "uuu", True))
    return instructions


@contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class TPInteraction(nn.Module):
    # fixed at construction: TorchScript compiles only the branches they select
    __constants__ = ["correlation", "residual"]

    def __init__(self, irreps_in: o3.Irreps, irreps_hidden: o3.Irreps, irreps_sh: o3.Irreps,
                 num_species: int, hp: TensorProductHyperparameters):
        super().__init__()
        self.avg_num_neighbors = float(hp.avg_num_neighbors)
        self.linear_up = o3.Linear(irreps_in, irreps_in)
        irreps_mid, instructions = uvu_instructions(irreps_in, irreps_sh, irreps_hidden)
        self.tp = o3.TensorProduct(irreps_in, irreps_sh, irreps_mid, instructions,
                                   shared_weights=False, internal_weights=False)
        # e3nn's MLP (no biases, variance-preserving init) as in NequIP
        self.radial = FullyConnectedNet(
            [hp.num_radial, hp.radial_hidden, hp.radial_hidden, self.tp.weight_numel],
            nn.functional.silu)

        scalars = o3.Irreps([(mul, ir) for mul, ir in irreps_hidden if ir.l == 0])
        gated = o3.Irreps([(mul, ir) for mul, ir in irreps_hidden if ir.l > 0])
        gates = o3.Irreps(f"{gated.num_irreps}x0e") if gated.num_irreps else o3.Irreps("")
        self.gate = Gate(scalars, [nn.functional.silu], gates, [torch.sigmoid] * len(gates),
                         gated)
        irreps_pre = self.gate.irreps_in

        self.correlation = int(hp.correlation)
        if self.correlation not in (1, 2):
            raise ValueError(f"correlation must be 1 or 2, not {hp.correlation}")
        self.linear_down = o3.Linear(irreps_mid, irreps_pre)
        if self.correlation == 2:
            k = hp.product_channels
            if k <= 0:
                raise ValueError("correlation 2 needs product_channels > 0")
            irreps_a = o3.Irreps(f"{k}x0e + {k}x1o + {k}x2e")
            self.linear_mid = o3.Linear(irreps_mid, irreps_a)
            self.product = o3.TensorProduct(irreps_a, irreps_a, irreps_a,
                                            symmetric_uuu_instructions(irreps_a))
            self.linear_prod = o3.Linear(irreps_a, irreps_pre)
        self.self_connection = o3.FullyConnectedTensorProduct(
            irreps_in, o3.Irreps(f"{num_species}x0e"), irreps_pre)
        self.residual = irreps_in == irreps_hidden

    def forward(self, h: torch.Tensor, onehot: torch.Tensor, sh: torch.Tensor, rbf: torch.Tensor,
                fcut: torch.Tensor, edge_index: torch.Tensor, chunk: int = 0) -> torch.Tensor:
        i, j = edge_index[0], edge_index[1]
        x = self.linear_up(h)
        if chunk > 0 and i.shape[0] > chunk and not torch.jit.is_scripting():
            a = self._chunked(x, i, j, sh, rbf, fcut, chunk)
        else:
            a = scatter_sum(self.edge_messages(x, j, sh, rbf, fcut), i, h.shape[0])
        a = a / self.avg_num_neighbors
        pre = self.linear_down(a) + self.self_connection(h, onehot)
        if self.correlation == 2:
            a = self.linear_mid(a)
            pre = pre + self.linear_prod(self.product(a, a))
        out = self.gate(pre)
        return h + out if self.residual else out

    @torch.jit.unused
    def _chunked(self, x, i, j, sh, rbf, fcut, chunk: int):
        """The sums over edges in checkpointed chunks (eager inference on large graphs)."""
        (a,) = sum_over_edges(self.edge_messages, i, x.shape[0], (x,), (j, sh, rbf, fcut), chunk)
        return a

    def edge_messages(self, x: torch.Tensor, j: torch.Tensor, sh: torch.Tensor, rbf: torch.Tensor,
                      fcut: torch.Tensor) -> torch.Tensor:
        """Tensor-product messages (E, irreps_mid) of edges to neighbours j."""
        return self.tp(x[j], sh, self.radial(rbf) * fcut.unsqueeze(-1))


class TensorProductBackbone(Backbone):
    """Scalars (N, F0), vectors (N, F1, 3) and native 2e tensors (N, F2, 5); energy from an MLP on
    the scalars."""

    name = "tensor_product"
    Hyperparameters = TensorProductHyperparameters

    def __init__(self, num_species: int, cutoff: float, hparams: TensorProductHyperparameters):
        super().__init__(num_species, cutoff, hparams)
        dtype = torch.get_default_dtype()
        # e3nn stores Wigner-3j constants as buffers in the dtype they were built in; a float32
        # build cast to float64 keeps float32-rounded constants (equivariance error ~1e-7). So:
        # build in float64, keep exact copies of the constant buffers, restore them on every cast.
        with default_dtype(torch.float64):
            self._build(num_species, cutoff, hparams)
        # (module path, buffer name, float64 value): by name, because e3nn regenerates its
        # compiled submodules when a model is deep-copied or unpickled
        self._exact_constants = [
            (path, name, buf.detach().clone()) for path, module in self.named_modules()
            for name, buf in module._buffers.items()
            if buf is not None and buf.is_floating_point() and buf.numel()
        ]
        self.to(dtype)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        for path, name, exact in getattr(self, "_exact_constants", ()):
            module = self.get_submodule(path)
            buf = module._buffers.get(name)
            if buf is not None:
                module._buffers[name] = exact.to(device=buf.device, dtype=buf.dtype)
        return out

    def for_torchscript(self) -> "TensorProductBackbone":
        """A copy whose e3nn modules are compiled by e3nn (``e3nn.util.jit.compile``: traced or
        scripted as each requires; e3nn's Gate and Activation cannot be scripted directly), so
        that ``torch.jit.script`` compiles the rest. The eager model is left as it is."""
        from e3nn.util.jit import compile as e3nn_compile

        scriptable = copy.deepcopy(self).eval()
        scriptable._exact_constants = []  # the copy's constants are already exact for its dtype
        e3nn_compile(scriptable)
        return scriptable

    def _build(self, num_species: int, cutoff: float, hp: TensorProductHyperparameters) -> None:
        if hp.num_scalars <= 0:
            raise ValueError("tensor_product needs num_scalars > 0")
        if hp.num_vectors < 0 or hp.num_tensors < 0:
            raise ValueError("num_vectors and num_tensors must be >= 0")
        self.num_scalars, self.num_vectors, self.num_tensors = (
            hp.num_scalars, hp.num_vectors, hp.num_tensors)
        self.irreps_hidden = o3.Irreps(
            [(m, ir) for m, ir in [(hp.num_scalars, "0e"), (hp.num_vectors, "1o"),
                                   (hp.num_tensors, "2e")] if m > 0])
        self.irreps_sh = o3.Irreps.spherical_harmonics(2)
        self.sh = o3.SphericalHarmonics(self.irreps_sh, normalize=True, normalization="component")
        self.rbf = BesselBasis(hp.num_radial, cutoff)
        self.embedding = nn.Embedding(num_species, hp.num_scalars)
        irreps_in = o3.Irreps(f"{hp.num_scalars}x0e")
        layers = []
        for _ in range(hp.num_layers):
            layers.append(TPInteraction(irreps_in, self.irreps_hidden, self.irreps_sh,
                                        num_species, hp))
            irreps_in = self.irreps_hidden
        self.layers = nn.ModuleList(layers)
        h = hp.readout_hidden or max(hp.num_scalars // 2, 1)
        self.readout = mlp([hp.num_scalars, h, 1])
        self.cutoff_p = int(hp.cutoff_p)

    def forward(self, species: torch.Tensor, edge_index: torch.Tensor, edge_vectors: torch.Tensor,
                batch: torch.Tensor, num_graphs: int) -> BackboneOutput:
        r = torch.linalg.norm(edge_vectors, dim=-1)
        sh = self.sh(edge_vectors)
        rbf = self.rbf(r)
        fcut = polynomial_cutoff(r, self.cutoff, self.cutoff_p)
        onehot = nn.functional.one_hot(species, self.num_species).to(edge_vectors.dtype)
        h = self.embedding(species)
        chunk = self.edge_chunk()
        for layer in self.layers:
            h = layer(h, onehot, sh, rbf, fcut, edge_index, chunk)
        n = h.shape[0]
        f0, f1, f2 = self.num_scalars, self.num_vectors, self.num_tensors
        scalars = h[:, :f0]
        vectors: torch.Tensor | None = None
        tensors: torch.Tensor | None = None
        if f1 > 0:
            vectors = h[:, f0:f0 + 3 * f1].reshape(n, f1, 3)
        if f2 > 0:
            tensors = h[:, f0 + 3 * f1:].reshape(n, f2, 5)
        return BackboneOutput(scalars=scalars, vectors=vectors, tensors=tensors,
                              atomic_energy=self.readout(scalars).squeeze(-1))
