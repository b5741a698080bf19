"""The engine is exact: a no-op walk reproduces the model, and pruning through it matches a
straightforward re-implementation of the Wanda reference loop."""
import pytest
import torch

from llmprune import arch, patterns, prune, walker
from llmprune.solvers import Solved, Solver, get
from llmprune.testing import tiny_model


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_walk_reproduces_model_outputs(name):
    m = tiny_model(name)
    ids = torch.randint(0, 256, (5, 33))
    ref = m(ids, output_hidden_states=True).hidden_states
    outs = None
    for blk in walker.walk(m, ids, batch_size=2, progress=False):
        # every block's calibration inputs equal the model's own hidden states there
        assert torch.equal(torch.cat(blk.inputs), ref[blk.index])
        last = blk
    outs = torch.cat(last.outputs)
    logits = m.lm_head(m.model.norm(outs))
    if getattr(m.config, "final_logit_softcapping", None):
        c = m.config.final_logit_softcapping
        logits = torch.tanh(logits / c) * c
    assert torch.equal(logits, m(ids).logits)


def test_noop_solver_leaves_model_bit_identical():
    m = tiny_model("llama")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ids = torch.randint(0, 256, (4, 20))
    ref = m(ids).logits
    noop = Solver("noop", lambda w, s, p, sp, **_: Solved(w.clone(), torch.ones_like(w, dtype=torch.bool), {}),
                  needs=frozenset({"norms"}), sequential=True)
    names = prune.target_linears(m)
    prune.prune(m, noop, patterns.parse("unstructured"), {n: 0.5 for n in names}, ids, progress=False)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert torch.equal(m(ids).logits, ref)


def test_hooks_removed_on_error():
    m = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 10))

    def boom(*a, **k):
        raise RuntimeError("solver failed")

    bad = Solver("bad", boom, needs=frozenset({"norms"}))
    with pytest.raises(RuntimeError):
        prune.prune(m, bad, patterns.parse("unstructured"), {n: 0.5 for n in prune.target_linears(m)}, ids,
                    progress=False)
    for mod in m.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
    assert all(not isinstance(b, walker._Recorder) for b in arch.blocks(m))


