"""Every supported model family, on tiny random models built from transformers' own config classes:
the engine is exact on it, pruning with Wanda and SparseGPT (unstructured and 2:4) saves a folder
that plain transformers reloads to the same logits, measured sparsity is exact, and the packed
formats and SliceGPT either work or refuse in one line. Mixture-of-Experts: each expert's statistics
come from its routed tokens only (checked against the router run by hand) and under-calibrated
experts fall back as recorded."""
import copy

import pytest
import torch

from llmprune import api, arch, patterns, prune, walker
from llmprune.errors import LLMPruneError
from llmprune.moe import ExpertProj
from llmprune.patterns import n_pruned
from llmprune.solvers import get
from llmprune.testing import FAMILIES, MOE_FAMILIES, tiny_model, tiny_model_dir

DENSE = [f for f in FAMILIES if f not in MOE_FAMILIES]


def _ids(n=8, seqlen=24, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_inputs_are_the_models_own_hidden_states(family):
    """The walker's calibration inputs of every block equal the model's hidden states there, batch by
    batch (a Mixture-of-Experts layer's output depends on which tokens share its batch in the last
    bit, so the reference runs the same batches), the last block's outputs through the final
    norm equal the model's last hidden state, and llmprune's head (arch.logits) its logits."""
    m = tiny_model(family)
    ids = _ids(4, 17)
    bs = 2
    ref = [torch.cat(h) for h in zip(*(m(b, output_hidden_states=True).hidden_states for b in ids.split(bs)))]
    a = arch.arch_of(m)
    last = None
    for blk in walker.walk(m, ids, batch_size=bs, progress=False):
        assert torch.equal(torch.cat(blk.inputs), ref[blk.index]), (family, blk.index)
        last = blk
    n = len(arch.blocks(m))
    out = torch.cat(last.outputs)
    assert torch.equal(arch.get(m, a.norm)(out), ref[n]) if len(ref) == n + 1 else torch.equal(out, ref[n])
    # the head as perplexity runs it on the decoder's output gives the model's logits (Granite's logits_scaling,
    # Falcon-H1's lm_head_multiplier; Llama 4's decoder, which base_model does not name)
    with torch.no_grad():
        hidden = arch.base(m)(input_ids=ids, use_cache=False).last_hidden_state
        torch.testing.assert_close(arch.logits(m, hidden), m(ids).logits.float())


def _expected_zeros(t, pattern, sparsity) -> int:
    out_f, in_f = t.weight.shape
    return out_f * in_f // 2 if pattern == "2:4" else n_pruned(out_f * in_f, sparsity)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prune_save_reload_with_plain_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_model(family)
    calib, ids = _ids(4, 32), _ids(2, 16, seed=1)
    names = prune.target_linears(base)
    for solver in ("wanda", "sparsegpt"):
        for pat in ("unstructured", "2:4"):
            m = copy.deepcopy(base)
            prune.prune(m, get(solver), patterns.parse(pat), {n: 0.5 for n in names}, calib, batch_size=4,
                        progress=False, expert_min_tokens=4)
            folder = tmp_path / f"{solver}-{pat.replace(':', '')}"
            m.save_pretrained(folder)
            r = AutoModelForCausalLM.from_pretrained(folder).eval()
            assert torch.equal(r(ids).logits, m(ids).logits), (solver, pat)
            for n in names:  # exact per target (SparseGPT/Wanda count per layer / row / group of 4)
                t = arch.target(r, n)
                assert int((t.weight == 0).sum()) == _expected_zeros(t, pat, 0.5), (solver, pat, n)
            assert prune.measured_sparsity(r, names) == 0.5
            if pat == "2:4" and solver == "wanda":
                _check_packed(m, family, tmp_path / "packed", ids)


def _check_packed(m, family, out, ids):
    """sparse24 packs every 2:4 linear of a family (biases, GQA, fused projections, tied embeddings) and every
    expert's projections of a Mixture-of-Experts one (as moe.SplitExperts runs them) to the logits of
    transformers' own forward of the pruned model; routers and shared-expert gates stay dense."""
    from llmprune import moe
    from llmprune.packed import load_packed, save_packed

    sec = save_packed(m, out, "sparse24", dtype=None)
    assert not sec["left_dense"], sec["left_dense"]
    experts = {n: e for n, e in m.named_modules() if moe.is_fused_experts(e)}
    assert bool(experts) == (family in MOE_FAMILIES)
    for n, e in experts.items():
        assert {moe.stored_name(v) for v in moe.view_names(n, e)} <= set(sec["layers"])
    assert not [n for n in sec["layers"] if arch.is_router(n)]
    loaded = load_packed(out)
    assert all(isinstance(loaded.get_submodule(n), moe.SplitExperts) for n in experts)
    torch.testing.assert_close(loaded(ids).logits, m(ids).logits, rtol=1e-5, atol=1e-5)


LLAMA_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _plans(m, ids=None):
    planner = arch.Planner(m)
    return [planner(b) for b in walker.walk(m, _ids(2, 8) if ids is None else ids, batch_size=2, progress=False)]


def test_traced_compute_order():
    """Tracing finds the order the llmprune table used to spell out for LLaMA, OPT's q,k,v before its
    out_proj though OPT registers k_proj first, Phi-3's fused projections as their parts, and
    Qwen3.5's two kinds of blocks (linear attention, full attention)."""
    p = _plans(tiny_model("llama"))[0]
    assert p.groups == LLAMA_GROUPS
    assert p.sublayers == (("self_attn", "self_attn.o_proj"), ("mlp", "mlp.down_proj"))
    opt = _plans(tiny_model("opt"))[0]
    assert opt.groups == (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",),
                          ("fc1",), ("fc2",))
    phi = tiny_model("phi3", num_key_value_heads=1)
    p = _plans(phi)[0]
    assert p.groups[0] == ("self_attn.qkv_proj[q]", "self_attn.qkv_proj[k]", "self_attn.qkv_proj[v]")
    assert p.groups[2] == ("mlp.gate_up_proj[gate]", "mlp.gate_up_proj[up]")
    qkv = phi.model.layers[0].self_attn.qkv_proj.weight
    assert [tuple(p.targets[f"self_attn.qkv_proj[{x}]"].weight.shape) for x in "qkv"] == [(64, 64), (16, 64), (16, 64)]
    assert p.targets["self_attn.qkv_proj[k]"].weight.data_ptr() == qkv[64:80].data_ptr()  # a view: writes reach it
    q35 = _plans(tiny_model("qwen3_5_text"))
    assert q35[0].groups[0] == ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_b",
                                "linear_attn.in_proj_a")
    assert q35[1].groups == ((*LLAMA_GROUPS[0],), *LLAMA_GROUPS[1:])


