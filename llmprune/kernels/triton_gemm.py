"""Triton matmul y = x @ W^T + b with W in a packed format, decoded tile by tile in registers.

Two kernels share the per-format tile decoders (triton_sparse24.py, triton_w4.py):
- `_gemv_kernel` for a few tokens (M <= 4): no MMA; every program reads a (BW rows x ITERS*BK
  inputs) slab of packed weight once and reduces it against each token with FMAs.
- `_tile_kernel` for everything else: acc (BW weight rows, BT tokens) = W_tile (BW, BK) @
  x_tile^T (BK, BT), weight rows on the MMA's M dimension (swap-AB, as in Marlin-style decode
  kernels) so that BT can be as small as 16 tokens; Triton pipelines the packed-weight loads
  through shared memory (cp.async, num_stages deep); prefill uses 128 x 128 tiles.
Both split K over programs when the row blocks alone would not fill the GPU (decode shapes). The
split-K partial sums are reduced inside the same launch: each program writes its fp32 partial
tile to a workspace, takes a ticket from a per-tile counter, and the last program of a tile sums
the partials in a fixed order (deterministic), adds the bias, writes y and re-arms the counter
(the serial split-K "semaphore" of CUTLASS/stream-K). No second kernel, so a decode step under a
CUDA graph costs one launch per linear.
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

from llmprune.kernels.triton_sparse24 import select4, sparse24_compact, sparse24_tile
from llmprune.kernels.triton_w4 import w4g_tile, w4s24_compact, w4s24_tile, w4s50_dense_tile, w4s50_slot_tile


def fmt_id(fmt: str) -> int:
    """The format's FMT branch below (formats registry: kernel_id)."""
    from llmprune.formats import get

    return get(fmt).kernel_id


def pointer_roles(args: tuple) -> tuple:
    """A format's kernel tensors (formats registry order) -> the kernels' pointers (A, B, C, D): an
    absent optional tensor (zeros of a symmetric grid) and unused roles repeat the previous one."""
    out = []
    for t in args:
        out.append(t if t is not None else out[-1])
    out += [out[-1]] * (4 - len(out))
    return tuple(t.contiguous() for t in out)


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
def _finish(acc, y_ptr, bias_ptr, ws_ptr, cnt_ptr, rows, rmask, tok, tmask, N, SPLIT, pid_k, tile,
            HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr, BW: tl.constexpr, BT: tl.constexpr):
    """Write acc (BW rows, BT tokens) to y (M, N): directly, or through the split-K reduction."""
    omask = rmask[:, None] & tmask[None, :]
    done = True
    if REDUCE:
        # partial tile -> workspace (tiles, SPLIT, BW, BT); the last of the SPLIT programs sums them
        slab = (tile * SPLIT).to(tl.int64) * (BW * BT)
        offs = tl.arange(0, BW)[:, None] * BT + tl.arange(0, BT)[None, :]
        tl.store(ws_ptr + slab + pid_k * (BW * BT) + offs, acc)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken
        ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        done = ticket == SPLIT - 1
        if done:
            acc = tl.zeros((BW, BT), tl.float32)
            for s in range(SPLIT):  # fixed order: the same sum whichever program comes last
                acc += tl.load(ws_ptr + slab + s * (BW * BT) + offs, cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")  # re-arm for the next launch
    if done:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + tok[None, :] * N + rows[:, None], acc.to(y_ptr.dtype.element_ty), mask=omask)