def reference_wanda(model, ids, sparsity, pattern):
    """The Wanda reference loop (prune_wanda), re-stated: one sample at a time through each dense
    block, running-mean column norms, all linears pruned, then outputs recomputed."""
    layers = model.model.layers
    hs = model(ids, output_hidden_states=True).hidden_states[0]  # embeddings
    pos = torch.arange(ids.shape[1])[None]
    pe = model.model.rotary_emb(hs, pos)
    for layer in layers:
        lins = {n: arch.get(layer, n) for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
        scaler = {n: torch.zeros(m.in_features) for n, m in lins.items()}
        count = {n: 0 for n in lins}

        def hook(name, scaler=scaler, count=count):
            def f(mod, inp, out):
                x = inp[0][0].float()  # (seq, in)
                t = 1
                scaler[name] *= count[name] / (count[name] + t)
                count[name] += t
                scaler[name] += torch.norm(x.t(), p=2, dim=1) ** 2 / count[name]
            return f

        hs_list = [h[None] for h in hs]
        handles = [m.register_forward_hook(hook(n)) for n, m in lins.items()]
        for h in hs_list:
            layer(h, position_embeddings=pe, attention_mask=None, position_ids=pos)
        for h in handles:
            h.remove()
        for n, m in lins.items():
            metric = m.weight.data.abs() * torch.sqrt(scaler[n].reshape(1, -1))
            mask = torch.zeros_like(metric, dtype=torch.bool)  # True = prune, as in the reference
            if pattern == "2:4":
                for ii in range(0, metric.shape[1], 4):
                    tmp = metric[:, ii:ii + 4]
                    mask.scatter_(1, ii + torch.sort(tmp, dim=1, stable=True)[1][:, :2], True)
            else:
                idx = torch.sort(metric, dim=-1, stable=True)[1][:, : int(metric.shape[1] * sparsity)]
                mask.scatter_(1, idx, True)
            m.weight.data[mask] = 0
        hs = torch.cat([layer(h, position_embeddings=pe, attention_mask=None, position_ids=pos) for h in hs_list])
    return model


@pytest.mark.parametrize("pat", ["unstructured", "2:4"])
def test_wanda_equals_reference_loop(pat):
    ids = torch.randint(0, 256, (4, 24))
    ours, ref = tiny_model("llama", seed=5), tiny_model("llama", seed=5)
    p = patterns.parse(pat)
    names = prune.target_linears(ours)
    prune.prune(ours, get("wanda"), p, {n: 0.5 for n in names}, ids, batch_size=3, progress=False)
    reference_wanda(ref, ids, 0.5, pat)
    for n in names:
        assert torch.equal(arch.get(ours, n).weight == 0, arch.get(ref, n).weight == 0), n


@pytest.mark.parametrize("name", ["llama", "gemma3"])
@pytest.mark.parametrize("solver", ["sparsegpt", "noop-seq"])
def test_sublayer_replay_is_bit_identical_to_rerunning(name, solver, monkeypatch):
    """Sequential solvers replay a finished attention / MLP from its last linear's recorded inputs;
    weights and logits must equal those of rerunning the sublayers (replay budget 0)."""
    ids = torch.randint(0, 256, (6, 29))
    s = get("sparsegpt") if solver == "sparsegpt" else Solver(
        "noop-seq", lambda w, st, p, sp, **_: Solved(w * 0.5, torch.ones_like(w, dtype=torch.bool), {}),
        needs=frozenset({"norms"}), sequential=True)  # halves each weight: later groups see changed inputs
    results = []
    for budget in (0, prune.REPLAY_BUDGET):
        monkeypatch.setattr(prune, "REPLAY_BUDGET", budget)
        m = tiny_model(name)
        names = prune.target_linears(m)
        res = prune.prune(m, s, patterns.parse("2:4"), {n: 0.5 for n in names}, ids, batch_size=4, progress=False)
        results.append((res["replayed_sublayers"], m.state_dict(), m(ids).logits))
    (r0, sd0, l0), (r1, sd1, l1) = results
    n_blocks = len(arch.blocks(tiny_model(name)))
    assert r0 == 0 and r1 == 2 * n_blocks  # attention and MLP of every block
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert torch.equal(l0, l1)


def test_replay_refuses_a_sublayer_that_is_not_its_last_linear():
    """A tape is used only when every batch's sublayer output was exactly the linear's output."""
    m = tiny_model("llama")
    ids = torch.randint(0, 256, (4, 12))
    block = next(walker.walk(m, ids, batch_size=2, progress=False))
    attn, o = block.module.self_attn, block.module.self_attn.o_proj
    with block.record(attn, o) as tape:
        block.run(stop_after=attn)
    assert tape.exact and len(tape.inputs) == 2
    assert block.replay(attn, o, tape)
    h = attn.register_forward_hook(lambda mod, inp, out: (out[0] + 1, *out[1:]))  # something after o_proj
    try:
        with block.record(block.module.mlp, o) as bad:  # the MLP does not return o_proj's output
            block.run(stop_after=block.module.mlp)
    finally:
        h.remove()
    assert not bad.exact and not block.replay(block.module.mlp, o, bad)
    assert "forward" not in vars(attn)  # the replay patch is undone after each run
    own = attn.forward  # a forward set on the instance (as accelerate's hooks do) is put back, not dropped
    attn.forward = lambda *a, **k: own(*a, **k)
    mine = attn.forward
    block.run(stop_after=block.module.mlp)
    assert vars(attn)["forward"] is mine


def test_activations_wait_in_cpu_memory_when_they_would_crowd_the_gpu(monkeypatch):
    """Hidden states stay on the GPU while a block's inputs and outputs take at most ACTIVATIONS_ON_DEVICE
    of it, counted over every batch, whether given as one (n, T) tensor or as batches of their own widths
    (zero-shot requests); on the CPU they stay where they are. (No GPU here: its size is faked.)"""
    from types import SimpleNamespace

    model = tiny_model("llama")  # hidden 64 x fp32: a token's hidden state is 256 bytes, 512 in and out
    per_token = 2 * model.config.hidden_size * 4
    gpu = 1000 * per_token / walker.ACTIVATIONS_ON_DEVICE  # room for exactly 1000 tokens
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=gpu))
    cuda = torch.device("cuda:0")
    assert walker.activation_home(model, torch.zeros(10, 100, dtype=torch.long), cuda) == cuda
    assert walker.activation_home(model, torch.zeros(10, 101, dtype=torch.long), cuda) == torch.device("cpu")
    ragged = [torch.zeros(4, 150, dtype=torch.long), torch.zeros(8, 50, dtype=torch.long)]  # 600 + 400 tokens
    assert walker.activation_home(model, ragged, cuda) == cuda
    assert walker.activation_home(model, [*ragged, torch.zeros(1, 1, dtype=torch.long)], cuda) == torch.device("cpu")
    assert walker.activation_home(model, torch.zeros(100, 100, dtype=torch.long), "cpu") == torch.device("cpu")


