"""Runtime replacements for packed linears: the model runs on the packed tensors, never a dense copy.

PackedLinear holds a layer's packed tensors as buffers (state-dict names `<layer>.values`,
`<layer>.meta`, ...) and calls `llmprune.kernels.ops.linear(format, x, packed, bias)` (Triton on
CUDA tensors, the pure-torch reference elsewhere).
"""
from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Module):
    def __init__(self, fmt: str, packed: dict[str, torch.Tensor], bias: torch.Tensor | None,
                 in_features: int, out_features: int, derived: tuple[str, ...] = ()):
        super().__init__()
        self.format, self.in_features, self.out_features = fmt, in_features, out_features
        self._names = tuple(packed)
        for name, t in packed.items():
            # derived tensors (w4s50 gidx) are rebuilt at load, so they stay out of the state dict
            self.register_buffer(name, t, persistent=name not in derived)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def packed(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self._names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .kernels import ops

        return ops.linear(self.format, x, self.packed, self.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight (out, in) these tensors encode (for checks and export)."""
        from .formats import get

        return get(self.format).unpack(self.packed, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.packed.values())

    def extra_repr(self) -> str:
        return f"format={self.format}, in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"
