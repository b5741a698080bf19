"""w4s24: 2:4 sparsity + int4 of the kept values (sparse24's metadata, w4g128's grid).

Scales cover groups of G ORIGINAL input features (G/2 kept values). Symmetric by default, as in
the sparse-quantized kernels of Sparse-Marlin (Frantar et al. 2024, arXiv 2408.11743).
"""
from __future__ import annotations

import torch

from ..errors import LLMPruneError
from .bits import (
    check_2d,
    check_keep,
    check_shapes,
    decode_meta_24,
    encode_meta_24,
    group_count,
    keep_24,
    kept_index_24,
    meta_24_valid,
    need,
    pack_nibbles,
    quantized,
    random_meta_24,
    random_scales,
    random_u8,
    unpack_nibbles,
)

PATTERN = "2:4"
QUANTIZED = True
DEFAULT_SYMMETRIC = True
KERNEL = ("codes", "meta", "scales", "zeros?")
KERNEL_ID = 2


def pack(weight: torch.Tensor, keep: torch.Tensor | None = None, group_size: int = 128, symmetric: bool = True,
         quant=None, **_) -> dict[str, torch.Tensor]:
    """weight (out, in) + 2:4 keep-mask (inferred from the non-zeros when None) -> codes, meta, scales[, zeros]."""
    check_2d(weight)
    if group_size % 4:
        raise LLMPruneError(f"w4s24 needs a group size divisible by 4 (whole 2:4 blocks), got {group_size}: "
                            f"pass --group-size 128 (or 64, 32)")
    keep = keep_24(weight, check_keep(weight, keep), "w4s24")
    q = quantized(weight * keep, keep, group_size, symmetric, quant, "w4s24")
    idx = kept_index_24(keep)  # (out, in/2)
    packed = {
        "codes": pack_nibbles(q.codes.gather(1, idx)),  # (out, in/4)
        "meta": encode_meta_24(idx),  # (out, in/8)
        "scales": q.scales.contiguous(),  # (out, in/G)
    }
    if not symmetric:
        packed["zeros"] = q.zeros.contiguous()  # (out, in/G)
    return packed


def unpack(packed: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    codes, meta, scales = packed["codes"], packed["meta"], packed["scales"]
    out_f, in_f = meta.shape[0], meta.shape[1] * 8
    half = in_f // 2 // scales.shape[1]  # kept values per scale group
    q = unpack_nibbles(codes).float()  # (out, in/2)
    z = packed["zeros"].float().repeat_interleave(half, dim=1) if "zeros" in packed else 8.0
    vals = (q - z) * scales.float().repeat_interleave(half, dim=1)  # (out, in/2)
    dense = torch.zeros(out_f, in_f, device=codes.device).scatter_(1, decode_meta_24(meta), vals)
    return dense.to(dtype or torch.float32)


def shapes(out_f: int, in_f: int, group_size: int = 128, symmetric: bool = True, **_) -> dict:
    s = {"codes": ((out_f, in_f // 4), torch.uint8), "meta": ((out_f, in_f // 8), torch.uint8),
         "scales": ((out_f, in_f // group_size), torch.float16)}
    if not symmetric:
        s["zeros"] = ((out_f, in_f // group_size), torch.uint8)
    return s


def derive(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not meta_24_valid(packed["meta"]):
        raise LLMPruneError("w4s24 metadata is corrupted (positions not ascending): re-create the checkpoint")
    return dict(packed)


def infer_keep(weight: torch.Tensor) -> torch.Tensor:
    return keep_24(weight, None, "w4s24")


def kernel_args(in_f: int, packed) -> tuple[tuple, int]:
    c, s, z = need(packed, "w4s24", "codes"), need(packed, "w4s24", "scales"), packed.get("zeros")
    group_count("w4s24", in_f, s)
    out = s.shape[0]
    check_shapes("w4s24", in_f, {"codes": (c, (out, in_f // 4)), **({"zeros": (z, s.shape)} if z is not None else {})})
    m = need(packed, "w4s24", "meta")
    check_shapes("w4s24", in_f, {"meta": (m, (out, in_f // 8))})
    return (c, m, s, z), out


def random(out_f: int, in_f: int, dtype, device, g) -> dict:
    return {"codes": random_u8((out_f, in_f // 4), device, g), "meta": random_meta_24(out_f, in_f, device, g),
            "scales": random_scales((out_f, in_f // 128), device, g)}
