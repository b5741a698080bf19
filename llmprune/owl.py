"""OWL: Outlier Weighed Layerwise sparsity (Yin et al. 2023, arXiv 2310.05175).

Blocks with more outliers are pruned less. A block's outlier ratio D is the fraction of its Wanda
scores |W_ij| ||X_j||_2 (over all its linears together) above M times their mean (sec. 4). The
ratios are mapped linearly onto sparsities in a band of width 2*lambda whose mean is the target:

    S_l = target - (d_l - mean(d)),   d_l = (D_l - min D) / (max D - min D) * 2 lambda

as the reference code (luuyin/OWL, lib/prune_all.py) computes it; so max S - min S = 2 lambda and
every S_l lies within target +- 2 lambda (the paper's "S - lambda .. S + lambda" when the ratios are
spread symmetrically).

Use: `layer_sparsities(model, names, calib_ids, target)` runs one pass over the dense model (as
the reference does), takes each block's Wanda scores, and returns every linear's sparsity for the
pruning pass (unstructured or group patterns; N:M fixes the sparsity).
"""
from __future__ import annotations

import torch

from .errors import LLMPruneError


@torch.no_grad()
def outlier_ratio(scores: list[torch.Tensor], M: float = 5.0) -> float:
    """Fraction of all entries of `scores` (one block's Wanda scores, any shapes) above M x their mean."""
    if M <= 0:
        raise LLMPruneError(f"--owl-m {M} must be > 0: outliers are scores above M x the mean, e.g. 5")
    count = sum(s.numel() for s in scores)
    if count == 0:
        raise LLMPruneError("OWL needs the Wanda scores of at least one linear layer per block")
    # two passes instead of one concatenation: a block's scores can be hundreds of MB
    mean = sum(float(s.double().sum()) for s in scores) / count
    above = sum(int((s.double() > M * mean).sum()) for s in scores)
    return above / count


def owl_sparsities(ratios: list[float], target: float, lam: float = 0.08) -> list[float]:
    """Per-block sparsities: higher outlier ratio -> lower sparsity; mean = target, spread = 2*lam."""
    if not ratios:
        raise LLMPruneError("OWL needs at least one block's outlier ratio")
    if not 0.0 <= target < 1.0:
        raise LLMPruneError(f"--sparsity {target} is outside [0, 1): give the fraction of weights to zero, "
                            "e.g. 0.5")
    if lam < 0:
        raise LLMPruneError(f"--owl-lambda {lam} must be >= 0, e.g. 0.08")
    r = torch.tensor(ratios, dtype=torch.float64)  # (blocks,)
    spread = float(r.max() - r.min())
    if spread == 0.0 or lam == 0.0:  # no signal to redistribute by
        return [float(target)] * len(ratios)
    dev = (r - r.min()) / spread * (2 * lam)  # (blocks,) in [0, 2 lam]
    s = target - (dev - dev.mean())
    if float(s.min()) < 0.0 or float(s.max()) >= 1.0:
        raise LLMPruneError(
            f"OWL sparsities span {float(s.min()):.3f}..{float(s.max()):.3f}, outside [0, 1): "
            f"lower --owl-lambda (now {lam:g}) or move --sparsity away from 0 and 1"
        )
    return s.tolist()


@torch.no_grad()
def layer_sparsities(model, names: list[str], calib_ids: torch.Tensor, sparsity: float,
                     batch_size: int = 8, device="cpu", progress: bool = True, m: float = 5.0,
                     lam: float = 0.08) -> dict[str, float]:
    """{linear name: sparsity}: all linears of a block share the block's OWL sparsity. Blocks are
    walked dense (nothing is pruned here), so every block's ratio uses the dense model's inputs."""
    from . import arch as archmod
    from . import walker
    from .solvers.wanda import wanda_score

    a = archmod.arch_of(model)
    planner = archmod.Planner(model, gates=True)  # every target; `names` says which are pruned
    per_block: list[list[str]] = []
    ratios: list[float] = []
    for block in walker.walk(model, calib_ids, batch_size, device, progress, desc="OWL outlier ratios"):
        prefix = f"{a.blocks}.{block.index}."
        plan = planner(block)  # targets in compute order: the last one ends the statistics pass
        mods = {prefix + n: plan.targets[n] for n in plan.order if prefix + n in names}
        if not mods:
            continue
        with walker.collect(mods, {"norms"}) as stats:
            block.run(stop_after=archmod.owner(plan.targets[plan.order[-1]]))
        scores = [wanda_score(mod.weight.data, stats[n].sq_norm) for n, mod in mods.items()]
        ratios.append(outlier_ratio(scores, m))
        del scores
        per_block.append(list(mods))
    block_s = owl_sparsities(ratios, sparsity, lam)
    return {n: s for names_b, s in zip(per_block, block_s) for n in names_b}