def test_chunks_keep_shared_statistics_together_within_the_budget():
    """Names cut in order into runs of at most `budget` bytes of Hessians (4 in^2 each); names sharing a
    stats_key (an expert's gate and up) share one Hessian and one run; a Hessian over the budget runs alone;
    statistics without a Hessian are one run."""
    class Lin:
        def __init__(self, n, key=None):
            self.in_features, self.stats_key = n, key

    mods = {"a": Lin(4), "g0": Lin(4, "e0"), "u0": Lin(4, "e0"), "b": Lin(8), "g1": Lin(4, "e1"), "u1": Lin(4, "e1")}
    assert walker.chunks(mods, {"hessian"}, 2 * 64) == [["a", "g0", "u0"], ["b"], ["g1", "u1"]]
    assert walker.chunks(mods, {"hessian"}, 0) == [["a"], ["g0", "u0"], ["b"], ["g1", "u1"]]
    assert walker.chunks(mods, {"hessian"}, 10**9) == [list(mods)]
    assert walker.chunks(mods, {"norms"}, 0) == [list(mods)]


def test_hessian_memory_sets_the_budget_within_it_only(monkeypatch):
    """--hessian-gib: GiB, whatever the devices (inf: no limit); outside the context (and nested ones after they
    close) the default, STATS_ON_DEVICE of each device's memory once."""
    monkeypatch.setattr(walker, "device_memory", lambda d: 8 * 2**30)
    assert walker.stats_budget(("cpu", "cpu")) == 2 * 2**30  # one RAM, a quarter of it
    with walker.hessian_memory(0.5):
        assert walker.stats_budget(("cpu",)) == 2**29
        with walker.hessian_memory(None):
            assert walker.stats_budget(("cpu",)) == 2 * 2**30
        with walker.hessian_memory(float("inf")):
            assert walker.stats_budget(("cpu",)) >= 2**62
        assert walker.stats_budget(("cpu",)) == 2**29
    assert walker.stats_budget(("cpu",)) == 2 * 2**30


@pytest.mark.parametrize("name", ["llama", "qwen3_moe"])
@pytest.mark.parametrize("fallback", ["pooled", "magnitude"])
def test_hessians_over_the_budget_are_collected_a_run_at_a_time_to_the_same_weights(name, fallback, monkeypatch,
                                                                                     live_hessians):
    """SparseGPT with a Hessian budget of 0 (every Hessian its own run: one expert's gate and up, q, k, v apart)
    prunes to the weights, infos and expert records of one run per group, and never holds two Hessians at once
    (a run's statistics are freed before the next run's are made; experts falling back: their routed ones too)."""
    ids = torch.randint(0, 250, (4, 24), generator=torch.Generator().manual_seed(0))
    results = []
    for share in (walker.STATS_ON_DEVICE, 0.0):
        monkeypatch.setattr(walker, "STATS_ON_DEVICE", share)
        peak = live_hessians()
        m = tiny_model(name, seed=3)
        names = prune.target_linears(m)
        res = prune.prune(m, get("sparsegpt"), patterns.parse("unstructured"), {n: 0.5 for n in names}, ids,
                          batch_size=4, progress=False, expert_min_tokens=12, expert_fallback=fallback)
        results.append((m.state_dict(), res, peak[0], max(4 * arch.target(m, n).in_features ** 2 for n in names)))
    (sd0, r0, p0, _), (sd1, r1, p1, one) = results
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert r0["layers"] == r1["layers"] and r0.get("experts") == r1.get("experts")
    # runs beyond one a group: q, k, v apart (2); gate, up apart (1) or 8 experts' gate+up (7), 8 downs (7)
    assert "hessian_runs" not in r0 and r1["hessian_runs"]["extra"] == 2 * (2 + 1 if name == "llama" else 2 + 7 + 7)
    if name == "qwen3_moe":
        stats = {e["stats"] for e in r1["experts"].values()}
        assert stats == {"routed", fallback}, stats  # some experts fell back, some did not
        assert p0 > one  # one run per group held every expert's Hessian at once
    assert p1 == one


def test_a_walk_lets_the_first_blocks_inputs_go():
    """The caught inputs of block 0 are freed once its outputs replace them (the walk's frame held them to the end:
    a third copy of the calibration activations, 8.6 GB at 70B with the paper's 128 x 2048)."""
    import gc
    import weakref

    from llmprune import walker
    from llmprune.testing import tiny_model

    model = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    refs = []
    for blk in walker.walk(model, ids, batch_size=2, progress=False):
        if blk.index == 0:
            refs = [weakref.ref(t) for t in blk.inputs]
        elif blk.index == 2:
            gc.collect()
            assert refs and all(r() is None for r in refs)
