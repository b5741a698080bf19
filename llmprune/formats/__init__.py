"""Packed weight formats: layouts, and the registry name -> Format.

Each format is a file with `pack(weight, keep=None, ...) -> dict[str, Tensor]`, `unpack(packed)
-> (out, in)` and `shapes(out, in, **opts)` (what a layer of that size stores, used to validate
files). Integer codes are int4 on a per-group grid, w = (q - z) * s with q in [0, 15], fp16
scales; symmetric grids have z = 8. Pruned weights are exactly zero after unpacking.

Layouts (the spec the kernels in llmprune/kernels are written against; dict keys in quotes):

sparse24  2:4 sparse, unquantized.
    "values" (out, in/2), the weight's dtype: the 2 kept weights of every 4 inputs, input order.
    "meta"   (out, in/8) uint8: byte b covers inputs 8b..8b+7 = two groups of 4. For a group,
             a nibble: position (0-3) of the first kept weight in bits 0-1, of the second in bits
             2-3 (first < second); the group 8b..8b+3 in the low nibble, 8b+4..8b+7 in the high.
    in % 8 == 0.
w4g128    int4 per group of G inputs (G = 128 by default; G = in / scales.shape[1]).
    "codes"  (out, in/2) uint8: two codes per byte, low nibble = even input column.
    "scales" (out, in/G) fp16.
    "zeros"  (out, in/G) uint8, only when asymmetric (absent: symmetric, z = 8).
    in % G == 0, G even.
w4s24     2:4 sparse + int4 of the kept values.
    "codes"  (out, in/4) uint8: the kept values' codes, in input order, low nibble first.
    "meta"   (out, in/8) uint8 as in sparse24.
    "scales" (out, in/G) fp16, per group of G ORIGINAL inputs (= G/2 kept values), G = 128 default.
    "zeros"  (out, in/G) uint8, only when asymmetric (the default is symmetric, z = 8).
    in % 8 == 0, in % G == 0, G % 4 == 0.
w4s50     group sparsity (groups of 16 inputs, 50%: every row keeps K = (in/16)/2 groups) + int4,
          GQSA-style (arXiv 2412.17560). Symmetric.
    "bitmap" (out, ceil(in/16/8)) uint8: bit j of byte b = group 8b+j kept. Stored on disk.
    "gidx"   (out, K) int16: the kept groups' indices, ascending. Derived from the bitmap at load
             (`derive`), not stored on disk; present in every runtime dict.
    "codes"  (out, K*8) uint8: codes of the kept values, group after group, low nibble first.
    "scales" (out, K) fp16: one per kept group.
    in % 32 == 0 (an even number of groups: in = 32 K).
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

import torch

from ..errors import LLMPruneError
from .bits import nbytes

# The one list of packed formats: name -> module. Adding a format is adding its file and a line here;
# packing, loading, the kernels' custom ops, compile checks and benchmarks read the registry.
_MODULES = {"sparse24": "sparse24", "w4g128": "w4g128", "w4s24": "w4s24", "w4s50": "w4s50"}
QUANTIZERS = ("rtn", "gptq")
GROUPS = (128, 64, 32, 16)  # --group-size auto: the largest of these dividing in_features


def auto_group(in_features: int) -> int:
    """--group-size auto for a layer of `in_features` inputs: the largest of GROUPS dividing it (else the largest)."""
    return next((g for g in GROUPS if in_features % g == 0), GROUPS[0])


@dataclass(frozen=True)
class Format:
    """A packed format: its layout (the module's pack / unpack / shapes / derive), its defaults and
    option checks, keep-mask inference, byte accounting, and the tensors its kernel takes, in order."""
    name: str
    pattern: str | None  # the sparsity pattern the format stores ("2:4", "group:16"), None = dense
    quantized: bool
    derived: tuple[str, ...]  # runtime tensors rebuilt at load, not stored on disk
    kernel: tuple[str, ...]  # the kernel op's tensor arguments after x, in order; "name?" = optional
    kernel_id: int  # FMT in the Triton kernels (kernels/triton_gemm.py)
    default_symmetric: bool | None  # int4 grid when --grid auto (None: not quantized)
    fixed_group: int | None  # a group size the layout fixes (w4s50: 16)
    module: object

    # -- layout ------------------------------------------------------------------------------------
    def pack(self, weight: torch.Tensor, keep: torch.Tensor | None = None, **opts) -> dict[str, torch.Tensor]:
        # every input on the weight's device: sequential GPTQ hands its codes over on the CPU while the
        # block being written is on the GPU (found on the H200: w4s24 + GPTQ through onloading)
        keep = None if keep is None else keep.to(weight.device)
        if hasattr(opts.get("quant"), "to"):  # the layout itself refuses codes it cannot store
            opts["quant"] = opts["quant"].to(weight.device)
        return self.module.pack(weight, keep, **opts)

    def unpack(self, packed: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.module.unpack(packed, dtype=dtype)

    def shapes(self, out_f: int, in_f: int, **opts) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
        """name -> (shape, dtype) a packed layer of this size stores (dtype None: any float)."""
        return self.module.shapes(out_f, in_f, **opts)

    def derive(self, packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Check a dict read from disk and add the derived tensors (raises LLMPruneError if corrupt)."""
        return self.module.derive(packed)

    def stored(self, packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in packed.items() if k not in self.derived}

    def nbytes(self, packed: dict[str, torch.Tensor]) -> int:
        """Bytes on disk (derived tensors not counted)."""
        return nbytes(self.stored(packed))

    # -- options -----------------------------------------------------------------------------------
    def check_options(self, quant: str | None = None, symmetric: bool | None = None) -> str | None:
        """Validate the quantizer and grid for this format before any work; returns the quantizer
        that will run (rtn by default for the int4 formats, None for the others)."""
        if not self.quantized:
            if quant is not None or symmetric is not None:
                what = "--quant" if quant is not None else "--grid"
                raise LLMPruneError(f"--format {self.name} stores unquantized values: drop {what}, or use "
                                    f"--format w4s24")
            return None
        quant = quant or "rtn"
        if quant not in QUANTIZERS:
            raise LLMPruneError(f"unknown --quant {quant!r}: choose {' or '.join(QUANTIZERS)}")
        if self.fixed_group is not None and symmetric is False:
            raise LLMPruneError(f"{self.name} is symmetric only: use --grid sym (or auto)")
        return quant

    def options(self, group_size: int | str = "auto", symmetric: bool | None = None) -> dict:
        """The quantization options every layer starts from (group size, grid); {} if unquantized."""
        if not self.quantized:
            return {}
        sym = self.default_symmetric if symmetric is None else symmetric
        return {"group_size": self.fixed_group or group_size, "symmetric": sym}

    def layer_options(self, base: dict, in_features: int) -> dict:
        """`options()` resolved for one layer: group_size "auto" -> the largest of GROUPS dividing it."""
        opts = dict(base)
        if opts.get("group_size") == "auto":
            opts["group_size"] = auto_group(in_features)
        return opts

    # -- masks, kernels, fixtures ------------------------------------------------------------------
    def infer_keep(self, weight: torch.Tensor) -> torch.Tensor:
        """The keep-mask (out, in) this format reads off a weight's non-zeros (raises if it cannot)."""
        return self.module.infer_keep(weight)

    def kernel_args(self, in_features: int, packed: dict) -> tuple[tuple, int]:
        """(tensors in `kernel` order, out_features) for a layer of `in_features` inputs; shapes
        checked (LLMPruneError naming what is wrong)."""
        return self.module.kernel_args(in_features, packed)

    def random(self, out_f: int, in_f: int, dtype=torch.float16, device="cpu", generator=None) -> dict:
        """Valid packed tensors of a random weight, built directly (benchmarks, kernel checks)."""
        return self.module.random(out_f, in_f, dtype, torch.device(device), generator)


@functools.cache
def get(name: str) -> Format:
    if name not in _MODULES:
        raise LLMPruneError(f"unknown format {name!r}: choose one of {', '.join(names())}")
    mod = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    return Format(name, mod.PATTERN, mod.QUANTIZED, getattr(mod, "DERIVED", ()), mod.KERNEL, mod.KERNEL_ID,
                  getattr(mod, "DEFAULT_SYMMETRIC", None), getattr(mod, "FIXED_GROUP", None), mod)


def names() -> list[str]:
    return list(_MODULES)


__all__ = ["Format", "get", "names", "nbytes"]
