"""SparseGPT: massive language models can be accurately pruned in one-shot
(Frantar & Alistarh 2023, arXiv 2301.00774).

Layer-wise OBS reconstruction: minimise ||W X - W' X||^2 with H = 2 X^T X / n. Columns are
pruned left to right; pruning w_q in column q of a row moves the not-yet-fixed weights F = {q..}
by the OBS update (sec. 3, eq. 3)

    delta_F = -w_q / [H_F^-1]_qq * [H_F^-1]_{q,:}

and the rows of H_F^-1 for every q at once are the rows of the upper Cholesky factor U of H^-1
(U^T U = H^-1, so [H_F^-1]_{q,:} = U_qq U_{q,q:}; Algorithm 1). Updates are applied inside a
block of `blocksize` columns as they happen and to the columns right of the block once per
block ("lazy batch updates"). The mask is chosen adaptively per block (sec. 3.3) by the OBS
saliency w^2 / [H_F^-1]_qq = (w / U_qq)^2.

How many weights each block prunes (the reference takes a fixed fraction of each block across
all rows, which gives neither an exact per-row nor an exact per-layer count):
- unstructured, scope="layer" (default, as the reference: rows may differ): block b prunes
  n_pruned(out*end_b) - n_pruned(out*start_b) weights across all rows, so the layer prunes exactly
  n_pruned(out*in, sparsity) -> check with satisfies(keep, pattern, sparsity, scope="layer").
- unstructured, scope="row": the same split per row -> exactly n_pruned(in, sparsity) per row.
- N:M: for every group of M columns, at the group's first column (with the weights as updated
  so far), the M-N lowest saliencies of each row are pruned (sec. 3.3, "semi-structured").
- group:G: whole groups are scored by the sum of their saliencies, per row, with the per-row count
  split over blocks as for scope="row", so every row prunes exactly n_pruned(in/G) groups.
"""
from __future__ import annotations

import torch

from ..errors import LLMPruneError
from ..linalg import inverse_hessian_cholesky
from ..patterns import Pattern, keep_mask, n_pruned
from . import Solved, Solver


def _block_keep(score: torch.Tensor, pattern: Pattern, sparsity: float, start: int, end: int,
                scope: str) -> torch.Tensor:
    """Keep-mask (out, end-start) for one block of columns from its saliencies (higher = keep)."""
    out_f, width = score.shape
    if pattern.kind == "group":
        g = pattern.group
        k = n_pruned(end // g, sparsity) - n_pruned(start // g, sparsity)  # groups per row in this block
        return keep_mask(score, pattern, k / (width // g))  # keep_mask sums scores over each group
    if scope == "row":
        k = n_pruned(end, sparsity) - n_pruned(start, sparsity)
        return keep_mask(score, pattern, k / width, scope="row")
    k = n_pruned(out_f * end, sparsity) - n_pruned(out_f * start, sparsity)
    return keep_mask(score, pattern, k / score.numel(), scope="layer")


@torch.no_grad()
def sparsegpt(weight: torch.Tensor, stats, pattern: Pattern, sparsity: float, damp: float = 0.01,
              blocksize: int = 128, scope: str = "layer", **_) -> Solved:
    """Prune one linear layer's weight (out, in) by SparseGPT; returns the updated weight."""
    if not damp > 0:
        raise LLMPruneError(f"--damp {damp} must be > 0: it is the fraction of mean(diag H) added, e.g. 0.01")
    if blocksize < 1:
        raise LLMPruneError(f"--blocksize {blocksize} must be >= 1, e.g. 128")
    if scope not in ("layer", "row"):
        raise LLMPruneError(f"sparsegpt scope {scope!r}: use 'layer' or 'row'")
    out_f, in_f = weight.shape
    pattern.check_shape(in_f)
    unit = pattern.m if pattern.kind == "nm" else pattern.group if pattern.kind == "group" else 1
    bs = -(-blocksize // unit) * unit  # N:M groups and pruning groups never straddle two blocks

    h = stats.take_hessian().to(weight.device, torch.float32)  # (in, in), ours: factored in place
    w = weight.to(torch.float32).clone()  # (out, in)
    w[:, h.diagonal() == 0] = 0.0  # inputs that were always zero: any weight works, so zero it (as the reference)
    u, damp_used, raised = inverse_hessian_cholesky(h, damp, "SparseGPT", overwrite=True)  # dead inputs: 1 there
    del h

    keep = torch.ones(out_f, in_f, dtype=torch.bool, device=w.device)
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        w1 = w[:, i1:i2].clone()  # (out, b)
        u1 = u[i1:i2, i1:i2]  # (b, b)
        d = u1.diagonal()  # (b,) sqrt([H_F^-1]_qq)
        err1 = torch.zeros_like(w1)  # (out, b) (w_q - q_q) / U_qq, for the lazy update
        if pattern.kind != "nm":
            keep[:, i1:i2] = _block_keep((w1 / d).pow(2), pattern, sparsity, i1, i2, scope)
        for i in range(i2 - i1):
            if pattern.kind == "nm" and i % pattern.m == 0:
                sal = (w1[:, i:i + pattern.m] / d[i:i + pattern.m]).pow(2)  # (out, M)
                keep[:, i1 + i:i1 + i + pattern.m] = keep_mask(sal, pattern, 1 - pattern.n / pattern.m)
            col = w1[:, i]
            q = col * keep[:, i1 + i]
            e = (col - q) / d[i]  # (out,)
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]  # OBS update of this row's weights not yet fixed
            w1[:, i] = q  # exact zeros (the update above leaves col - e*d = q up to rounding)
            err1[:, i] = e
            loss += e.double().pow(2).sum() / 2  # OBS error estimate (w_q^2 / [H_F^-1]_qq / 2)
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]  # lazy batch update of the columns right of the block
    info = {"damp_used": damp_used, "damp_raised": raised, "obs_loss": float(loss)}
    return Solved(w.mul_(keep).to(weight.dtype), keep, info)


SOLVER = Solver("sparsegpt", sparsegpt, needs=frozenset({"hessian"}), sequential=True,
                cite="Frantar & Alistarh 2023, arXiv 2301.00774")