def test_routers_and_shared_expert_gates_stay_dense_unless_asked():
    m = tiny_model("qwen2_moe")
    names = prune.target_linears(m)
    assert not any(n.endswith(("mlp.gate", "shared_expert_gate")) for n in names)
    assert "model.layers.0.mlp.shared_expert.down_proj" in names and "model.layers.0.mlp.experts[7].down_proj" in names
    gates = set(prune.target_linears(m, gates=True)) - set(names)
    assert gates == {f"model.layers.{i}.mlp.shared_expert_gate" for i in range(2)}
    assert not [n for n in prune.target_linears(tiny_model("hunyuan_v1_moe")) if ".mlp.gate." in n]  # its router's wg


# --- Mixture-of-Experts: statistics from routed tokens only ----------------------------------------

def _moe_input(m, ids, layer=0, mlp="mlp"):
    """The MoE layer's input (tokens, hidden), captured from a plain forward of the model."""
    got = []
    h = getattr(m.model.layers[layer], mlp).register_forward_pre_hook(lambda mod, args: got.append(args[0]))
    with torch.no_grad():
        m(ids)
    h.remove()
    return got[0].reshape(-1, got[0].shape[-1])


def _router(m, x, layer=0):
    """Top-k expert indices (tokens, k), the router run by hand: top-k of the logits (a softmax before
    or after top-k does not change which experts win)."""
    mlp = m.model.layers[layer].mlp
    r = getattr(mlp, "router", None) or mlp.gate
    logits = x @ r.weight.T + (r.bias if getattr(r, "bias", None) is not None else 0)
    return logits.topk(m.config.num_experts_per_tok, dim=-1).indices


