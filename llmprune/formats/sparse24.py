"""sparse24: 2:4 semi-structured sparsity, values + 2-bit position metadata (layout in __init__).

The layout of NVIDIA's sparse tensor cores (Mishra et al. 2021, arXiv 2104.08378) with an explicit
byte order; unquantized, so the round trip is exact in the weight's dtype.
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
    keep_24,
    kept_index_24,
    meta_24_valid,
    need,
    random_meta_24,
)

PATTERN = "2:4"
QUANTIZED = False
KERNEL = ("values", "meta")
KERNEL_ID = 0


def pack(weight: torch.Tensor, keep: torch.Tensor | None = None, quant=None, **_) -> dict[str, torch.Tensor]:
    """weight (out, in) + 2:4 keep-mask (inferred from the non-zeros when None) -> values, meta."""
    check_2d(weight)
    if quant is not None:
        raise LLMPruneError("sparse24 stores unquantized values: drop --quant, or use --format w4s24")
    keep = keep_24(weight, check_keep(weight, keep), "sparse24")
    idx = kept_index_24(keep)  # (out, in/2)
    return {"values": weight.detach().gather(1, idx).contiguous(), "meta": encode_meta_24(idx)}


def unpack(packed: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    values, meta = packed["values"], packed["meta"]
    idx = decode_meta_24(meta)  # (out, in/2)
    dense = torch.zeros(meta.shape[0], meta.shape[1] * 8, dtype=values.dtype, device=values.device)
    dense.scatter_(1, idx, values)
    return dense if dtype is None else dense.to(dtype)


def shapes(out_f: int, in_f: int, **_) -> dict:
    return {"values": ((out_f, in_f // 2), None), "meta": ((out_f, in_f // 8), torch.uint8)}


def derive(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not meta_24_valid(packed["meta"]):
        raise LLMPruneError("sparse24 metadata is corrupted (positions not ascending): re-create the checkpoint")
    return dict(packed)


def infer_keep(weight: torch.Tensor) -> torch.Tensor:
    return keep_24(weight, None, "sparse24")


def kernel_args(in_f: int, packed) -> tuple[tuple, int]:
    v, m = need(packed, "sparse24", "values"), need(packed, "sparse24", "meta")
    if in_f % 8:
        raise LLMPruneError(f"sparse24 needs in_features divisible by 8, got {in_f}")
    check_shapes("sparse24", in_f, {"values": (v, (v.shape[0], in_f // 2)), "meta": (m, (v.shape[0], in_f // 8))})
    return (v, m), v.shape[0]


def random(out_f: int, in_f: int, dtype, device, g) -> dict:
    return {"values": (torch.randn(out_f, in_f // 2, generator=g, device=device) * 0.02).to(dtype),
            "meta": random_meta_24(out_f, in_f, device, g)}
