"""DSnoT: Dynamic Sparse No Training (Zhang et al. 2023, ICLR 2024, arXiv 2310.08915).

Training-free fine-tuning of a mask: start from a pruning solver's mask and swap weights one
pair at a time per output row (all rows in parallel) to shrink the expected reconstruction
error of the row, eps = sum_j (w_j - w'_j) mu_j  (sec. 4.1):

- grow  j = argmax over pruned j of  sign(eps) * w_j mu_j / Var(x_j)^pow_of_var_regrowing   (eq. 5)
  (restoring w_j moves eps by -w_j mu_j; low-variance inputs are preferred, they add little noise);
- prune k = argmin over kept k of  |w'_k| ||x_k||_2 * Var(x_k)^pow_of_var_pruning        (eq. 6)
  among those with sign(w'_k mu_k) = -sign(eps) (pruning moves eps by +w'_k mu_k);
  for N:M, k is taken from j's block of M inputs and the sign is not restricted (and with
  init magnitude it is ranked by |w'_k| alone: the reference ranks a block by the init's score).

Reference followed: zyxxmu/DSnoT at 4c029df (2024-01-16), whose main.py defaults date from 297993f
(2023-12-02): update_threshold 0.1, max_cycle_time 50, pow_of_var_regrowing 1, skip_layer "mlp",
without_same_sign True. Hence, as there:
- mu_j is the input's sum over a sequence's tokens averaged over sequences (its per-token mean
  times the tokens per sequence, `lib/layerwrapper.py` L60), so eps is a per-sequence error and
  `update_threshold` 0.1 is compared with it: a row stops once |eps| <= 0.1 on that scale (the
  calibration's own sequence length: 2048 tokens there, 512 under our P-cpu protocol);
- Var(x_j) is the variance within each sequence (about its own mean) averaged over sequences, as
  `lib/layerwrapper.py` L47-53 computes it one sequence at a time (`stats.seq_var`), not the
  variance over all tokens;
- the sign rule (reject a swap that would flip the sign of eps) applies to N:M only; the
  unstructured branch skips it because that release's `--without_same_sign` is an argparse
  `type=bool` defaulting to True. The first commit (dd4e2ee, 2023-10-14: threshold 0, 10 cycles,
  power 0, no skip) applied it in both branches (2da5814, the same day, dropped it for unstructured
  and set skip "mlp"): same_sign=True gives that rule;
- `skip` "mlp": the MLP linears keep the init solver's mask (layer names come from the engine);
  skip="none" refines every linear, "self_attn" only the MLP.
A row stops (for good) at its first rejected swap, or when no candidate is left. Our extra rule,
off by default (lower_error=True): also reject a swap that would increase the modelled squared
error E||(w - w') x||^2, with the exact second moment E[x x^T] = H/2 when a Hessian was collected
(init sparsegpt or alps), otherwise with inputs taken as uncorrelated: eps^2 + sum_j (w_j - w'_j)^2 Var(x_j)
(eps per token, Var over all tokens).
Each swap exchanges one pruned and one kept weight of the same row (and the same M-block), so the
per-row count and the N:M pattern hold at every step. Weights already swapped are frozen: never
swapped back. (The reference walks fixed sorted lists with two pointers per row, which is the same
choice as long as a row has candidates; a row here stops when none is left, where the reference's
pointers run on into kept weights and can break the row's count or N:M pattern: not reproduced.)
Kept weights keep the init solver's values (SparseGPT's or ALPS's updates; the reference takes a
per-row mask from SparseGPT's saliency w^2/U_jj^2 (U: H^-1's Cholesky factor) but keeps the dense
values, and ranks an N:M block by that saliency where we use Wanda's score); grown weights get their
original value, as the reference does. The reference never reads pow_of_var_pruning, so its default here is 0 (= the
reference).
"""
from __future__ import annotations

import torch

from ..errors import LLMPruneError
from ..patterns import Pattern
from . import Solved, Solver

INITS = ("wanda", "sparsegpt", "alps", "magnitude")
SKIPS = ("mlp", "self_attn", "none")
_TINY = 1e-12  # variance floor: a constant input has zero variance


def _init_solver(init: str) -> Solver:
    if init not in INITS:
        raise LLMPruneError(f"dsnot --init {init!r} is not a mask solver: choose one of {', '.join(INITS)}")
    from . import get

    return get(init)


