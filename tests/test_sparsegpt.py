"""SparseGPT against independent oracles: least squares, explicit-inverse OBS steps, Wanda/magnitude."""
import math

import pytest
import torch

from llmprune.errors import LLMPruneError
from llmprune.patterns import n_pruned, parse, satisfies
from llmprune.solvers import get
from llmprune.solvers.magnitude import magnitude
from llmprune.solvers.sparsegpt import sparsegpt
from llmprune.solvers.wanda import wanda
from llmprune.stats import LayerStats


def correlated(n, d, rank, seed, noise=0.2):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, rank, generator=g)
    a = torch.randn(rank, d, generator=g)
    return z @ a + noise * torch.randn(n, d, generator=g)  # (n, d): inputs that strongly co-vary


def stats_of(x, needs=("hessian", "norms", "moments")):
    s = LayerStats(x.shape[1], set(needs))
    s.add(x)
    return s


def out_err(w, w2, x):
    return float(((x.double() @ (w - w2).double().T) ** 2).sum())  # ||W X - W' X||^2


class FakeStats:  # LayerStats' contract: each read of .hessian is a new matrix the solver may overwrite
    def __init__(self, h):
        self._h = h

    @property
    def hessian(self):
        return self._h.clone()

    def take_hessian(self):
        return self.hessian


@pytest.mark.parametrize("spec,s", [("unstructured", 0.5), ("2:4", None), ("unstructured", 0.7)])
def test_beats_wanda_and_magnitude(spec, s):
    x = correlated(384, 40, rank=6, seed=1)
    w = torch.randn(13, 40, generator=torch.Generator().manual_seed(2))
    st, p = stats_of(x), parse(spec)
    s = p.implied_sparsity if s is None else s
    e_sg = out_err(w, sparsegpt(w, st, p, s, blocksize=16).weight, x)
    assert e_sg < 0.5 * out_err(w, wanda(w, st, p, s).weight, x)
    assert e_sg < 0.5 * out_err(w, magnitude(w, st, p, s).weight, x)


@pytest.mark.parametrize(
    "spec,s,scope,in_f",
    [("unstructured", 0.5, "layer", 37), ("unstructured", 0.3, "layer", 37),
     ("unstructured", 0.55, "row", 37),
     ("2:4", 0.5, "layer", 36), ("4:8", 0.5, "layer", 40), ("1:4", 0.75, "layer", 36),
     ("group:4", 0.5, "layer", 36), ("group:3", 0.4, "layer", 33)],
)
def test_masks_satisfy_pattern_exactly(spec, s, scope, in_f):
    x = correlated(200, in_f, rank=5, seed=3)
    w = torch.randn(11, in_f, generator=torch.Generator().manual_seed(4))
    p = parse(spec)
    # blocksize 7: rounded up to a multiple of M or G; the last block is partial
    r = sparsegpt(w, stats_of(x), p, s, blocksize=7, scope=scope)
    verify_scope = scope if p.kind == "unstructured" else "row"
    assert satisfies(r.keep, p, s, scope=verify_scope)
    assert bool((r.weight[~r.keep] == 0).all())
    assert torch.isfinite(r.weight).all()
    if p.kind == "unstructured" and scope == "layer":
        assert int((~r.keep).sum()) == n_pruned(r.keep.numel(), s)


def _damped(h, damp):
    return h + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)


