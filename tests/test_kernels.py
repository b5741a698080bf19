"""Triton kernels vs. an independent unpack-then-matmul oracle (and the formats' reference), on CPU
under TRITON_INTERPRET=1; the custom ops (fake impls, torch.compile) and input validation."""
import pytest
import torch

from llmprune.errors import LLMPruneError

FORMATS = ("sparse24", "w4g128", "w4s24", "w4s50")

# Triton reads TRITON_INTERPRET=1 when @triton.jit decorates a function, so conftest.py sets it before any
# test module imports triton; the `ops` fixture fails if it came too late.


@pytest.fixture(scope="module")
def ops():
    triton = pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton.language.standard.zeros, InterpretedFunction):
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set: set it in the environment "
                    "(tests/conftest.py does, before any test module is imported)")
    from llmprune.kernels import ops as mod

    return mod


# --- oracle: random packed tensors straight from the layout spec, unpacked by scatter ------------

PAIRS = torch.tensor([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)])


def _rand_meta(out, n_in, g):
    sel = PAIRS[torch.randint(6, (out, n_in // 4), generator=g)]  # (out, in/4, 2) kept positions
    nib = sel[..., 0] | (sel[..., 1] << 2)  # (out, in/4)
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8), sel  # (out, in/8)


def _scatter24(kept, sel):
    out, ng = sel.shape[:2]
    w = torch.zeros(out, ng, 4, dtype=kept.dtype)
    w.scatter_(2, sel, kept.reshape(out, ng, 2))  # (out, in/4, 4)
    return w.reshape(out, ng * 4)


def rand_packed(fmt, out, n_in, dtype=torch.float16, seed=0, G=128, zeros=False):
    """(packed dict, dense fp32 weight) for random codes/metadata of the given layout."""
    g = torch.Generator().manual_seed(seed)

    def u8(*s):
        return torch.randint(0, 256, s, generator=g).to(torch.uint8)

    if fmt == "sparse24":
        meta, sel = _rand_meta(out, n_in, g)
        v = torch.randn(out, n_in // 2, generator=g).to(dtype)
        return {"values": v, "meta": meta}, _scatter24(v.float(), sel)
    if fmt in ("w4g128", "w4s24"):
        ng = n_in // G
        s = (torch.rand(out, ng, generator=g) * 0.1 + 0.01).half()
        z = torch.randint(0, 16, (out, ng), generator=g).to(torch.uint8)
        zf = z.float() if zeros else torch.full((out, ng), 8.0)
        per = G if fmt == "w4g128" else G // 2  # codes per scale group
        c = u8(out, n_in // (2 if fmt == "w4g128" else 4))
        q = torch.stack([c & 15, c >> 4], -1).reshape(out, -1).float()  # low nibble first
        vals = (q - zf.repeat_interleave(per, 1)) * s.float().repeat_interleave(per, 1)
        p = {"codes": c, "scales": s, **({"zeros": z} if zeros else {})}
        if fmt == "w4g128":
            return p, vals
        meta, sel = _rand_meta(out, n_in, g)
        return {**p, "meta": meta}, _scatter24(vals, sel)
    ng = n_in // 16
    k = ng // 2
    gidx = torch.rand(out, ng, generator=g).argsort(1)[:, :k].sort(1).values  # (out, K)
    c = u8(out, k * 8)
    s = (torch.rand(out, k, generator=g) * 0.1 + 0.01).half()
    q = torch.stack([c & 15, c >> 4], -1).reshape(out, k, 16).float()
    w = torch.zeros(out, ng, 16)
    w.scatter_(1, gidx[:, :, None].expand(out, k, 16), (q - 8) * s.float()[:, :, None])
    return {"codes": c, "gidx": gidx.to(torch.int16), "scales": s}, w.reshape(out, n_in)


def oracle(x, w, bias=None):
    """fp64 matmul with the weight first rounded to x's dtype (the spec's numerics)."""
    y = x.double() @ w.to(x.dtype).double().T
    return y if bias is None else y + bias.double()


def assert_close(y, ref, k):
    assert y.shape == ref.shape and y.dtype in (torch.float16, torch.bfloat16, torch.float32)
    # fp32: accumulation error ~ sqrt(K) ulp; fp16/bf16: the output's rounding dominates
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[y.dtype]
    scale = ref.abs().max().item() + 1e-6
    err = (y.double() - ref).abs().max().item()
    assert err <= tol * scale * max(1.0, (k / 4096) ** 0.5) + 1e-6, (err, scale)


# --- correctness -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M", [1, 3, 13, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_oracle_odd_shapes(ops, fmt, M, dtype):
    out, n_in = (72, 384) if fmt != "w4g128" else (40, 256)  # out not a multiple of the row tile
    p, w = rand_packed(fmt, out, n_in, dtype, seed=M, zeros=(M % 2 == 1), G=128)
    x = torch.randn(M, n_in, generator=torch.Generator().manual_seed(M)).to(dtype)
    y = ops.triton_linear(fmt, x, p)
    assert_close(y, oracle(x, w), n_in)


@pytest.mark.parametrize("fmt,M,out,n_in", [
    ("sparse24", 1, 1024, 4096), ("w4g128", 13, 1024, 4096), ("w4s24", 1, 256, 4096),
    ("w4s50", 33, 256, 4096), ("w4s50", 1, 1024, 1024), ("sparse24", 3, 200, 1056),
])
def test_matches_oracle_large(ops, fmt, M, out, n_in):
    p, w = rand_packed(fmt, out, n_in, torch.float16, seed=1)
    x = torch.randn(M, n_in, generator=torch.Generator().manual_seed(2)).half()
    assert_close(ops.triton_linear(fmt, x, p), oracle(x, w), n_in)


@pytest.mark.parametrize("fmt", FORMATS)
def test_bias_batch_dims_and_bf16(ops, fmt):
    """bf16 runs through fp32 in the interpreter; leading batch dims and bias are kept."""
    p, w = rand_packed(fmt, 48, 256, torch.bfloat16, seed=3, G=64)
    x = torch.randn(2, 3, 256).bfloat16()
    b = torch.randn(48).bfloat16()
    y = ops.triton_linear(fmt, x, p, b)
    assert y.shape == (2, 3, 48) and y.dtype == torch.bfloat16
    assert_close(y, oracle(x, w, b), 256)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_launch_shape_agrees(ops, fmt):
    """GEMV with split-K, GEMV unsplit, the lean GEMVs, decode tile, prefill tile and the dense unpack
    (+ torch's matmul) give the same result for one M."""
    from llmprune.kernels.triton_gemm import Config

    p, w = rand_packed(fmt, 96, 512, torch.float32, seed=4, G=32)
    x = torch.randn(2, 512)
    ref = oracle(x, w)
    for cfg in (Config("gemv", 32, 2, 64), Config("gemv", 128, 2, 128), Config("gemv24", 32, 2, 64),
                Config("gemv4", 32, 2, 64), Config("tile", 64, 16, 32), Config("unpack", 32, 128, 64),
                Config("tile", 128, 128, 64, num_warps=8)):
        assert_close(ops.triton_linear(fmt, x, p, config=cfg), ref, 512)


@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_formats_reference(ops, fmt):
    """Kernels against llmprune.kernels.reference on weights packed by llmprune.formats."""
    from llmprune.formats import get
    from llmprune.kernels import reference
    from llmprune.patterns import keep_mask, parse

    wd = torch.randn(80, 256, generator=torch.Generator().manual_seed(5))
    keep = {"sparse24": "2:4", "w4s24": "2:4", "w4s50": "group:16", "w4g128": None}[fmt]
    keep = None if keep is None else keep_mask(wd.abs(), parse(keep), 0.5)
    f = get(fmt)
    packed = f.pack(wd.half() if fmt == "sparse24" else wd, keep)
    if f.derived:
        packed = f.derive(f.stored(packed))
    x = torch.randn(5, 256).half()
    b = torch.randn(80).half()
    ref = getattr(reference, f"linear_{fmt}")(x.float(), packed, b.float())
    y = ops.triton_linear(fmt, x.float(), packed, b.float())
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y16 = ops.triton_linear(fmt, x, packed, b)
    assert_close(y16, oracle(x, f.unpack(packed, dtype=torch.float32), b), 256)


def test_empty_batch(ops):
    p, _ = rand_packed("sparse24", 16, 64)
    assert ops.triton_linear("sparse24", torch.zeros(0, 64).half(), p).shape == (0, 16)


# --- validation ------------------------------------------------------------------------------------

def test_rejects_bad_inputs(ops):
    p, _ = rand_packed("sparse24", 16, 64)
    with pytest.raises(LLMPruneError, match="in_features"):
        ops.linear("sparse24", torch.randn(2, 72), p)  # wrong input width
    with pytest.raises(LLMPruneError, match="unknown packed format"):
        ops.linear("sparse23", torch.randn(2, 64), p)
    with pytest.raises(LLMPruneError, match="lacks 'meta'"):
        ops.linear("sparse24", torch.randn(2, 64), {"values": p["values"]})
    with pytest.raises(LLMPruneError, match="divisible by 8"):
        ops.linear("sparse24", torch.randn(2, 60), p)
    p8, _ = rand_packed("sparse24", 16, 24)  # valid for the reference, too narrow for a kernel tile
    with pytest.raises(LLMPruneError, match="divisible by 16"):
        ops.triton_linear("sparse24", torch.randn(2, 24), p8)
    pg, _ = rand_packed("w4g128", 16, 96, G=48)  # 48 is not a power of two
    with pytest.raises(LLMPruneError, match="power-of-two group size"):
        ops.triton_linear("w4g128", torch.randn(2, 96), pg)
    with pytest.raises(LLMPruneError, match="fp16/bf16/fp32"):
        ops.triton_linear("sparse24", torch.ones(2, 64, dtype=torch.int32), p)
    pw, _ = rand_packed("w4s50", 16, 64)
    with pytest.raises(LLMPruneError, match="gidx"):
        ops.linear("w4s50", torch.randn(2, 64), {**pw, "gidx": pw["gidx"][:, :1]})
    with pytest.raises(LLMPruneError, match="divisible by 16"):
        ops.linear("w4s50", torch.randn(2, 72), pw)


def test_gidx_from_bitmap_roundtrip(ops):
    from llmprune.formats.w4s50 import _gidx  # the formats' own derivation, as an oracle

    p, _ = rand_packed("w4s50", 9, 320)  # 20 groups: a partial last bitmap byte
    ng = 20
    bits = torch.zeros(9, 24, dtype=torch.int64).scatter_(1, p["gidx"].long(), 1)
    bitmap = (bits.view(9, 3, 8) << torch.arange(8)).sum(-1).to(torch.uint8)
    g = ops.gidx_from_bitmap(bitmap, ng)
    assert torch.equal(g.long(), p["gidx"].long()) and torch.equal(g.long(), _gidx(bitmap, ng, 10).long())
    with pytest.raises(LLMPruneError, match="different numbers"):
        ops.gidx_from_bitmap(torch.tensor([[3], [1]], dtype=torch.uint8), 4)


# --- custom ops ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_custom_op_cpu_is_reference_and_opcheck(ops, fmt):
    from llmprune.kernels import reference

    p, _ = rand_packed(fmt, 24, 128, torch.float32, G=64, zeros=True)
    x, b = torch.randn(3, 128), torch.randn(24)
    torch.testing.assert_close(ops.linear(fmt, x, p, b), getattr(reference, f"linear_{fmt}")(x, p, b))
    args, _ = ops.unpack_args(fmt, x, p)
    torch.library.opcheck(ops._OPS[fmt], (x, *args, b), test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph(ops):
    """The fake impls let dynamo + AOT trace a model that calls the ops, with no graph break."""
    p, w = rand_packed("w4s24", 32, 128, torch.float32, G=64)
    q, w2 = rand_packed("sparse24", 16, 32, torch.float32)

    def f(x):
        return ops.linear("sparse24", torch.relu(ops.linear("w4s24", x, p)), q)

    x = torch.randn(4, 128)
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(y, torch.relu(x @ w.T) @ w2.T, rtol=1e-4, atol=1e-4)


# --- grouped (Mixture-of-Experts decode): every (token, expert) pair in one launch ----------------------

def _experts(fmt, E, out, n_in, dtype, G=64):
    """E experts' random packed tensors (one seed each), stacked by ops.stack_args, and their dense weights."""
    from llmprune.kernels import ops as o

    packs, ws = zip(*[rand_packed(fmt, out, n_in, dtype, seed=10 + e, G=G, zeros=fmt != "sparse24")
                      for e in range(E)])
    args, n_out = o.stack_args(fmt, n_in, packs)
    assert n_out == out and all(t is None or t.shape[0] == E for t in args)
    return args, ws


def _grouped_oracle(x, ids, xdiv, ws, bias=None):
    return torch.stack([oracle(x[p // xdiv][None], ws[e], None if bias is None else bias[e])[0]
                        for p, e in enumerate(ids.tolist())])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_matches_oracle(ops, fmt, dtype):
    """Row p = x[p // xdiv] @ W_{ids[p]}^T + b_{ids[p]}: 5 experts of 37 rows (a partial row block), ids with
    repeats and unused experts; the tokens' hidden states (xdiv = top-k) and one row per pair (xdiv = 1). The
    Triton kernel (interpreter) and the custom op (CPU: the reference) both give the fp64 oracle's result."""
    E, T, k, n_in = 5, 3, 2, 192
    args, ws = _experts(fmt, E, 37, n_in, dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([4, 1, 1, 4, 0, 4], dtype=torch.int32)
    bias = torch.randn(E, 37, generator=g).to(dtype)
    for xdiv, rows in ((k, T), (1, T * k)):
        x = torch.randn(rows, n_in, generator=g).to(dtype)
        want = _grouped_oracle(x, ids, xdiv, ws, bias)
        assert_close(ops.triton_grouped_linear(fmt, x, ids, xdiv, args, bias), want, n_in)
        assert_close(ops.grouped_linear(fmt, x, ids, xdiv, args, bias), want, n_in)


@pytest.mark.parametrize("fmt", FORMATS)
def test_grouped_every_gemv_agrees(ops, fmt):
    """Each one-token GEMV a grouped launch can run (the generic one, and the lean one of the format's family),
    with small row blocks and K steps: the oracle's result; an empty batch gives an empty result."""
    from llmprune.kernels import triton_gemm as tg

    args, ws = _experts(fmt, 3, 24, 128, torch.float32, G=32)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([2, 0, 2, 2], dtype=torch.int32)
    kinds = ["gemv"] + ["gemv24"] * (fmt in tg.COMPACT_FORMATS) + ["gemv4"] * (fmt in tg.WORD_FORMATS)
    for kind in kinds:
        y = ops.triton_grouped_linear(fmt, x, ids, 2, args, None, config=tg.Config(kind, 16, 1, 32))
        assert_close(y, _grouped_oracle(x, ids, 2, ws), 128)
    assert ops.triton_grouped_linear(fmt, x[:0], ids[:0], 2, args).shape == (0, 24)


def test_grouped_op_schema_fake_and_refusals(ops, monkeypatch):
    """The grouped custom op passes torch's schema and fake-tensor checks (so graphs capture it); experts of
    different shapes are not stacked, and x / ids that disagree, or more pairs than a launch's grid axis takes,
    are refused in one line."""
    args, _ = _experts("w4s24", 3, 16, 64, torch.float32, G=32)
    x, ids, b = torch.randn(2, 64), torch.tensor([0, 2, 1, 1], dtype=torch.int32), torch.randn(3, 16)
    torch.library.opcheck(ops._GROUPED_OPS["w4s24"], (x, ids, 2, *args, b), test_utils=("test_schema", "test_faketensor"))
    p1, _ = rand_packed("w4s24", 16, 64, G=32)
    p2, _ = rand_packed("w4s24", 24, 64, G=32)
    with pytest.raises(LLMPruneError, match="different shapes"):
        ops.stack_args("w4s24", 64, [p1, p2])
    with pytest.raises(LLMPruneError, match="do not agree"):
        ops.grouped_linear("w4s24", x, ids[:3], 2, args)
    monkeypatch.setattr(ops, "MAX_PAIRS", 3)
    with pytest.raises(LLMPruneError, match="one by one"):
        ops.grouped_linear("w4s24", x, ids, 2, args)


# --- split-K with the in-kernel reduction, and the recorded launch shapes --------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind,split", [("tile", 3), ("tile", 5), ("gemv", 3), ("gemv", 7)])
def test_forced_splits_agree_and_rearm_counters(ops, fmt, kind, split):
    """Any number of K splits (also ones that do not divide the K loop) gives the oracle's result,
    the same bits on a second launch, and leaves the ticket counters at zero for the next launch."""
    from llmprune.kernels import triton_gemm as tg

    p, w = rand_packed(fmt, 40, 1024, torch.float32, seed=split, G=64)  # 40 rows: a partial row block
    x = torch.randn(3 if kind == "tile" else 2, 1024, generator=torch.Generator().manual_seed(7))
    b = torch.randn(40)
    cfg = tg.Config(kind, 32 if kind == "gemv" else 64, 16, 64, split=split)
    y = ops.triton_linear(fmt, x, p, b, config=cfg)
    assert_close(y, oracle(x, w, b), 1024)
    assert torch.equal(ops.triton_linear(fmt, x, p, b, config=cfg), y)
    assert int(tg._counters(x.device).abs().sum()) == 0


def test_split_count_never_leaves_an_empty_split():
    from llmprune.kernels.triton_gemm import Config, _split

    for n_iter in range(1, 40):
        for forced in range(1, 50):
            split, iters = _split(Config("tile", 64, 16, 64, split=forced), n_iter, 3, torch.device("cpu"))
            assert 1 <= split <= n_iter and (split - 1) * iters < n_iter <= split * iters


def test_tuned_table_lookup(ops, monkeypatch, tmp_path):
    """A recorded table is used for its device arch: exact shape, else the nearest swept size; a
    bucket it lacks falls back to the default launch shape, and it never applies off CUDA."""
    import json

    from llmprune.kernels import triton_gemm as tg
    from llmprune.kernels import tuned

    table = {"w4s24": {"1": {"default": ["gemv", 16, 1, 256, 4, 3, 2], "4096x4096": ["tile", 64, 16, 128, 4, 4, 1],
                             "28672x8192": ["tile", 128, 16, 256, 8, 3, 4]}}}
    (tmp_path / "sm90.json").write_text(json.dumps({"configs": table}))
    monkeypatch.setattr(tuned, "DIR", tmp_path)
    monkeypatch.setattr(tuned, "arch", lambda device: "sm90")
    tuned.table.cache_clear()
    try:
        c = tg.pick_config("w4s24", 1, 4096, 4096, "cuda")
        assert (c.kind, c.BW, c.BK, c.num_stages, c.waves) == ("tile", 64, 128, 4, 1)
        c = tg.pick_config("w4s24", 1, 8192, 30000, "cuda")  # nearest swept size: the 70B MLP shape
        assert (c.BW, c.BK, c.waves) == (128, 256, 4)
        c = tg.pick_config("w4s24", 1, 384, 96, "cuda")  # BK adapted to what divides 384
        assert c.BK == 128 and 384 % c.BK == 0
        assert tg.pick_config("w4s24", 16, 4096, 4096, "cuda") == tg.default_config("w4s24", 16, 4096)
        assert tg.pick_config("w4g128", 1, 4096, 4096, "cuda") == tg.default_config("w4g128", 1, 4096)
        monkeypatch.setattr(tuned, "arch", lambda device: None)
        assert tg.pick_config("w4s24", 1, 4096, 4096, "cpu") == tg.default_config("w4s24", 1, 4096)
    finally:
        tuned.table.cache_clear()


def test_shipped_tuned_tables_are_valid():
    """Every recorded entry names a launch shape the kernels accept."""
    import json

    from llmprune.kernels import tuned
    from llmprune.kernels.triton_gemm import Config

    for path in tuned.DIR.glob("*.json"):
        d = json.loads(path.read_text())
        assert d["env"]["device"] and d["configs"], path
        for fmt, buckets in d["configs"].items():
            assert fmt in FORMATS
            for bucket, entries in buckets.items():
                assert int(bucket) in (1, 2, 4, 8, 16, 64, 512) and "default" in entries
                for c in entries.values():
                    cfg = Config(*c)
                    assert cfg.kind in ("gemv", "gemv24", "gemv4", "tile") and cfg.BK & (cfg.BK - 1) == 0
                    assert cfg.BW >= 16


@pytest.mark.parametrize("fmt,zeros,G", [("sparse24", False, 128), ("w4s24", False, 32), ("w4s24", True, 64),
                                         ("w4g128", False, 16), ("w4g128", True, 128)])
def test_lean_gemvs(ops, fmt, zeros, G):
    """The lean GEMVs (gemv24: the 2:4 formats select the input of each kept value; gemv4: w4g128 as
    int32 words): odd row counts, M = 1, 2 and 3 (each its own accumulator count; 3 with its last token masked),
    K tiles inside and across scale groups, forced split-K, bias, asymmetric grid; sparse24 with fp16 values (the
    int32-word path) and fp32 ones. M = 2 through the split-K launch alone (all three cost 20 s more interpreter
    time). w4s24's groups of 32 and 64 put K tiles of 32 inside a group and of 128 across groups (its groups of
    128 were a case too, 11 s, dropped for the suite's time)."""
    from llmprune.kernels.triton_gemm import Config

    kind = "gemv4" if fmt == "w4g128" else "gemv24"
    p, w = rand_packed(fmt, 72, 384, torch.float32 if fmt == "sparse24" and zeros is False and G == 128 else
                       torch.float16, seed=7, G=G, zeros=zeros)
    b = torch.randn(72)
    for M in (1, 2, 3):
        x = torch.randn(M, 384, generator=torch.Generator().manual_seed(M))
        configs = (Config(kind, 32, M, 128), Config(kind, 16, M, 32, split=3), Config(kind, 64, M, 64, split=2))
        for cfg in configs if M != 2 else configs[1:2]:
            assert_close(ops.triton_linear(fmt, x, p, b, config=cfg), oracle(x, w, b), 384)
    if fmt == "sparse24":  # the same weight with fp16 values: 2 per int32 word
        p16 = {**p, "values": p["values"].half()}
        x = torch.randn(2, 384)
        assert_close(ops.triton_linear(fmt, x, p16, config=Config(kind, 32, 2, 128)),
                     oracle(x, w.half().float()), 384)


@pytest.mark.parametrize("fmt", ["sparse24", "w4g128", "w4s24"])
def test_lean_gemvs_small_inputs_and_unaligned_views(ops, fmt):
    """16 and 48 inputs (one word or unit per row and tile) and packed tensors that are views at an
    odd byte offset (the launcher copies them: the lean kernels read int32 / int16)."""
    from llmprune.kernels.triton_gemm import Config

    kind = "gemv4" if fmt == "w4g128" else "gemv24"
    for n_in in (16, 48):
        p, w = rand_packed(fmt, 24, n_in, torch.float16, seed=n_in, G=16)
        x = torch.randn(1, n_in)
        assert_close(ops.triton_linear(fmt, x, p, config=Config(kind, 16, 1, 128)), oracle(x, w), n_in)
    p, w = rand_packed(fmt, 24, 64, torch.float16, seed=5, G=16)
    odd = {k: torch.cat([torch.zeros(1, dtype=t.dtype), t.reshape(-1)])[1:].view(t.shape) for k, t in p.items()}
    assert any(t.data_ptr() % 4 for t in odd.values())
    x = torch.randn(2, 64)
    for cfg in (Config(kind, 16, 2, 32), Config("tile", 64, 16, 32)):
        assert_close(ops.triton_linear(fmt, x, odd, config=cfg), oracle(x, w), 64)


def test_nibble_floats_are_exact(ops):
    """Every code 0..15 at every nibble position of an int32 word comes out of the magic-number decode
    as code * 16^j' exactly (the kernels fold the 16^-j' into the input or the scale)."""
    codes = torch.arange(16, dtype=torch.uint8)
    q = torch.stack([codes.roll(j) for j in range(8)], 1)  # (16, 8): word i holds code (i - j) % 16 at nibble j
    words = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()  # (16, 4) bytes, low nibble first
    out = torch.zeros(16 * 8)
    from nibble_probe import decode

    decode[(1,)](words, out, N=16)
    assert torch.equal(out.view(16, 8), q.float())


@pytest.mark.parametrize("fmt", ["sparse24", "w4g128", "w4s24"])
def test_prefill_decodes_the_weight_then_matmul(ops, fmt):
    """From M = 65 on the default is the dense weight decoded by _unpack_kernel, then torch's matmul:
    the spec's numerics (the weight rounded once to x's dtype); odd rows, bias, zeros, fp16 values."""
    from llmprune.kernels.triton_gemm import UNPACK_FROM_M, pick_config

    assert pick_config(fmt, UNPACK_FROM_M, 256).kind == "unpack"
    assert pick_config(fmt, UNPACK_FROM_M - 1, 256).kind == "tile"
    p, w = rand_packed(fmt, 40, 256, torch.float16, seed=9, G=64, zeros=True)
    x = torch.randn(UNPACK_FROM_M + 2, 256, generator=torch.Generator().manual_seed(9))
    b = torch.randn(40)
    assert_close(ops.triton_linear(fmt, x, p, b), oracle(x, w, b), 256)


def test_prefill_decodes_in_row_chunks(ops, monkeypatch):
    """The dense buffer is capped (UNPACK_BYTES): 40 rows in chunks of 16, 16 and 8, one result."""
    from llmprune.kernels import triton_gemm as tg

    monkeypatch.setattr(tg, "UNPACK_BYTES", 16 * 256 * 4)  # 16 fp32 rows of 256
    for fmt in ("sparse24", "w4g128", "w4s24"):
        p, w = rand_packed(fmt, 40, 256, torch.float16, seed=3, G=128, zeros=fmt == "w4g128")
        x = torch.randn(5, 256)
        b = torch.randn(40)
        assert_close(ops.triton_linear(fmt, x, p, b, config=tg.Config("unpack", 16, 128, 64)), oracle(x, w, b), 256)
