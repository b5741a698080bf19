"""Reference matmuls for the packed formats, pure torch: the spec the Triton kernels are tested against.

`linear_<format>(x, packed, bias=None)` = x @ W^T (+ bias) for x (..., in) and the packed weight
(out, in) laid out as documented in llmprune/formats/__init__.py. The numerics define the spec:
- sparse24: the dense weight is rebuilt in the values' dtype (exact) and multiplied in x's dtype;
- int4 formats: w = (q - z) * s is computed in fp32 (exact), rounded once to x's dtype, then
  multiplied in x's dtype (fp32 accumulation where torch does it).
The dense weight is materialized once per call: this is a specification, not a fast path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LLMPruneError


def _linear(x: torch.Tensor, fmt: str, packed: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    from ..formats import get

    w = get(fmt).unpack(packed, dtype=x.dtype)  # (out, in)
    if x.shape[-1] != w.shape[1]:
        raise LLMPruneError(f"{fmt} linear: input has {x.shape[-1]} features, the packed weight expects {w.shape[1]}")
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def linear_sparse24(x: torch.Tensor, packed: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> torch.Tensor:
    return _linear(x, "sparse24", packed, bias)


def linear_w4g128(x: torch.Tensor, packed: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> torch.Tensor:
    return _linear(x, "w4g128", packed, bias)


def linear_w4s24(x: torch.Tensor, packed: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> torch.Tensor:
    return _linear(x, "w4s24", packed, bias)


def linear_w4s50(x: torch.Tensor, packed: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> torch.Tensor:
    return _linear(x, "w4s50", packed, bias)


OPS = {"sparse24": linear_sparse24, "w4g128": linear_w4g128, "w4s24": linear_w4s24, "w4s50": linear_w4s50}


def linear(fmt: str, x: torch.Tensor, packed: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch by format name (same signature as llmprune.kernels.ops.linear)."""
    if fmt not in OPS:
        raise LLMPruneError(f"unknown format {fmt!r}: choose one of {', '.join(OPS)}")
    return OPS[fmt](x, packed, bias)