def _expert_mats(m, e, layer=0):
    """(gate (I, H), up (I, H), down (H, I), biases) of expert e, read off the stored layout by hand."""
    ex = m.model.layers[layer].mlp.experts
    gu, dn = ex.gate_up_proj[e], ex.down_proj[e]
    if m.config.model_type == "gpt_oss":  # (H, 2I) interleaved gate/up, (I, H), with biases
        return gu[:, ::2].T, gu[:, 1::2].T, dn.T, (ex.gate_up_proj_bias[e][::2], ex.gate_up_proj_bias[e][1::2])
    i = gu.shape[0] // 2  # (2I, H) = [gate; up], (H, I)
    return gu[:i], gu[i:], dn, (0, 0)


def _act(m, g, u):
    if m.config.model_type == "gpt_oss":  # clamped SwiGLU of the gpt-oss reference
        ex = m.model.layers[0].mlp.experts  # its constants (transformers 5.17: fixed; later ones: from the config)
        c, alpha = ex.limit, ex.alpha
        g, u = g.clamp(max=c), u.clamp(-c, c)
        return (u + 1) * (g * torch.sigmoid(g * alpha))
    return torch.nn.functional.silu(g) * u


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3", "glm4_moe",
                                    "qwen3_next", "minimax_m2"])
def test_expert_statistics_come_from_its_routed_tokens(family):
    """(DeepSeek-V3 and GLM-4.5: block 1, their first is dense; their sigmoid routers' bias is 0 here and one
    group of experts, so the top-k of the logits picks their experts too.)"""
    m = tiny_model(family)
    layer = getattr(m.config, "first_k_dense_replace", 0)
    ids = _ids(4, 16)
    x = _moe_input(m, ids, layer)  # (tokens, H)
    idx = _router(m, x, layer)  # (tokens, k)
    block = next(b for b in walker.walk(m, ids, batch_size=4, progress=False) if b.index == layer)
    targets = {n: t for n, t in arch.block_targets(m, layer).items() if isinstance(t, ExpertProj)}
    with walker.collect(targets, {"norms", "hessian"}) as stats:
        block.run()
    counts = []
    experts = next(getattr(m.config, k) for k in ("num_local_experts", "num_experts", "n_routed_experts")
                   if getattr(m.config, k, None))
    with torch.no_grad():
        for e in range(experts):
            xe = x[(idx == e).any(-1)]  # (n_e, H): only the tokens routed to e
            g, u, _, (bg, bu) = _expert_mats(m, e, layer)
            he = _act(m, xe @ g.T + bg, xe @ u.T + bu)  # (n_e, I): what down_proj reads
            counts.append(xe.shape[0])
            for proj, inp in (("gate_proj", xe), ("up_proj", xe), ("down_proj", he)):
                s = stats[f"mlp.experts[{e}].{proj}"]
                assert s.n == xe.shape[0]
                torch.testing.assert_close(s.sq_norm.float(), inp.pow(2).sum(0), rtol=1e-4, atol=1e-6)
                if xe.shape[0]:
                    torch.testing.assert_close(s.hessian, 2 * inp.T @ inp / inp.shape[0], rtol=1e-4, atol=1e-6)
    assert sum(counts) == x.shape[0] * m.config.num_experts_per_tok and len(set(counts)) > 1


