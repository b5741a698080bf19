"""An int4 source's own codes as GGUF Q4_0 / Q4_1 blocks: llama.cpp then runs the int4 model llmprune packed and
measured (GPTQ's codes, w4s24's pruned zeros), not gguf's round-to-nearest of its dequantized weights, which
rounds every weight a second time onto another grid.

llama.cpp's Q4_0 block is 32 weights x = d (q - 8) with one fp16 d; Q4_1's is x = d q + m with fp16 d and m
(gguf.quants, ggml's dequantize_row_q4_0 / _q4_1). An llmprune int4 group (32, 64 or 128 inputs) is x = s (q - z)
with an fp16 s (quant/rtn.py), so each of its 32-blocks has d = s and q as stored: the symmetric grid (z = 8) is
Q4_0 exactly, and Q4_1 with m = -8 s (exact in fp16: a power of two times s); an asymmetric group is Q4_1 with
m = -s z rounded to fp16 (each weight off by at most 2^-11 |m|, under 1% of a step; pruned weights then no
longer exact zeros), never Q4_0.

Each weight's step s and offset -s z go through the same layout changes as the weights (gguf_tensors.to_gguf and
take: row permutations, splits, all linear in the weight), so a block is recognised after them by one step and
one offset over its 32 weights and codes that reproduce it (a fused experts tensor's from each expert's
projection: gpt-oss's and Llama 4's, stored (in, out), are transposed back to (out, in) for llama.cpp, where their
groups run along its blocks again); a tensor whose blocks are not (an asymmetric one asked as Q4_0, or a layout
that would move the groups across blocks) is quantized by gguf as before, and the export counts it.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import moe
from .source import Source, stored_code

TYPES = ("q4_0", "q4_1")
BLOCK = 32  # weights a Q4_0 / Q4_1 block holds


def grid(src: Source, model, key: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(step, offset) of every weight of the source's int4 tensor `key` of `model` (its dense weight `w`): s and
    -s z, each `w`'s shape, fp32; a fused experts tensor's from each expert's projection (moe's views of it);
    None when a part of it is not stored as int4."""
    module, param = key.rsplit(".", 1)
    experts = model.get_submodule(module)
    if moe.is_fused_experts(experts):
        step, offset = torch.empty_like(w, dtype=torch.float32), torch.empty_like(w, dtype=torch.float32)
        for e in range(moe.num_experts(experts)):
            for proj in (p for p in moe.projections(experts) if moe.fused_param(experts, p) == param):
                full = moe._oi(experts, w[e])
                rows = moe._rows(experts, proj, full.shape[0])
                got = _expanded(src, f"{module}[{e}].{proj}", full[rows])
                if got is None:
                    return None
                moe._oi(experts, step[e])[rows], moe._oi(experts, offset[e])[rows] = got
        return step, offset
    return _expanded(src, module, w) if param == "weight" and w.dim() == 2 else None


def _expanded(src: Source, name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(s, -s z) of each weight of the int4 layer `name` (dense weight `w`, (out, in)); None: not int4."""
    q = stored_code(src, name, w)
    if q is None:
        return None
    s = q.scales.float().repeat_interleave(q.group_size, dim=1)
    return s, -s * q.zeros.float().repeat_interleave(q.group_size, dim=1)


def modules(src: Source) -> set[str]:
    """Every module path holding an int4 layer of the source (each dotted prefix of its packed layers' names,
    a fused projection's part `qkv_proj[q]` as `qkv_proj`): a tensor under one that `grid` cannot give (stacked
    experts, fused parts) is int4 in the source all the same, and quantized again by gguf."""
    out = set()
    for name in (src.manifest.format or {}).get("layers") or {}:
        parts = name.split("[", 1)[0].split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def encode(x: np.ndarray, step: np.ndarray, offset: np.ndarray, t: str) -> tuple[np.ndarray, float] | None:
    """`x` (..., n) as `t` blocks ("q4_0" or "q4_1"; the bytes as gguf.quants lays them out) from its int4 grid:
    (blocks, the largest deviation of a weight from `x`, in steps), or None when a block of 32 does not hold one
    step and one offset with codes 0..15 that reproduce it, or Q4_0 is asked of an offset other than -8 steps."""
    shape = x.shape
    x, s, o = (np.asarray(a, dtype=np.float32).reshape(-1, BLOCK) for a in (x, step, offset))
    d, m = s[:, :1], o[:, :1]
    if not (np.array_equal(s, np.broadcast_to(d, s.shape)) and np.array_equal(o, np.broadcast_to(m, o.shape))):
        return None
    d16 = d.astype(np.float16)
    if not np.array_equal(d16.astype(np.float32), d) or (t == "q4_0" and not np.array_equal(m, -8 * d)):
        return None
    q = (x - m) / d  # exact: x = s (q - z) and m = -s z are fp32-exact products of an fp16 s and small integers
    if not (np.array_equal(q, np.rint(q)) and q.min(initial=0) >= 0 and q.max(initial=0) <= 15):
        return None
    q = q.astype(np.uint8)
    nibbles = q[:, :BLOCK // 2] | (q[:, BLOCK // 2:] << np.uint8(4))  # gguf.quants' order: low nibbles first
    if t == "q4_0":
        return _rows(np.concatenate([d16.view(np.uint8), nibbles], axis=1), shape), 0.0
    m16 = m.astype(np.float16)
    dev = float((np.abs(m16.astype(np.float32) - m) / d).max(initial=0))
    return _rows(np.concatenate([d16.view(np.uint8), m16.view(np.uint8), nibbles], axis=1), shape), dev


def _rows(blocks: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Blocks (n_blocks, bytes) as the byte shape GGUFWriter was told: (..., n / 32 x bytes)."""
    return blocks.reshape(*shape[:-1], shape[-1] // BLOCK * blocks.shape[1])