def test_one_step_matches_brute_force_obs():
    """1 row, 6 inputs, one weight pruned: SparseGPT's choice and update equal the OBS step on the
    columns not yet fixed (F = q..), computed with an explicit inverse and by least squares."""
    x = correlated(64, 6, rank=6, seed=5, noise=0.5).double()
    w = torch.randn(1, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    st = stats_of(x.float())
    r = sparsegpt(w.float(), st, parse("unstructured"), 1 / 6, damp=1e-6)
    h = _damped(st.hessian.double(), 1e-6)
    sal = [w[0, q] ** 2 / torch.linalg.inv(h[q:, q:])[0, 0] for q in range(6)]  # OBS saliency of each column
    q = int(torch.stack(sal).argmin())
    assert (~r.keep[0]).nonzero().flatten().tolist() == [q]
    hinv_f = torch.linalg.inv(h[q:, q:])  # (6-q, 6-q)
    expect = w.clone()
    expect[0, q:] += -w[0, q] / hinv_f[0, 0] * hinv_f[0]  # delta = -w_q / [H^-1]_qq * H^-1[q, :]
    torch.testing.assert_close(r.weight.double(), expect, atol=1e-4, rtol=1e-4)
    # independent: the best w' with w'_q = 0 and columns left of q fixed, by least squares on X
    free = list(range(q + 1, 6))
    target = x @ w[0] - x[:, :q] @ w[0, :q]
    sol = torch.linalg.lstsq(x[:, free], target[:, None]).solution[:, 0]
    torch.testing.assert_close(r.weight[0, free].double(), sol, atol=1e-3, rtol=1e-3)


def naive_sparsegpt(w, h, s, bs):
    """Column-by-column OBS with an explicit inverse per column; mask per block of bs columns
    from the saliency at the block's start, n_pruned(out*end) - n_pruned(out*start) across rows."""
    w = w.double().clone()
    out_f, in_f = w.shape
    keep = torch.ones_like(w, dtype=torch.bool)
    inv = [torch.linalg.inv(h[c:, c:]) for c in range(in_f)]  # H_F^-1 for F = c..
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        sal = torch.stack([w[:, c] ** 2 / inv[c][0, 0] for c in range(i1, i2)], 1)  # (out, b)
        k = n_pruned(out_f * i2, s) - n_pruned(out_f * i1, s)
        flat = torch.ones(sal.numel(), dtype=torch.bool)
        flat[sal.flatten().argsort(stable=True)[:k]] = False
        keep[:, i1:i2] = flat.view(out_f, -1)
        for c in range(i1, i2):
            for row in range(out_f):
                if not keep[row, c]:
                    w[row, c:] -= w[row, c] / inv[c][0, 0] * inv[c][0]
    return w * keep, keep


def test_blocks_match_naive_sequential_obs():
    x = correlated(256, 19, rank=19, seed=7, noise=0.5)
    w = torch.randn(5, 19, generator=torch.Generator().manual_seed(8))
    st = stats_of(x)
    r = sparsegpt(w, st, parse("unstructured"), 0.45, damp=0.01, blocksize=6)
    ref_w, ref_keep = naive_sparsegpt(w, _damped(st.hessian.double(), 0.01), 0.45, 6)
    assert torch.equal(r.keep, ref_keep)
    torch.testing.assert_close(r.weight.double(), ref_w, atol=1e-4, rtol=1e-4)


def test_dead_inputs_are_zeroed_not_nan():
    x = correlated(128, 16, rank=4, seed=9)
    x[:, [3, 10]] = 0.0  # inputs that never fire: zero Hessian row and column
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(10))
    r = sparsegpt(w, stats_of(x), parse("2:4"), 0.5)
    assert torch.isfinite(r.weight).all()
    assert bool((r.weight[:, [3, 10]] == 0).all())
    assert satisfies(r.keep, parse("2:4"), 0.5)