@pytest.mark.parametrize("k", [1, 2])
def test_llama4_experts_see_their_routed_tokens_scaled_by_their_scores(k, monkeypatch):
    """Llama 4's experts run densely (every expert on every token, a token not routed to it a zero row; moe.py
    UNDECORATED): each expert's statistics come from the tokens its router picked, each scaled by its sigmoid score
    as the expert reads it, checked against the router run by hand (block 1: block 0 is dense). An experts class
    llmprune does not know stops in one line naming the table."""
    m = tiny_model("llama4_text", num_experts_per_tok=k)
    ids = _ids(4, 16)
    x = _moe_input(m, ids, 1, "feed_forward")  # (tokens, H)
    ff = m.model.layers[1].feed_forward
    logits = x @ ff.router.weight.T  # (tokens, experts)
    top = logits.topk(k, -1).indices
    block = next(b for b in walker.walk(m, ids, batch_size=4, progress=False) if b.index == 1)
    targets = {n: t for n, t in arch.block_targets(m, 1).items() if isinstance(t, ExpertProj)}
    assert len(targets) == 4 * 3
    with walker.collect(targets, {"norms", "hessian"}) as stats:
        block.run()
    counts = []
    with torch.no_grad():
        for e in range(4):
            xe = (x * torch.sigmoid(logits[:, e:e + 1]))[(top == e).any(-1)]  # (n_e, H)
            g, u = (xe @ ff.experts.gate_up_proj[e]).chunk(2, -1)  # stored (H, 2I): [gate | up]
            counts.append(xe.shape[0])
            for proj, inp in (("gate_proj", xe), ("up_proj", xe), ("down_proj", torch.nn.functional.silu(g) * u)):
                s = stats[f"feed_forward.experts[{e}].{proj}"]
                assert s.n == xe.shape[0]
                torch.testing.assert_close(s.sq_norm.float(), inp.pow(2).sum(0), rtol=1e-4, atol=1e-6)
    assert sum(counts) == x.shape[0] * k and len(set(counts)) > 1
    from llmprune import moe

    monkeypatch.delitem(moe.UNDECORATED, "Llama4TextExperts")
    with pytest.raises(LLMPruneError, match="Llama4TextExperts has a layout .* llmprune/moe.py UNDECORATED") as e:
        prune.target_linears(tiny_model("llama4_text"))
    assert "\n" not in str(e.value)


def test_expert_weights_are_views_in_the_stored_layout():
    """gpt-oss stores (experts, in, out) with gate and up interleaved: the views are (out, in) and
    writing through them reaches the right stored entries."""
    m = tiny_model("gpt_oss")
    ex = m.model.layers[0].mlp.experts
    t = arch.target(m, "model.layers.0.mlp.experts[3].up_proj")
    assert tuple(t.weight.shape) == (32, 64) and torch.equal(t.weight, ex.gate_up_proj[3][:, 1::2].T)
    t.weight.data.zero_()
    assert bool((ex.gate_up_proj[3][:, 1::2] == 0).all()) and bool((ex.gate_up_proj[3][:, ::2] != 0).all())
    d = arch.target(m, "model.layers.1.mlp.experts[0].down_proj")
    assert tuple(d.weight.shape) == (64, 32) and torch.equal(d.bias, m.model.layers[1].mlp.experts.down_proj_bias[0])


