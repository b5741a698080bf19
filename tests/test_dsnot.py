"""DSnoT: the reference's rules (per-sequence error scale, within-sequence variance, sign rule, MLP skip),
our optional error check, the pattern kept, a per-row greedy oracle and a transcription of the reference's loop."""
import pytest
import torch

from llmprune.errors import LLMPruneError
from llmprune.patterns import parse, satisfies
from llmprune.solvers import get
from llmprune.solvers.dsnot import dsnot
from llmprune.stats import LayerStats


def uncorrelated(n, d, seed, mean=2.0):
    """Inputs with large per-feature means and an exactly diagonal sample covariance, so that
    E||(W - W')x||^2 = eps^2 + sum d_j^2 Var_j holds exactly on this data."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(z - z.mean(0))  # (n, d): orthonormal columns, each of mean 0
    scale = 0.2 + torch.rand(d, generator=g, dtype=torch.float64)
    mu = mean * torch.randn(d, generator=g, dtype=torch.float64)
    return (mu + n**0.5 * q * scale).float()


def correlated(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, generator=g) @ torch.randn(4, d, generator=g)  # (n, d) strongly co-varying
    return z + 0.3 * torch.randn(n, d, generator=g) + 1.0


def stats_of(x, needs=("norms", "moments")):
    s = LayerStats(x.shape[-1], set(needs))
    s.add(x)
    return s


def msq_err(w, w2, x):
    return ((x.double() @ (w - w2).double().T) ** 2).mean(0)  # (out,) E||(W - W')x||^2 per row


W = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("init,spec,s", [("wanda", "unstructured", 0.5), ("wanda", "2:4", 0.5),
                                         ("magnitude", "unstructured", 0.6), ("wanda", "4:8", 0.5)])
def test_never_worse_than_init_and_keeps_counts(init, spec, s):
    x = uncorrelated(512, 32, seed=1)
    st, p = stats_of(x), parse(spec)
    first = get(init).fn(W, st, p, s)
    r = dsnot(W, st, p, s, init=init, update_threshold=0.0, lower_error=True)
    assert r.info["dsnot_swaps"] > 0  # means far from zero: there is something to fix
    before, after = msq_err(W, first.weight, x), msq_err(W, r.weight, x)
    assert bool((after <= before * (1 + 1e-5)).all())
    assert float(after.sum()) < float(before.sum())
    assert torch.equal(r.keep.sum(1), first.keep.sum(1))  # per-row count unchanged
    if p.kind == "nm":
        assert satisfies(r.keep, p, s)
    assert torch.equal(r.weight[r.keep], W[r.keep]) and bool((r.weight[~r.keep] == 0).all())


def test_correlated_wanda_init_shrinks_expected_error_per_row():
    x = correlated(512, 32, seed=2)
    st, p = stats_of(x), parse("unstructured")
    first = get("wanda").fn(W, st, p, 0.5)
    r = dsnot(W, st, p, 0.5, update_threshold=0.0, same_sign=True)
    mu = x.double().mean(0)
    eps0, eps1 = (W - first.weight).double() @ mu, (W - r.weight).double() @ mu
    assert r.info["dsnot_swaps"] > 0
    assert bool((eps1.abs() <= eps0.abs() + 1e-5).all())
    assert bool((torch.sign(eps1) * torch.sign(eps0) >= 0).all())  # the sign of eps never flips
    assert satisfies(r.keep, p, 0.5)


@pytest.mark.parametrize("spec", ["unstructured", "2:4"])
def test_sparsegpt_init_uses_exact_second_moment(spec):
    x = correlated(512, 32, seed=3)
    st, p = stats_of(x, ("norms", "moments", "hessian")), parse(spec)
    first = get("sparsegpt").fn(W, st, p, 0.5)
    r = dsnot(W, st, p, 0.5, init="sparsegpt", update_threshold=0.0, lower_error=True)
    before, after = msq_err(W, first.weight, x), msq_err(W, r.weight, x)
    assert bool((after <= before * (1 + 1e-4) + 1e-6).all())
    assert torch.equal(r.keep.sum(1), first.keep.sum(1))
    both, grown = r.keep & first.keep, r.keep & ~first.keep
    assert torch.equal(r.weight[both], first.weight[both])  # SparseGPT's updated values stay
    assert torch.equal(r.weight[grown], W[grown])  # grown weights come back with their original value
    assert r.info["damp_used"] == 0.01  # the init solver's info is kept


def greedy_oracle(w, x3, keep, threshold, cycles, m=0, same_sign=False, lower_error=False, by_norm=True):
    """The rule of the docstring, one row at a time in plain Python (diagonal error model); m > 0: N:M.
    x3 (sequences, tokens, in); eps is the reference's: sum_j d_j * (sum over tokens of x_j) / sequences.
    by_norm=False: a kept weight's score is |w'_k| alone (the reference's N:M rule after a magnitude init)."""
    x = x3.reshape(-1, x3.shape[-1]).double()
    w, var = w.double(), x.var(0, unbiased=False)
    seq_var = x3.double().var(1, unbiased=False).mean(0)  # lib/layerwrapper.py: var within each sequence
    mu_seq = x.sum(0) / x3.shape[0]  # lib/layerwrapper.py: sum_metric_row
    mu = x.mean(0)
    norm = x.pow(2).sum(0).sqrt() if by_norm else torch.ones(x.shape[1], dtype=torch.float64)
    keep = keep.clone()
    for r in range(w.shape[0]):
        cur = w[r] * keep[r]
        frozen = set()
        for _ in range(cycles):
            d = w[r] - cur
            eps = float(d @ mu_seq)
            if abs(eps) <= threshold:
                break
            sg = 1.0 if eps > 0 else -1.0
            grow = [(sg * w[r, j] * mu[j] / seq_var[j], j) for j in range(w.shape[1])
                    if not keep[r, j] and j not in frozen and sg * w[r, j] * mu[j] > 0]
            if not grow:
                break
            j = max(grow)[1]
            prune = [(abs(cur[k]) * norm[k], k) for k in range(w.shape[1]) if keep[r, k] and k not in frozen
                     and (k // m == j // m if m else sg * cur[k] * mu[k] < 0)]
            if not prune:
                break
            k = min(prune)[1]
            new = cur.clone()
            new[j], new[k] = w[r, j], 0.0
            d2 = w[r] - new
            eps2 = float(d2 @ mu_seq)
            e_tok, e2_tok = float(d @ mu), float(d2 @ mu)
            gain = (e2_tok**2 + float((d2**2 * var).sum())) - (e_tok**2 + float((d**2 * var).sum()))
            if (same_sign and eps2 * sg <= 0) or (lower_error and gain >= 0):
                break
            cur, keep[r, j], keep[r, k] = new, True, False
            frozen |= {j, k}
    return keep


@pytest.mark.parametrize("spec,rules", [("unstructured", {}), ("2:4", {}),
                                        ("unstructured", {"same_sign": True, "lower_error": True}),
                                        ("2:4", {"lower_error": True}), ("unstructured", {"lower_error": True})])
def test_matches_per_row_greedy_oracle(spec, rules):
    x3 = uncorrelated(1024, 96, seed=4, mean=1.0).reshape(16, 64, 96)  # 16 sequences of 64 tokens
    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(5))
    st, p = stats_of(x3), parse(spec)
    first = get("wanda").fn(w, st, p, 0.5)
    r = dsnot(w, st, p, 0.5, update_threshold=0.05, max_cycles=20, **rules)
    assert r.info["dsnot_cycles"] >= 3  # some row swapped more than once
    same_sign = rules.get("same_sign", p.kind == "nm")  # the reference applies the sign rule to N:M only
    want = greedy_oracle(w, x3, first.keep, 0.05, 20, m=p.m, same_sign=same_sign,
                         lower_error=rules.get("lower_error", False))
    assert torch.equal(r.keep, want)


@pytest.mark.parametrize("spec", ["2:4", "unstructured"])
def test_magnitude_init_prunes_by_the_init_score_in_nm_blocks(spec):
    """lib/prune.py L623-629: an N:M block gives up its kept weight of lowest init score (|w| after a
    magnitude init); unstructured ranks by Wanda's score whatever the init (L691)."""
    x3 = uncorrelated(1024, 96, seed=14, mean=1.0).reshape(16, 64, 96) * torch.linspace(0.2, 3, 96)
    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(15))
    st, p = stats_of(x3), parse(spec)
    first = get("magnitude").fn(w, st, p, 0.5)
    r = dsnot(w, st, p, 0.5, init="magnitude", update_threshold=0.05, max_cycles=20)
    want = greedy_oracle(w, x3, first.keep, 0.05, 20, m=p.m, same_sign=p.kind == "nm", by_norm=p.kind != "nm")
    assert torch.equal(r.keep, want) and r.info["dsnot_swaps"] > 0
    if p.kind == "nm":  # ranked by Wanda's score the blocks would give up other weights
        assert not torch.equal(want, greedy_oracle(w, x3, first.keep, 0.05, 20, m=p.m, same_sign=True))


def reference_oracle(w, x3, sparsity, threshold, cycles):
    """zyxxmu/DSnoT 4c029df, unstructured, init Wanda, default flags (without_same_sign), one row at a time:
    lib/layerwrapper.py L47-60 (statistics fed one sequence at a time) and lib/prune.py L483-488, L666-855,
    with its sorted candidate lists and the two pointers into each. x3: (sequences, tokens, in)."""
    x3, w = x3.double(), w.double()
    seqs = x3.shape[0]
    sum_metric_row = x3.sum((0, 1)) / seqs  # each sequence's sum over its tokens, averaged over sequences
    scaler_row = x3.pow(2).sum((0, 1)) / seqs
    var = x3.var(1, unbiased=False).mean(0)  # torch.var of each batch (one sequence), token-weighted average
    keep = torch.ones(w.shape, dtype=torch.bool)
    n_prune = int(w.shape[1] * sparsity)
    for r in range(w.shape[0]):
        dsnot_metric = w[r] * sum_metric_row  # L483
        wanda = (w[r].abs() * scaler_row.sqrt()).tolist()  # L486, L691
        order = sorted(range(w.shape[1]), key=lambda j: wanda[j])  # stable: ties keep index order
        pruned, kept = order[:n_prune], order[n_prune:]  # L674
        keep[r, pruned] = False
        eps = float(dsnot_metric[pruned].sum())  # L696: sum over pruned j of w_j * mu_j
        # L701-709: pruned weights by w_j mu_j / var_j ascending (the kept ones sit at 0 in the middle,
        # never reached here); eps > 0 takes from the top, else from the bottom
        grow = sorted(pruned, key=lambda j: float(dsnot_metric[j] / var[j]))
        # L711-722 + return_reorder_indice: the kept weights by Wanda's score ascending, those with
        # w_k mu_k < 0 first, then those > 0 in reverse; eps >= 0 takes from the front, eps < 0 from the back
        neg = [k for k in kept if dsnot_metric[k] < 0]
        pos = [k for k in kept if dsnot_metric[k] > 0]
        for _ in range(cycles):  # L758
            if not abs(eps) > threshold:  # L827-829: the row stops for good
                break
            j, k = (grow.pop(), neg.pop(0)) if eps > 0 else (grow.pop(0), pos.pop(0))  # L762-819
            keep[r, j], keep[r, k] = True, False  # L840-841
            eps += float(dsnot_metric[k] - dsnot_metric[j])  # L843-852
    return keep


class _AllTokenVar:
    def __init__(self, s):
        self.s = s

    def __getattr__(self, k):
        return self.s.var if k == "seq_var" else getattr(self.s, k)


def test_matches_the_reference_code_at_70_percent():
    """Default options against a transcription of the reference's loop, on sequences whose means differ
    (so the variance within sequences, which the reference divides by, is not the variance over all
    tokens: with the latter the masks differ)."""
    g = torch.Generator().manual_seed(11)
    d = 160
    x3 = (torch.randn(12, 48, d, generator=g) * (0.3 + torch.rand(d, generator=g)) + torch.randn(d, generator=g)
          + torch.randn(12, 1, d, generator=g) * torch.rand(d, generator=g))
    w = torch.randn(24, d, generator=torch.Generator().manual_seed(12))
    st, p = stats_of(x3), parse("unstructured")
    want = reference_oracle(w, x3, 0.7, 0.5, 12)
    r = dsnot(w, st, p, 0.7, update_threshold=0.5, max_cycles=12)
    assert 0 < r.info["dsnot_swaps"] < 24 * 12  # some rows stop below the threshold
    assert torch.equal(r.keep, want)
    assert not torch.equal(dsnot(w, _AllTokenVar(st), p, 0.7, update_threshold=0.5, max_cycles=12).keep, want)


def test_within_sequence_variance():
    g = torch.Generator().manual_seed(13)
    x3 = torch.randn(6, 20, 5, generator=g) + torch.randn(6, 1, 5, generator=g) * 3
    want = x3.double().var(1, unbiased=False).mean(0)
    for parts in ((x3,), x3.split(4), [s[0] for s in x3.split(1)]):  # batches of sequences, or 2-D ones
        s = LayerStats(5, {"moments"})
        for part in parts:
            s.add(part)
        assert torch.allclose(s.seq_var, want, rtol=1e-10)
        assert bool((s.var > s.seq_var * 1.5).all())  # the spread of the sequences' means is left out


def test_threshold_is_on_the_per_sequence_scale():
    """The same tokens cut into 16 sequences of 64, or given as one sequence of 1024, with the threshold
    scaled by the 16 sequences: the same swaps. And a threshold that the per-token mean error never
    reaches still lets the per-sequence error (64x larger) swap."""
    x = uncorrelated(1024, 64, seed=8, mean=1.0)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(9))
    p = parse("unstructured")
    a = dsnot(w, stats_of(x.reshape(16, 64, 64)), p, 0.5, update_threshold=0.3)
    b = dsnot(w, stats_of(x.reshape(1, 1024, 64)), p, 0.5, update_threshold=0.3 * 16)
    assert torch.equal(a.keep, b.keep) and a.info["dsnot_swaps"] > 0
    eps_tok = (w - get("wanda").fn(w, stats_of(x), p, 0.5).weight).double() @ x.double().mean(0)
    thr = 2 * float(eps_tok.abs().max())  # above every row's per-token error, below most per-sequence ones
    assert dsnot(w, stats_of(x.reshape(16, 64, 64)), p, 0.5, update_threshold=thr).info["dsnot_swaps"] > 0


