"""Round-to-nearest int4 quantization per group of inputs, the keep-mask respected.

The grid (`group_grid`) is shared with GPTQ so both produce codes the formats pack the same way:
- asymmetric: the range [min(w, 0), max(w, 0)] of the group's KEPT weights is split into 15 steps,
  s = (max - min) / 15, z = round(-min / s); 0 is on the grid, so zeros stay exactly zero;
- symmetric: s = max|w| / 7 and z = 8 (q - z in [-7, 7] is used; -8 is never needed, no clipping).
Scales are rounded to fp16 before the codes are computed, so the stored fp16 scales reproduce the
dequantized weights exactly.
"""
from __future__ import annotations

import torch

from ..errors import LLMPruneError
from . import MAXQ, SYM_ZERO, Quantized

FP16_MAX = 65504.0
FP16_TINY = 2.0**-14  # smallest normal fp16: tiny groups get this scale (error <= s/2, negligible)


def group_grid(w: torch.Tensor, keep: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of `w` (rows, G) from its kept entries -> ((rows,), (rows,))."""
    wk = torch.where(keep, w.float(), 0.0)  # pruned entries count as 0, which the grid contains anyway
    if symmetric:
        scale = wk.abs().amax(-1) / (SYM_ZERO - 1)
    else:
        lo, hi = wk.amin(-1).clamp(max=0), wk.amax(-1).clamp(min=0)
        scale = (hi - lo) / MAXQ
    if not torch.isfinite(scale).all() or bool((scale > FP16_MAX).any()):
        raise LLMPruneError("weights too large or not finite for fp16 int4 scales: check the checkpoint for inf/nan")
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # all-zero group: any scale, q = z
    scale = scale.clamp_min(FP16_TINY).half().float()  # what is stored is what is used
    if symmetric:
        zero = torch.full_like(scale, SYM_ZERO)
    else:
        zero = torch.round(-lo / scale).clamp(0, MAXQ)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 15] (float) for w with broadcastable scale and zero."""
    return torch.clamp(torch.round(w / scale) + zero, 0, MAXQ)


def rtn(weight: torch.Tensor, keep: torch.Tensor | None = None, group_size: int = 128,
        symmetric: bool = False, **_) -> Quantized:
    """Round-to-nearest int4 of weight (out, in) per group of `group_size` inputs; pruned -> q = z."""
    out_f, in_f = weight.shape
    check_group(in_f, group_size)
    w = weight.detach().float()
    keep = torch.ones_like(w, dtype=torch.bool) if keep is None else keep.bool()
    ng = in_f // group_size
    wg = w.reshape(out_f * ng, group_size)  # (out*in/G, G)
    kg = keep.reshape(out_f * ng, group_size)
    scale, zero = group_grid(wg, kg, symmetric)  # (out*in/G,)
    q = quantize(wg, scale[:, None], zero[:, None])
    q = torch.where(kg, q, zero[:, None])  # pruned weights dequantize to exactly 0
    return Quantized(
        codes=q.to(torch.uint8).reshape(out_f, in_f),
        scales=scale.half().reshape(out_f, ng),
        zeros=zero.to(torch.uint8).reshape(out_f, ng),
        group_size=group_size,
        symmetric=symmetric,
    )


def check_group(in_f: int, group_size: int) -> None:
    if group_size < 2 or group_size % 2 or in_f % group_size:
        raise LLMPruneError(
            f"int4 group size {group_size} must be even and divide in_features {in_f}: "
            f"pass --group-size with a divisor of {in_f} (e.g. {_divisor(in_f)}) or leave the layer dense"
        )


def _divisor(n: int) -> int:
    for g in (128, 64, 32, 16, 8, 4, 2):
        if n % g == 0:
            return g
    return 2
