"""ALPS: improved optimization for highly sparse one-shot pruning of LLMs
(Meng, Behdin, Wang & Mazumder, NeurIPS 2024, arXiv 2406.07831).

The layer-wise reconstruction problem, row by row (all rows at once), eq. (1):

    min_W  (W - Ŵ) H (W - Ŵ)^T    s.t.  W in S        H = X^T X + damp * mean(diag) I

with S = "k weights kept per layer" (unstructured) or "N of every M inputs" (N:M). Everything is
solved in the variables scaled by E = diag(H)^1/2 (W <- W E, H <- E^-1 H E^-1: unit diagonal, a
Jacobi preconditioning), where keeping the largest |W| is Wanda's mask.

1. ADMM on the split W = D (sec. 3.1, Algorithm 1), with V the scaled dual:
       W <- (Ŵ H + rho D - V) (H + rho I)^-1       ridge step; H = Q diag(L) Q^T once per layer
       D <- P_S(W + V / rho)                        projection: keep the largest |.| (per layer / per block of M)
       V <- V + rho (W - D)
2. The rho schedule that fixes the support (sec. 3.2): every `update_every` iterations, with s the
   number of mask entries that changed since the last check and k the number of weights kept,
       rho *= 1.3 if s > 0.1 k,  1.2 if s > 0.005 k,  1.1 if s >= 1;   stop once s = 0,
   or after `switch_iter` iterations once s < 0.0003 k. While rho has not grown yet, a rho that lets
   the support barely move is too large for this layer: it is divided by 5 (restarting from the
   initial point if the support moved at all), as the reference code does. rho stays <= 1e6.
3. The support of P_S(W) is then fixed and the kept weights are refit by preconditioned conjugate
   gradient (sec. 3.3): for every row, H_SS w_S = (Ŵ H)_S, `pcg_steps` steps from the ADMM point
   (a masked matmul per step; the preconditioner is the Jacobi scaling above).

Defaults are the paper's / reference code's (mazumder-lab/ALPS, alps.py and llama.py): rho0 = 0.1,
at most 300 iterations, rho updated every 3, switch after 30, 10 PCG steps, 1% ridge, one top-k over
the whole layer for unstructured sparsity. Differences: dead inputs (always zero) are zeroed as in
SparseGPT, and the engine solves a block's linears group by group (true sequential, as SparseGPT
here) where the reference solves them all on the dense block's inputs.
"""
from __future__ import annotations

import torch

from ..errors import LLMPruneError
from ..linalg import all_finite
from ..patterns import Pattern, n_pruned
from . import Solved, Solver

RHO_MAX = 1e6


def project(z: torch.Tensor, pattern: Pattern, sparsity: float, scope: str = "layer") -> torch.Tensor:
    """Keep-mask of P_S(z): the largest |z| per layer (or per row), or N of every M per row."""
    out_f, in_f = z.shape
    a = z.abs()
    if pattern.kind == "nm":
        blocks = a.reshape(out_f, in_f // pattern.m, pattern.m)  # (out, in/M, M)
        idx = blocks.topk(pattern.n, dim=-1, sorted=False).indices
        return torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, idx, True).reshape(out_f, in_f)
    if scope == "row":
        idx = a.topk(in_f - n_pruned(in_f, sparsity), dim=1, sorted=False).indices
        return torch.zeros_like(a, dtype=torch.bool).scatter_(1, idx, True)
    flat = a.reshape(-1)
    idx = flat.topk(flat.numel() - n_pruned(flat.numel(), sparsity), sorted=False).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(0, idx, True).reshape(out_f, in_f)