def test_skips_the_mlp_by_default_as_the_reference():
    x3 = uncorrelated(512, 32, seed=10).reshape(8, 64, 32)
    st, p = stats_of(x3), parse("unstructured")
    first = get("wanda").fn(W, st, p, 0.5)
    mlp = dsnot(W, st, p, 0.5, layer="model.layers.3.mlp.up_proj")
    assert torch.equal(mlp.keep, first.keep) and mlp.info["dsnot_skipped"]
    attn = dsnot(W, st, p, 0.5, layer="model.layers.3.self_attn.q_proj")
    assert attn.info["dsnot_swaps"] > 0 and not torch.equal(attn.keep, first.keep)
    assert torch.equal(dsnot(W, st, p, 0.5, layer="model.layers.3.mlp.up_proj", skip="none").keep, attn.keep)
    assert torch.equal(dsnot(W, st, p, 0.5, layer="model.layers.3.self_attn.q_proj", skip="self_attn").keep,
                       first.keep)


def test_zero_cycles_or_large_threshold_is_the_init():
    x = uncorrelated(128, 32, seed=6)
    st, p = stats_of(x), parse("unstructured")
    first = get("wanda").fn(W, st, p, 0.5)
    for kw in ({"max_cycles": 0}, {"update_threshold": 1e9}):
        r = dsnot(W, st, p, 0.5, **kw)
        assert torch.equal(r.keep, first.keep) and r.info["dsnot_swaps"] == 0


