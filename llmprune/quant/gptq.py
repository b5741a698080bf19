"""GPTQ int4 quantization of a pruned layer (Frantar et al. 2022, arXiv 2210.17323).

Columns are quantized left to right (act_order off); the rounding error of column j, scaled by
the inverse Hessian, is pushed onto the columns not yet quantized (Alg. 1):
    err = (w_j - q_j) / [H^-1]_jj,    W[:, j+1:] -= err [H^-1]_{j, j+1:}
with H^-1 given by its upper Cholesky factor and lazy block updates of `blocksize` columns.
After pruning, a pruned weight is quantized to exactly 0 when its column is reached, like a kept
weight is rounded to the grid, and its error (the compensation it received from earlier columns)
is pushed on in turn: the error ends up in the KEPT weights to the right and pruned weights stay
exactly zero, bit for bit. (Masking the update instead, so pruned weights never move, ignores the
coupling through them: on correlated inputs it gains ~1% over RTN where this gains ~8%.) This is
SparseGPT's joint sparsification and quantization (arXiv 2301.00774) with the mask given.
A group's scale/zero are computed when its first column is reached, from the group's current
(already error-corrected) kept weights; with act_order (columns by decreasing H_jj) the grids are
fixed up front from the unquantized weights instead ("static groups"). Dampening and dead inputs as in
SparseGPT: H += damp * mean(diag H) * I; inputs with H_jj = 0 get weight 0.
"""
from __future__ import annotations

import torch

from ..errors import LLMPruneError
from ..linalg import inverse_hessian_cholesky
from . import Quantized
from .rtn import check_group, group_grid, quantize


@torch.no_grad()
def gptq(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor | None = None, group_size: int = 128,
         symmetric: bool = False, damp: float = 0.01, blocksize: int = 128, act_order: bool = False,
         overwrite_hessian: bool = False, **_) -> Quantized:
    """Quantize weight (out, in) to int4 given H = 2 X^T X / n (in, in); pruned weights stay 0.

    act_order: quantize the columns in order of decreasing H_jj (the inputs with the most energy
    first, while the most columns remain to absorb their error), with every group's grid fixed up
    front from the unquantized weights ("static groups"), so the groups stay the contiguous input
    ranges the formats store. overwrite_hessian: the caller gives `hessian` up (it is modified).
    """
    out_f, in_f = weight.shape
    check_group(in_f, group_size)
    if tuple(hessian.shape) != (in_f, in_f):
        raise LLMPruneError(f"GPTQ: Hessian shape {tuple(hessian.shape)} does not match in_features {in_f}")
    W = weight.detach().float().clone()
    keep = torch.ones_like(W, dtype=torch.bool) if keep is None else keep.bool().to(W.device)
    H = hessian.detach().float().to(W.device)
    H = H if overwrite_hessian else H.clone()
    dead = torch.diag(H) == 0  # inputs never active: any weight works; the reference zeroes them
    H[dead, dead] = 1
    W[:, dead] = 0
    W *= keep
    ng = in_f // group_size
    group_of = torch.arange(in_f, device=W.device) // group_size
    scales = torch.empty(out_f, ng, device=W.device)
    zeros = torch.empty(out_f, ng, device=W.device)
    if act_order:
        for g in range(ng):
            cols = slice(g * group_size, (g + 1) * group_size)
            scales[:, g], zeros[:, g] = group_grid(W[:, cols], keep[:, cols], symmetric)
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, keep, H, group_of = W[:, perm], keep[:, perm], H[perm][:, perm], group_of[perm]
    Hinv, damp_used, _ = inverse_hessian_cholesky(H, damp, "GPTQ", overwrite=True)  # H: our copy
    del H

    # lazy blocks hold whole groups, so a group's grid is computed from its fully updated columns
    B = group_size * max(1, blocksize // group_size)
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=W.device)
    for b0 in range(0, in_f, B):
        b1 = min(b0 + B, in_f)
        W1 = W[:, b0:b1].clone()  # (out, B)
        Hinv1 = Hinv[b0:b1, b0:b1]
        Err1 = torch.zeros_like(W1)
        for i in range(b1 - b0):
            j = b0 + i
            g = int(group_of[j])
            if not act_order and j % group_size == 0:
                scales[:, g], zeros[:, g] = group_grid(W1[:, i:i + group_size], keep[:, j:j + group_size], symmetric)
            s, z = scales[:, g], zeros[:, g]
            w = W1[:, i]
            q = torch.where(keep[:, j], quantize(w, s, z), z)  # pruned: q = z, dequantized 0
            err = (w - torch.where(keep[:, j], (q - z) * s, 0.0)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            codes[:, j] = q.to(torch.uint8)
            Err1[:, i] = err
        W[:, b1:] -= Err1 @ Hinv[b0:b1, b1:]
    if act_order:
        codes = codes[:, torch.argsort(perm)]
    return Quantized(codes, scales.half(), zeros.to(torch.uint8), group_size, symmetric, damp=damp_used)


@torch.no_grad()
def collect_hessians(model: torch.nn.Module, names: list[str], batches, sink_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """H = 2 X^T X / n for the named linears from one dense pass over `batches` of input ids.

    For `llmprune pack --quant gptq` on an already pruned checkpoint (not sequential: each layer
    sees the inputs of the unquantized model, as GPTQ's non-sequential variant).
    """
    from ..stats import LayerStats

    stats, hooks = {}, []
    try:
        for name in names:
            mod = model.get_submodule(name)
            stats[name] = st = LayerStats(mod.in_features, {"hessian"}, device=mod.weight.device, sink_weight=sink_weight)
            hooks.append(mod.register_forward_pre_hook(lambda m, args, st=st: st.add(args[0])))
        for ids in batches:
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return {n: s.hessian for n, s in stats.items()}