@pytest.mark.parametrize("fallback", ["pooled", "magnitude"])
def test_under_calibrated_experts_fall_back_as_recorded(fallback):
    """gpt-oss with expert 0's router bias at -1e4 (no token reaches it) and a threshold that some
    other experts miss: each expert's record holds its routed token count (counted by hand) and
    the statistics used; pooled experts are solved from every token of the layer pushed through
    them, magnitude ones from |W| alone."""
    m = tiny_model("gpt_oss")
    with torch.no_grad():
        for layer in m.model.layers:
            layer.mlp.router.bias[0] = -1e4
    ids = _ids(4, 16)
    x = _moe_input(m, ids)
    counts = torch.bincount(_router(m, x).flatten(), minlength=8)
    assert counts[0] == 0
    min_tokens = int(counts[1:].float().median())  # about half the experts fall below
    ref = copy.deepcopy(m)
    names = [n for n in prune.target_linears(m) if ".0.mlp.experts[" in n]
    res = prune.prune(m, get("wanda"), patterns.parse("unstructured"), {n: 0.5 for n in names}, ids, batch_size=4,
                      progress=False, expert_min_tokens=min_tokens, expert_fallback=fallback)
    rec = res["experts"]
    assert set(rec) == {f"model.layers.0.mlp.experts[{e}]" for e in range(8)}
    for e in range(8):
        r = rec[f"model.layers.0.mlp.experts[{e}]"]
        assert r["tokens"] == int(counts[e])
        assert r["stats"] == (fallback if counts[e] < max(min_tokens, 1) else "routed")
    low = [e for e in range(8) if counts[e] < min_tokens]
    assert 0 in low and len(low) < 8
    with torch.no_grad():
        for e in low:
            g, u, _, (bg, bu) = _expert_mats(ref, e)
            for proj, inp in (("gate_proj", x), ("down_proj", _act(ref, x @ g.T + bg, x @ u.T + bu))):
                w = arch.target(ref, f"model.layers.0.mlp.experts[{e}].{proj}").weight
                score = w.abs() * (inp.pow(2).sum(0).sqrt() if fallback == "pooled" else 1)
                keep = patterns.keep_mask(score, patterns.parse("unstructured"), 0.5,
                                          scope="row" if fallback == "pooled" else "layer")
                got = arch.target(m, f"model.layers.0.mlp.experts[{e}].{proj}").weight != 0
                assert torch.equal(got, keep), (e, proj)


def test_moe_compress_end_to_end_records_experts(tmp_path, calib_txt):
    """`compress` on a Qwen3-MoE folder: the manifest says, per expert, how many routed tokens it saw
    and which statistics pruned it; the folder reloads with plain transformers; SliceGPT refuses the model in one
    line before any work (packed experts: test_moe_packed.py)."""
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir(tmp_path / "src", "qwen3_moe")
    common = dict(model=str(src), calib=str(calib_txt), nsamples=4, seqlen=16, calib_batch=4, progress=False,
                  eval=())
    m = api.compress(solver="sparsegpt", pattern="2:4", out=str(tmp_path / "o"), expert_min_tokens=12, **common)
    ex = m["experts"]
    assert ex["min_tokens"] == 12 and ex["fallback"] == "pooled" and len(ex["per_expert"]) == 16
    assert sum(e["tokens"] for e in ex["per_expert"].values()) == 2 * 4 * 16 * 2  # layers x tokens x top-2
    assert ex["fell_back"] == sum(e["stats"] == "pooled" for e in ex["per_expert"].values()) > 0
    assert m["sparsity"]["measured"] == 0.5
    AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    with pytest.raises(LLMPruneError, match="Mixture-of-Experts"):
        api.compress(solver="slicegpt", slicegpt={"slicing": 0.25}, out=str(tmp_path / "s"), **common)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_folders_are_evaluated_to_the_figures_of_a_whole_load(family, tmp_path, calib_txt):
    """Checkpoints that store their experts one by one (transformers fuses them at load): compress's evaluation
    of its saved output and `llmprune eval` of a folder (perplexity; zero-shot, walked block by block with the
    experts fused as each block is read: stored.py) give the figures of the model transformers loads. (Both
    stopped with "lacks model.layers.0.mlp.gate.weight" once, and zero-shot loaded them whole before
    2026-12-06.)"""
    from transformers import AutoModelForCausalLM

    from llmprune.eval.perplexity import perplexity
    from llmprune.testing import byte_tokenizer

    src = tiny_model_dir(tmp_path / "src", family)
    m = api.compress(model=str(src), solver="wanda", out=str(tmp_path / "o"), calib=str(calib_txt), nsamples=4,
                     seqlen=16, calib_batch=4, progress=False, eval=("wikitext2",), eval_seqlen=64, eval_windows=2)

    def ppl(folder):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            return perplexity(model, byte_tokenizer(), "wikitext2", 64, 2, progress=False)["ppl"]

    e = m["eval"]["wikitext2"]
    assert e["ppl"] == pytest.approx(ppl(tmp_path / "o"), rel=1e-6)
    assert e["dense_ppl"] == pytest.approx(ppl(src), rel=1e-6) and e["ppl"] != e["dense_ppl"]
    r = api.evaluate(str(src), seqlen=64, windows=2, progress=False, tasks=("copa",), limit=2)
    assert r["eval"]["wikitext2"]["ppl"] == pytest.approx(e["dense_ppl"], rel=1e-6) and r["zeroshot"]["copa"]["n"] == 2
    assert r["zeroshot"]["blockwise"]


