"""The inverse-Hessian factor that SparseGPT and GPTQ both use (one function, one behaviour)."""
from __future__ import annotations

import torch

from .errors import LLMPruneError

MAX_DAMP_RAISES = 4  # each x10: 0.01 -> 100 x mean(diag H) at most


def inverse_hessian_cholesky(h: torch.Tensor, damp: float, who: str = "SparseGPT") -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor U of (H + damp * mean(diag H) I)^-1 in H's dtype; on failure the
    dampening is raised x10 (at most MAX_DAMP_RAISES times). Returns (U, damp used, times raised).
    H is not modified (callers pass the shared statistics as they are); inputs that were never
    active (zero on the diagonal) get a 1 there first, as the references do.

    A Hessian from few tokens, or from fp32 rounding, can be singular or slightly indefinite; more
    dampening regularises it (SparseGPT arXiv 2301.00774 sec. 4 and GPTQ arXiv 2210.17323 sec. 4,
    "dampening"). The caller records when it was raised."""
    if not damp > 0:
        raise LLMPruneError(f"--damp {damp} must be > 0 (a fraction of the mean Hessian diagonal, e.g. 0.01)")
    if not all(bool(torch.isfinite(c).all()) for c in h.view(-1).split(1 << 24)):  # in chunks: no n^2 mask
        raise LLMPruneError(f"{who}: the Hessian has inf/NaN: the layer's inputs overflowed; compute in float32 or "
                            f"bfloat16 (--dtype), or check the weights of the blocks before it")
    dead = h.diagonal() == 0
    mean_diag = torch.where(dead, torch.ones_like(h.diagonal()), h.diagonal()).mean()
    info = torch.empty((), dtype=torch.int32, device=h.device)
    for raised in range(MAX_DAMP_RAISES + 1):
        d = damp * 10.0**raised
        # one n x n working copy, factored, inverted and factored again in place: a 70B down_proj's
        # Hessian is 3.3 GB in fp32, and the textbook chain of temporaries held five of them
        a = h.clone()
        a.diagonal()[dead] = 1.0
        a.diagonal().add_(d * mean_diag)
        torch.linalg.cholesky_ex(a, out=(a, info))
        if int(info) == 0:
            torch.cholesky_inverse(a, out=a)
            torch.linalg.cholesky_ex(a, upper=True, out=(a, info))
            if int(info) == 0 and all(bool(torch.isfinite(c).all()) for c in a.view(-1).split(1 << 24)):
                return a, d, raised
        del a
    raise LLMPruneError(
        f"{who}: the Hessian is not positive definite even with dampening {d:g} x mean(diag H): "
        f"raise --damp (now {damp:g}) or use more calibration samples (--nsamples)"
    )