# token count, K-loop length and split count change from call to call: no recompilation for them
_RUNTIME_INTS = ["M", "KG", "ITERS", "SPLIT"]


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _gemv_kernel(x_ptr, y_ptr, bias_ptr, ws_ptr, cnt_ptr, A, B, C, D, sa, sb, sc, M, N, KK, KG, sxm,
                 ITERS, SPLIT, FMT: tl.constexpr, G: tl.constexpr, HAS_Z: tl.constexpr,
                 HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr, CDT: tl.constexpr, BW: tl.constexpr,
                 BT: tl.constexpr, BK: tl.constexpr):
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
            # m < M as a block, not a scalar: Triton 3.9's interpreter splats a scalar comparison as int32,
            # which tl.load then refuses as a mask ("mask has unsupported dtype"); the compiled code is the same
            okm = okc & (tl.full(cols.shape, m, tl.int32) < M)
            xm = tl.load(x_ptr + m * sxm + cols, mask=okm, other=0.0).to(tl.float32)
            part = tl.sum(wf * xm, axis=1)  # (BW,)
            acc += tl.where(tok[None, :] == m, part[:, None], 0.0)
    _finish(acc, y_ptr, bias_ptr, ws_ptr, cnt_ptr, rows, rmask, tok, tok < M, N, SPLIT, pid_k, pid_w,
            HAS_BIAS, REDUCE, BW, BT)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _gemv24_kernel(x_ptr, y_ptr, bias_ptr, ws_ptr, cnt_ptr, A, B, C, D, sa, sb, sc, M, N, KK, KG, sxm,
                   ITERS, SPLIT, FMT: tl.constexpr, G: tl.constexpr, HAS_Z: tl.constexpr,
                   HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr, CDT: tl.constexpr, BW: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr):
    """The GEMV of the 2:4 formats (sparse24, w4s24) without expanding the weight: each kept value
    multiplies the input its 2-bit index selects (select4 over the group's 4 inputs), so a row costs
    half the multiply-adds and no register shuffles of the (BW, BK) expansion the MMA tile needs."""
    pid_w = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_w * BW + tl.arange(0, BW)
    rmask = rows < N
    tok = tl.arange(0, BT)
    acc = tl.zeros((BW, BT), tl.float32)
    NB: tl.constexpr = BK // 8
    n_it = tl.minimum(ITERS, tl.cdiv(KK, BK) - pid_k * ITERS)
    for i in range(n_it):
        kk = (pid_k * ITERS + i) * BK
        if FMT == 0:
            a0, a1, b0, b1, ia0, ia1, ib0, ib1 = sparse24_compact(A, B, sa, sb, rows, rmask, kk, BW, BK)
        else:
            a0, a1, b0, b1, ia0, ia1, ib0, ib1 = w4s24_compact(A, B, C, D, sa, sb, sc, rows, rmask, kk, BW, BK,
                                                               G, HAS_Z)
        c8 = kk + 8 * tl.arange(0, NB)  # (NB,) first input of each meta byte's 8
        okc = c8 < KK
        for m in tl.static_range(BT):
            okm = okc & (tl.full(c8.shape, m, tl.int32) < M)  # a block, not a scalar (see _gemv_kernel)
            xp = x_ptr + m * sxm + c8
            x0 = tl.load(xp + 0, mask=okm, other=0.0).to(tl.float32)[None, :]
            x1 = tl.load(xp + 1, mask=okm, other=0.0).to(tl.float32)[None, :]
            x2 = tl.load(xp + 2, mask=okm, other=0.0).to(tl.float32)[None, :]
            x3 = tl.load(xp + 3, mask=okm, other=0.0).to(tl.float32)[None, :]
            x4 = tl.load(xp + 4, mask=okm, other=0.0).to(tl.float32)[None, :]
            x5 = tl.load(xp + 5, mask=okm, other=0.0).to(tl.float32)[None, :]
            x6 = tl.load(xp + 6, mask=okm, other=0.0).to(tl.float32)[None, :]
            x7 = tl.load(xp + 7, mask=okm, other=0.0).to(tl.float32)[None, :]
            t = a0 * select4(ia0, x0, x1, x2, x3) + a1 * select4(ia1, x0, x1, x2, x3)
            t += b0 * select4(ib0, x4, x5, x6, x7) + b1 * select4(ib1, x4, x5, x6, x7)
            part = tl.sum(t, axis=1)  # (BW,)
            acc += tl.where(tok[None, :] == m, part[:, None], 0.0)
    _finish(acc, y_ptr, bias_ptr, ws_ptr, cnt_ptr, rows, rmask, tok, tok < M, N, SPLIT, pid_k, pid_w,
            HAS_BIAS, REDUCE, BW, BT)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _tile_kernel(x_ptr, y_ptr, bias_ptr, ws_ptr, cnt_ptr, A, B, C, D, sa, sb, sc, M, N, KIN, KG, sxm,
                 ITERS, SPLIT, FMT: tl.constexpr, G: tl.constexpr, HAS_Z: tl.constexpr,
                 HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr, CDT: tl.constexpr, BW: tl.constexpr,
                 BT: tl.constexpr, BK: tl.constexpr):
    pid_w = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_w * BW + tl.arange(0, BW)
    rmask = rows < N
    tok = pid_t * BT + tl.arange(0, BT)
    tmask = tok < M
    acc = tl.zeros((BW, BT), tl.float32)
    it0 = pid_k * ITERS
    n_it = tl.minimum(ITERS, tl.cdiv(KIN, BK) - it0)
    pos = tl.zeros((BW,), tl.int32)  # w4s50: kept groups before the tile's first input, per row
    if FMT == 3 and REDUCE:  # w4s50 split starting at input it0*BK: each row's kept groups before it
        for j0 in range(0, KG, 64):
            j = j0 + tl.arange(0, 64)
            ok = rmask[:, None] & (j[None, :] < KG)
            gi = tl.load(B + rows[:, None] * sb + j[None, :], mask=ok, other=0).to(tl.int32)
            pos += tl.sum((ok & (gi * 16 < it0 * BK)).to(tl.int32), axis=1)
    for i in range(n_it):
        k0 = (it0 + i) * BK
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
    tile = pid_w * tl.num_programs(1) + pid_t
    _finish(acc, y_ptr, bias_ptr, ws_ptr, cnt_ptr, rows, rmask, tok, tmask, N, SPLIT, pid_k, tile,
            HAS_BIAS, REDUCE, BW, BT)


