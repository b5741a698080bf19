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


def linear(fmt: str, x: torch.Tensor, packed: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias for W packed in `fmt` (same signature as llmprune.kernels.ops.linear)."""
    from ..formats import get

    w = get(fmt).unpack(packed, dtype=x.dtype)  # (out, in)
    if x.shape[-1] != w.shape[1]:
        raise LLMPruneError(f"{fmt} linear: input has {x.shape[-1]} features, the packed weight expects {w.shape[1]}")
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def __getattr__(name: str):
    """linear_<format>(x, packed, bias): `linear` with the format fixed, for every registered format."""
    from ..formats import names

    if name.startswith("linear_") and name[7:] in names():
        return lambda x, packed, bias=None: linear(name[7:], x, packed, bias)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
