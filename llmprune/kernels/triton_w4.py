"""Triton decode of int4 weight tiles: w4g128, w4s24 (2:4 + int4) and w4s50 (group-sparse int4).

Each function returns a dense weight tile in registers, dequantized as w = (q - z) * s in fp32 and
cast to the compute dtype, so that the GEMV / tile kernels in triton_gemm.py read only the packed
bytes (the memory-bound decode win). Layouts are those of llmprune/formats:
  w4g128: codes (out, in/2) low nibble = even input; scales fp16 (out, in/G); zeros uint8 or z = 8.
  w4s24:  codes (out, in/4): the 2 kept values of group g in byte g, low nibble first; meta as
          sparse24; scales (out, in/G) per G original inputs; z = 8 (or zeros as in w4g128).
  w4s50:  GQSA-style (arXiv 2412.17560) groups of 16 inputs, K kept per row: gidx int16 (out, K)
          sorted; codes (out, K*8) int4 of the kept values; scales fp16 (out, K); z = 8.
"""
import triton
import triton.language as tl

from llmprune.kernels.triton_sparse24 import _pair_groups, expand24, expand24_bits, meta_indices

# int4 -> fp32 without an int-to-float conversion instruction (not full-rate on sm_90): OR-ing a code
# into the mantissa of 2^23 gives the float 2^23 + code exactly, and one FADD removes 2^23 (the "magic
# number" dequant of FasterTransformer and Kim et al. 2022, arXiv 2211.10017; here in fp32, exact)
MAGIC = tl.constexpr(0x4B000000)  # bits of 2^23
MAGIC_F = tl.constexpr(8388608.0)


@triton.jit
def _nibbles(c, BW: tl.constexpr, N: tl.constexpr):
    """uint8 codes (BW, N) -> int32 (BW, 2N), low nibble first."""
    c = c.to(tl.int32)
    return _pair_groups(c & 15, c >> 4, BW, N)