@dataclass(frozen=True)
class Config:
    """One launch shape. `waves`: split K until about waves x SMs programs run (1 = no split
    beyond what fills the GPU once); `split` > 0 forces the number of K splits."""
    kind: str  # "gemv" | "gemv24" (2:4 formats: compact, no expansion) | "tile"
    BW: int
    BT: int
    BK: int
    num_warps: int = 4
    num_stages: int = 3
    waves: int = 2
    split: int = 0

    def as_list(self) -> list:
        return [self.kind, self.BW, self.BT, self.BK, self.num_warps, self.num_stages, self.waves]


def _pow2_divisor(n: int, cap: int, floor: int = 16) -> int:
    """Largest power of two <= cap dividing n (n % floor == 0 is checked by the caller)."""
    bk = cap
    while bk > floor and n % bk:
        bk //= 2
    return bk


def _walk_len(fmt: str, in_features: int) -> int:
    """Length of the K axis the GEMV walks: w4s50 walks its K*16 kept columns."""
    return (in_features // 32) * 16 if fmt == "w4s50" else in_features


COMPACT_FORMATS = ("sparse24", "w4s24")  # the formats _gemv24_kernel runs


def m_bucket(M: int) -> int:
    """Token-count buckets that share a launch shape (and a tuned entry)."""
    for b in (1, 2, 4, 8, 16, 64):
        if M <= b:
            return b
    return 512


def default_config(fmt: str, M: int, in_features: int) -> Config:
    """Launch shape by token count when no tuned entry applies: GEMV for M <= 2, the MMA tile with
    16 tokens to M = 16, larger tiles for prefill."""
    if M <= 2:
        bk = _pow2_divisor(_walk_len(fmt, in_features), 128)
        return Config("gemv", BW=32, BT=1 if M == 1 else 2, BK=bk, num_warps=4, num_stages=3)
    if M <= 16:
        return Config("tile", BW=64, BT=16, BK=_pow2_divisor(in_features, 128), num_warps=4, num_stages=3)
    if M <= 64:
        return Config("tile", BW=64, BT=64, BK=_pow2_divisor(in_features, 64), num_warps=4, num_stages=3)
    return Config("tile", BW=128, BT=128, BK=_pow2_divisor(in_features, 64), num_warps=8, num_stages=3,
                  waves=1)


def fit_config(cfg: Config, fmt: str, M: int, in_features: int) -> Config:
    """Adapt a (tuned) config to this call: BK must divide the walked K axis, BT cover M for the GEMV."""
    kind = cfg.kind
    if kind == "gemv24" and fmt not in COMPACT_FORMATS:
        kind = "gemv"  # a table entry or sweep shape of the 2:4 formats, asked of another format
    k = _walk_len(fmt, in_features) if kind == "gemv" else in_features
    bk = _pow2_divisor(k, cfg.BK)
    bt = cfg.BT
    if kind in ("gemv", "gemv24"):
        bt = 1 << max(0, (M - 1).bit_length())  # next power of two >= M
        if bt > 8:  # the GEMV unrolls over tokens: beyond 8 the tile kernel is the right shape
            return default_config(fmt, M, in_features)
    return Config(kind, cfg.BW, bt, bk, cfg.num_warps, cfg.num_stages, cfg.waves, cfg.split)


def pick_config(fmt: str, M: int, in_features: int, out_features: int | None = None,
                device: torch.device | None = None) -> Config:
    """The tuned launch shape for this device and layer shape if one was recorded
    (kernels/tuned.py), else the default by token count."""
    from llmprune.kernels import tuned

    entry = tuned.lookup(fmt, m_bucket(M), in_features, out_features, device)
    return fit_config(Config(*entry), fmt, M, in_features) if entry else default_config(fmt, M, in_features)


_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_COUNTERS: dict = {}  # device -> int32 zeros: split-K tickets, re-armed to 0 by every launch
MAX_TILES = 1 << 16


def _counters(device: torch.device) -> torch.Tensor:
    """Per-device ticket counters. Allocated once (before any CUDA-graph capture: the first call of a
    layer runs eagerly); every launch leaves them at zero. Launches that split K must not run
    concurrently on two streams of one device (they share these counters)."""
    key = (device.type, device.index)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def _n_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _split(cfg: Config, n_iter: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """(split, iterations per split): enough programs for cfg.waves x SMs, never an empty split."""
    if tiles > MAX_TILES:
        return 1, n_iter
    split = cfg.split or triton.cdiv(cfg.waves * _n_sms(device), tiles)
    split = max(1, min(n_iter, split))
    iters = triton.cdiv(n_iter, split)
    return triton.cdiv(n_iter, iters), iters


def launch(fmt: str, x2d: torch.Tensor, tensors: tuple, n_out: int, in_features: int, kg: int, G: int,
           has_z: bool, bias: torch.Tensor | None, config: Config | None = None) -> torch.Tensor:
    """y (M, n_out) = x2d (M, in) @ W^T + bias. `tensors` are (A, B, C, D) as in the module
    docstring (unused roles may repeat a tensor); shapes were validated by ops.py."""
    M = x2d.shape[0]
    cfg = fit_config(config, fmt, M, in_features) if config else pick_config(fmt, M, in_features, n_out,
                                                                               x2d.device)
    A, B, C, D = tensors
    sa, sb, sc = A.stride(0), B.stride(0), C.stride(0)
    bias_arg = bias if bias is not None else x2d
    kk = _walk_len(fmt, in_features) if cfg.kind == "gemv" else in_features  # the K axis walked
    n_iter = triton.cdiv(kk, cfg.BK)
    row_blocks = triton.cdiv(n_out, cfg.BW)
    tok_blocks = triton.cdiv(M, cfg.BT) if cfg.kind == "tile" else 1
    split, iters = _split(cfg, n_iter, row_blocks * tok_blocks, x2d.device)
    y = torch.empty((M, n_out), dtype=x2d.dtype, device=x2d.device)
    if split > 1:
        ws = torch.empty((row_blocks * tok_blocks, split, cfg.BW, cfg.BT), dtype=torch.float32,
                         device=x2d.device)
        cnt = _counters(x2d.device)
    else:
        ws = cnt = y  # unused
    meta = {"FMT": fmt_id(fmt), "G": G, "HAS_Z": has_z, "HAS_BIAS": bias is not None, "REDUCE": split > 1,
            "CDT": _TL[x2d.dtype], "BW": cfg.BW, "BT": cfg.BT, "BK": cfg.BK, "num_warps": cfg.num_warps,
            "num_stages": cfg.num_stages}
    args = (x2d, y, bias_arg, ws, cnt, A, B, C, D, sa, sb, sc, M, n_out, kk, kg, x2d.stride(0), iters, split)
    if cfg.kind == "tile":
        _tile_kernel[(row_blocks, tok_blocks, split)](*args, **meta)
    elif cfg.kind == "gemv24":
        _gemv24_kernel[(row_blocks, split)](*args, **meta)
    else:
        _gemv_kernel[(row_blocks, split)](*args, **meta)
    return y
