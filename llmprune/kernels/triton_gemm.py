"""Triton matmul y = x @ W^T + b with W in a packed format, decoded tile by tile in registers.

Two kernels share the per-format tile decoders (triton_sparse24.py, triton_w4.py):
- `_gemv_kernel`, split-K GEMV for M <= 2 tokens: no MMA (a 16-row MMA would waste 15/16 of it);
  every program reads a (BW rows x ITERS*BK inputs) slab of packed weight once, partial sums over
  K splits go to an fp32 buffer (deterministic, summed by torch) so that small matrices still
  fill the GPU.
- `_tile_kernel` for M > 2 (decode up to 16, and prefill): acc (BW weight rows, BT tokens) =
  W_tile (BW, BK) @ x_tile^T (BK, BT), weight rows on the MMA's M dimension (swap-AB, as in
  Marlin-style decode kernels) so that BT can be as small as 16 tokens; prefill uses 128 x 128.
Accumulation is fp32; activations fp16 or bf16 (fp32 only for the CPU interpreter and tests).

Format ids (FMT) and pointer roles (A, B, C, D):
  0 sparse24: values, meta     1 w4g128: codes, scales, zeros     2 w4s24: codes, meta, scales, zeros
  3 w4s50: codes, gidx, scales
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llmprune.kernels.triton_sparse24 import sparse24_tile
from llmprune.kernels.triton_w4 import w4g_tile, w4s24_tile, w4s50_dense_tile, w4s50_slot_tile

FMT_IDS = {"sparse24": 0, "w4g128": 1, "w4s24": 2, "w4s50": 3}


@triton.jit
def _dense_tile(A, B, C, D, sa, sb, sc, rows, rmask, k0, FMT: tl.constexpr, G: tl.constexpr,
                HAS_Z: tl.constexpr, CDT: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr):
    """(BW, BK) weight tile of the formats stored in input order (all but w4s50)."""
    if FMT == 0:
        w = sparse24_tile(A, B, sa, sb, rows, rmask, k0, BW, BK, CDT)
    elif FMT == 1:
        w = w4g_tile(A, B, C, sa, sb, rows, rmask, k0, BW, BK, G, HAS_Z, CDT)
    else:
        w = w4s24_tile(A, B, C, D, sa, sb, sc, rows, rmask, k0, BW, BK, G, HAS_Z, CDT)
    return w


@triton.jit
def _gemv_kernel(x_ptr, y_ptr, bias_ptr, A, B, C, D, sa, sb, sc, M, N, KK, KG, sxm, ITERS,
                 FMT: tl.constexpr, G: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                 FINAL: tl.constexpr, CDT: tl.constexpr, BW: tl.constexpr, BT: tl.constexpr,
                 BK: tl.constexpr):
    pid_w = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_w * BW + tl.arange(0, BW)
    rmask = rows < N
    tok = tl.arange(0, BT)
    acc = tl.zeros((BW, BT), tl.float32)
    n_it = tl.minimum(ITERS, tl.cdiv(KK, BK) - pid_k * ITERS)
    for i in range(n_it):
        kk = (pid_k * ITERS + i) * BK
        if FMT == 3:  # walk kept columns, gather x per row
            w, cols, okc = w4s50_slot_tile(A, B, C, sa, sb, sc, rows, rmask, kk, KG, BW, BK, CDT)
        else:
            w = _dense_tile(A, B, C, D, sa, sb, sc, rows, rmask, kk, FMT, G, HAS_Z, CDT, BW, BK)
            cols = (kk + tl.arange(0, BK))[None, :]  # (1, BK)
            okc = cols < KK
        wf = w.to(tl.float32)
        for m in tl.static_range(BT):
            xm = tl.load(x_ptr + m * sxm + cols, mask=okc & (m < M), other=0.0).to(tl.float32)
            part = tl.sum(wf * xm, axis=1)  # (BW,)
            acc += tl.where(tok[None, :] == m, part[:, None], 0.0)
    omask = rmask[:, None] & (tok[None, :] < M)
    if FINAL:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + tok[None, :] * N + rows[:, None], acc.to(y_ptr.dtype.element_ty), mask=omask)
    else:  # fp32 partials (SPLIT, M, N)
        tl.store(y_ptr + pid_k * M * N + tok[None, :] * N + rows[:, None], acc, mask=omask)


@triton.jit
def _tile_kernel(x_ptr, y_ptr, bias_ptr, A, B, C, D, sa, sb, sc, M, N, KIN, KG, sxm,
                 FMT: tl.constexpr, G: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                 CDT: tl.constexpr, BW: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    pid_w = tl.program_id(0)
    pid_t = tl.program_id(1)
    rows = pid_w * BW + tl.arange(0, BW)
    rmask = rows < N
    tok = pid_t * BT + tl.arange(0, BT)
    tmask = tok < M
    acc = tl.zeros((BW, BT), tl.float32)
    pos = tl.zeros((BW,), tl.int32)  # w4s50: kept groups before k0, per row
    for k0 in range(0, KIN, BK):
        if FMT == 3:
            w, pos = w4s50_dense_tile(A, B, C, sa, sb, sc, rows, rmask, k0, pos, KG, BW, BK, CDT)
        else:
            w = _dense_tile(A, B, C, D, sa, sb, sc, rows, rmask, k0, FMT, G, HAS_Z, CDT, BW, BK)
        xt = tl.load(x_ptr + tok[None, :] * sxm + (k0 + tl.arange(0, BK))[:, None],
                     mask=tmask[None, :], other=0.0).to(CDT)  # (BK, BT)
        if CDT == tl.float32:  # interpreter / tests: exact fp32, not tf32
            acc = tl.dot(w, xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + tok[None, :] * N + rows[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=rmask[:, None] & tmask[None, :])


@dataclass(frozen=True)
class Config:
    """One launch shape; compile_check.py compiles exactly these."""
    kind: str  # "gemv" | "tile"
    BW: int
    BT: int
    BK: int
    num_warps: int = 4
    num_stages: int = 3


def _pow2_divisor(n: int, cap: int, floor: int = 16) -> int:
    """Largest power of two <= cap dividing n (n % floor == 0 is checked by the caller)."""
    bk = cap
    while bk > floor and n % bk:
        bk //= 2
    return bk


def pick_config(fmt: str, M: int, in_features: int) -> Config:
    """Launch shape by token count: GEMV for M <= 2, decode tile to 16, larger tiles for prefill."""
    if M <= 2:
        # w4s50's GEMV walks the K*16 kept columns instead of the inputs
        bk = _pow2_divisor((in_features // 32) * 16 if fmt == "w4s50" else in_features, 128)
        return Config("gemv", BW=32, BT=1 if M == 1 else 2, BK=bk, num_warps=4, num_stages=3)
    if M <= 16:
        return Config("tile", BW=64, BT=16, BK=_pow2_divisor(in_features, 128), num_warps=4, num_stages=3)
    if M <= 64:
        return Config("tile", BW=64, BT=64, BK=_pow2_divisor(in_features, 64), num_warps=4, num_stages=3)
    return Config("tile", BW=128, BT=128, BK=_pow2_divisor(in_features, 64), num_warps=8, num_stages=3)


_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _n_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch(fmt: str, x2d: torch.Tensor, tensors: tuple, n_out: int, in_features: int, kg: int, G: int,
           has_z: bool, bias: torch.Tensor | None, config: Config | None = None) -> torch.Tensor:
    """y (M, n_out) = x2d (M, in) @ W^T + bias. `tensors` are (A, B, C, D) as in the module
    docstring (unused roles may repeat a tensor); shapes were validated by ops.py."""
    M = x2d.shape[0]
    cfg = config or pick_config(fmt, M, in_features)
    A, B, C, D = tensors
    sa, sb, sc = A.stride(0), B.stride(0), C.stride(0)
    cdt = _TL[x2d.dtype]
    fid = FMT_IDS[fmt]
    bias_arg = bias if bias is not None else x2d
    common = {"FMT": fid, "G": G, "HAS_Z": has_z, "HAS_BIAS": bias is not None, "CDT": cdt, "BW": cfg.BW,
              "BT": cfg.BT, "BK": cfg.BK, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if cfg.kind == "tile":
        y = torch.empty((M, n_out), dtype=x2d.dtype, device=x2d.device)
        grid = (triton.cdiv(n_out, cfg.BW), triton.cdiv(M, cfg.BT))
        _tile_kernel[grid](x2d, y, bias_arg, A, B, C, D, sa, sb, sc, M, n_out, in_features, kg,
                           x2d.stride(0), **common)
        return y
    kk = kg * 16 if fmt == "w4s50" else in_features  # length of the walked K axis
    n_iter = triton.cdiv(kk, cfg.BK)
    row_blocks = triton.cdiv(n_out, cfg.BW)
    split = max(1, min(n_iter, triton.cdiv(2 * _n_sms(x2d.device), row_blocks)))
    iters = triton.cdiv(n_iter, split)
    split = triton.cdiv(n_iter, iters)
    final = split == 1
    y = (torch.empty((M, n_out), dtype=x2d.dtype, device=x2d.device) if final
         else torch.empty((split, M, n_out), dtype=torch.float32, device=x2d.device))
    _gemv_kernel[(row_blocks, split)](x2d, y, bias_arg, A, B, C, D, sa, sb, sc, M, n_out, kk, kg,
                                      x2d.stride(0), iters, FINAL=final, **common)
    if final:
        return y
    y = y.sum(0)
    if bias is not None:
        y += bias.float()
    return y.to(x2d.dtype)
