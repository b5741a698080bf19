"""RTN and GPTQ after pruning: oracles on random data, zeros kept bit for bit, bad input rejected."""
import pytest
import torch

from llmprune.errors import LLMPruneError
from llmprune.patterns import keep_mask, parse
from llmprune.quant import gptq as gptq_mod
from llmprune.quant.gptq import collect_hessians, gptq
from llmprune.quant.rtn import rtn


def correlated(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    a = torch.randn(d, d, generator=g) / d**0.5 + 0.5 * torch.eye(d)
    return (z @ a).double()  # (n, d): strongly correlated features


def hess(x):
    return (2 * x.T @ x / x.shape[0]).float()


def recon_err(w, wq, x):
    return torch.linalg.norm((w.double() - wq.double()) @ x.T).item()


def test_rtn_matches_a_scalar_oracle_and_keeps_zeros():
    torch.manual_seed(0)
    w = torch.randn(6, 40)
    keep = torch.rand(6, 40) > 0.5
    for sym in (False, True):
        q = rtn(w * keep, keep, group_size=8, symmetric=sym)
        dq = q.dequantize()
        for r in range(6):
            for g0 in range(0, 40, 8):
                vals = [(w[r, c] * keep[r, c]).item() for c in range(g0, g0 + 8) if keep[r, c]]
                if sym:
                    s, z = max([abs(v) for v in vals], default=0) / 7, 8
                else:
                    lo, hi = min(vals + [0.0]), max(vals + [0.0])
                    s = (hi - lo) / 15
                s = float(torch.tensor(s if s else 1.0).half())
                if not sym:
                    z = min(max(round(-lo / s), 0), 15)
                assert q.scales[r, g0 // 8].item() == s and q.zeros[r, g0 // 8].item() == z
                for c in range(g0, g0 + 8):
                    want = (min(max(round(w[r, c].item() / s) + z, 0), 15) - z) * s if keep[r, c] else 0.0
                    assert dq[r, c].item() == pytest.approx(want, abs=0, rel=0)
        assert torch.equal(q.codes[~keep], q.zeros.repeat_interleave(8, 1)[~keep])


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
@pytest.mark.parametrize("sym", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs_and_keeps_zeros(pattern, sym):
    torch.manual_seed(1)
    x = correlated(1024, 64)
    w = torch.randn(48, 64)
    keep = keep_mask(w.abs(), parse(pattern), 0.5)
    w = w * keep
    qr = rtn(w, keep, group_size=32, symmetric=sym)
    qg = gptq(w, hess(x), keep, group_size=32, symmetric=sym, blocksize=32)
    dg = qg.dequantize()
    assert bool((dg[~keep] == 0).all()) and bool((dg[~keep].view(torch.int32) == 0).all())  # +0.0, bit for bit
    assert torch.equal(qg.codes[~keep], qg.zeros.repeat_interleave(32, 1)[~keep])
    assert recon_err(w, dg, x) < 0.95 * recon_err(w, qr.dequantize(), x)


def test_gptq_is_rtn_for_a_diagonal_hessian():
    """A diagonal H means no correlations: GPTQ's update vanishes and it must round like RTN."""
    torch.manual_seed(2)
    w = torch.randn(16, 48)
    keep = keep_mask(w.abs(), parse("2:4"), 0.5)
    h = torch.diag(torch.rand(48) + 0.1)
    for sym in (False, True):
        a, b = gptq(w * keep, h, keep, group_size=16, symmetric=sym), rtn(w * keep, keep, 16, sym)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_matches_sequential_obs_oracle(act_order):
    """GPTQ (Cholesky rows, lazy blocks) equals the textbook sequential OBS update with explicit
    inverses of the not-yet-quantized columns' Hessian (arXiv 2210.17323, eq. 2-3), fp64; a pruned
    weight is 'quantized' to 0 and its error compensated like any other. act_order: the columns in
    order of decreasing H_jj, each group's grid fixed from the unquantized weights."""
    torch.manual_seed(3)
    d, G = 12, 4
    x = correlated(256, d, seed=3) * torch.linspace(0.5, 2.0, d, dtype=torch.float64)[torch.randperm(d)]
    w = torch.randn(3, d).double()
    keep = keep_mask(w.abs(), parse("2:4"), 0.5)
    w = w * keep
    H = 2 * x.T @ x / x.shape[0]
    H = H + 0.01 * torch.diag(H).mean() * torch.eye(d, dtype=torch.float64)

    def grid(blk):  # asymmetric grid of a group's kept weights
        lo, hi = blk.amin(1).clamp(max=0), blk.amax(1).clamp(min=0)
        s = ((hi - lo) / 15).float().half().double()
        return s, torch.round(-lo / s).clamp(0, 15)

    static = [grid(torch.where(keep[:, c:c + G], w[:, c:c + G], 0.0)) for c in range(0, d, G)]
    order = sorted(range(d), key=lambda j: -H[j, j].item()) if act_order else list(range(d))
    assert order != list(range(d)) or not act_order  # the test really permutes
    W = w.clone()
    out = torch.zeros_like(W)
    for t, j in enumerate(order):
        if act_order:
            s, z = static[j // G]
        elif j % G == 0:  # the group's grid from its current kept weights
            s, z = grid(torch.where(keep[:, j:j + G], W[:, j:j + G], 0.0))
        q = torch.where(keep[:, j], (torch.clamp(torch.round(W[:, j] / s) + z, 0, 15) - z) * s, 0.0)
        out[:, j] = q
        F = order[t:]  # the remaining columns, j first
        Hinv = torch.linalg.inv(H[F][:, F])
        W[:, F] = W[:, F] - ((W[:, j] - q) / Hinv[0, 0])[:, None] * Hinv[0, :][None, :]
    got = gptq(w.float(), H.float(), keep, group_size=G, symmetric=False, damp=1e-9, blocksize=8,
               act_order=act_order).dequantize()
    assert torch.allclose(got.double(), out, atol=1e-4)


def test_gptq_handles_dead_inputs_and_rejects_bad_input():
    torch.manual_seed(4)
    x = correlated(256, 16)
    x[:, 3] = 0  # a dead input: zero diagonal
    w = torch.randn(4, 16)
    q = gptq(w, hess(x), None, group_size=8)
    assert torch.isfinite(q.dequantize()).all()
    with pytest.raises(LLMPruneError, match="--damp"):
        gptq(w, hess(x), None, group_size=8, damp=0)
    with pytest.raises(LLMPruneError, match="raise --damp"):
        gptq(w, -torch.eye(16), None, group_size=8)
    with pytest.raises(LLMPruneError, match="Hessian shape"):
        gptq(w, torch.eye(8), None, group_size=8)
    with pytest.raises(LLMPruneError, match="--group-size"):
        gptq(w, hess(x), None, group_size=6)


def test_collect_hessians_matches_definition():
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    xs = [torch.randn(5, 8), torch.randn(3, 8)]
    hs = collect_hessians(model, ["0", "2"], xs)
    x0 = torch.cat(xs)
    x2 = torch.relu(model[0](x0)).detach()
    assert torch.allclose(hs["0"], 2 * x0.T @ x0 / 8, atol=1e-5)
    assert torch.allclose(hs["2"], 2 * x2.T @ x2 / 8, atol=1e-5)
    assert not model[0]._forward_pre_hooks  # hooks removed


def test_sink_weight_counts_each_sequence_first_token_w_times():
    """H = 2 (X^T X + (w - 1) X0^T X0) / (n + (w - 1) b) for b sequences whose first tokens are X0;
    the norms/moments statistics still count every token once."""
    from llmprune.stats import LayerStats

    torch.manual_seed(6)
    xs = [torch.randn(3, 7, 5), torch.randn(2, 7, 5)]
    st = LayerStats(5, {"hessian", "moments"}, sink_weight=9.0)
    for x in xs:
        st.add(x)
    flat, first = torch.cat([x.reshape(-1, 5) for x in xs]), torch.cat([x[:, 0] for x in xs])
    want = 2 * (flat.T @ flat + 8 * first.T @ first) / (35 + 8 * 5)
    assert torch.allclose(st.hessian, want, atol=1e-5)
    assert torch.allclose(st.mean.float(), flat.mean(0), atol=1e-6)
    plain = LayerStats(5, {"hessian"})
    for x in xs:
        plain.add(x)
    assert torch.allclose(plain.hessian, 2 * flat.T @ flat / 35, atol=1e-5)
    with pytest.raises(ValueError, match="sink_weight"):
        LayerStats(5, {"hessian"}, sink_weight=0)


def test_quant_registry():
    from llmprune import quant

    assert quant.get("rtn") is rtn and quant.get("gptq") is gptq_mod.gptq
    with pytest.raises(LLMPruneError, match="rtn or gptq"):
        quant.get("awq")


def test_gptq_sequential_quantizes_each_expert_from_its_routed_tokens():
    """Mixture-of-Experts: GPTQ's pass reaches every expert's projections, each quantized from the Hessian of
    the tokens the router sent to that expert. Oracle: the experts module's own inputs and routing, recorded by
    a hook on the unquantized first block, give expert e's gate/up inputs X_e = hidden[routed to e] and its
    down inputs act(X_e W_gate^T) * (X_e W_up^T); GPTQ from 2 X^T X / n gives the same codes. With a
    `--expert-min-tokens` above every expert's count, each falls back to `magnitude`: round-to-nearest."""
    import torch.nn.functional as F

    from llmprune.quant.sequential import gptq_sequential
    from llmprune.testing import tiny_model

    model = tiny_model("qwen3_moe", seed=2)
    ids = torch.randint(0, 250, (4, 24), generator=torch.Generator().manual_seed(0))
    experts = model.model.layers[0].mlp.experts
    seen = []
    hook = experts.register_forward_hook(lambda m, a, k, out: seen.append((a[0].detach(), a[1].detach())),
                                         with_kwargs=True)
    with torch.no_grad():
        model(ids)
    hook.remove()
    hidden, index = seen[0]  # (tokens, H), (tokens, k): block 0's experts call
    w_gate_up = experts.gate_up_proj.detach().clone()  # (E, 2I, H): [gate; up]
    w_down = experts.down_proj.detach().clone()
    info: dict = {}
    codes = gptq_sequential(model, ids, "w4g128", 32, True, act_order=False, dtype=None, info=info,
                            expert_min_tokens=1, batch_size=4)
    inter = w_down.shape[-1]
    checked = 0
    for e in range(w_gate_up.shape[0]):
        x = hidden[(index == e).any(-1)].double()
        if x.shape[0] == 0:
            continue
        gate, up = w_gate_up[e, :inter], w_gate_up[e, inter:]
        h_in = (2 * x.T @ x / x.shape[0]).float()
        xd = (F.silu(x.float() @ gate.T) * (x.float() @ up.T)).double()
        h_down = (2 * xd.T @ xd / xd.shape[0]).float()
        for proj, w, h in (("gate_proj", gate, h_in), ("up_proj", up, h_in), ("down_proj", w_down[e], h_down)):
            want = gptq(w, h, None, 32, True, act_order=False)
            got = codes[f"model.layers.0.mlp.experts[{e}].{proj}"]
            assert torch.equal(got.codes, want.codes), (e, proj, (got.codes != want.codes).float().mean())
            checked += 1
    assert checked >= 12 and info["experts"]["fell_back"] == 0
    assert info["experts"]["per_expert"]["model.layers.0.mlp.experts[0]"]["tokens"] == int((index == 0).any(-1).sum())
    rounded = gptq_sequential(tiny_model("qwen3_moe", seed=2), ids, "w4g128", 32, True, act_order=False, dtype=None,
                              info=(info := {}), expert_min_tokens=10**6, expert_fallback="magnitude", batch_size=4)
    w = w_down[3]
    assert torch.equal(rounded["model.layers.0.mlp.experts[3].down_proj"].codes, rtn(w, None, 32, True).codes)
    assert info["experts"]["fell_back"] == 16


@pytest.mark.parametrize("fallback", ["pooled", "magnitude"])
def test_gptq_hessians_over_the_budget_give_the_codes_of_one_run(fallback, monkeypatch, live_hessians):
    """GPTQ's pass takes every Hessian of a block from the unquantized block. With a Hessian budget of 0 (each
    expert's gate/up, its down, q, k, v, ... collected and solved in a run of its own) the codes, the model's
    weights and the expert records equal one run's, and no two Hessians are alive at once."""
    from llmprune import walker
    from llmprune.quant.sequential import gptq_sequential
    from llmprune.testing import tiny_model

    ids = torch.randint(0, 250, (4, 24), generator=torch.Generator().manual_seed(0))
    results = []
    for share in (walker.STATS_ON_DEVICE, 0.0):
        monkeypatch.setattr(walker, "STATS_ON_DEVICE", share)
        peak = live_hessians()
        model = tiny_model("qwen3_moe", seed=2)
        codes = gptq_sequential(model, ids, "w4g128", 32, True, dtype=None, info=(info := {}), batch_size=4,
                                expert_min_tokens=20, expert_fallback=fallback)
        results.append((codes, model.state_dict(), info, peak[0]))
    (c0, sd0, i0, p0), (c1, sd1, i1, p1) = results
    assert c0.keys() == c1.keys() and len(c0) > 20
    for n in c0:
        assert torch.equal(c0[n].codes, c1[n].codes) and torch.equal(c0[n].scales, c1[n].scales), n
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    runs = i1.pop("hessian_runs")  # recorded: runs beyond one a block (q, k, v, o, 8 experts' gate+up, 8 downs)
    assert "hessian_runs" not in i0 and runs == {"budget_gib": 0.0, "extra": 2 * (4 + 8 + 8 - 1)}
    assert i0 == i1 and {e["stats"] for e in i1["experts"]["per_expert"].values()} == {"routed", fallback}
    assert p1 == 4 * 64 ** 2 < p0  # tiny Qwen3-MoE: hidden 64, expert width 32


def test_codes_waiting_for_the_scale_tuning_are_held_two_a_byte(monkeypatch):
    """GPTQ's pass in memory with scale tuning holds every layer's codes until the tuning: two a byte
    (Quantized.compact; one a byte before, 70 GB at 70B beside the tuning's own int8 levels), unpacked one layer at
    a time where read, to the codes and tuned scales of a pass that kept them one a byte; `full` undoes `compact`."""
    import copy

    from llmprune.quant import Quantized, tune
    from llmprune.quant.sequential import gptq_sequential
    from llmprune.testing import tiny_model

    w = torch.randn(6, 32)
    q = rtn(w, w.abs() > 0.3, 16, False)
    c = q.compact()
    assert c.nibbles and c.codes.shape == (6, 16) and c.compact() is c and q.full() is q
    assert torch.equal(c.full().codes, q.codes) and torch.equal(c.dequantize(), q.dequantize())

    model = tiny_model("llama", seed=1)
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(3))
    ref = copy.deepcopy(model)
    got, real = {}, tune.tune_scales

    def watched(model, quantized, *a, **k):
        got.update(nibbles={q.nibbles for q in quantized.values()},
                   held=sum(q.codes.nbytes for q in quantized.values()),
                   weights=sum(q.codes.shape[0] * q.group_size * q.scales.shape[1] for q in quantized.values()))
        return real(model, quantized, *a, **k)

    opts = dict(group_size=16, batch_size=4, tune_steps=2, tune_lr=1e-2)
    with monkeypatch.context() as m:
        m.setattr(tune, "tune_scales", watched)
        out = gptq_sequential(model, ids, "w4g128", **opts)
    assert got["nibbles"] == {True} and got["held"] * 2 == got["weights"]  # (was one byte a weight)
    with monkeypatch.context() as m:
        m.setattr(Quantized, "compact", lambda self: self)  # the pass as it was: one a byte
        want = gptq_sequential(ref, ids, "w4g128", **opts)
    assert set(out) == set(want)
    for n, q in out.items():
        assert not q.nibbles and torch.equal(q.codes, want[n].codes) and torch.equal(q.scales, want[n].scales), n
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
