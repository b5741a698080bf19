"""Triton decode of 2:4 weight tiles (sparse24 and the 2:4 half of w4s24).

Triton has no sparse tensor cores, so the win is bytes read: a (BW, BK) weight tile is read as
(BW, BK/2) values + (BW, BK/8) metadata bytes and expanded to dense in registers before the MMA
(2:4 layout: Mishra et al. 2021, arXiv 2104.08378; the metadata mirrors NVIDIA's 2-bit indices).

Layout (shared with llmprune/formats and kernels/reference.py):
  values (out, in/2), kept in input order; meta uint8 (out, in/8): byte b covers groups 2b, 2b+1
  of 4 inputs; group 2b: first kept index in bits 0-1, second in bits 2-3; group 2b+1: bits 4-7.
"""
import triton
import triton.language as tl


@triton.jit
def _pair_groups(a, b, BW: tl.constexpr, N: tl.constexpr):
    """Interleave a, b (BW, N) -> (BW, 2N) with a at even and b at odd positions."""
    return tl.reshape(tl.join(a, b), (BW, 2 * N))


@triton.jit
def meta_indices(meta_ptr, s_meta, rows, rmask, k0, BW: tl.constexpr, BK: tl.constexpr):
    """First and second kept index (BW, BK/4) of each group of 4 inputs in [k0, k0+BK)."""
    m = tl.load(meta_ptr + rows[:, None] * s_meta + (k0 // 8 + tl.arange(0, BK // 8))[None, :],
                mask=rmask[:, None], other=0).to(tl.int32)  # (BW, BK/8)
    nib = _pair_groups(m & 15, m >> 4, BW, BK // 8)  # (BW, BK/4): group 2b is the low nibble
    return nib & 3, (nib >> 2) & 3


@triton.jit
def expand24(v0, v1, i0, i1, BW: tl.constexpr, BK: tl.constexpr):
    """Scatter the two kept values of every group (v0 at i0, v1 at i1; each (BW, BK/4)) into a
    dense (BW, BK) tile. Done with selects and joins: Triton has no register scatter."""
    zero = tl.zeros_like(v0)
    o0 = tl.where(i0 == 0, v0, zero)
    o1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
    o2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
    o3 = tl.where(i1 == 3, v1, zero)
    # join(join(o0, o2), join(o1, o3))[..., j, i] = o_{2j+i}: row-major reshape gives 4g + p
    return tl.reshape(tl.join(tl.join(o0, o2), tl.join(o1, o3)), (BW, BK))


@triton.jit
def expand24_bits(b0, b1, i0, i1, BW: tl.constexpr, BK: tl.constexpr, CDT: tl.constexpr):
    """expand24 for 16-bit values, without a compare or a select: b0, b1 (BW, BK/4) are the bits of each
    group's first and second kept value (CDT, as uint32); the group's 4 dense values are the 64-bit word
    b0 << 16 i0 | b1 << 16 i1 (shifts below 64), whose low and high halves hold (d0, d1) and (d2, d3)."""
    d = (b0.to(tl.uint64) << (i0 * 16).to(tl.uint64)) | (b1.to(tl.uint64) << (i1 * 16).to(tl.uint64))
    lo = d.to(tl.uint32)
    hi = (d >> 32).to(tl.uint32)
    d0 = (lo & 0xFFFF).to(tl.uint16).to(CDT, bitcast=True)
    d1 = (lo >> 16).to(tl.uint16).to(CDT, bitcast=True)
    d2 = (hi & 0xFFFF).to(tl.uint16).to(CDT, bitcast=True)
    d3 = (hi >> 16).to(tl.uint16).to(CDT, bitcast=True)
    return tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BW, BK))


@triton.jit
def sparse24_tile(val_ptr, meta_ptr, s_val, s_meta, rows, rmask, k0,
                  BW: tl.constexpr, BK: tl.constexpr, CDT: tl.constexpr):
    """Dense (BW, BK) tile of a sparse24 weight for inputs [k0, k0+BK), in dtype CDT."""
    i0, i1 = meta_indices(meta_ptr, s_meta, rows, rmask, k0, BW, BK)
    if val_ptr.dtype.element_ty == CDT and CDT.primitive_bitwidth == 16:  # a group's pair is one int32 word
        ab = tl.load(val_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (s_val // 2)
                     + (k0 // 4 + tl.arange(0, BK // 4))[None, :], mask=rmask[:, None], other=0)
        ab = ab.to(tl.uint32, bitcast=True)
        return expand24_bits(ab & 0xFFFF, ab >> 16, i0, i1, BW, BK, CDT)
    v = tl.load(val_ptr + rows[:, None] * s_val + (k0 // 2 + tl.arange(0, BK // 2))[None, :],
                mask=rmask[:, None], other=0.0).to(CDT)  # (BW, BK/2), contiguous -> vector loads
    v0, v1 = tl.split(tl.reshape(v, (BW, BK // 4, 2)))  # (BW, BK/4) each
    return expand24(v0, v1, i0, i1, BW, BK)