def test_sweep_of_a_folder_with_converted_names_reads_it_block_by_block(tmp_path, calib_txt, monkeypatch):
    """`sweep` reads a Mixtral folder (experts stored one by one, fused at load: stored.py) from disk as it
    reads any other, to the whole load's figures; a checkpoint whose conversion does not work block by
    block (forced here) makes auto load it whole and say why, and `--onload blocks` is refused before any
    work."""
    import json

    from llmprune import stored, sweep

    src = tiny_model_dir(tmp_path / "src", "mixtral")
    common = dict(solvers_=("wanda",), sparsities=(0.5,), calib=str(calib_txt), nsamples=4, seqlen=16,
                  eval_seqlen=64, eval_windows=2, calib_batch=4, progress=False)
    rows = {m: sweep.sweep(str(src), out=str(tmp_path / m), onload=m, **common)["rows"] for m in ("blocks", "whole")}
    assert json.loads((tmp_path / "blocks" / "sweep_meta.json").read_text())["onload"] == "blocks"
    assert [r["ppl_wikitext2"] for r in rows["blocks"]] == pytest.approx([r["ppl_wikitext2"] for r in rows["whole"]],
                                                                         rel=1e-6)
    assert rows["blocks"][1]["ppl_wikitext2"] != rows["blocks"][0]["ppl_wikitext2"]
    monkeypatch.setattr(stored, "to_memory", lambda model, tensors: {})
    with pytest.raises(LLMPruneError, match="^--onload blocks: the checkpoint stores .*: use --onload whole"):
        sweep.sweep(str(src), out=str(tmp_path / "b"), onload="blocks", **common)
    assert not (tmp_path / "b").exists()
    auto = sweep.sweep(str(src), out=str(tmp_path / "a"), **common)["rows"]
    assert json.loads((tmp_path / "a" / "sweep_meta.json").read_text())["onload"].startswith("whole: the checkpoint")
    assert [r["ppl_wikitext2"] for r in auto] == [r["ppl_wikitext2"] for r in rows["whole"]]


@pytest.mark.parametrize("family", ["gemma3_text", "qwen3_5_text", "opt", "phi3", "gpt_oss", "mixtral", "qwen2_moe"])
def test_recover_reading_blocks_to_their_devices_equals_a_whole_load(family, tmp_path, calib_txt):
    """`recover --onload blocks` (each tensor from disk onto its device, the folder written block by block) writes
    what the whole load writes, bit for bit, with the same losses, across the families' special cases: a tied
    head and soft-capping, linear attention, biases and learned positions, a fused QKV, fused experts with
    biases, experts stored one by one (Mixtral, Qwen2-MoE: fused as each block is read)."""
    from llmprune.lazy import WeightFiles

    src = tiny_model_dir(tmp_path / "src", family)
    api.compress(model=str(src), solver="wanda", out=str(tmp_path / "p"), calib=str(calib_txt), nsamples=4,
                 seqlen=16, calib_batch=4, progress=False, eval=())
    run = dict(data=str(calib_txt), seqlen=16, steps=2, batch_size=2, rank=2, device="cpu", progress=False,
               resident_gib=0.0003 if family == "opt" else None)  # OPT: every block streamed too
    ms = {mode: api.recover(str(tmp_path / "p"), str(tmp_path / mode), onload=mode, **run) for mode in ("whole", "blocks")}
    assert ms["whole"]["recover"]["losses"] == ms["blocks"]["recover"]["losses"]
    assert ms["blocks"]["recover"]["onload"] == "blocks" and ms["blocks"]["recover"]["zeros_unchanged"]
    assert ms["blocks"]["recover"]["placement"]["streamed_blocks"] == (2 if family == "opt" else 0)
    wa, wb = WeightFiles(tmp_path / "whole"), WeightFiles(tmp_path / "blocks")
    names = sorted(wa.keys())
    assert names == sorted(wb.keys()) and all(torch.equal(wa.get(n), wb.get(n)) for n in names)


