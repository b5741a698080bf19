"""w4g128: int4 weights with one fp16 scale (and uint8 zero point) per group of G inputs.

The grouped int4 layout of GPTQ (Frantar et al. 2022, arXiv 2210.17323) with an explicit byte
order (layout in __init__). Exact zeros in the weight (pruned weights) stay exactly zero.
"""
from __future__ import annotations

import torch

from .bits import (
    check_2d,
    check_keep,
    check_shapes,
    group_count,
    need,
    pack_nibbles,
    quantized,
    random_scales,
    random_u8,
    unpack_nibbles,
)

PATTERN = None
QUANTIZED = True
DEFAULT_SYMMETRIC = False
KERNEL = ("codes", "scales", "zeros?")
KERNEL_ID = 1


def pack(weight: torch.Tensor, keep: torch.Tensor | None = None, group_size: int = 128, symmetric: bool = False,
         quant=None, **_) -> dict[str, torch.Tensor]:
    """weight (out, in) -> codes, scales[, zeros]. keep=None keeps the non-zeros (zeros stay zero)."""
    check_2d(weight)
    keep = check_keep(weight, keep)
    keep = weight != 0 if keep is None else keep
    q = quantized(weight, keep, group_size, symmetric, quant, "w4g128")
    packed = {"codes": pack_nibbles(q.codes), "scales": q.scales.contiguous()}  # (out, in/2), (out, in/G)
    if not symmetric:
        packed["zeros"] = q.zeros.contiguous()  # (out, in/G)
    return packed


def unpack(packed: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    codes, scales = packed["codes"], packed["scales"]
    q = unpack_nibbles(codes).float()  # (out, in)
    g = q.shape[1] // scales.shape[1]
    z = packed["zeros"].float().repeat_interleave(g, dim=1) if "zeros" in packed else 8.0
    w = (q - z) * scales.float().repeat_interleave(g, dim=1)  # (out, in), exact in fp32
    return w.to(dtype or torch.float32)


def shapes(out_f: int, in_f: int, group_size: int = 128, symmetric: bool = False, **_) -> dict:
    s = {"codes": ((out_f, in_f // 2), torch.uint8), "scales": ((out_f, in_f // group_size), torch.float16)}
    if not symmetric:
        s["zeros"] = ((out_f, in_f // group_size), torch.uint8)
    return s


def derive(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(packed)


def infer_keep(weight: torch.Tensor) -> torch.Tensor:
    return weight != 0


def kernel_args(in_f: int, packed) -> tuple[tuple, int]:
    c, s, z = need(packed, "w4g128", "codes"), need(packed, "w4g128", "scales"), packed.get("zeros")
    group_count("w4g128", in_f, s)
    out = s.shape[0]
    check_shapes("w4g128", in_f, {"codes": (c, (out, in_f // 2)), **({"zeros": (z, s.shape)} if z is not None else {})})
    return (c, s, z), out


def random(out_f: int, in_f: int, dtype, device, g) -> dict:
    return {"codes": random_u8((out_f, in_f // 2), device, g), "scales": random_scales((out_f, in_f // 128), device, g)}