def indefinite_hessian(n, neg, seed):
    """H with one eigenvalue = -neg * mean(diag H): Cholesky needs damp > neg."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    rest = 0.5 + 1.5 * torch.rand(n - 1, generator=g, dtype=torch.float64)
    m = float(rest.sum()) / (n + neg)  # mean of all eigenvalues = trace / n
    lam = torch.cat([torch.tensor([-neg * m], dtype=torch.float64), rest])
    return (q * lam) @ q.T


def test_failed_cholesky_raises_damp_and_records_it():
    h = indefinite_hessian(12, 2e-3, seed=11)
    w = torch.randn(4, 12, generator=torch.Generator().manual_seed(12))
    r = sparsegpt(w, FakeStats(h.float()), parse("unstructured"), 0.5, damp=1e-5)
    assert r.info["damp_raised"] == 3 and math.isclose(r.info["damp_used"], 1e-2)
    assert torch.isfinite(r.weight).all() and satisfies(r.keep, parse("unstructured"), 0.5, scope="layer")
    assert sparsegpt(w, FakeStats(h.float()), parse("unstructured"), 0.5, damp=0.05).info["damp_raised"] == 0


def test_singular_hessian_from_few_tokens_is_handled():
    x = correlated(5, 24, rank=5, seed=13, noise=0.0)  # rank 5 < 24 inputs
    w = torch.randn(8, 24, generator=torch.Generator().manual_seed(14))
    r = sparsegpt(w, stats_of(x), parse("unstructured"), 0.5, damp=1e-9)
    assert torch.isfinite(r.weight).all() and satisfies(r.keep, parse("unstructured"), 0.5, scope="layer")
    assert out_err(w, r.weight, x) < out_err(w, wanda(w, stats_of(x), parse("unstructured"), 0.5).weight, x)


def test_hopeless_hessian_names_damp():
    h = -torch.eye(8) - 0.1 * torch.ones(8, 8)
    with pytest.raises(LLMPruneError, match="--damp"):
        sparsegpt(torch.randn(3, 8), FakeStats(h), parse("unstructured"), 0.5)


@pytest.mark.parametrize("kw,match", [({"damp": 0.0}, "--damp"), ({"damp": -1.0}, "--damp"),
                                      ({"blocksize": 0}, "--blocksize"), ({"scope": "col"}, "scope")])
def test_bad_options(kw, match):
    x = correlated(64, 8, rank=4, seed=15)
    with pytest.raises(LLMPruneError, match=match):
        sparsegpt(torch.randn(3, 8), stats_of(x), parse("unstructured"), 0.5, **kw)


def test_non_finite_hessian_and_bad_shape():
    with pytest.raises(LLMPruneError, match="inf/NaN"):
        sparsegpt(torch.randn(3, 8), FakeStats(torch.full((8, 8), float("nan"))), parse("unstructured"), 0.5)
    x = correlated(64, 10, rank=4, seed=16)
    with pytest.raises(LLMPruneError, match="divisible"):
        sparsegpt(torch.randn(3, 10), stats_of(x), parse("2:4"), 0.5)


def test_registered():
    s = get("sparsegpt")
    assert s.needs == frozenset({"hessian"}) and s.sequential and "2301.00774" in s.cite


def test_last_reader_takes_the_hessian_over():
    """LayerStats.take_hessian: a new matrix unless the statistics are disposable (their last reader),
    then X^T X's own memory scaled in place; a later read raises instead of returning garbage."""
    x = correlated(64, 12, rank=5, seed=17)
    s = stats_of(x)
    ref = s.hessian
    h = s.take_hessian()
    assert torch.equal(h, ref) and h.data_ptr() != s.xtx.data_ptr()
    s.disposable = True
    xtx_ptr = s.xtx.data_ptr()
    h = s.take_hessian()
    assert torch.equal(h, ref) and h.data_ptr() == xtx_ptr
    with pytest.raises(RuntimeError, match="handed over"):
        _ = s.hessian


def test_prune_marks_only_the_last_reader_of_shared_statistics(monkeypatch):
    """Phi-3's fused qkv_proj and gate_up_proj parts share one accumulator (walker.collect): only the
    last part solved is marked disposable, and the pruned model equals one pruned without any handing
    over (every read a new matrix), bit for bit."""
    import dataclasses

    from llmprune.prune import prune, target_linears
    from llmprune.testing import tiny_model

    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    base = get("sparsegpt")
    seen = []

    def spy(weight, stats, *a, **k):
        seen.append((stats, stats.disposable))  # (kept alive: ids stay unique)
        return base.fn(weight, stats, *a, **k)

    def pruned(solver):
        m = tiny_model("phi3", seed=3)
        prune(m, solver, parse("2:4"), {n: 0.5 for n in target_linears(m)}, ids, progress=False)
        return m.state_dict()

    got = pruned(dataclasses.replace(base, fn=spy))
    last = {}
    for i, (st, _) in enumerate(seen):
        last[id(st)] = i
    assert len(last) < len(seen), "no shared statistics: the test needs fused linears"
    assert [d for _, d in seen] == [last[id(st)] == i for i, (st, _) in enumerate(seen)]
    monkeypatch.setattr(LayerStats, "take_hessian", lambda self: self.hessian)
    ref = pruned(base)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
