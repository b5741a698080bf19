"""Magnitude pruning: drop the weights of smallest |W| (Han et al. 2015; the baseline in
SparseGPT and Wanda). Ranked per layer here; across all layers (Global MP) see global_counts()."""
from __future__ import annotations

import torch

from ..patterns import Pattern, keep_mask, n_pruned
from . import Solved, Solver


def magnitude(weight: torch.Tensor, stats, pattern: Pattern, sparsity: float, **_) -> Solved:
    keep = keep_mask(weight.abs(), pattern, sparsity, scope="layer")
    return Solved(weight * keep, keep, {})


def global_sparsities(weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, float]:
    """Per-layer sparsities that prune the globally smallest |W| across all the given layers.

    Ties at the threshold are pruned in layer order, then by index (stable), so the result is
    exactly the stable global ranking; each layer's count k gives sparsity k / numel, which
    keep_mask(scope="layer") turns back into exactly k pruned weights.
    """
    total = sum(w.numel() for w in weights.values())
    k = n_pruned(total, sparsity)
    if k == 0:
        return {name: 0.0 for name in weights}
    flat = torch.cat([w.detach().abs().float().flatten() for w in weights.values()])  # (total,)
    thresh = flat.kthvalue(k).values
    del flat
    below = {n: int((w.abs().float() < thresh).sum()) for n, w in weights.items()}
    ties_left = k - sum(below.values())
    out = {}
    for n, w in weights.items():
        ties = int((w.abs().float() == thresh).sum())
        take = min(ties, ties_left)
        ties_left -= take
        out[n] = (below[n] + take) / w.numel()
    return out


SOLVER = Solver("magnitude", magnitude, needs=frozenset(), cite="Han et al. 2015, arXiv 1506.02626")
