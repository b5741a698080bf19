"""Magnitude and Wanda against short independent oracles on random data."""
import numpy as np
import pytest
import torch

from llmprune import patterns
from llmprune.solvers import get, magnitude
from llmprune.stats import LayerStats


def _stats(x, needs):
    s = LayerStats(x.shape[-1], needs)
    for chunk in x.split(7):
        s.add(chunk)
    return s


def test_stats_match_numpy():
    torch.manual_seed(0)
    x = torch.randn(50, 9) * torch.arange(1, 10) + 1.0
    s = _stats(x, {"norms", "moments", "hessian"})
    xn = x.double().numpy()
    np.testing.assert_allclose(s.sq_norm.numpy(), (xn ** 2).sum(0), rtol=1e-10)
    np.testing.assert_allclose(s.mean.numpy(), xn.mean(0), rtol=1e-10)
    np.testing.assert_allclose(s.var.numpy(), xn.var(0), rtol=1e-8)
    np.testing.assert_allclose(s.hessian.numpy(), 2 * xn.T @ xn / 50, rtol=1e-4)


def test_stats_convert_a_bounded_piece_to_fp64_at_a_time(monkeypatch):
    """Sums in fp64 a few rows at a time (a whole 70B-width batch in fp64 would be GBs): the same statistics as
    numpy over the whole input, for 3-D batches (the per-sequence sums of DSnoT too), ragged pieces and an empty
    input (an expert no token was routed to)."""
    from llmprune import stats

    monkeypatch.setattr(stats, "CHUNK", 20)  # 2 rows of 9 features: pieces of 2 and a last one of 1
    converted = []
    double = torch.Tensor.double
    monkeypatch.setattr(torch.Tensor, "double", lambda t: converted.append(t.numel()) or double(t))
    torch.manual_seed(0)
    x = torch.randn(3, 5, 9) * torch.arange(1, 10) + 1.0
    s = LayerStats(9, {"norms", "moments"})
    s.add(x)
    s.add(torch.zeros(0, 9))
    assert max(converted) <= 20 and s.n == 15
    xn = x.double().numpy().reshape(-1, 9)
    np.testing.assert_allclose(s.sq_norm.numpy(), (xn ** 2).sum(0), rtol=1e-12)
    np.testing.assert_allclose(s.mean.numpy(), xn.mean(0), rtol=1e-12)
    seq = x.double().numpy()
    want = ((seq - seq.mean(1, keepdims=True)) ** 2).sum((0, 1)) / 15
    np.testing.assert_allclose(s.seq_var.numpy(), want, rtol=1e-10)


@pytest.mark.parametrize("pat", ["unstructured", "2:4", "4:8"])
@pytest.mark.parametrize("shape", [(7, 16), (13, 24)])
def test_wanda_matches_oracle(pat, shape):
    torch.manual_seed(1)
    w = torch.randn(shape)
    x = torch.randn(40, shape[1]) * torch.rand(shape[1]) * 3
    p = patterns.parse(pat)
    s = 0.5
    res = get("wanda").fn(w, _stats(x, {"norms"}), p, s)
    # oracle: the paper's metric, |W_ij| * ||X_j||_2, pruned lowest per row / per block of M
    norm = np.sqrt((x.double().numpy() ** 2).sum(0))
    metric = np.abs(w.double().numpy()) * norm[None, :]
    block = p.m if p.kind == "nm" else shape[1]
    k = (p.m - p.n) if p.kind == "nm" else int(shape[1] * s)
    want = np.ones(shape, dtype=bool)
    for i in range(shape[0]):
        for b0 in range(0, shape[1], block):
            order = np.argsort(metric[i, b0:b0 + block], kind="stable")[:k]
            want[i, b0 + order] = False
    assert np.array_equal(res.keep.numpy(), want)
    assert torch.equal(res.weight, w * res.keep)


def test_magnitude_layer_matches_oracle():
    torch.manual_seed(2)
    w = torch.randn(9, 11)
    res = get("magnitude").fn(w, None, patterns.parse("unstructured"), 0.6)
    order = np.argsort(np.abs(w.numpy()).flatten(), kind="stable")[: int(99 * 0.6)]
    want = np.ones(99, dtype=bool)
    want[order] = False
    assert np.array_equal(res.keep.flatten().numpy(), want)


def test_global_magnitude_matches_oracle():
    torch.manual_seed(3)
    ws = {"a": torch.randint(-3, 4, (4, 6)).float(), "b": torch.randint(-3, 4, (5, 3)).float() * 2,
          "c": torch.randn(2, 8)}
    s = 0.55
    per = magnitude.global_sparsities(ws, s)
    keeps = {n: get("magnitude").fn(w, None, patterns.parse("unstructured"), per[n]).keep for n, w in ws.items()}
    # oracle: one stable sort over all weights in layer order
    flat = np.concatenate([np.abs(w.numpy()).flatten() for w in ws.values()])
    order = np.argsort(flat, kind="stable")[: patterns.n_pruned(flat.size, s)]
    want = np.ones(flat.size, dtype=bool)
    want[order] = False
    got = np.concatenate([k.flatten().numpy() for k in keeps.values()])
    assert np.array_equal(got, want)


@pytest.mark.parametrize("seed", range(4))
def test_kth_smallest_abs_is_kthvalue_of_the_concatenation(seed):
    """Radix select over several tensors (ties, zeros, negatives, tiny and huge values, odd sizes) against
    torch.kthvalue of their concatenation, at the ends and in between."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randint(-4, 5, (7, 3), generator=g).float() * 0.25,
          torch.randn(11, 5, generator=g) * 10 ** torch.randint(-30, 30, (11, 5), generator=g).float(),
          torch.zeros(3), torch.randn(1, 13, generator=g).to(torch.bfloat16)]
    flat = torch.cat([w.abs().float().flatten() for w in ws])
    for k in (1, 2, 17, flat.numel() // 2, flat.numel() - 1, flat.numel()):
        got = magnitude.kth_smallest_abs(ws, k)
        assert got.dtype == torch.float32 and torch.equal(got, flat.kthvalue(k).values), k