@pytest.mark.parametrize("family", ["gemma3_text", "qwen3_5_text", "opt", "phi3", "olmo2"])
def test_scale_tuning_from_disk_equals_a_whole_load(family, tmp_path, calib_txt):
    """`pack --quant gptq --tune-steps` reading the model from disk to where the tuning trains (onload.gptq_tuned)
    writes what the whole load writes, bit for bit, with the same KL figures, across the families' special
    cases: a tied, soft-capped head, linear attention, biases, learned positions and dropout (OPT's 0.1, off
    while tuning: tune.no_dropout), a fused QKV, post-norms."""
    from llmprune.lazy import WeightFiles

    src = tiny_model_dir(tmp_path / "src", family)
    api.compress(model=str(src), solver="wanda", out=str(tmp_path / "p"), calib=str(calib_txt), nsamples=4,
                 seqlen=16, calib_batch=4, progress=False, eval=())
    run = dict(fmt="w4g128", quant="gptq", group_size=16, calib=str(calib_txt), nsamples=4, seqlen=16, device="cpu",
               progress=False, gptq={"tune_steps": 2, "tune_lr": 5e-3})
    ms = {mode: api.pack(str(tmp_path / "p"), str(tmp_path / mode), onload=mode, **run) for mode in ("whole", "blocks")}
    ta, tb = (ms[m]["format"]["quant_options"]["tune"] for m in ("whole", "blocks"))
    assert ms["blocks"]["onload"] == "blocks" and ms["whole"]["onload"] == "whole"
    assert (ta["kl_before"], ta["kl_after"], ta["kept"]) == (tb["kl_before"], tb["kl_after"], tb["kept"])
    assert ms["blocks"]["format"]["layers"] and ms["blocks"]["format"]["layers"] == ms["whole"]["format"]["layers"]
    wa, wb = WeightFiles(tmp_path / "whole"), WeightFiles(tmp_path / "blocks")
    names = sorted(wa.keys())
    assert names == sorted(wb.keys()) and all(torch.equal(wa.get(n), wb.get(n)) for n in names)


# --- what SliceGPT and unknown families are told ----------------------------------------------------

@pytest.mark.parametrize("family,why", [("gemma2", "post_feedforward_layernorm"), ("gemma3_text", "1 \\+ weight"),
                                        ("glm4", "post_mlp_layernorm"), ("olmo2", "post-norm"),
                                        ("opt", "residual wiring"), ("phi3", "residual wiring"),
                                        ("qwen3_5_text", "residual wiring"), ("mixtral", "Mixture-of-Experts"),
                                        ("deepseek_v3", "Mixture-of-Experts"), ("glm4_moe", "Mixture-of-Experts"),
                                        ("qwen3_next", "Mixture-of-Experts"), ("minimax_m2", "Mixture-of-Experts"),
                                        ("llama4_text", "Mixture-of-Experts"), ("nemotron_h", "Mixture-of-Experts"),
                                        ("granitemoehybrid", "Mixture-of-Experts"), ("falcon_h1", "residual wiring"),
                                        ("lfm2", "residual wiring"), ("olmo3", "post-norm"), ("exaone4", "post-norm")])
def test_slicegpt_refuses_families_it_cannot_rotate(family, why):
    from llmprune.transforms.fuse import layout_of

    with pytest.raises(LLMPruneError, match=why) as e:
        layout_of(tiny_model(family))
    assert "\n" not in str(e.value)


