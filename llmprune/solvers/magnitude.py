"""Magnitude pruning: drop the weights of smallest |W| (Han et al. 2015; the baseline in
SparseGPT and Wanda). Ranked per layer here; across all layers (Global MP) see global_counts()."""
from __future__ import annotations

import torch

from ..patterns import Pattern, keep_mask, n_pruned
from . import Solved, Solver


def magnitude(weight: torch.Tensor, stats, pattern: Pattern, sparsity: float, **_) -> Solved:
    keep = keep_mask(weight.abs(), pattern, sparsity, scope="layer")
    return Solved(weight * keep, keep, {})


def global_sparsities(weights, sparsity: float, sizes: dict[str, int] | None = None) -> dict[str, float]:
    """Per-layer sparsities that prune the globally smallest |W| across all the given layers.

    weights: name -> tensor, or a re-iterable of (name, tensor) pairs that reads them on demand (a model
    on disk, one block at a time: onload.global_sparsities) with `sizes` (name -> numel, in layer order).
    Five passes over the weights: four of the radix select (kth_smallest_abs), one counting.

    Ties at the threshold are pruned in layer order, then by index (stable), so the result is
    exactly the stable global ranking; each layer's count k gives sparsity k / numel, which
    keep_mask(scope="layer") turns back into exactly k pruned weights.
    """
    pairs = weights.items() if isinstance(weights, dict) else weights
    sizes = sizes if sizes is not None else {n: w.numel() for n, w in weights.items()}
    k = n_pruned(sum(sizes.values()), sparsity)
    if k == 0:
        return {name: 0.0 for name in sizes}
    thresh = kth_smallest_abs(_Values(pairs), k)
    below, ties = {}, {}
    for n, w in pairs:
        a = w.detach().abs().float()
        below[n], ties[n] = int((a < thresh).sum()), int((a == thresh).sum())
    ties_left = k - sum(below.values())
    out = {}
    for n, size in sizes.items():
        take = min(ties[n], ties_left)
        ties_left -= take
        out[n] = (below[n] + take) / size
    return out


class _Values:
    """The tensors of re-iterable (name, tensor) pairs, re-iterable too (each pass reads them again)."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __iter__(self):
        return (w for _, w in self.pairs)


def kth_smallest_abs(weights, k: int) -> torch.Tensor:
    """The k-th smallest |w| (1-based) over all the tensors: torch.kthvalue of their concatenation,
    without it (a 70B model's weights concatenated in fp32 would be 280 GB). Radix select: |w| in
    float32 orders as its bit pattern read as a non-negative int32, so four passes over the tensors
    fix the answer's bits 8 at a time, each counting (torch.bincount) the next byte of the values
    that match the bits fixed so far; one tensor's temporaries at a time. `weights`: any re-iterable of
    tensors (read again on each pass)."""
    prefix, left = 0, k
    for shift in (24, 16, 8, 0):
        counts = torch.zeros(256, dtype=torch.int64)
        for w in weights:
            bits = w.detach().abs().float().flatten().view(torch.int32)
            if shift < 24:
                bits = bits[(bits >> (shift + 8)) == prefix]
            counts += torch.bincount(((bits >> shift) & 255).long(), minlength=256).cpu()
        cum = counts.cumsum(0)
        byte = int(torch.searchsorted(cum, torch.tensor(left)))  # the first byte whose count reaches `left`
        left -= int(cum[byte - 1]) if byte else 0
        prefix = (prefix << 8) | byte
    return torch.tensor([prefix], dtype=torch.int32).view(torch.float32)[0]


SOLVER = Solver("magnitude", magnitude, needs=frozenset(), cite="Han et al. 2015, arXiv 1506.02626")
