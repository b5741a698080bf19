"""Weight quantization after pruning: int4 codes on a per-group grid, with the keep-mask respected.

A quantizer returns `Quantized`: codes (out, in) in [0, 15], one fp16 scale and one integer zero
point per group of `group_size` consecutive inputs, w ~= (q - z) * s. Pruned weights get q = z,
so they dequantize to exactly 0. Formats pack these codes; they never re-derive the grid. Codes held
until later (GPTQ's, until the scale tuning) are kept two a byte (`compact`), and unpacked a layer at a
time where they are read (`full`).
rtn.py and gptq.py make them; tune.py then trains the scales of GPTQ's codes end to end.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

BITS = 4
MAXQ = 2**BITS - 1  # codes in [0, 15]
SYM_ZERO = 8  # symmetric grid: z fixed at 8, so q - z in [-8, 7]


@dataclass(frozen=True)
class Quantized:
    codes: torch.Tensor  # (out, in) uint8 in [0, 15]
    scales: torch.Tensor  # (out, in/G) fp16
    zeros: torch.Tensor  # (out, in/G) uint8 (all 8 when symmetric)
    group_size: int
    symmetric: bool
    damp: float | None = None  # GPTQ: the Hessian dampening used (raised when the first failed)
    nibbles: bool = False  # codes two a byte, (out, in/2) (`compact`): read them through `full`

    def compact(self) -> Quantized:
        """The same codes two a byte (formats.bits.pack_nibbles): half their memory, for codes held until later."""
        from ..formats.bits import pack_nibbles

        return self if self.nibbles else replace(self, codes=pack_nibbles(self.codes), nibbles=True)  # (out, in/2)

    def full(self) -> Quantized:
        """The codes one a byte, (out, in), as quantizers make them and formats read them."""
        from ..formats.bits import unpack_nibbles

        return replace(self, codes=unpack_nibbles(self.codes), nibbles=False) if self.nibbles else self

    def to(self, device) -> Quantized:
        """The same codes and grid on `device` (GPTQ may keep them on the CPU while the layer is on the GPU)."""
        return replace(self, codes=self.codes.to(device), scales=self.scales.to(device), zeros=self.zeros.to(device))

    def dequantize(self) -> torch.Tensor:
        """(out, in) fp32: (q - z) * s, exact in fp32 (a small integer times an fp16 value)."""
        g = self.group_size
        s = self.scales.float().repeat_interleave(g, dim=1)  # (out, in)
        z = self.zeros.float().repeat_interleave(g, dim=1)  # (out, in)
        return (self.full().codes.float() - z) * s


def get(name: str):
    """'rtn' | 'gptq' -> the quantizer function."""
    from ..errors import LLMPruneError

    if name == "rtn":
        from .rtn import rtn

        return rtn
    if name == "gptq":
        from .gptq import gptq

        return gptq
    raise LLMPruneError(f"unknown quantizer {name!r}: choose rtn or gptq")