@triton.jit
def _word_scales(s_ptr, z_ptr, s_scale, rows, rmask, k0, BW: tl.constexpr, NW: tl.constexpr, SPAN: tl.constexpr,
                 G: tl.constexpr, HAS_Z: tl.constexpr):
    """Scale s and -z * s (fp32; exact: a 4-bit integer times an fp16 scale) of each of NW words of codes
    covering SPAN inputs each from k0 on: (BW, 1) when the whole tile lies in one group, else (BW, NW)."""
    if NW * SPAN <= G:  # one scale group per row: scale and zero point per row
        s = tl.load(s_ptr + rows * s_scale + k0 // G, mask=rmask, other=0.0).to(tl.float32)[:, None]
        if HAS_Z:
            z = tl.load(z_ptr + rows * s_scale + k0 // G, mask=rmask, other=8).to(tl.float32)[:, None]
        else:
            z = 8.0
    else:  # a word never straddles a group (G >= 16)
        offs = rows[:, None] * s_scale + ((k0 + SPAN * tl.arange(0, NW)) // G)[None, :]
        s = tl.load(s_ptr + offs, mask=rmask[:, None], other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + offs, mask=rmask[:, None], other=8).to(tl.float32)
        else:
            z = 8.0
    return s, -z * s


@triton.jit
def _word_value(wm, hm, j: tl.constexpr, s, zs, CDT: tl.constexpr):
    """(q - z) * s of nibble j, rounded once to CDT: (q * 16^j') * (s / 16^j') + (-z * s), both products
    exact, the FFMA's rounding the only one in fp32, as in the spec."""
    return (nibble_float(wm, hm, j) * (s * nibble_unscale(j)) + zs).to(CDT)


@triton.jit
def _tile_words(code_ptr, s_code, rows, rmask, k0, N: tl.constexpr, SPAN: tl.constexpr):
    """The N int32 code words of each row from input k0 on, a word covering SPAN inputs (8: w4g128,
    16: w4s24; the launcher guarantees 4-byte alignment), as magic_words (BW, N) each."""
    wrd = tl.load(code_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (s_code // 4)
                  + (k0 // SPAN + tl.arange(0, N))[None, :], mask=rmask[:, None], other=0)
    return magic_words(wrd)


@triton.jit
def w4g_tile(code_ptr, s_ptr, z_ptr, s_code, s_scale, rows, rmask, k0,
             BW: tl.constexpr, BK: tl.constexpr, G: tl.constexpr, HAS_Z: tl.constexpr, CDT: tl.constexpr):
    """Dense (BW, BK) tile of a w4g128 weight for inputs [k0, k0+BK): the codes read as int32 words of 8
    each code made fp32 by nibble_float (no conversion instruction)."""
    NW: tl.constexpr = BK // 8
    wm, hm = _tile_words(code_ptr, s_code, rows, rmask, k0, NW, 8)
    s, zs = _word_scales(s_ptr, z_ptr, s_scale, rows, rmask, k0, BW, NW, 8, G, HAS_Z)
    v0 = _word_value(wm, hm, 0, s, zs, CDT)
    v1 = _word_value(wm, hm, 1, s, zs, CDT)
    v2 = _word_value(wm, hm, 2, s, zs, CDT)
    v3 = _word_value(wm, hm, 3, s, zs, CDT)
    v4 = _word_value(wm, hm, 4, s, zs, CDT)
    v5 = _word_value(wm, hm, 5, s, zs, CDT)
    v6 = _word_value(wm, hm, 6, s, zs, CDT)
    v7 = _word_value(wm, hm, 7, s, zs, CDT)
    # code 8w + j at column 8w + j: join's new axis is the fastest, so pair j with j + 4, then j + 2, then j + 1
    t = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
    return tl.reshape(t, (BW, BK))


@triton.jit
def w4s24_tile(code_ptr, meta_ptr, s_ptr, z_ptr, s_code, s_meta, s_scale, rows, rmask, k0,
               BW: tl.constexpr, BK: tl.constexpr, G: tl.constexpr, HAS_Z: tl.constexpr,
               CDT: tl.constexpr):
    """Dense (BW, BK) tile of a w4s24 weight: one code byte per group of 4 inputs, read as int32 words
    of 4 groups (nibble 2g + e: the e-th kept value of group g), decoded as in w4g_tile."""
    NU: tl.constexpr = BK // 16
    wm, hm = _tile_words(code_ptr, s_code, rows, rmask, k0, NU, 16)
    s, zs = _word_scales(s_ptr, z_ptr, s_scale, rows, rmask, k0, BW, NU, 16, G, HAS_Z)
    # first (v0) and second (v1) kept value of the groups 4u + g: g = 2 g1 + g0, g0 the fastest axis
    v0 = tl.reshape(tl.join(tl.join(_word_value(wm, hm, 0, s, zs, CDT), _word_value(wm, hm, 4, s, zs, CDT)),
                            tl.join(_word_value(wm, hm, 2, s, zs, CDT), _word_value(wm, hm, 6, s, zs, CDT))),
                    (BW, BK // 4))
    v1 = tl.reshape(tl.join(tl.join(_word_value(wm, hm, 1, s, zs, CDT), _word_value(wm, hm, 5, s, zs, CDT)),
                            tl.join(_word_value(wm, hm, 3, s, zs, CDT), _word_value(wm, hm, 7, s, zs, CDT))),
                    (BW, BK // 4))
    i0, i1 = meta_indices(meta_ptr, s_meta, rows, rmask, k0, BW, BK)
    if CDT.primitive_bitwidth == 16:  # placed by bit shifts, no selects
        return expand24_bits(v0.to(tl.uint16, bitcast=True).to(tl.uint32),
                             v1.to(tl.uint16, bitcast=True).to(tl.uint32), i0, i1, BW, BK, CDT)
    return expand24(v0, v1, i0, i1, BW, BK)


@triton.jit
def w4s50_dense_tile(code_ptr, gidx_ptr, s_ptr, s_code, s_gidx, s_scale, rows, rmask, k0, pos, KG,
                     BW: tl.constexpr, BK: tl.constexpr, CDT: tl.constexpr):
    """Dense (BW, BK) tile of a w4s50 weight for inputs [k0, k0+BK), for the MMA tile kernel.

    `pos` (BW,) = kept groups of each row before k0 (carried across the K loop, tiles visited in
    order). Among the next BK/16 kept slots of a row, dense group g sits at slot pos + #(gidx < g)
    if some gidx == g; only kept groups' code bytes are loaded. Returns (tile, new pos)."""
    NG: tl.constexpr = BK // 16
    j = tl.arange(0, NG)
    cand = pos[:, None] + j[None, :]  # (BW, NG) candidate slots
    okc = rmask[:, None] & (cand < KG)
    gi = tl.load(gidx_ptr + rows[:, None] * s_gidx + cand, mask=okc, other=0).to(tl.int32)
    gi = tl.where(okc, gi, 1 << 30)  # (BW, NG) next kept group ids (sorted); past the end: never hit
    g = k0 // 16 + j  # (NG,) dense groups of this tile
    hit = gi[:, None, :] == g[None, :, None]  # (BW, NG dense, NG cand)
    kept = tl.sum(hit.to(tl.int32), axis=2) > 0  # (BW, NG)
    slot = pos[:, None] + tl.sum((gi[:, None, :] < g[None, :, None]).to(tl.int32), axis=2)  # (BW, NG)
    b = tl.arange(0, 8)
    c = tl.load(code_ptr + rows[:, None, None] * s_code + slot[:, :, None] * 8 + b[None, None, :],
                mask=kept[:, :, None], other=0x88).to(tl.int32)  # (BW, NG, 8): 16 int4 per group
    s = tl.load(s_ptr + rows[:, None] * s_scale + slot, mask=kept, other=0.0).to(tl.float32)  # (BW, NG)
    q = tl.reshape(tl.join(c & 15, c >> 4), (BW, NG, 16)).to(tl.float32)  # (BW, NG, 16)
    w = tl.reshape((q - 8.0) * s[:, :, None], (BW, BK)).to(CDT)
    return w, pos + tl.sum(kept.to(tl.int32), axis=1)


@triton.jit
def w4s50_slot_tile(code_ptr, gidx_ptr, s_ptr, s_code, s_gidx, s_scale, rows, rmask, kk, KG,
                    BW: tl.constexpr, BK: tl.constexpr, CDT: tl.constexpr):
    """Kept-value tile (BW, BK) for kept columns [kk, kk+BK) (16 per slot) and the input column of
    each, for the GEMV: it walks the compressed columns and gathers x (cached) per row."""
    NS: tl.constexpr = BK // 16
    sl = kk // 16 + tl.arange(0, NS)  # (NS,)
    ok = rmask[:, None] & (sl[None, :] < KG)  # (BW, NS)
    gi = tl.load(gidx_ptr + rows[:, None] * s_gidx + sl[None, :], mask=ok, other=0).to(tl.int32)
    c = tl.load(code_ptr + rows[:, None] * s_code + (kk // 2 + tl.arange(0, BK // 2))[None, :],
                mask=rmask[:, None], other=0x88)  # (BW, BK/2); BK divides KG*16: no tail, vector loads
    q = tl.reshape(_nibbles(c, BW, BK // 2), (BW, NS, 16)).to(tl.float32)  # (BW, NS, 16)
    s = tl.load(s_ptr + rows[:, None] * s_scale + sl[None, :], mask=ok, other=0.0).to(tl.float32)  # (BW, NS)
    w = tl.reshape((q - 8.0) * s[:, :, None], (BW, BK))
    cols = tl.reshape(gi[:, :, None] * 16 + tl.arange(0, 16)[None, None, :], (BW, BK))  # (BW, BK)
    okc = tl.reshape(tl.broadcast_to(ok[:, :, None], (BW, NS, 16)), (BW, BK))
    return w.to(CDT), cols, okc


@triton.jit
def magic_words(wrd):
    """int32 words of 8 codes -> (wm, hm), what nibble_bits reads: the words with MAGIC's bits set, and
    the words shifted by 20 (nibbles 5-7 at the bottom) with MAGIC's bits set."""
    return wrd | MAGIC, ((wrd >> 20) & 0xFFF) | MAGIC


@triton.jit
def nibble_bits(wm, hm, j: tl.constexpr):
    """Nibble j (0..7) of int32 words as the fp32 2^23 + code * 16^j' (exact), one LOP3 per value: `wm` =
    words | MAGIC, `hm` = (words >> 20) | MAGIC (the caller's two operations per word). Nibbles 0..4 are
    masked in place (code * 16^j stays inside the 23-bit mantissa; the caller folds 16^-j into the
    input or the scale, nibble_unscale), nibbles 5..7 come from the word shifted by 20 (j' = j - 5).
    Subtracting 2^23 (+ z * 16^j' for a zero point z) is one exact FADD."""
    if j < 5:
        bits = wm & (MAGIC | (15 << (4 * j)))
    else:
        bits = hm & (MAGIC | (15 << (4 * (j - 5))))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def nibble_float(wm, hm, j: tl.constexpr):
    """code * 16^j' of nibble j as fp32 (nibble_bits less 2^23)."""
    return nibble_bits(wm, hm, j) - MAGIC_F


@triton.jit
def nibble_unscale(j: tl.constexpr):
    """1 / 16^j': what the input of nibble j is multiplied by (exact: a power of two)."""
    if j < 5:
        r = 1.0 / (1 << (4 * j))
    else:
        r = 1.0 / (1 << (4 * (j - 5)))
    return r