def pcg(h: torch.Tensor, b: torch.Tensor, keep: torch.Tensor, w: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` of conjugate gradient on H_SS w_S = b_S for every row at once (S = keep of that row),
    from w (zero off S). h (in, in) has a unit diagonal, so this is Jacobi-preconditioned CG."""
    tiny = torch.finfo(w.dtype).tiny
    r = (b - w @ h) * keep  # (out, in) residual on the support
    p = r.clone()
    rr = (r * r).sum(1, keepdim=True)  # (out, 1)
    for _ in range(steps):
        hp = (p @ h) * keep  # (out, in)
        alpha = rr / (p * hp).sum(1, keepdim=True).clamp_min(tiny)
        w = w + alpha * p
        r = r - alpha * hp
        rr_new = (r * r).sum(1, keepdim=True)
        p = r + (rr_new / rr.clamp_min(tiny)) * p
        rr = rr_new
    return w


def objective(w: torch.Tensor, w0: torch.Tensor, h: torch.Tensor) -> float:
    """(W - Ŵ) H (W - Ŵ)^T summed over rows: the layer's squared reconstruction error."""
    d = (w - w0).double()
    return float(((d @ h.double()) * d).sum())


@torch.no_grad()
def alps(weight: torch.Tensor, stats, pattern: Pattern, sparsity: float, rho: float = 0.1, max_iter: int = 300,
         update_every: int = 3, switch_iter: int = 30, pcg_steps: int = 10, damp: float = 0.01,
         scope: str = "layer", **_) -> Solved:
    """Prune one linear layer's weight (out, in) by ALPS; returns the refit weight and its mask."""
    if pattern.kind == "group":
        raise LLMPruneError("alps solves unstructured and N:M sparsity; use --solver sparsegpt or wanda for group:G")
    if not rho > 0 or max_iter < 1 or update_every < 1 or pcg_steps < 0:
        raise LLMPruneError(f"alps: --rho {rho} must be > 0, --max-iter {max_iter} and update_every {update_every} "
                            f">= 1, --pcg-steps {pcg_steps} >= 0 (defaults 0.1, 300, 3, 10)")
    if not damp >= 0:
        raise LLMPruneError(f"--damp {damp} must be >= 0: the ridge term, a fraction of mean(diag H), e.g. 0.01")
    if scope not in ("layer", "row"):
        raise LLMPruneError(f"alps scope {scope!r}: use 'layer' or 'row'")
    out_f, in_f = weight.shape
    pattern.check_shape(in_f)
    h = stats.hessian.to(weight.device, torch.float32)  # (in, in), a new matrix; its scale cancels below
    if not all_finite(h):
        raise LLMPruneError("ALPS: the Hessian has inf/NaN (activations overflowed): load the model in "
                            "float32 or bfloat16 (--dtype) instead of float16")
    w0 = weight.to(torch.float32).clone()  # (out, in) Ŵ
    dead = h.diagonal() == 0  # inputs that were always zero: any weight works, so zero it (as SparseGPT)
    h[dead, dead] = 1.0
    w0[:, dead] = 0.0
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    e = h.diagonal().sqrt()  # (in,) Jacobi scaling
    h = h / e[:, None] / e[None, :]  # (in, in), unit diagonal
    w0 = w0 * e  # (out, in) in the scaled variables
    b = w0 @ h  # (out, in) Ŵ H
    lam, q = torch.linalg.eigh(h.double())  # H = Q diag(L) Q^T

    def ridge_inverse(r: float) -> torch.Tensor:  # (H + rho I)^-1, (in, in)
        return ((q / (lam + r)) @ q.T).float()

    keep0 = project(w0, pattern, sparsity, scope)
    k = int(keep0.sum())
    w, d, v = w0, w0 * keep0, torch.zeros_like(w0)
    keep_last, grown, inv, it = keep0, False, ridge_inverse(rho), 0
    for it in range(1, max_iter + 1):
        w = (b + rho * d - v) @ inv  # (out, in)
        z = w + v / rho
        keep = project(z, pattern, sparsity, scope)
        d = z * keep
        v = v + rho * (w - d)
        if it % update_every:
            continue
        s = int((keep != keep_last).sum())  # support changes since the last check
        keep_last = keep
        if s > 0.1 * k:
            rho, grown = rho * 1.3, True
        elif s > 0.005 * k:
            rho, grown = rho * 1.2, True
        elif s >= 1:
            if grown:
                rho *= 1.1
            else:  # rho0 too large: the support hardly moves from the initial one; start again lower
                rho /= 5
                w, d, v, keep_last = w0, w0 * keep0, torch.zeros_like(w0), keep0
        elif grown:
            break  # the support is fixed
        else:
            rho /= 5
        if it >= switch_iter and s < 3e-4 * k:
            break
        rho = min(rho, RHO_MAX)
        inv = ridge_inverse(rho)

    keep = project(w, pattern, sparsity, scope)
    w = w * keep
    err_admm = objective(w, w0, h)
    w = pcg(h, b, keep, w, pcg_steps) * keep
    err, ref = objective(w, w0, h), objective(torch.zeros_like(w0), w0, h)
    info = {"alps_iters": it, "alps_rho": rho, "alps_rel_err_admm": err_admm / max(ref, 1e-30),
            "alps_rel_err": err / max(ref, 1e-30)}
    return Solved((w / e).to(weight.dtype) * keep, keep, info)


SOLVER = Solver("alps", alps, needs=frozenset({"hessian"}), sequential=True,
                cite="Meng et al. 2024 (NeurIPS), arXiv 2406.07831")
