"""Sums of per-edge (or per-atom) rows into bins: per-atom message sums, per-structure energies."""

import torch
from torch.utils.checkpoint import checkpoint


def scatter_sum(src: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Sum rows of `src` into `size` bins given by `index` (first dimension)."""
    out = src.new_zeros((size,) + src.shape[1:])
    return out.index_add_(0, index, src)


def sum_over_edges(message, centers: torch.Tensor, num_nodes: int,
                   node_inputs: tuple[torch.Tensor, ...], edge_inputs: tuple[torch.Tensor, ...],
                   chunk_size: int = 0) -> tuple[torch.Tensor, ...]:
    """Per-atom sums of per-edge messages: out_k[n] = sum over edges e with centers[e] = n of
    ``message(*node_inputs, *edge_inputs[e])[k]``.

    message: a function of the node inputs (whole) and the edge inputs (rows of one set of edges)
    returning one tensor or a tuple of tensors with one row per edge.
    With `chunk_size` > 0 and more edges than that, edges are processed `chunk_size` at a time
    and each chunk is checkpointed (``torch.utils.checkpoint``, non-reentrant): its per-edge
    intermediates, which dominate the memory of a forward + force backward pass, are recomputed
    in the backward pass instead of being kept, so memory is O(atoms + chunk) rather than
    O(edges) at the price of evaluating the messages twice. The sums are the same up to the
    order of floating-point additions. (Written here because PyTorch offers checkpointing but
    not a chunked scatter; every backbone's message passing goes through this one function.)
    """

    def summed(chunk_centers, *inputs):
        out = message(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        return tuple(scatter_sum(o, chunk_centers, num_nodes) for o in out)

    num_edges = centers.shape[0]
    if chunk_size <= 0 or num_edges <= chunk_size:
        return summed(centers, *node_inputs, *edge_inputs)
    # torch.split, not slicing: the backward of one split is one concatenation of the chunks'
    # gradients, where each slice's backward would write a zero-filled edge-sized tensor
    chunks = zip(torch.split(centers, chunk_size),
                 *(torch.split(x, chunk_size) for x in edge_inputs))
    total: tuple[torch.Tensor, ...] | None = None
    for chunk_centers, *chunk_inputs in chunks:
        part = checkpoint(summed, chunk_centers, *node_inputs, *chunk_inputs, use_reentrant=False)
        total = part if total is None else tuple(a + b for a, b in zip(total, part))
    assert total is not None
    return total
