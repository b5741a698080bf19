"""Triton matmul y = x @ W^T + b with W in a packed format, decoded tile by tile in registers.

Kernels (the tile decoders are in triton_sparse24.py, triton_w4.py):
- `_gemv4_kernel` (w4g128) and `_gemv24_kernel` (sparse24, w4s24) for 1-4 tokens, lean: the first
  H200 sweep measured the GEMVs instruction-bound (10-14 thread instructions per weight, 300-1,400
  GB/s), so these spend 5-7 (compile_check counts the loop's SASS): int32-word loads, one word
  column of several rows per thread, int4 -> fp32 by the magic-number trick, 2:4 positions by two
  selects of the input, scales per word, row sums after the K loop, cp.async pipelining.
- `_gemv_kernel` for a few tokens (M <= 8) of any format (w4s50's GEMV): no MMA; every program reads
  a (BW rows x ITERS*BK inputs) slab of packed weight once and reduces it against each token.
- `_unpack_kernel` for prefill (M > 64; sparse24, w4g128, w4s24): the dense weight decoded once, then
  cuBLAS: 2-2.5 more bytes per weight but cuBLAS's matmul, where the MMA tile below ran 0.27-0.45x.
- `_tile_kernel` for everything else: acc (BW weight rows, BT tokens) = W_tile (BW, BK) @
  x_tile^T (BK, BT), weight rows on the MMA's M dimension (swap-AB, as in Marlin-style decode
  kernels) so that BT can be as small as 16 tokens; Triton pipelines the packed-weight loads
  through shared memory (cp.async, num_stages deep); prefill uses 128 x 128 tiles.
All split K over programs when the row blocks alone would not fill the GPU (decode shapes). The
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

from llmprune.kernels.triton_sparse24 import sparse24_tile
from llmprune.kernels.triton_w4 import (
    MAGIC_F,
    magic_words,
    nibble_bits,
    nibble_float,
    nibble_unscale,
    w4g_tile,
    w4s24_tile,
    w4s50_dense_tile,
    w4s50_slot_tile,
)


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
def _pair(ids_ptr, XDIV, x_ptr, y_ptr, bias_ptr, A, B, C, D, sa, sb, sc, N, sxm):
    """GROUPED launches (Mixture-of-Experts decode): program axis 2 is one (token, expert) pair p. Its expert
    e = ids[p] picks the weights, stacked (experts, N, ...) with rows `sa`, `sb`, `sc` apart (so expert e
    starts e * N rows in), its input is row p // XDIV of x (XDIV = top-k for the tokens' hidden states, 1
    for one row per pair) and its output row p of y (pairs, N); the bias is stacked (experts, N)."""
    p = tl.program_id(2)
    e = tl.load(ids_ptr + p).to(tl.int64)
    return (x_ptr + (p // XDIV).to(tl.int64) * sxm, y_ptr + p.to(tl.int64) * N, bias_ptr + e * N,
            A + e * N * sa, B + e * N * sb, C + e * N * sc, D + e * N * sc)


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
_RUNTIME_INTS = ["M", "KG", "ITERS", "SPLIT", "XDIV"]


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _gemv_kernel(x_ptr, y_ptr, bias_ptr, ws_ptr, cnt_ptr, A, B, C, D, sa, sb, sc, M, N, KK, KG, sxm,
                 ITERS, SPLIT, ids_ptr, XDIV, FMT: tl.constexpr, G: tl.constexpr, HAS_Z: tl.constexpr,
                 HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr, CDT: tl.constexpr, BW: tl.constexpr,
                 BT: tl.constexpr, BK: tl.constexpr, GROUPED: tl.constexpr = False):
    if GROUPED:
        x_ptr, y_ptr, bias_ptr, A, B, C, D = _pair(ids_ptr, XDIV, x_ptr, y_ptr, bias_ptr, A, B, C, D, sa, sb, sc,
                                                   N, sxm)
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


@triton.jit
def _scattered(N: tl.constexpr):
    """0..N-1 (N a power of two) as adjacent pairs in scattered order (pair p at 5p mod N/2), for the
    word or unit column of the lean GEMVs: told that columns come in aligned pairs and no longer runs,
    Triton (3.6 to 3.9) lays threads along the row with two columns each and gives each thread several
    rows, so that each input is loaded and scaled once per thread for all its rows. (With no
    contiguity at all the thread order is a tie that Triton 3.6 and 3.7 break differently: 3.6 gave
    each thread a whole row, twice the instructions.) A warp still reads whole row segments."""
    if N == 1:
        c = tl.arange(0, 1)
    else:
        i = tl.arange(0, N)
        c = 2 * (((i // 2) * 5) % (N // 2)) + i % 2
        c = tl.max_contiguous(tl.multiple_of(c, 2), 2)
    return c


@triton.jit
def _pick(b0, b1, xa, xb, xc, second: tl.constexpr):
    """The input a kept 2:4 value multiplies, from its 2-bit position (bits b1 b0) in its group of 4,
    positions ascending (the formats validate it): the first kept one sits at 0, 1 or 2 (xa, xb, xc =
    x0, x1, x2), the second at 1, 2 or 3 (xa, xb, xc = x1, x2, x3). Two selects, not three."""
    if second:
        v = tl.where(b1, tl.where(b0, xc, xb), xa)  # 1 = 01, 2 = 10, 3 = 11
    else:
        v = tl.where(b1, xc, tl.where(b0, xb, xa))  # 0 = 00, 1 = 01, 2 = 10
    return v


@triton.jit
def _s24_token(acc, vals, x_ptr, m: tl.constexpr, sxm, M, k0, ucol, meta, s, FMT: tl.constexpr,
               VT: tl.constexpr):
    """One token's share of a 2:4 GEMV step over units of 16 inputs (4 groups, 8 kept values e = 0..7,
    value e in group e // 2): acc += s * sum_e v_e * x[position of e]. For w4s24 v_e is code e scaled by
    16^e' (nibble_float), so the group's 4 inputs are scaled by 16^-e' here, once per thread for all
    its rows."""
    ok = tl.full(ucol.shape, m, tl.int32) < M
    xp = x_ptr + m * sxm + k0 + 16 * ucol
    part = tl.zeros(meta.shape, tl.float32)
    for g in tl.static_range(4):
        x0 = tl.load(xp + 4 * g + 0, mask=ok, other=0.0).to(tl.float32)[None, :]
        x1 = tl.load(xp + 4 * g + 1, mask=ok, other=0.0).to(tl.float32)[None, :]
        x2 = tl.load(xp + 4 * g + 2, mask=ok, other=0.0).to(tl.float32)[None, :]
        x3 = tl.load(xp + 4 * g + 3, mask=ok, other=0.0).to(tl.float32)[None, :]
        for e in tl.static_range(2):
            b0 = (meta & (1 << (4 * g + 2 * e))) != 0
            b1 = (meta & (2 << (4 * g + 2 * e))) != 0
            if FMT == 0:
                u = 1.0
            else:
                u = nibble_unscale(2 * g + e)
            if e == 0:
                xv = _pick(b0, b1, x0 * u, x1 * u, x2 * u, False)
            else:
                xv = _pick(b0, b1, x1 * u, x2 * u, x3 * u, True)
            part += _kept(vals, g, e, FMT, VT) * xv
    if FMT == 0:
        acc += part
    else:
        acc += part * s
    return acc


@triton.jit
def _kept(vals, g: tl.constexpr, e: tl.constexpr, FMT: tl.constexpr, VT: tl.constexpr):
    """Kept value j = 2g + e (group g, first or second) of a unit as fp32. sparse24: `vals` = 8 fp32
    values, or 4 int32 words of 2 fp16 / bf16 values (type VT, low half first); w4s24: magic_words'
    two, then the 8 offsets 2^23 + z * 16^j') for nibble_bits."""
    if FMT == 0:
        if len(vals) == 8:
            v = vals[2 * g + e]
        else:
            w = vals[g]
            if e == 0:
                h = w.to(tl.int16)
            else:
                h = (w >> 16).to(tl.int16)
            v = h.to(VT, bitcast=True).to(tl.float32)
    else:
        v = nibble_bits(vals[0], vals[1], 2 * g + e) - vals[2 + 2 * g + e]
    return v


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _gemv24_kernel(x_ptr, y_ptr, bias_ptr, ws_ptr, cnt_ptr, A, B, C, D, sa, sb, sc, M, N, KK, KG, sxm,
                   ITERS, SPLIT, ids_ptr, XDIV, FMT: tl.constexpr, G: tl.constexpr, HAS_Z: tl.constexpr,
                   HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr, CDT: tl.constexpr, BW: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, GROUPED: tl.constexpr = False):
    """The GEMV of the 2:4 formats (sparse24, w4s24; 1, 2 or 4 tokens) without expanding the weight:
    each kept value multiplies the input its 2-bit position selects (two selects), so a row costs half
    the multiply-adds. As in _gemv4_kernel, each thread holds one unit of 16 inputs of several rows
    (its 16 inputs loaded once for all of them), w4s24 codes become fp32 without a conversion
    instruction (nibble_float), scales apply per unit, the row sums across threads happen after the
    K loop, and the weight loads are software-pipelined (STAGES deep). Per unit and row: sparse24 8
    fp16 values (4 int32 words), w4s24 8 int4 codes (1 int32 word); meta 2 bytes (1 int16)."""
    if GROUPED:
        x_ptr, y_ptr, bias_ptr, A, B, C, D = _pair(ids_ptr, XDIV, x_ptr, y_ptr, bias_ptr, A, B, C, D, sa, sb, sc,
                                                   N, sxm)
    pid_w = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_w * BW + tl.arange(0, BW)
    rmask = rows < N
    NU: tl.constexpr = BK // 16
    ucol = _scattered(NU)  # one unit per thread and row
    mptr = B.to(tl.pointer_type(tl.int16)) + rows[:, None] * (sb // 2) + ucol[None, :]
    VT: tl.constexpr = A.dtype.element_ty
    if FMT == 0 and VT == tl.float32:  # the interpreter's values: 8 per unit
        vptr = A + rows[:, None] * sa + 8 * ucol[None, :]
    elif FMT == 0:  # fp16 / bf16 values: 4 int32 words of 2 per unit
        vptr = A.to(tl.pointer_type(tl.int32)) + rows[:, None] * (sa // 2) + 4 * ucol[None, :]
    else:  # w4s24: one int32 word of 8 codes per unit
        vptr = A.to(tl.pointer_type(tl.int32)) + rows[:, None] * (sa // 4) + ucol[None, :]
    acc0 = tl.zeros((BW, NU), tl.float32)
    acc1 = tl.zeros((BW, NU), tl.float32)
    acc2 = tl.zeros((BW, NU), tl.float32)
    acc3 = tl.zeros((BW, NU), tl.float32)
    n_it = tl.minimum(ITERS, tl.cdiv(KK, BK) - pid_k * ITERS)
    for i in tl.range(n_it, num_stages=STAGES):
        k0 = (pid_k * ITERS + i) * BK
        rm = rmask[:, None]
        meta = tl.load(mptr + k0 // 16, mask=rm, other=0x4444).to(tl.int32) & 0xFFFF  # (BW, NU)
        s = 1.0
        if FMT == 0 and VT == tl.float32:
            p = vptr + k0 // 2
            vals = (tl.load(p, mask=rm, other=0.0), tl.load(p + 1, mask=rm, other=0.0),
                    tl.load(p + 2, mask=rm, other=0.0), tl.load(p + 3, mask=rm, other=0.0),
                    tl.load(p + 4, mask=rm, other=0.0), tl.load(p + 5, mask=rm, other=0.0),
                    tl.load(p + 6, mask=rm, other=0.0), tl.load(p + 7, mask=rm, other=0.0))
        elif FMT == 0:
            p = vptr + k0 // 4
            vals = (tl.load(p, mask=rm, other=0), tl.load(p + 1, mask=rm, other=0),
                    tl.load(p + 2, mask=rm, other=0), tl.load(p + 3, mask=rm, other=0))
        else:
            wrd = tl.load(vptr + k0 // 16, mask=rm, other=0)
            # one scale per row (the launcher keeps BK <= G): a 1-D load, so that the 2-D ones (words,
            # meta) alone choose the layout of the tile
            s = tl.load(C + rows * sc + k0 // G, mask=rmask, other=0.0).to(tl.float32)[:, None]
            wm, hm = magic_words(wrd)
            if HAS_Z:  # the codes' offsets 2^23 + z * 16^j' (exact), per row and nibble
                z = tl.load(D + rows * sc + k0 // G, mask=rmask, other=8).to(tl.float32)[:, None]
                vals = (wm, hm, z + MAGIC_F, z * 16.0 + MAGIC_F, z * 256.0 + MAGIC_F, z * 4096.0 + MAGIC_F,
                        z * 65536.0 + MAGIC_F, z + MAGIC_F, z * 16.0 + MAGIC_F, z * 256.0 + MAGIC_F)
            else:
                vals = (wm, hm, MAGIC_F + 8.0, MAGIC_F + 128.0, MAGIC_F + 2048.0, MAGIC_F + 32768.0,
                        MAGIC_F + 524288.0, MAGIC_F + 8.0, MAGIC_F + 128.0, MAGIC_F + 2048.0)
        acc0 = _s24_token(acc0, vals, x_ptr, 0, sxm, M, k0, ucol, meta, s, FMT, VT)
        if BT > 1:
            acc1 = _s24_token(acc1, vals, x_ptr, 1, sxm, M, k0, ucol, meta, s, FMT, VT)
        if BT > 2:
            acc2 = _s24_token(acc2, vals, x_ptr, 2, sxm, M, k0, ucol, meta, s, FMT, VT)
            acc3 = _s24_token(acc3, vals, x_ptr, 3, sxm, M, k0, ucol, meta, s, FMT, VT)
    tok = tl.arange(0, BT)
    out = _row_sums(acc0, acc1, acc2, acc3, tok, BT)
    _finish(out, y_ptr, bias_ptr, ws_ptr, cnt_ptr, rows, rmask, tok, tok < M, N, SPLIT, pid_k, pid_w,
            HAS_BIAS, REDUCE, BW, BT)


@triton.jit
def _row_sums(acc0, acc1, acc2, acc3, tok, BT: tl.constexpr):
    """(BW, BT) per-row sums of the lean GEMVs' per-token accumulators (BW, columns): the reduction
    across a row's threads, once after the K loop."""
    out = tl.where(tok[None, :] == 0, tl.sum(acc0, axis=1)[:, None], 0.0)
    if BT > 1:
        out = tl.where(tok[None, :] == 1, tl.sum(acc1, axis=1)[:, None], out)
    if BT > 2:
        out = tl.where(tok[None, :] == 2, tl.sum(acc2, axis=1)[:, None], out)
        out = tl.where(tok[None, :] == 3, tl.sum(acc3, axis=1)[:, None], out)
    return out


@triton.jit
def _w4_token(acc, x_ptr, m: tl.constexpr, sxm, M, k0, wcol, wm, hm, s, z):
    """One token's share of a w4g128 GEMV step: part = sum_j code_j * x_j per word (nibble_float's
    scaling folded into x), then acc += s * (part - z * sum_j x_j): the zero point and the scale are
    applied once per word of 8 codes, not per code."""
    ok = tl.full(wcol.shape, m, tl.int32) < M  # a block, not a scalar (see _gemv_kernel)
    xp = x_ptr + m * sxm + k0 + 8 * wcol
    xs = tl.zeros(wcol.shape, tl.float32)
    part = tl.zeros(wm.shape, tl.float32)
    for j in tl.static_range(8):
        xj = tl.load(xp + j, mask=ok, other=0.0).to(tl.float32)
        xs += xj
        part += nibble_float(wm, hm, j) * (xj * nibble_unscale(j))[None, :]
    return acc + (part - z * xs[None, :]) * s


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _gemv4_kernel(x_ptr, y_ptr, bias_ptr, ws_ptr, cnt_ptr, A, B, C, D, sa, sb, sc, M, N, KK, KG, sxm,
                  ITERS, SPLIT, ids_ptr, XDIV, FMT: tl.constexpr, G: tl.constexpr, HAS_Z: tl.constexpr,
                  HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr, CDT: tl.constexpr, BW: tl.constexpr,
                  BT: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, GROUPED: tl.constexpr = False):
    """The w4g128 GEMV (1, 2 or 4 tokens) at few instructions per weight: the codes are read as int32
    words of 8, each thread holds one word column of several rows (so each input is loaded and
    scaled once per thread for all its rows), a code becomes fp32 in one LOP3 + one FADD (magic
    number, no conversion instruction), its product is one FFMA per token; scales and zero points
    apply per word, and the per-row sums across threads happen once, after the K loop. The word
    loads are software-pipelined (cp.async, STAGES deep). Codes: (out, in/2) uint8 = (out, in/8)
    int32 (the launcher copies a misaligned view); scales (and zeros) (out, in/G), G >= 16, BK <= G
    (the launcher's choice), so one scale per row and K step."""
    if GROUPED:
        x_ptr, y_ptr, bias_ptr, A, B, C, D = _pair(ids_ptr, XDIV, x_ptr, y_ptr, bias_ptr, A, B, C, D, sa, sb, sc,
                                                   N, sxm)
    pid_w = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_w * BW + tl.arange(0, BW)
    rmask = rows < N
    NW: tl.constexpr = BK // 8
    wcol = _scattered(NW)  # one word per thread and row
    words = A.to(tl.pointer_type(tl.int32)) + rows[:, None] * (sa // 4) + wcol[None, :]
    acc0 = tl.zeros((BW, NW), tl.float32)
    acc1 = tl.zeros((BW, NW), tl.float32)
    acc2 = tl.zeros((BW, NW), tl.float32)
    acc3 = tl.zeros((BW, NW), tl.float32)
    n_it = tl.minimum(ITERS, tl.cdiv(KK, BK) - pid_k * ITERS)
    for i in tl.range(n_it, num_stages=STAGES):
        k0 = (pid_k * ITERS + i) * BK
        wm, hm = magic_words(tl.load(words + k0 // 8, mask=rmask[:, None], other=0))  # (BW, NW) each
        # one scale per row (the launcher keeps BK <= G): a 1-D load, so that the words alone choose the
        # layout of the tile
        s = tl.load(B + rows * sb + k0 // G, mask=rmask, other=0.0).to(tl.float32)[:, None]  # (BW, 1)
        if HAS_Z:
            z = tl.load(C + rows * sb + k0 // G, mask=rmask, other=8).to(tl.float32)[:, None]
        else:
            z = 8.0
        acc0 = _w4_token(acc0, x_ptr, 0, sxm, M, k0, wcol, wm, hm, s, z)
        if BT > 1:
            acc1 = _w4_token(acc1, x_ptr, 1, sxm, M, k0, wcol, wm, hm, s, z)
        if BT > 2:
            acc2 = _w4_token(acc2, x_ptr, 2, sxm, M, k0, wcol, wm, hm, s, z)
            acc3 = _w4_token(acc3, x_ptr, 3, sxm, M, k0, wcol, wm, hm, s, z)
    tok = tl.arange(0, BT)
    out = _row_sums(acc0, acc1, acc2, acc3, tok, BT)
    _finish(out, y_ptr, bias_ptr, ws_ptr, cnt_ptr, rows, rmask, tok, tok < M, N, SPLIT, pid_k, pid_w,
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


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _unpack_kernel(x_ptr, y_ptr, bias_ptr, ws_ptr, cnt_ptr, A, B, C, D, sa, sb, sc, M, N, KIN, KG, sxm,
                   ITERS, SPLIT, FMT: tl.constexpr, G: tl.constexpr, HAS_Z: tl.constexpr,
                   HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr, CDT: tl.constexpr, BW: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr):
    """Prefill: the dense weight (N, KIN) into y_ptr, one (BW, BK) tile per program, decoded as the tile
    kernel decodes it (the spec's rounding); cuBLAS then runs the matmul (launch, kind "unpack").
    The other arguments keep the kernels' common signature and are unused."""
    rows = tl.program_id(0) * BW + tl.arange(0, BW)
    rmask = rows < N
    k0 = tl.program_id(1) * BK
    w = _dense_tile(A, B, C, D, sa, sb, sc, rows, rmask, k0, FMT, G, HAS_Z, CDT, BW, BK)
    tl.store(y_ptr + rows[:, None].to(tl.int64) * KIN + (k0 + tl.arange(0, BK))[None, :], w, mask=rmask[:, None])


@dataclass(frozen=True)
class Config:
    """One launch shape. `waves`: split K until about waves x SMs programs run (1 = no split
    beyond what fills the GPU once); `split` > 0 forces the number of K splits."""
    kind: str  # "gemv" | "gemv24" (2:4 formats) | "gemv4" (w4g128) | "tile" | "unpack" (dense + cuBLAS)
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
WORD_FORMATS = ("w4g128",)  # the formats _gemv4_kernel runs
INT4_WORD_FORMATS = ("w4g128", "w4s24")  # codes read as int32 words by every kernel
UNPACK_FORMATS = ("sparse24", "w4g128", "w4s24")  # tiles decoded in input order: _unpack_kernel
UNPACK_FROM_M = 65  # prefill from here: dense weight + cuBLAS (the MMA tile ran 0.27-0.45x cuBLAS at M = 512)


def m_bucket(M: int) -> int:
    """Token-count buckets that share a launch shape (and a tuned entry)."""
    for b in (1, 2, 4, 8, 16, 64):
        if M <= b:
            return b
    return 512


def default_config(fmt: str, M: int, in_features: int) -> Config:
    """Launch shape by token count when no tuned entry applies: GEMV for M <= 2, the MMA tile with
    16 tokens to M = 16 and 64 to M = 64; beyond, the dense weight decoded once + cuBLAS (sparse24,
    w4g128, w4s24) or 128 x 128 tiles (w4s50). The lean GEMVs (gemv4, gemv24) and the prefill unpack
    were chosen by instruction count and bytes (compile_check, docs/formats.md), not yet by a GPU timing."""
    if M <= 2 and (fmt in WORD_FORMATS or fmt in COMPACT_FORMATS):
        return Config("gemv4" if fmt in WORD_FORMATS else "gemv24", BW=128 if M == 1 else 64, BT=M,
                      BK=_pow2_divisor(in_features, 128), num_warps=4, num_stages=3)
    if M <= 2:
        bk = _pow2_divisor(_walk_len(fmt, in_features), 128)
        return Config("gemv", BW=32, BT=1 if M == 1 else 2, BK=bk, num_warps=4, num_stages=3)
    if M <= 16:
        return Config("tile", BW=64, BT=16, BK=_pow2_divisor(in_features, 128), num_warps=4, num_stages=3)
    if M <= 64:
        return Config("tile", BW=64, BT=64, BK=_pow2_divisor(in_features, 64), num_warps=4, num_stages=3)
    if M >= UNPACK_FROM_M and fmt in UNPACK_FORMATS:  # 2-2.5 extra bytes per weight, then cuBLAS's speed
        return Config("unpack", BW=64, BT=128, BK=_pow2_divisor(in_features, 128), num_warps=4, num_stages=1)
    return Config("tile", BW=128, BT=128, BK=_pow2_divisor(in_features, 64), num_warps=8, num_stages=3,
                  waves=1)


def fit_config(cfg: Config, fmt: str, M: int, in_features: int) -> Config:
    """Adapt a (tuned) config to this call: BK must divide the walked K axis, BT cover M for the GEMV."""
    kind = cfg.kind
    if (kind == "gemv24" and fmt not in COMPACT_FORMATS) or (kind == "gemv4" and fmt not in WORD_FORMATS):
        kind = "gemv"  # a table entry or sweep shape of one format family, asked of another format
    if kind == "unpack" and fmt not in UNPACK_FORMATS:
        return default_config(fmt, M, in_features)
    k = _walk_len(fmt, in_features) if kind == "gemv" else in_features
    bk = _pow2_divisor(k, cfg.BK)
    bt = cfg.BT
    if kind in ("gemv", "gemv24", "gemv4"):
        bt = 1 << max(0, (M - 1).bit_length())  # next power of two >= M
        if bt > (8 if kind == "gemv" else 4):  # the GEMVs unroll over tokens: beyond, the tile kernel
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


UNPACK_BYTES = 256 << 20  # the dense buffer of a prefill matmul, at most (decoded in row chunks)


def _unpack_matmul(fmt: str, x2d: torch.Tensor, tensors: tuple, n_out: int, in_features: int, kg: int, G: int,
                   has_z: bool, bias: torch.Tensor | None, cfg: Config) -> torch.Tensor:
    """Prefill: decode the weight (_unpack_kernel) into a dense buffer, rows in chunks of at most
    UNPACK_BYTES (a 70B MLP weight is 470 MB in bf16), and multiply each chunk with cuBLAS."""
    rows = max(cfg.BW, UNPACK_BYTES // (in_features * x2d.element_size()) // cfg.BW * cfg.BW)
    buf = torch.empty((min(rows, n_out), in_features), dtype=x2d.dtype, device=x2d.device)
    b = None if bias is None else bias.to(x2d.dtype)
    if rows >= n_out:
        ys = None
    else:
        ys = torch.empty((x2d.shape[0], n_out), dtype=x2d.dtype, device=x2d.device)
    for r0 in range(0, n_out, rows):
        n = min(rows, n_out - r0)
        part = tuple(t[r0:r0 + n] for t in tensors)  # row views: every packed tensor has a row per output
        _unpack_kernel[(triton.cdiv(n, cfg.BW), in_features // cfg.BK)](
            x2d, buf, x2d, x2d, x2d, *part, *(t.stride(0) for t in part[:3]), x2d.shape[0], n, in_features, kg,
            x2d.stride(0), 1, 1, FMT=fmt_id(fmt), G=G, HAS_Z=has_z, HAS_BIAS=False, REDUCE=False,
            CDT=_TL[x2d.dtype], BW=cfg.BW, BT=cfg.BT, BK=cfg.BK, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
        y = torch.nn.functional.linear(x2d, buf[:n], None if b is None else b[r0:r0 + n])
        if ys is None:
            return y
        ys[:, r0:r0 + n] = y
    return ys


def launch(fmt: str, x2d: torch.Tensor, tensors: tuple, n_out: int, in_features: int, kg: int, G: int,
           has_z: bool, bias: torch.Tensor | None, config: Config | None = None) -> torch.Tensor:
    """y (M, n_out) = x2d (M, in) @ W^T + bias. `tensors` are (A, B, C, D) as in the module
    docstring (unused roles may repeat a tensor); shapes were validated by ops.py."""
    M = x2d.shape[0]
    cfg = fit_config(config, fmt, M, in_features) if config else pick_config(fmt, M, in_features, n_out,
                                                                               x2d.device)
    A, B, C, D = tensors
    cfg = _within_group(cfg, fmt, G)
    # int4 codes and sparse24's 16-bit value pairs are read as int32 words, the 2:4 GEMV's meta as int16:
    # aligned unless a view starts at an odd offset (rows are multiples of 8 bytes), which is copied
    if (fmt in INT4_WORD_FORMATS or fmt == "sparse24") and A.data_ptr() % 4:
        A = A.clone()
    if cfg.kind == "gemv24" and B.data_ptr() % 2:
        B = B.clone()
    sa, sb, sc = A.stride(0), B.stride(0), C.stride(0)
    if cfg.kind == "unpack":
        return _unpack_matmul(fmt, x2d, (A, B, C, D), n_out, in_features, kg, G, has_z, bias, cfg)
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
    else:
        _GEMVS[cfg.kind][(row_blocks, split)](*args, x2d, 1, **meta, **_stages(cfg))
    return y


def _within_group(cfg: Config, fmt: str, G: int) -> Config:
    """The lean int4 GEMVs read one scale per row and K step: BK <= G."""
    if cfg.kind in ("gemv4", "gemv24") and fmt != "sparse24" and cfg.BK > G:
        cfg = Config(cfg.kind, cfg.BW, cfg.BT, G, cfg.num_warps, cfg.num_stages, cfg.waves, cfg.split)
    return cfg


def _stages(cfg: Config) -> dict:
    return {"STAGES": cfg.num_stages} if cfg.kind in ("gemv4", "gemv24") else {}


_GEMVS = {"gemv": _gemv_kernel, "gemv4": _gemv4_kernel, "gemv24": _gemv24_kernel}


def launch_grouped(fmt: str, x2d: torch.Tensor, ids: torch.Tensor, xdiv: int, tensors: tuple, n_out: int,
                   in_features: int, kg: int, G: int, has_z: bool, bias: torch.Tensor | None,
                   config: Config | None = None) -> torch.Tensor:
    """y (P, n_out): row p = x2d[p // xdiv] @ W_e^T (+ b_e) for expert e = ids[p] (P = ids.numel()), the experts'
    packed tensors stacked: `tensors` (A, B, C, D) each (experts, n_out, ...) contiguous, bias (experts, n_out).
    One launch of the one-token GEMV per row block and pair (grid axis 2), the expert read on the device: no
    host synchronization, so a CUDA graph captures it. Every pair reads its expert's weights (pairs of one
    expert share them through L2): for decode; prefill runs expert by expert (moe.SplitExperts)."""
    P = ids.shape[0]
    # each pair runs the one-token GEMV: its tuned shape for this layer, else the default
    cfg = fit_config(config, fmt, 1, in_features) if config else pick_config(fmt, 1, in_features, n_out, x2d.device)
    if cfg.kind not in _GEMVS:
        cfg = default_config(fmt, 1, in_features)
    cfg = _within_group(cfg, fmt, G)
    A, B, C, D = tensors
    sa, sb, sc = A.stride(1), B.stride(1), C.stride(1)  # row strides; expert e starts e * n_out rows in
    y = torch.empty((P, n_out), dtype=x2d.dtype, device=x2d.device)
    if P == 0:
        return y
    kk = _walk_len(fmt, in_features) if cfg.kind == "gemv" else in_features
    n_iter = triton.cdiv(kk, cfg.BK)
    meta = {"FMT": fmt_id(fmt), "G": G, "HAS_Z": has_z, "HAS_BIAS": bias is not None, "REDUCE": False,
            "CDT": _TL[x2d.dtype], "BW": cfg.BW, "BT": 1, "BK": cfg.BK, "num_warps": cfg.num_warps,
            "num_stages": cfg.num_stages, "GROUPED": True}
    _GEMVS[cfg.kind][(triton.cdiv(n_out, cfg.BW), 1, P)](
        x2d, y, bias if bias is not None else x2d, y, y, A, B, C, D, sa, sb, sc, 1, n_out, kk, kg, x2d.stride(0),
        n_iter, 1, ids, xdiv, **meta, **_stages(cfg))
    return y