@torch.no_grad()
def dsnot(weight: torch.Tensor, stats, pattern: Pattern, sparsity: float, init: str = "wanda",
          max_cycles: int = 50, update_threshold: float = 0.1, pow_of_var_regrowing: float = 1,
          pow_of_var_pruning: float = 0, same_sign: bool | None = None, lower_error: bool = False,
          skip: str = "mlp", layer: str | None = None, **opts) -> Solved:
    """Refine the init solver's mask of one linear layer (out, in) by DSnoT's grow/prune cycles."""
    solver = _init_solver(init)
    if pattern.kind == "group":
        raise LLMPruneError("dsnot swaps single weights, so it cannot keep a group:G pattern: "
                            "use --solver sparsegpt or wanda for group patterns")
    if max_cycles < 0:
        raise LLMPruneError(f"--max-cycles {max_cycles} must be >= 0, e.g. 50")
    if skip not in SKIPS:
        raise LLMPruneError(f"dsnot skip {skip!r}: choose one of {', '.join(SKIPS)}")
    exact = lower_error and "hessian" in getattr(stats, "needs", ())
    # (read before the init solver: SparseGPT may take the statistics' Hessian over, LayerStats.take_hessian)
    c = stats.hessian.to(weight.device, torch.float32) / 2 if exact else None  # (in, in) E[x x^T]
    first = solver.fn(weight, stats, pattern, sparsity, layer=layer, **opts)
    if skip != "none" and layer is not None and skip in layer.split("."):
        return Solved(first.weight, first.keep, {**first.info, "dsnot_init": init, "dsnot_skipped": True})
    same_sign = pattern.kind == "nm" if same_sign is None else bool(same_sign)
    w = weight.to(torch.float32)  # (out, in)
    keep = first.keep.clone()
    cur = first.weight.to(torch.float32).clone()  # w' (out, in): zero where pruned
    out_f, in_f = w.shape
    dev = w.device
    mu = stats.mean.to(dev, torch.float32)  # (in,) per token
    per_seq = stats.n / max(stats.n_seqs, 1)  # tokens per sequence: eps * per_seq is the reference's eps
    # Var(x_j) of eqs. 5-6 as the reference computes it: within each sequence, averaged over them
    # (lib/layerwrapper.py L47-53); the lower_error model needs the variance over all tokens (var)
    seq_var = stats.seq_var.to(dev, torch.float32).clamp_min(_TINY)  # (in,)
    var = stats.var.to(dev, torch.float32).clamp_min(_TINY)  # (in,)
    norm = stats.sq_norm.to(dev, torch.float32).sqrt()  # (in,) ||x_j||_2
    grow_base = w * mu / seq_var.pow(pow_of_var_regrowing)  # (out, in) eq. 5 without the sign
    # eq. 6 is |w'_k| * prune_scale (in,): Wanda's score, as the reference ranks (lib/prune.py L691), but
    # for N:M it ranks j's block by the init's own score (L627 initial_metric): |w| for magnitude
    own = pattern.kind == "nm" and init == "magnitude"
    prune_scale = (torch.ones_like(norm) if own else norm) * seq_var.pow(pow_of_var_pruning)

    d = w - cur  # (out, in) what the layer lost
    eps = d @ mu  # (out,) expected error per row
    cd = d @ c if exact else None  # (out, in) E[x x^T] d, kept up to date for the exact model

    frozen = torch.zeros_like(keep)
    active = torch.ones(out_f, dtype=torch.bool, device=dev)
    rows = torch.arange(out_f, device=dev)
    cols = torch.arange(in_f, device=dev)
    swaps = cycles = 0
    for cycles in range(1, max_cycles + 1):
        active &= eps.abs() * per_seq > update_threshold
        if not bool(active.any()):
            cycles -= 1
            break
        sgn = torch.sign(eps)[:, None]  # (out, 1)
        g_score = (sgn * grow_base).masked_fill(keep | frozen, -float("inf"))
        g_score = g_score.masked_fill(g_score <= 0, -float("inf"))  # only growths that shrink |eps|
        g_best, j = g_score.max(1)  # (out,)
        p_ok = keep & ~frozen
        if pattern.kind == "nm":
            p_ok &= (cols // pattern.m)[None, :] == (j // pattern.m)[:, None]  # j's block only
        else:
            p_ok &= sgn * cur * mu < 0
        p_score = (cur.abs() * prune_scale).masked_fill(~p_ok, float("inf"))
        p_best, k = p_score.min(1)  # (out,)

        wj, ck = w[rows, j], cur[rows, k]  # grown weight's value, pruned weight's current value
        eps_new = eps - wj * mu[j] + ck * mu[k]
        dj, dk = -d[rows, j], ck  # change of d at j (to 0) and at k (to w_k)
        # change of the modelled E||(w - w')x||^2 per row if it makes this swap; < 0 = better
        if not lower_error:
            change = None
        elif exact:
            change = (2 * (dj * cd[rows, j] + dk * cd[rows, k]) + dj.pow(2) * c[j, j] + dk.pow(2) * c[k, k]
                    + 2 * dj * dk * c[j, k])
        else:
            change = (eps_new.pow(2) - eps.pow(2) + var[k] * (w[rows, k].pow(2) - d[rows, k].pow(2))
                    - var[j] * d[rows, j].pow(2))
        ok = active & torch.isfinite(g_best) & torch.isfinite(p_best)
        if same_sign:
            ok &= torch.sign(eps_new) == sgn[:, 0]
        if lower_error:
            ok &= change < 0
        active &= ok
        if not bool(ok.any()):
            break
        r, j, k = rows[ok], j[ok], k[ok]
        keep[r, j], keep[r, k] = True, False
        cur[r, j], cur[r, k] = w[r, j], 0.0
        frozen[r, j] = frozen[r, k] = True
        if exact:
            cd[r] += dj[ok, None] * c[j] + dk[ok, None] * c[k]
        d[r, j], d[r, k] = 0.0, w[r, k]
        eps = torch.where(ok, eps_new, eps)
        swaps += int(ok.sum())
    info = {**first.info, "dsnot_init": init, "dsnot_swaps": swaps, "dsnot_cycles": cycles}
    return Solved((cur * keep).to(weight.dtype), keep, info)


def _needs(opts: dict) -> frozenset:
    return frozenset({"moments", "norms"}) | _init_solver(opts.get("init", "wanda")).needs


SOLVER = Solver("dsnot", dsnot, needs=frozenset({"moments", "norms"}), sequential=False,
                cite="Zhang et al. 2023, arXiv 2310.08915", needs_fn=_needs,
                sequential_fn=lambda opts: _init_solver(opts.get("init", "wanda")).sequential)