def test_bad_inputs_and_needs():
    x = uncorrelated(64, 32, seed=7)
    st = stats_of(x)
    for bad in ("dsnot", "sparsgpt", "owl"):
        with pytest.raises(LLMPruneError, match="wanda, sparsegpt, alps, magnitude"):
            dsnot(W, st, parse("unstructured"), 0.5, init=bad)
    with pytest.raises(LLMPruneError, match="group"):
        dsnot(W, st, parse("group:4"), 0.5)
    with pytest.raises(LLMPruneError, match="--max-cycles"):
        dsnot(W, st, parse("unstructured"), 0.5, max_cycles=-1)
    with pytest.raises(LLMPruneError, match="skip"):
        dsnot(W, st, parse("unstructured"), 0.5, skip="attn")
    s = get("dsnot")
    assert s.needs_for({}) == {"moments", "norms"}
    assert s.needs_for({"init": "sparsegpt"}) == {"moments", "norms", "hessian"}
    with pytest.raises(LLMPruneError, match="not a mask solver"):
        s.needs_for({"init": "x"})


def test_dsnot_follows_its_init_solvers_order_in_the_model():
    """dsnot --init sparsegpt runs true-sequential like SparseGPT itself, so with zero cycles it
    gives SparseGPT's model exactly (solved in one pass it would see unpruned inputs and differ)."""
    from llmprune import patterns, prune
    from llmprune.testing import tiny_model

    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))
    p = patterns.parse("unstructured")
    models = []
    for solver, opts in ((get("sparsegpt"), {}), (get("dsnot"), {"init": "sparsegpt", "max_cycles": 0})):
        m = tiny_model()
        names = prune.target_linears(m)
        prune.prune(m, solver, p, {n: 0.6 for n in names}, ids, opts, batch_size=3, progress=False)
        models.append(m)
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), n
    assert get("dsnot").sequential_for({"init": "sparsegpt"}) and not get("dsnot").sequential_for({})
