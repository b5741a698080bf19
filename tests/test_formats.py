"""Packed formats: exact inverses against loop oracles, odd-but-valid sizes, invalid input rejected."""
import pytest
import torch
import torch.nn.functional as F

from llmprune import formats
from llmprune.errors import LLMPruneError
from llmprune.formats import bits
from llmprune.kernels import reference
from llmprune.modules import PackedLinear
from llmprune.patterns import Pattern, keep_mask, parse


def mask24(w):
    return keep_mask(w.abs(), parse("2:4"), 0.5)


def mask_g16(w):
    return keep_mask(w.abs(), Pattern("group", group=16), 0.5)


# ---- independent oracles: plain Python loops over the documented layout
def meta_oracle(keep):
    out = []
    for row in keep.tolist():
        rb = []
        for b in range(len(row) // 8):
            byte = 0
            for g in range(2):
                pos = [i for i in range(4) if row[8 * b + 4 * g + i]]
                byte |= (pos[0] | (pos[1] << 2)) << (4 * g)
            rb.append(byte)
        out.append(rb)
    return torch.tensor(out, dtype=torch.uint8)


def nibble_oracle(q):
    return torch.tensor([[r[2 * j] | (r[2 * j + 1] << 4) for j in range(len(r) // 2)] for r in q.tolist()],
                        dtype=torch.uint8)


def grid_oracle(vals, symmetric):
    """Scale/zero of one group from its kept values (list of floats), written out by hand."""
    if symmetric:
        s = max(abs(v) for v in vals) / 7 if vals else 0.0
        z = 8
    else:
        lo, hi = min(min(vals, default=0.0), 0.0), max(max(vals, default=0.0), 0.0)
        s = (hi - lo) / 15
    s = s if s != 0 else 1.0
    s = float(torch.tensor(max(s, 2.0 ** -14)).half())
    if not symmetric:
        z = min(max(round(-lo / s), 0), 15)
    return s, z


def dequant_oracle(w, keep, g, symmetric):
    """Dense (out, in) of RTN int4 per group of g inputs computed from the kept values only."""
    out = torch.zeros_like(w)
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], g):
            vals = [w[r, c].item() for c in range(c0, c0 + g) if keep[r, c]]
            s, z = grid_oracle(vals, symmetric)
            for c in range(c0, c0 + g):
                if keep[r, c]:
                    q = min(max(round(w[r, c].item() / s) + z, 0), 15)
                    out[r, c] = (q - z) * s
    return out


# ---- bit helpers
def test_nibbles_and_meta_match_oracles():
    torch.manual_seed(0)
    q = torch.randint(0, 16, (5, 18))
    assert torch.equal(bits.pack_nibbles(q), nibble_oracle(q))
    assert torch.equal(bits.unpack_nibbles(bits.pack_nibbles(q)), q.to(torch.uint8))
    keep = mask24(torch.randn(7, 40))
    idx = bits.kept_index_24(keep)
    assert torch.equal(bits.encode_meta_24(idx), meta_oracle(keep))
    assert torch.equal(bits.decode_meta_24(meta_oracle(keep)), idx)


def test_bitmap_matches_oracle():
    b = torch.rand(3, 21) > 0.5
    packed = bits.pack_bitmap(b)
    oracle = [[sum(1 << j for j in range(8) if 8 * k + j < 21 and b[r, 8 * k + j]) for k in range(3)] for r in range(3)]
    assert packed.tolist() == oracle
    assert torch.equal(bits.unpack_bitmap(packed, 21), b)


# ---- sparse24
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8), (3, 24), (7, 40)])
def test_sparse24_exact_round_trip(shape, dtype):
    torch.manual_seed(1)
    w = torch.randn(*shape).to(dtype)
    keep = mask24(w.float())
    p = formats.get("sparse24").pack(w, keep)
    assert p["values"].dtype == dtype and p["values"].shape == (shape[0], shape[1] // 2)
    assert torch.equal(p["values"], w[keep].reshape(shape[0], -1))  # kept values, input order
    assert torch.equal(p["meta"], meta_oracle(keep))
    dense = formats.get("sparse24").unpack(p)
    assert dense.dtype == dtype and torch.equal(dense, w * keep)
    assert formats.nbytes(p) == shape[0] * shape[1] // 2 * w.element_size() + shape[0] * shape[1] // 8


def test_sparse24_infers_mask_from_zeros_with_padding():
    torch.manual_seed(2)
    w = torch.randn(5, 16)
    w = w * mask24(w)
    w[0, :4] = 0  # a block with no non-zero: padded with zeros
    w[1, 5] = 0  # a block with one non-zero
    f = formats.get("sparse24")
    assert torch.equal(f.unpack(f.pack(w)), w)


def test_sparse24_rejects_invalid():
    f = formats.get("sparse24")
    w = torch.randn(4, 12)
    with pytest.raises(LLMPruneError, match="divisible by 8"):
        f.pack(w, mask24(w))
    w = torch.randn(4, 16)
    bad = mask24(w)
    bad[0, :4] = True  # 4 kept in a block
    with pytest.raises(LLMPruneError, match="not 2:4"):
        f.pack(w, bad)
    with pytest.raises(LLMPruneError, match="more than 2 non-zeros"):
        f.pack(w)  # dense weight, no mask
    with pytest.raises(LLMPruneError, match="keep-mask shape"):
        f.pack(w, mask24(w)[:, :8])
    with pytest.raises(LLMPruneError, match="2-D"):
        f.pack(torch.randn(16))
    with pytest.raises(LLMPruneError, match="drop --quant"):
        f.pack(w, mask24(w), quant=object())
    p = f.pack(w, mask24(w))
    p["meta"][0, 0] = 0  # first == second position: corrupted
    with pytest.raises(LLMPruneError, match="corrupted"):
        f.derive(p)


# ---- w4g128
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape,g", [((3, 24), 8), ((5, 64), 32), ((2, 6), 2)])
def test_w4g128_matches_rtn_oracle(shape, g, symmetric):
    torch.manual_seed(3)
    w = torch.randn(*shape)
    keep = torch.rand(*shape) > 0.3  # unstructured pruning: zeros must stay zero
    w = w * keep
    f = formats.get("w4g128")
    p = f.pack(w, keep, group_size=g, symmetric=symmetric)
    assert set(p) == ({"codes", "scales"} if symmetric else {"codes", "scales", "zeros"})
    assert p["codes"].shape == (shape[0], shape[1] // 2) and p["scales"].dtype == torch.float16
    dense = f.unpack(p)
    assert torch.equal(dense, dequant_oracle(w, keep, g, symmetric))
    assert bool((dense[~keep] == 0).all())
    # low nibble = even column: the codes are the oracle's q, packed
    s = p["scales"].float().repeat_interleave(g, 1)
    z = p["zeros"].float().repeat_interleave(g, 1) if not symmetric else 8.0
    q = torch.round(dense / s + z).to(torch.uint8)
    assert torch.equal(p["codes"], nibble_oracle(q))
    assert bool(((dense - w).abs() <= s / 2 + 1e-6).all())


def test_w4g128_rejects_invalid():
    f = formats.get("w4g128")
    with pytest.raises(LLMPruneError, match="--group-size"):
        f.pack(torch.randn(4, 96), group_size=64)
    with pytest.raises(LLMPruneError, match="--group-size"):
        f.pack(torch.randn(4, 9), group_size=3)
    with pytest.raises(LLMPruneError, match="not finite"):
        f.pack(torch.full((2, 8), float("inf")), group_size=8)


# ---- w4s24
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape,g", [((3, 16), 8), ((5, 48), 16), ((1, 64), 64)])
def test_w4s24_matches_oracle(shape, g, symmetric):
    torch.manual_seed(4)
    w = torch.randn(*shape)
    keep = mask24(w)
    f = formats.get("w4s24")
    p = f.pack(w, keep, group_size=g, symmetric=symmetric)
    assert p["codes"].shape == (shape[0], shape[1] // 4) and torch.equal(p["meta"], meta_oracle(keep))
    assert p["scales"].shape == (shape[0], shape[1] // g)
    dense = f.unpack(p)
    assert torch.equal(dense, dequant_oracle(w, keep, g, symmetric))
    assert bool((dense[~keep] == 0).all())
    assert torch.equal(f.unpack(f.pack(dense, None, group_size=g, symmetric=symmetric)), dense)  # idempotent


def test_w4s24_rejects_invalid():
    f = formats.get("w4s24")
    w = torch.randn(4, 32)
    with pytest.raises(LLMPruneError, match="divisible by 4"):
        f.pack(w, mask24(w), group_size=6)
    with pytest.raises(LLMPruneError, match="--group-size"):
        f.pack(w, mask24(w), group_size=64)
    with pytest.raises(LLMPruneError, match="not 2:4"):
        f.pack(w, torch.ones_like(w, dtype=torch.bool), group_size=16)


# ---- w4s50
@pytest.mark.parametrize("shape", [(1, 32), (3, 96), (6, 288)])
def test_w4s50_matches_oracle(shape):
    torch.manual_seed(5)
    w = torch.randn(*shape)
    keep = mask_g16(w)
    f = formats.get("w4s50")
    p = f.pack(w, keep)
    out_f, in_f = shape
    k = in_f // 32
    gk = keep[:, ::16]  # (out, in/16)
    assert p["gidx"].dtype == torch.int16 and p["gidx"].tolist() == [[i for i in range(in_f // 16) if r[i]] for r in gk.tolist()]
    assert p["bitmap"].tolist() == [[sum(1 << j for j in range(8) if 8 * b + j < in_f // 16 and r[8 * b + j])
                                     for b in range(-(-in_f // 128))] for r in gk.tolist()]
    assert p["codes"].shape == (out_f, k * 8) and p["scales"].shape == (out_f, k)
    dense = f.unpack(p)
    assert torch.equal(dense, dequant_oracle(w, keep, 16, True))
    stored = f.stored(p)
    assert "gidx" not in stored
    assert torch.equal(f.derive(stored)["gidx"], p["gidx"]) and torch.equal(f.unpack(stored), dense)


def test_w4s50_rejects_invalid():
    f = formats.get("w4s50")
    w = torch.randn(4, 48)
    with pytest.raises(LLMPruneError, match="divisible by 32"):
        f.pack(w, torch.ones_like(w, dtype=torch.bool))
    w = torch.randn(4, 64)
    with pytest.raises(LLMPruneError, match="whole 16-input groups"):
        f.pack(w, mask24(w))
    too_many = keep_mask(w.abs(), Pattern("group", group=16), 0.25)  # 3 of 4 groups kept
    with pytest.raises(LLMPruneError, match="whole 16-input groups"):
        f.pack(w, too_many)
    with pytest.raises(LLMPruneError, match="more than half"):
        f.pack(w)
    p = f.pack(w, mask_g16(w))
    p["bitmap"][0, 0] = 0b1111
    with pytest.raises(LLMPruneError, match="corrupted"):
        f.derive(f.stored(p))


def test_unknown_format():
    with pytest.raises(LLMPruneError, match="sparse24, w4g128, w4s24, w4s50"):
        formats.get("w3")


# ---- reference ops and the runtime module
@pytest.mark.parametrize("fmt,opts", [("sparse24", {}), ("w4g128", {"group_size": 16}), ("w4g128", {"group_size": 16, "symmetric": True}),
                                      ("w4s24", {"group_size": 32}), ("w4s50", {})])
def test_reference_linear_and_module(fmt, opts):
    torch.manual_seed(6)
    w = torch.randn(11, 64)
    keep = mask_g16(w) if fmt == "w4s50" else mask24(w) if fmt in ("sparse24", "w4s24") else None
    f = formats.get(fmt)
    p = f.pack(w, keep, **opts)
    x, bias = torch.randn(2, 5, 64), torch.randn(11)
    wd = f.unpack(p)
    y = reference.linear(fmt, x, p, bias)
    assert torch.equal(y, F.linear(x, wd, bias))
    assert torch.equal(getattr(reference, f"linear_{fmt}")(x, p), F.linear(x, wd))
    y16 = reference.linear(fmt, x.half(), {k: v.half() if v.dtype == torch.float32 else v for k, v in p.items()})
    assert y16.dtype == torch.float16 and torch.allclose(y16.float(), F.linear(x, wd), atol=0.05, rtol=0.01)
    mod = PackedLinear(fmt, p, bias, 64, 11, derived=f.derived)
    assert torch.equal(mod(x), reference.linear(fmt, x, p, bias))
    assert mod.nbytes == formats.nbytes(p)
    assert set(mod.state_dict()) == {*f.stored(p), "bias"}
    with pytest.raises(LLMPruneError, match="features"):
        reference.linear(fmt, torch.randn(3, 32), p)


@pytest.mark.parametrize("name", ["w4s24", "w4g128", "w4s50", "sparse24"])
def test_pack_hands_the_layout_one_device(name):
    """GPTQ codes kept on the CPU while the block's weight sits on the GPU crashed w4s24 packing on
    the H200 (gather across devices). Format.pack moves keep and codes to the weight's device; here
    the weight is on `meta` (a second device on a CPU-only machine) and a recorder stands in for the layout."""
    from dataclasses import replace

    from llmprune.quant import Quantized

    f = formats.get(name)
    seen = {}

    class Recorder:
        def pack(self, weight, keep, quant=None, **_):
            seen.update(weight=weight.device, keep=keep.device,
                        quant={t.device for t in (quant.codes, quant.scales, quant.zeros)} if quant else None)
            return {}

    orig = f.module
    object.__setattr__(f, "module", Recorder())  # the registry's Format is a frozen dataclass
    q = Quantized(torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 2, dtype=torch.float16),
                  torch.full((8, 2), 8, dtype=torch.uint8), 16, True)
    try:
        f.pack(torch.empty(8, 32, device="meta"), torch.ones(8, 32, dtype=torch.bool), quant=q)
    finally:
        object.__setattr__(f, "module", orig)
    assert seen["weight"] == seen["keep"] == torch.device("meta")
    assert seen["quant"] == {torch.device("meta")}
    assert replace(q).codes.device.type == "cpu"  # the caller's codes are not moved in place
