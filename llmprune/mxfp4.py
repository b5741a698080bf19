"""Checkpoints stored in MXFP4, read as the weights they stand for: gpt-oss-20b and gpt-oss-120b as released.

config.json says `"quantization_config": {"quant_method": "mxfp4", ...}`. Each expert projection of a decoder
block, held in memory as one fused tensor X (`mlp.experts.gate_up_proj`, (experts, in, out): gpt-oss keeps its
experts transposed), is stored as two tensors beside that name, in the OCP Microscaling format (MX v1.0, 2023:
blocks of 32 FP4 E2M1 values sharing one E8M0 scale):

  X_blocks  uint8 (experts, out, in / 32, 16)  a block's 32 codes, two per byte, the low nibble first
  X_scales  uint8 (experts, out, in / 32)      the block's power of two, biased by 127

and the weight is FP4[code] * 2^(scale - 127), transposed to (experts, in, out) (openai/gpt-oss' weights.py,
transformers' integrations/mxfp4.py). Attention, router, embeddings and head are stored unquantized (bf16).
llmprune prunes the dequantized weights and writes unquantized outputs (in the unquantized tensors' dtype);
the fused tensors are decoded one expert at a time, in their compute dtype.
"""
from __future__ import annotations

import torch

from .errors import LLMPruneError

BLOCKS, SCALES = "_blocks", "_scales"  # `X` is stored as `X_blocks` and `X_scales`
# E2M1: sign, 2 exponent bits, 1 mantissa bit (the spec's table; code 8 is -0)
FP4 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FAMILIES = ("gpt_oss",)  # the model types whose MXFP4 checkpoints store experts so (transformers reads no other)


def quantization(config) -> dict | None:
    """config.json's quantization_config (a transformers config, or config.json as a dict), as a dict; None: none
    (fp8.py reads it too)."""
    q = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    return None if q is None else q if isinstance(q, dict) else q.to_dict()


def stored(config) -> bool:
    """Whether `config` (a transformers config, or config.json as a dict) is an MXFP4 checkpoint llmprune reads."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return (quantization(config) or {}).get("quant_method") == "mxfp4" and model_type in FAMILIES


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(experts, out, G, 16) codes and (experts, out, G) scales -> the (experts, G * 32, out) weights in `dtype`,
    as gpt-oss holds them (exact: every value is a 2-bit significand times a power of two). One expert at a
    time, its codes transposed first (bytes), so the result is written row by row; beside the result, one
    expert's codes as indices and one product of a nibble's values (bench/mxfp4_read.py)."""
    if blocks.dim() != 4 or blocks.shape[-1] != 16 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise LLMPruneError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match (a "
                            f"scale per 16 bytes of codes): the checkpoint is damaged; re-download it")
    experts, out_f, groups, _ = blocks.shape
    byte = torch.arange(256)
    low, high = torch.tensor(FP4)[byte & 0x0F], torch.tensor(FP4)[byte >> 4]  # a byte's two values, in order
    w = torch.empty(experts, groups * 32, out_f, dtype=dtype)
    for e in range(experts):
        codes = blocks[e].permute(1, 2, 0).long()  # (G, 16, out)
        scale = torch.exp2(scales[e].t().float() - 127)[:, None, :]  # (G, 1, out)
        rows = w[e].view(groups, 16, 2, out_f)  # input j = 32 g + 2 i + nibble
        rows[:, :, 0] = low[codes] * scale
        rows[:, :, 1] = high[codes] * scale
    return w


def describe() -> str:
    """What a manifest records of an MXFP4 source (its dense figures are of these weights)."""
    return "mxfp4 (experts: FP4 E2M1 with a power-of-two scale per 32 weights), read dequantized"
