"""Checkpoints stored in block-scaled FP8, read as the unquantized weights they stand for.

The largest open models ship this way: DeepSeek-V3/R1, MiniMax-M2, Qwen3's -FP8 releases. config.json says
`"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}`; each quantized linear
stores its weight in float8_e4m3fn and a float32 `weight_scale_inv` with one entry per 128 x 128 block (the
last blocks of a row or column cut short: DeepSeek-V3's 576-row kv_a_proj has 5 row blocks), and the weight
is q * scale_inv, blockwise (DeepSeek-V3's inference/kernel.py weight_dequant). llmprune prunes the
dequantized weights and writes its outputs unquantized (the source's unquantized tensors' dtype, bf16 for
these). gpt-oss' MXFP4 experts are read dequantized too (mxfp4.py); other quantized checkpoints (GPTQ, AWQ,
bitsandbytes, compressed-tensors) are refused: their weights cannot be pruned as stored.
"""
from __future__ import annotations

import torch

from . import mxfp4
from .errors import LLMPruneError
from .mxfp4 import quantization

SCALE = "_scale_inv"  # `X.weight` is scaled by `X.weight_scale_inv`
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def block_of(config) -> tuple[int, int] | None:
    """The (rows, columns) of a scale block when `config` (a transformers config, or config.json as a dict) is
    a block-scaled FP8 checkpoint's, else None."""
    q = quantization(config) or {}
    block = q.get("weight_block_size")
    return (int(block[0]), int(block[1])) if q.get("quant_method") == "fp8" and block and len(block) == 2 else None


def check(config, folder) -> tuple[int, int] | None:
    """block_of(config) for a model to compress: an LLMPruneError when it is quantized any other way (gpt-oss'
    MXFP4 aside: mxfp4.py reads it)."""
    q = quantization(config)
    block = block_of(config)
    if q is not None and block is None and not mxfp4.stored(config):
        method, blocks = q.get("quant_method"), q.get("weight_block_size")
        raise LLMPruneError(f"{folder} is quantized ({method}{'' if blocks is None else f', blocks {blocks}'}: "
                            f"config.json's quantization_config): llmprune prunes unquantized weights and reads "
                            f"block-scaled FP8 (quant_method fp8 with weight_block_size) and gpt-oss' MXFP4 only: use "
                            f"the model's bf16 or fp16 checkpoint")
    return block


def unquantized(config) -> None:
    """Drop the quantization from `config` (in place): what llmprune writes is unquantized (FP8 or MXFP4)."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """q (rows, cols) times its block's entry of scale_inv (ceil(rows / block[0]), ceil(cols / block[1])), in
    float32; one row block at a time, so beside the result only one block row of scales is expanded."""
    bm, bn = block
    rows, cols = q.shape
    if tuple(scale_inv.shape) != (-(-rows // bm), -(-cols // bn)):
        raise LLMPruneError(f"a {rows} x {cols} FP8 weight has {tuple(scale_inv.shape)} scales, not one per "
                            f"{bm} x {bn} block: the checkpoint is damaged; re-download it")
    w = q.to(torch.float32)
    s = scale_inv.to(torch.float32)
    for i in range(0, rows, bm):
        w[i:i + bm] *= s[i // bm].repeat_interleave(bn)[:cols]
    return w


def describe(block: tuple[int, int]) -> str:
    """What a manifest records of an FP8 source (its dense figures are of these weights, not of the bf16 model
    the FP8 release was made from)."""
    return f"fp8 (scales per {block[0]} x {block[1]} block), read dequantized"
