"""The inverse-Hessian factor that SparseGPT and GPTQ both use (one function, one behaviour)."""
from __future__ import annotations

import torch

from .errors import LLMPruneError

MAX_DAMP_RAISES = 4  # each x10: 0.01 -> 100 x mean(diag H) at most
# A CPU factor at least this large is computed in place by LAPACK (one n x n buffer: the Hessian itself
# when the caller gives it up); smaller ones, and every factor on an accelerator, by torch's chain, which
# holds about three. 256 MiB in fp32 is n = 8192: a 7B/8B model's MLP down_proj and every layer of a
# 70B; 135M-270M models stay on torch's chain, so their published figures are reproduced bit for bit.
LEAN_BYTES = 256 * 2**20


def inverse_hessian_cholesky(h: torch.Tensor, damp: float, who: str = "SparseGPT",
                             overwrite: bool = False) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor U of (H + damp * mean(diag H) I)^-1 in H's dtype; on failure the
    dampening is raised x10 (at most MAX_DAMP_RAISES times). Returns (U, damp used, times raised).
    H is not modified unless `overwrite` (the caller owns H and will not read it again: a large CPU
    factor is then computed in H's own memory); inputs that were never active (zero on the
    diagonal) get a 1 there first, as the references do.

    A Hessian from few tokens, or from fp32 rounding, can be singular or slightly indefinite; more
    dampening regularises it (SparseGPT arXiv 2301.00774 sec. 4 and GPTQ arXiv 2210.17323 sec. 4,
    "dampening"). The caller records when it was raised."""
    if not damp > 0:
        raise LLMPruneError(f"--damp {damp} must be > 0 (a fraction of the mean Hessian diagonal, e.g. 0.01)")
    if not all_finite(h):
        raise LLMPruneError(f"{who}: the Hessian has inf/NaN: the layer's inputs overflowed; compute in float32 or "
                            f"bfloat16 (--dtype), or check the weights of the blocks before it")
    dead = h.diagonal() == 0
    mean_diag = torch.where(dead, torch.ones_like(h.diagonal()), h.diagonal()).mean()
    if (h.device.type == "cpu" and h.dtype in (torch.float32, torch.float64) and h.is_contiguous()
            and h.numel() * h.element_size() >= LEAN_BYTES):
        out = _factor_in_place(h if overwrite else h.clone(), dead, float(mean_diag), damp)
    else:
        out = _factor_torch(h, dead, mean_diag, damp)
    if out is None:
        raise LLMPruneError(
            f"{who}: the Hessian is not positive definite even with dampening {damp * 10.0**MAX_DAMP_RAISES:g} x "
            f"mean(diag H): raise --damp (now {damp:g}) or use more calibration samples (--nsamples)")
    return out


def all_finite(a: torch.Tensor) -> bool:
    """No inf/NaN in a, checked 4M elements at a time (no mask the size of a 3 GB matrix)."""
    return all(bool(torch.isfinite(c).all()) for c in a.reshape(-1).split(1 << 22))


def _factor_torch(h, dead, mean_diag, damp):
    """torch's Cholesky, inverse and Cholesky again on one working copy (plus LAPACK's own copy)."""
    info = torch.empty((), dtype=torch.int32, device=h.device)
    for raised in range(MAX_DAMP_RAISES + 1):
        d = damp * 10.0**raised
        a = h.clone()
        a.diagonal()[dead] = 1.0
        a.diagonal().add_(d * mean_diag)
        torch.linalg.cholesky_ex(a, out=(a, info))
        if int(info) == 0:
            torch.cholesky_inverse(a, out=a)
            torch.linalg.cholesky_ex(a, upper=True, out=(a, info))
            if int(info) == 0 and all_finite(a):
                return a, d, raised
        del a
    return None


def _factor_in_place(a, dead, mean_diag, damp):
    """The same factor in a's memory, by two LAPACK calls that touch one triangle each.

    With J the order-reversing permutation: if J H J = R^T R (R upper), then H^-1 = J R^-1 R^-T J, so
    U = J R^-T J is upper triangular with U^T U = H^-1. a is reversed (J a J), potrf writes R and trtri
    R^-1 over one triangle, and reversing back gives U. The other triangle keeps H, so a failed attempt
    is undone and retried with more dampening; nothing n x n is allocated."""
    from scipy.linalg import lapack

    potrf, trtri = (lapack.spotrf, lapack.strtri) if a.dtype == torch.float32 else (lapack.dpotrf, lapack.dtrtri)
    diag = a.diagonal().clone()
    diag[dead] = 1.0
    _reverse(a)
    diag = diag.flip(0)
    f = a.numpy().T  # Fortran-ordered view of a's memory: LAPACK's upper triangle is a's lower one
    for raised in range(MAX_DAMP_RAISES + 1):
        d = damp * 10.0**raised
        a.diagonal().copy_(diag + d * mean_diag)
        r, info = potrf(f, lower=0, overwrite_a=1, clean=0)  # R, R^T R = J H J
        if info == 0:
            r, info = trtri(r, lower=0, overwrite_c=1)  # R^-1
        if r.ctypes.data != f.ctypes.data:  # (scipy copied after all: put the result where it belongs)
            f[...] = r
        if info == 0 and all_finite(torch.from_numpy(r.T)):
            _reverse(a)  # a's lower triangle held R^-T: reversed, U = J R^-T J in the upper one
            return a.triu_(), d, raised
        _restore_lower(a)
    return None


def _reverse(a: torch.Tensor, chunk: int = 1 << 22) -> None:
    """a <- J a J in place: for a square matrix, the reversal of its storage; chunked, O(chunk) memory."""
    flat = a.view(-1)
    n, i = flat.numel(), 0
    while (c := min(chunk, (n - 2 * i) // 2)) > 0:
        front, back = flat[i:i + c], flat[n - i - c:n - i]
        tmp = front.clone()
        front.copy_(back.flip(0))
        back.copy_(tmp.flip(0))
        i += c


def _restore_lower(a: torch.Tensor, b: int = 256) -> None:
    """The strict lower triangle of symmetric a rebuilt from its strict upper one, b rows at a time."""
    n = a.shape[0]
    for i in range(0, n, b):
        j = min(i + b, n)
        a[i:j, :i] = a[:i, i:j].T
        blk = a[i:j, i:j]
        blk.copy_(blk.triu() + blk.triu(1).T)
