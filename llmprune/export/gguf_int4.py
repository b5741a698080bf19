"""An int4 source's own codes as GGUF blocks: llama.cpp then runs the int4 model llmprune packed and measured
(GPTQ's codes, w4s24's pruned zeros), not gguf's round-to-nearest of its dequantized weights, which rounds every
weight a second time onto another grid; likewise the codes GPTQ makes on export (`export --to gguf --quant gptq`:
`code_of` hands each layer's codes, whichever made them).

Each GGUF block is 32 weights on one fp16 step d (gguf.quants, ggml's dequantize_row_*): Q4_0 x = d (q - 8) and
Q5_0 x = d (q - 16) with codes of 4 and 5 bits, Q8_0 x = d q with int8 codes, Q4_1 / Q5_1 x = d q + m with an fp16
minimum m. An llmprune int4 group (32, 64 or 128 inputs) is x = s (q - z) with an fp16 s (quant/rtn.py), so each
of its 32-blocks is one of these with d = s and its weights' steps q - z (-15..15) as codes: exactly in Q5_0, Q5_1
(m = -16 d), Q8_0, and in Q4_0 and Q4_1 (m = -8 d) where they fit 8 steps down and 7 up, which the symmetric grid's
(z = 8) always do; an asymmetric block that does not fit is Q4_1 with its own m = -s z rounded to fp16 (each weight
off by at most 2^-11 |m|, under 1% of a step; a pruned weight then no longer an exact zero), and no Q4_0.

Each weight's step s and offset -s z go through the same layout changes as the weights (gguf_tensors.to_gguf and
take: row permutations, splits, all linear in the weight), so a block is recognised after them by one step and
one offset over its 32 weights and codes that reproduce it (a fused experts tensor's from each expert's
projection: gpt-oss's and Llama 4's, stored (in, out), are transposed back to (out, in) for llama.cpp, where their
groups run along its blocks again); a tensor whose blocks are not (an asymmetric one asked as Q4_0, or a layout
that would move the groups across blocks) is quantized by gguf as before, and the export counts it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import moe
from .gguf_arch import GGUFArch
from .gguf_tensors import take, to_gguf
from .source import Source, stored_code

if TYPE_CHECKING:
    from ..quant import Quantized

# each block type: (its codes' levels, None for int8; the code of 0, None where a block stores its minimum m)
LAYOUT = {"q4_0": (16, 8), "q4_1": (16, None), "q5_0": (32, 16), "q5_1": (32, None), "q8_0": (None, 0)}
TYPES = tuple(LAYOUT)
BLOCK = 32  # weights a block holds
CodeOf = Callable[[str, torch.Tensor], "Quantized | None"]  # (layer name, its dense weight) -> its int4 codes


def blocks(code_of: CodeOf, model, key: str, w: torch.Tensor, piece: np.ndarray, rows, types, a: GGUFArch,
           cfg) -> dict:
    """{type: (blocks, largest deviation in steps) or None} for each of `types`: `piece`, the GGUF tensor the writer
    made of part `rows` (gguf_tensors.parts) of the int4 tensor `key` (its dense weight `w`; `code_of` gives its
    layers' codes), in that type's blocks from its codes (`encode`), None where they cannot be. Its grid is laid
    out as the writer laid out the weights (to_gguf, then take) and made once for every type; a fused experts
    tensor's one expert at a time (as large as one expert's, not the whole stack's: a 256-expert stack in fp32 is
    tens of GB)."""
    def laid(x: torch.Tensor, sh: tuple[int, ...]) -> np.ndarray:
        return np.ascontiguousarray(take(to_gguf(key, x, a, cfg), rows)).reshape(sh)

    module, param = key.rsplit(".", 1)
    experts = model.get_submodule(module)
    if not moe.is_fused_experts(experts):
        g = grid(code_of, module, w) if param == "weight" and w.dim() == 2 else None
        g = g and [laid(x, piece.shape) for x in g]
        return {t: g and encode(piece, *g, t) for t in types}
    out = {t: [] for t in types}  # each type's experts' blocks, None once one cannot be
    for e in range(moe.num_experts(experts)):
        g = expert_grid(code_of, experts, module, param, w, e)
        g = g and [laid(x, (1, *piece.shape[1:])) for x in g]
        for t in types:
            got = out[t] is not None and g and encode(piece[e:e + 1], *g, t)
            out[t] = out[t] + [got] if got else None
    return {t: v and (np.concatenate([b for b, _ in v]), max(d for _, d in v)) for t, v in out.items()}


def expert_grid(code_of: CodeOf, experts, module: str, param: str, w: torch.Tensor, e: int):
    """(step, offset) of expert `e`'s rows of the fused experts parameter `param` (its dense value `w`, all
    experts), each (1, *w.shape[1:]): from each projection it holds (moe's views of it); None when one is not int4."""
    step, offset = (torch.full_like(w[e:e + 1], torch.nan, dtype=torch.float32) for _ in "so")  # (rows no view holds
    # stay NaN: no block of them is taken for codes)
    for proj in (p for p in moe.projections(experts) if moe.fused_param(experts, p) == param):
        got = grid(code_of, f"{module}[{e}].{proj}", moe.proj_view(experts, proj, w[e]))
        if got is None:
            return None
        for dst, x in zip((step[0], offset[0]), got):
            moe.proj_view(experts, proj, dst).copy_(x)
    return step, offset


def grid(code_of: CodeOf, name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(step, offset) of every weight of the int4 layer `name` (its dense weight `w`, (out, in)): s and -s z, each
    `w`'s shape, fp32; None when `code_of` gives it no codes."""
    q = code_of(name, w)
    if q is None:
        return None
    s = q.scales.float().repeat_interleave(q.group_size, dim=1)
    return s, -s * q.zeros.float().repeat_interleave(q.group_size, dim=1)


def stored(src: Source) -> CodeOf:
    """`code_of` for an int4 output: each layer's stored codes (source.stored_code)."""
    return lambda name, w: stored_code(src, name, w)


def modules(layers) -> set[str]:
    """Every module path holding one of the int4 `layers` (each dotted prefix of their names, a fused projection's
    part `qkv_proj[q]` as `qkv_proj`): a tensor under one that `grid` cannot give (stacked experts, fused parts) is
    int4 in the source all the same, and quantized again by gguf."""
    out = set()
    for name in layers:
        parts = name.split("[", 1)[0].split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def encode(x: np.ndarray, step: np.ndarray, offset: np.ndarray, t: str) -> tuple[np.ndarray, float] | None:
    """`x` (..., n) as `t` blocks (`TYPES`; the bytes as gguf.quants lays them out) from its int4 grid: (blocks, the
    largest deviation of a weight from `x`, in steps), or None when a block of 32 does not hold one step and one
    offset with codes 0..15 that reproduce it, or its codes do not fit the type (Q4_0: an asymmetric block's)."""
    shape = x.shape
    x, s, o = (np.asarray(a, dtype=np.float32).reshape(-1, BLOCK) for a in (x, step, offset))
    d, m = s[:, :1], o[:, :1]
    if not (np.array_equal(s, np.broadcast_to(d, s.shape)) and np.array_equal(o, np.broadcast_to(m, o.shape))):
        return None
    d16 = d.astype(np.float16)
    if not np.array_equal(d16.astype(np.float32), d):
        return None
    q = (x - m) / d  # exact: x = s (q - z) and m = -s z are fp32-exact products of an fp16 s and small integers
    if not (np.array_equal(q, np.rint(q)) and q.min(initial=0) >= 0 and q.max(initial=0) <= 15):
        return None
    k = q + m / d  # q - z: the weights in steps, -15..15
    levels, zero = LAYOUT[t]
    dev, mins = 0.0, []
    if zero is None:  # (Q4_1's minimum -8 d where a block's weights fit 8 steps down, else its own -z d, rounded)
        fits = (k.min(1, keepdims=True) >= -8) & (k.max(1, keepdims=True) <= 7) if levels == 16 else True
        zero = np.where(fits, levels // 2, np.rint(-m / d))
        m16 = (-zero * d).astype(np.float16)
        dev = float((np.abs(m16.astype(np.float32) + zero * d) / d).max(initial=0))
        mins = [m16.view(np.uint8)]
    codes = k + zero
    if levels and not (codes.min(initial=0) >= 0 and codes.max(initial=0) < levels):
        return None
    return _rows(np.concatenate([d16.view(np.uint8), *mins, *_pack(codes, levels)], axis=1), shape), dev


def _pack(codes: np.ndarray, levels: int | None) -> list[np.ndarray]:
    """A block's codes as gguf.quants stores them: int8 (Q8_0); 4 bits, the first 16 codes in the low nibbles; 5
    bits, those nibbles after the 32 fifth bits packed little-endian (qh)."""
    if levels is None:
        return [codes.astype(np.int8).view(np.uint8)]
    c = codes.astype(np.uint8)
    nibbles = (c[:, :BLOCK // 2] & np.uint8(15)) | (c[:, BLOCK // 2:] << np.uint8(4))
    if levels == 16:
        return [nibbles]
    return [np.packbits(c >> np.uint8(4), axis=-1, bitorder="little"), nibbles]


def _rows(blocks: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Blocks (n_blocks, bytes) as the byte shape GGUFWriter was told: (..., n / 32 x bytes)."""
    return blocks.reshape(*shape[:-1], shape[-1] // BLOCK * blocks.shape[1])