def test_slicegpt_checks_the_norm_computes_rmsnorm():
    from llmprune.transforms.fuse import layout_of

    m = tiny_model("llama")
    m.model.layers[0].input_layernorm.forward = lambda x: x - x.mean(-1, keepdim=True)  # a LayerNorm-like norm
    with pytest.raises(LLMPruneError, match="x / rms\\(x\\) \\* weight"):
        layout_of(m)


def test_an_unsupported_family_names_what_to_add():
    """GPT-2 blocks compute with transformers' Conv1D, not nn.Linear."""
    from transformers import AutoModelForCausalLM, GPT2Config

    m = AutoModelForCausalLM.from_config(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=258))
    with pytest.raises(LLMPruneError, match="hold no nn.Linear.*llmprune/arch.py OVERRIDES") as e:
        prune.target_linears(m)
    assert "\n" not in str(e.value)


def test_magnitude_global_magnitude_and_owl_see_parts_and_experts():
    """Magnitude needs no calibration and reaches experts through their views; Global MP ranks the
    experts with everything else; OWL gives every part and expert its block's sparsity."""
    from llmprune import owl
    from llmprune.solvers.magnitude import global_sparsities

    m = tiny_model("mixtral")
    names = prune.target_linears(m)
    prune.prune(m, get("magnitude"), patterns.parse("2:4"), {n: 0.5 for n in names}, None, progress=False)
    assert prune.measured_sparsity(m, names) == 0.5
    m = tiny_model("mixtral")
    s = global_sparsities({n: arch.target(m, n).weight.data for n in names}, 0.5)
    prune.prune(m, get("magnitude"), patterns.parse("unstructured"), s, None, progress=False)
    assert prune.measured_sparsity(m, names) == pytest.approx(0.5, abs=1e-6)
    phi = tiny_model("phi3")
    pnames = prune.target_linears(phi, ignore=r"\[k\]")
    assert "model.layers.0.self_attn.qkv_proj[q]" in pnames and "model.layers.0.self_attn.qkv_proj[k]" not in pnames
    per = owl.layer_sparsities(phi, pnames, _ids(4, 16), 0.5, batch_size=4, progress=False, lam=0.05)
    assert set(per) == set(pnames) and len(set(per.values())) == 2


def test_an_override_can_fix_the_order(monkeypatch):
    """An OVERRIDES entry with `groups` replaces the trace for every block."""
    order = (*LLAMA_GROUPS[2:], *LLAMA_GROUPS[:2])
    monkeypatch.setitem(arch.OVERRIDES, "llama", {"groups": order, "sublayers": ()})
    p = _plans(tiny_model("llama"))[1]
    assert p.groups == order and p.sublayers == ()
    monkeypatch.setitem(arch.OVERRIDES, "llama", {"groups": order[1:]})
    with pytest.raises(LLMPruneError, match="leave out mlp.gate_proj of block 0"):
        _plans(tiny_model("llama"))


def test_cli_expert_options_reach_the_manifest(tmp_path, calib_txt):
    import json

    from llmprune.cli import main
    from llmprune.testing import FAST_CLI

    src = tiny_model_dir(tmp_path / "src", "olmoe")
    out = tmp_path / "o"
    assert main(["compress", "--model", str(src), "--calib", str(calib_txt), "--out", str(out), *FAST_CLI,
                 "--expert-min-tokens", "100000", "--expert-fallback", "magnitude"]) == 0
    ex = json.loads((out / "llmprune.json").read_text())["experts"]
    assert ex["fallback"] == "magnitude" and ex["fell_back"] == 16
    assert {e["stats"] for e in ex["per_expert"].values()} == {"magnitude"}
    assert main(["compress", "--model", str(src), "--calib", str(calib_txt), "--out", str(tmp_path / "p"), *FAST_CLI,
                 "--pattern", "2:4", "--format", "sparse24"]) == 0
    layers = json.loads((tmp_path / "p" / "llmprune.json").read_text())["format"]["layers"]
    assert "model.layers.1.mlp.experts.7.down_proj" in layers
