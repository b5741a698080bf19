"""w4s50: group-sparse int4, GQSA-style (Zeng et al. 2024, "GQSA", arXiv 2412.17560).

Inputs come in groups of 16; every row keeps the same number K = (in/16)/2 of groups (50%), and
only the kept groups are stored: their int4 codes, one symmetric fp16 scale each, and which groups
they are (a bitmap on disk, sorted int16 indices at run time). Layout in __init__.
"""
from __future__ import annotations

import torch

from ..errors import LLMPruneError
from ..patterns import Pattern, keep_mask
from .bits import (
    check_2d,
    check_keep,
    check_shapes,
    need,
    pack_bitmap,
    pack_nibbles,
    quantized,
    random_scales,
    random_u8,
    unpack_bitmap,
    unpack_nibbles,
)

PATTERN = "group:16"
QUANTIZED = True
DERIVED = ("gidx",)
DEFAULT_SYMMETRIC = True
FIXED_GROUP = 16
KERNEL = ("codes", "gidx", "scales")
KERNEL_ID = 3
GROUP = 16


def _group_keep(weight: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """(out, in/16) bool: the kept groups, K per row; inferred from the non-zeros when keep is None."""
    out_f, in_f = weight.shape
    if in_f % (2 * GROUP):
        raise LLMPruneError(f"w4s50 needs in_features divisible by 32 (an even number of 16-input groups), got "
                            f"{in_f}: leave this layer dense or use --format w4g128")
    ng, k = in_f // GROUP, in_f // GROUP // 2
    if keep is None:
        nz = (weight != 0).reshape(out_f, ng, GROUP).any(-1)  # (out, in/16)
        gkeep = keep_mask(nz.float(), Pattern("unstructured"), 0.5)  # non-zero groups first, zero groups pad
        if (nz & ~gkeep).any():
            raise LLMPruneError("w4s50: some row has more than half of its 16-input groups non-zero: prune with "
                                "--pattern group:16 --sparsity 0.5 first, or pass its keep-mask")
        return gkeep
    g = keep.reshape(out_f, ng, GROUP)
    if not bool((g.all(-1) | ~g.any(-1)).all()) or not bool((g.all(-1).sum(-1) == k).all()):
        raise LLMPruneError(f"w4s50: the keep-mask does not keep whole 16-input groups, {k} of {ng} per row: "
                            f"prune with --pattern group:16 --sparsity 0.5")
    return g.all(-1)


def pack(weight: torch.Tensor, keep: torch.Tensor | None = None, quant=None, **_) -> dict[str, torch.Tensor]:
    """weight (out, in) + group:16 50% keep-mask -> bitmap, gidx, codes, scales (symmetric int4)."""
    check_2d(weight)
    out_f, in_f = weight.shape
    gkeep = _group_keep(weight, check_keep(weight, keep))  # (out, in/16)
    ng, k = in_f // GROUP, in_f // GROUP // 2
    gidx = torch.sort((~gkeep).to(torch.uint8), dim=1, stable=True).indices[:, :k]  # (out, K) ascending
    keep = gkeep.repeat_interleave(GROUP, dim=1)  # (out, in)
    q = quantized(weight * keep, keep, GROUP, True, quant, "w4s50")
    codes = q.codes.reshape(out_f, ng, GROUP).gather(1, gidx[..., None].expand(-1, -1, GROUP))  # (out, K, 16)
    return {
        "bitmap": pack_bitmap(gkeep),  # (out, ceil(in/16/8))
        "gidx": gidx.to(torch.int16),  # (out, K)
        "codes": pack_nibbles(codes.reshape(out_f, k * GROUP)),  # (out, K*8)
        "scales": q.scales.gather(1, gidx).contiguous(),  # (out, K)
    }


def unpack(packed: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    codes, scales = packed["codes"], packed["scales"]
    out_f, k = scales.shape
    gidx = packed["gidx"].long() if "gidx" in packed else _gidx(packed["bitmap"], 2 * k, k)
    q = unpack_nibbles(codes).float().reshape(out_f, k, GROUP)  # (out, K, 16)
    vals = (q - 8.0) * scales.float()[..., None]  # (out, K, 16)
    dense = torch.zeros(out_f, 2 * k, GROUP, device=codes.device)
    dense.scatter_(1, gidx[..., None].expand(-1, -1, GROUP), vals)
    return dense.reshape(out_f, 2 * k * GROUP).to(dtype or torch.float32)  # (out, in)


def _gidx(bitmap: torch.Tensor, ng: int, k: int) -> torch.Tensor:
    gkeep = unpack_bitmap(bitmap, ng)  # (out, in/16)
    return torch.sort((~gkeep).to(torch.uint8), dim=1, stable=True).indices[:, :k]  # (out, K)


def shapes(out_f: int, in_f: int, **_) -> dict:
    ng = in_f // GROUP
    return {"bitmap": ((out_f, -(-ng // 8)), torch.uint8), "codes": ((out_f, in_f // 4), torch.uint8),
            "scales": ((out_f, ng // 2), torch.float16)}


def derive(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rebuild gidx from the bitmap; a bitmap without exactly K groups per row is corrupt."""
    k = packed["scales"].shape[1]
    gkeep = unpack_bitmap(packed["bitmap"], 2 * k)
    extra = packed["bitmap"].shape[1] * 8 - 2 * k  # padding bits must be 0
    if not bool((gkeep.sum(1) == k).all()) or (extra and unpack_bitmap(packed["bitmap"], 2 * k + extra)[:, 2 * k:].any()):
        raise LLMPruneError("w4s50 bitmap is corrupted (not K kept groups per row): re-create the checkpoint")
    return {**packed, "gidx": _gidx(packed["bitmap"], 2 * k, k).to(torch.int16)}


def infer_keep(weight: torch.Tensor) -> torch.Tensor:
    return _group_keep(weight, None).repeat_interleave(GROUP, dim=1)


def gidx_from_bitmap(bitmap: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Sorted kept-group indices (out, K) int16 from a bitmap; rows must keep equally many groups."""
    bits = unpack_bitmap(bitmap, n_groups)  # (out, n_groups)
    k = int(bits[0].sum()) if bits.shape[0] else 0
    if not bool((bits.sum(1) == k).all()):
        raise LLMPruneError("w4s50: rows keep different numbers of groups; repack with pattern group:16")
    return torch.sort((~bits).to(torch.uint8), dim=1, stable=True).indices[:, :k].to(torch.int16)


def kernel_args(in_f: int, packed) -> tuple[tuple, int]:
    c, s = need(packed, "w4s50", "codes"), need(packed, "w4s50", "scales")
    if in_f % GROUP:
        raise LLMPruneError(f"w4s50 needs in_features divisible by 16 (groups of 16), got {in_f}")
    out, k = s.shape[0], (in_f // GROUP) // 2
    g = packed.get("gidx")
    if g is None:
        g = gidx_from_bitmap(need(packed, "w4s50", "bitmap"), in_f // GROUP)
    check_shapes("w4s50", in_f, {"scales": (s, (out, k)), "gidx": (g, (out, k)), "codes": (c, (out, k * 8))})
    return (c, g, s), out


def random(out_f: int, in_f: int, dtype, device, g) -> dict:
    ng, k = in_f // GROUP, in_f // (2 * GROUP)
    gidx = torch.rand(out_f, ng, generator=g, device=device).argsort(1)[:, :k].sort(1).values.to(torch.int16)
    return {"codes": random_u8((out_f, k * 8), device, g), "gidx": gidx, "scales": random_scales((out_f, k), device, g)}
