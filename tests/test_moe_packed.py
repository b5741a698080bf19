"""Packed Mixture-of-Experts outputs: each expert's projections stored as a packed linear
(`<experts>.<e>.<proj>`) and run by moe.SplitExperts. The oracle is transformers' own fused model with
every packed layer's dequantized weight written into it (an expert's into its rows of the 3-D parameter)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llmprune import api, arch, moe
from llmprune.errors import LLMPruneError
from llmprune.packed import load_packed, save_packed
from llmprune.testing import byte_tokenizer, tiny_model, tiny_model_dir
from llmprune.testing import folder_tensors as _tensors

CAL = dict(nsamples=4, seqlen=16, calib_batch=4, progress=False)


def _ids(n=2, t=24, seed=3):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))



def _oracle(dense_folder, packed_model, sec):
    """The dense folder as transformers loads it (experts fused), each packed layer's weight replaced by what the
    packed folder decodes to, and the other tensors by the packed folder's."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(dense_folder, dtype=torch.float32).eval()
    views = {moe.stored_name(v): v for n, e in ref.named_modules() if moe.is_fused_experts(e)
             for v in moe.view_names(n, e)}
    with torch.no_grad():
        for name in sec["layers"]:
            arch.target(ref, views.get(name, name)).weight.copy_(packed_model.get_submodule(name).dequantize())
        dense = {k: t for k, t in packed_model.state_dict().items() if k in ref.state_dict()}
        ref.load_state_dict(dense, strict=False)
    return ref


def _nemotron_h():
    """NemotronH's experts: no gate (up, relu^2, down), a block of experts alone (testing.FAMILIES' nemotron_h has
    Mamba2 and attention blocks too)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("nemotron_h", vocab_size=300, hidden_size=64, hybrid_override_pattern="E*",
                               moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, mamba_num_heads=4, mamba_head_dim=16,
                               ssm_state_size=16, n_groups=1)
    m = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 3:
                p.normal_(0, 0.08)
    return m


def test_split_experts_compute_what_the_fused_module_computes():
    """SplitExperts with the fused module's weights copied into its linears: the fused forward's outputs,
    called with positional or keyword routing, for the concatenated (Qwen3-MoE), the interleaved, transposed,
    biased (gpt-oss) and the gateless (NemotronH) layouts; an index out of range (a masked token) adds nothing."""
    for m in (tiny_model("qwen3_moe"), tiny_model("gpt_oss"), _nemotron_h()):
        fused = next(e for e in m.modules() if moe.is_fused_experts(e))
        split = moe.SplitExperts(fused)
        split.to_empty(device="cpu")
        with torch.no_grad():
            for e, ex in enumerate(split):
                for proj in moe.projections(fused):
                    v = moe.ExpertProj(fused, e, proj)
                    getattr(ex, proj).weight.copy_(v.weight)
                    if v.bias is not None:
                        getattr(ex, proj).bias.copy_(v.bias)
        g = torch.Generator().manual_seed(0)
        n, k, E = 13, 2, moe.num_experts(fused)
        hidden = torch.randn(n, fused.down_proj.shape[1 if not fused.is_transposed else 2], generator=g)
        index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(n)])
        weights = torch.rand(n, k, generator=g)
        want = fused(hidden, index, weights)
        torch.testing.assert_close(split(hidden, index, weights), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(split(hidden, router_indices=index, routing_weights=weights), want,
                                   rtol=1e-5, atol=1e-6)
        masked = index.clone()
        masked[0] = E  # token 0 routed nowhere
        got = split(hidden, masked, weights)
        assert torch.equal(got[0], torch.zeros_like(got[0])) and torch.allclose(got[1:], want[1:], atol=1e-6)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_gptq_pack_of_experts_block_by_block_equals_whole_and_decodes_to_its_weights(family, tmp_path, calib_txt):
    """`llmprune pack --format w4s24 --quant gptq` of a pruned MoE output: every expert's projections packed
    (none left dense, routers dense), GPTQ's codes (not RTN's) for them, the same files read block by block or
    whole, logits those of transformers' fused model holding the decoded weights, and `llmprune eval` of the
    folder (block by block) the perplexity of the whole packed model."""
    from llmprune.eval.perplexity import perplexity

    src = tiny_model_dir(tmp_path / "src", family)
    api.compress(model=str(src), solver="wanda", pattern="2:4", out=str(tmp_path / "d"), calib=str(calib_txt),
                 eval=(), **CAL)
    common = dict(fmt="w4s24", calib=str(calib_txt), nsamples=4, seqlen=16, progress=False, save_dtype="float32",
                  group_size=16)
    secs = {}
    for how in ("blocks", "whole"):
        secs[how] = api.pack(str(tmp_path / "d"), str(tmp_path / how), quant="gptq", onload=how, **common)["format"]
    api.pack(str(tmp_path / "d"), str(tmp_path / "rtn"), quant="rtn", **common)
    a, b, rtn = (_tensors(tmp_path / x) for x in ("blocks", "whole", "rtn"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sec = secs["blocks"]
    assert sec["layers"] == secs["whole"]["layers"] and not sec["left_dense"]
    model = load_packed(tmp_path / "blocks")
    experts = {n: e for n, e in tiny_model(family).named_modules() if moe.is_fused_experts(e)}
    views = [moe.stored_name(v) for n, e in experts.items() for v in moe.view_names(n, e)]
    assert views and set(views) <= set(sec["layers"]) and not [n for n in sec["layers"] if arch.is_router(n)]
    assert all(isinstance(model.get_submodule(n), moe.SplitExperts) for n in experts)
    assert any(not torch.equal(a[k], rtn[k]) for k in a if k.startswith(views[0] + "."))  # GPTQ's codes
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, _oracle(tmp_path / "d", model, sec)(ids).logits,
                                   rtol=1e-4, atol=1e-4)
        whole = perplexity(model, byte_tokenizer(), "wikitext2", 64, 2, progress=False)["ppl"]
    got = api.evaluate(str(tmp_path / "blocks"), seqlen=64, windows=2, progress=False)["eval"]["wikitext2"]
    assert got["blockwise"] and got["ppl"] == pytest.approx(whole, rel=1e-5)


def test_compress_to_sparse24_block_by_block_equals_whole(tmp_path, calib_txt):
    """`compress --pattern 2:4 --format sparse24` of a Qwen3-MoE folder: the same files and figures read block by
    block or whole, expert layers packed at 9/16 of their fp16 bytes."""
    src = tiny_model_dir(tmp_path / "src", "qwen3_moe")
    ms = {how: api.compress(model=str(src), solver="sparsegpt", pattern="2:4", format="sparse24", onload=how,
                            out=str(tmp_path / how), calib=str(calib_txt), eval=("wikitext2",), eval_seqlen=64,
                            eval_windows=2, **CAL) for how in ("blocks", "whole")}
    a, b = _tensors(tmp_path / "blocks"), _tensors(tmp_path / "whole")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ms["blocks"]["eval"]["wikitext2"]["ppl"] == pytest.approx(ms["whole"]["eval"]["wikitext2"]["ppl"], rel=1e-6)
    layer = ms["blocks"]["format"]["layers"]["model.layers.1.mlp.experts.7.down_proj"]
    assert layer["bytes"] / layer["dense_bytes"] == pytest.approx(9 / 16, rel=0.02)
    assert ms["blocks"]["sparsity"]["measured"] == 0.5


def test_experts_the_split_module_cannot_run_are_refused(tmp_path):
    m = tiny_model("qwen3_moe")
    for e in m.modules():
        if moe.is_fused_experts(e):
            e.has_post_expert_norm = True
    with pytest.raises(LLMPruneError, match="has_post_expert_norm.*--format dense") as e:
        save_packed(m, tmp_path / "p", "w4g128")
    assert "\n" not in str(e.value) and not (tmp_path / "p").exists()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_ct_export_of_packed_experts_writes_their_own_codes(family, tmp_path, capsys, calib_txt):
    """`export --to compressed-tensors` of a w4s24 GPTQ folder with packed experts: read block by block, each
    expert's codes decoded into its rows of the fused tensors, written under the checkpoint's own names (Mixtral's
    `block_sparse_moe.experts.3.w1`); transformers reads back every packed layer's decoded weight (it fuses experts
    in fp16) and the packed model's logits."""
    import llmprune
    from llmprune.cli import main

    p, ct = tmp_path / "p", tmp_path / "ct"
    sec = api.compress(model=str(tiny_model_dir(tmp_path / "src", family)), solver="wanda", pattern="2:4",
                       format="w4s24", quant="gptq", group_size=32, out=str(p), calib=str(calib_txt), eval=(),
                       **CAL)["format"]
    capsys.readouterr()
    assert main(["export", str(p), "--to", "compressed-tensors", "--out", str(ct), "--no-progress"]) == 0
    model, _ = llmprune.export.load(str(ct))
    packed = load_packed(p, dtype=torch.float32)
    views = {moe.stored_name(v): v for n, e in model.named_modules() if moe.is_fused_experts(e)
             for v in moe.view_names(n, e)}
    assert len(views) == 2 * 8 * 3  # two blocks of 8 experts (DeepSeek-V3: after its dense first block)
    assert set(views) <= set(sec["layers"])
    for name in sec["layers"]:
        got = arch.target(model, views.get(name, name)).weight.detach().float()
        torch.testing.assert_close(got, packed.get_submodule(name).dequantize().float(), rtol=2**-10,
                                   atol=0)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), packed(ids).logits, rtol=0, atol=5e-3)


def test_inconsistent_manifests_are_refused(tmp_path):
    """A manifest listing packed experts that config.json's model lacks is a damaged folder."""

    save_packed(tiny_model("qwen3_moe"), tmp_path / "p", "w4g128", group_size="auto", dtype=None)
    doc = json.loads((tmp_path / "p" / "llmprune.json").read_text())
    assert doc["format"]["experts"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    doc["format"]["experts"].append("model.layers.1.mlp")
    (tmp_path / "p" / "llmprune.json").write_text(json.dumps(doc))
    with pytest.raises(LLMPruneError, match="lists packed experts model.layers.1.mlp, which"):
        load_packed(tmp_path / "p")


def _kl(student, teacher, ids):
    """Mean per-token KL(teacher || student) from the two models' own logits."""
    import torch.nn.functional as F

    with torch.no_grad():
        p = F.log_softmax(teacher(ids).logits.float(), -1)
        q = F.log_softmax(student(ids).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_scale_tuning_of_experts_whole_and_from_disk(family, tmp_path, capsys, calib_txt, monkeypatch):
    """`pack --quant gptq --tune-steps N` of a Mixture-of-Experts model: every expert's projections train as
    ScaledLinear layers of a split experts module (quant.tune.scaled_experts). Against plain GPTQ only scales
    differ, the experts' among them; loaded back, the pack is closer to its source, by the KL its manifest records;
    the block-by-block path writes the whole load's files bit for bit, without reading the fused experts' weights
    the codes cover (gpt-oss: their biases are read). qwen3_moe: layer 0 expert 0's gate projection is made dense
    in the source, so it has no codes and stays dense: its weights are read for the tuning and written unchanged."""
    from safetensors.torch import save_file

    from llmprune import calibration, checkpoint, lazy
    from llmprune.cli import main

    src = tiny_model_dir(tmp_path / "src", family)
    d = tmp_path / "d"
    api.compress(model=str(src), solver="wanda", pattern="2:4", out=str(d), calib=str(calib_txt), eval=(), **CAL)
    dense = "model.layers.0.mlp.experts.0.gate_proj.weight"
    if family == "qwen3_moe":
        t = load_file(d / "model.safetensors")
        t[dense] = torch.randn_like(t[dense])
        save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    args = ["pack", str(d), "--format", "w4s24", "--quant", "gptq", "--group-size", "16", "--calib", str(calib_txt),
            "--nsamples", "4", "--seqlen", "32", "--save-dtype", "float32", "--no-progress"]
    tune = ["--tune-steps", "6", "--tune-lr", "5e-3"]
    reads: dict[str, int] = {}
    real = lazy.WeightFiles.get

    def get(self, name, dtype=None):
        reads[name] = reads.get(name, 0) + 1
        return real(self, name, dtype)

    for out, extra in (("g", ["--onload", "whole"]), ("tw", ["--onload", "whole", *tune]),
                       ("tb", ["--onload", "blocks", *tune])):
        with monkeypatch.context() as m:
            if out == "tb":
                m.setattr(checkpoint, "load", lambda *a, **k: pytest.fail("the whole model was loaded"))
                m.setattr(lazy.WeightFiles, "get", get)
            assert main([*args, *extra, "--out", str(tmp_path / out)]) == 0, capsys.readouterr().err
    g, tw, tb = (_tensors(tmp_path / x) for x in ("g", "tw", "tb"))
    assert tw.keys() == tb.keys() == g.keys()
    assert all(torch.equal(tw[k], tb[k]) for k in tw)
    differ = [k for k in tw if not torch.equal(tw[k], g[k])]
    assert {k.rsplit(".", 1)[-1] for k in differ} == {"scales"} and any(".experts." in k for k in differ), differ
    ma, mb = (json.loads((tmp_path / x / "llmprune.json").read_text())["format"] for x in ("tw", "tb"))
    ta, tb_ = ma["quant_options"].pop("tune"), mb["quant_options"].pop("tune")
    assert ta["kept"] == "tuned" and ta["kl_after"] < ta["kl_before"]
    assert all(ta[k] == tb_[k] for k in ("kl_before", "kl_after", "kept", "steps", "windows"))
    if family == "qwen3_moe":
        assert list(ma["left_dense"]) == ["model.layers.0.mlp.experts.0.gate_proj"]
        assert torch.equal(tw[dense], load_file(d / "model.safetensors")[dense])
        assert reads[dense] == 3  # teacher, GPTQ and the tuning: its fused parameter is not all codes
        assert reads["model.layers.1.mlp.experts.0.gate_proj.weight"] == 2  # never read for the tuning
    else:
        assert reads["model.layers.0.mlp.experts.gate_up_proj"] == reads["model.layers.0.mlp.experts.down_proj"] == 2
        assert reads["model.layers.0.mlp.experts.gate_up_proj_bias"] == 3
    source, tok, _ = checkpoint.load(d)
    tuned, _, _ = checkpoint.load(tmp_path / "tw")
    plain, _, _ = checkpoint.load(tmp_path / "g")
    ids, _ = calibration.load(str(calib_txt), tok, 4, 32, 0)
    assert _kl(tuned, source, ids) == pytest.approx(ta["kl_after"], rel=1e-3)  # what was stored
    assert _kl(plain, source, ids) == pytest.approx(ta["kl_before"], rel=1e-3) and ta["kl_before"] > ta["kl_after"]


@pytest.mark.parametrize("family,pattern,fmt", [("qwen3_moe", "2:4", "w4g128"), ("gpt_oss", "2:4", "w4s24"),
                                                ("mixtral", "2:4", "sparse24"), ("qwen3_moe", "group:16", "w4s50")])
def test_grouped_experts_equal_expert_by_expert(family, pattern, fmt, tmp_path, monkeypatch):
    """load_packed stacks each projection's experts ((experts, out, ...), every expert's tensors views of the
    stacks: one copy); the grouped forward (all (token, expert) pairs in three launches, what CUDA decode runs;
    here the ops' reference) gives the expert-by-expert loop's logits, for the concatenated, the interleaved and
    biased (gpt-oss) layouts and every format; the stacks follow the module through .to()-style moves, and a
    tensor moved on its own unbinds them (back to the loop); dynamo traces the grouped forward without a graph break
    (gpt-oss, w4s24).
    On CPU, "auto" runs the loop."""
    from llmprune.kernels import ops

    src = tiny_model_dir(tmp_path / "src", family)
    api.compress(model=str(src), solver="magnitude", pattern=pattern, sparsity=0.5, out=str(tmp_path / "d"), eval=(),
                 progress=False)
    api.pack(str(tmp_path / "d"), str(tmp_path / "p"), fmt=fmt, quant=None if fmt == "sparse24" else "rtn",
             group_size=16, save_dtype="float32", progress=False)
    model = load_packed(tmp_path / "p")
    splits = [m for m in model.modules() if isinstance(m, moe.SplitExperts)]
    assert splits and all(m._stacked() for m in splits)
    for m in splits:
        for proj, kind, name, stack in m._bound():
            for e, ex in enumerate(m):
                t = getattr(getattr(ex, proj), name)
                assert t.data_ptr() == stack[e].data_ptr() and t.untyped_storage().data_ptr() == stack.data_ptr()
    calls = []
    real = ops.grouped_linear
    monkeypatch.setattr(ops, "grouped_linear", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    ids = _ids()
    with torch.no_grad():
        loop = model(ids).logits
        assert not calls  # CPU, "auto": expert by expert
        for m in splits:
            m.grouped = "always"
        torch.testing.assert_close(model(ids).logits, loop, rtol=1e-5, atol=1e-5)
        assert calls == [fmt] * (len(calls)) and len(calls) == len(splits) * len(splits[0].projections)
        model._apply(lambda t: t.clone())  # what .to(device) does to every tensor
        assert all(m._stacked() for m in splits)
        torch.testing.assert_close(model(ids).logits, loop, rtol=1e-5, atol=1e-5)
        m = splits[0]
        proj, kind, name, _ = next(m._bound())
        lin = getattr(m[-1], proj)
        if kind == "bias":
            lin.bias = torch.nn.Parameter(lin.bias.clone(), requires_grad=False)
        else:
            lin._buffers[name] = lin._buffers[name].clone()
        n = len(calls)
        torch.testing.assert_close(model(ids).logits, loop, rtol=1e-5, atol=1e-5)
        assert not m._stacked() and len(calls) == n + len(m.projections) * (len(splits) - 1)
        hidden = torch.randn(5, m[0].down_proj.out_features)
        index = torch.tensor([[0, 1], [2, len(m)], [1, 3], [len(m), len(m)], [3, 0]])
        w = torch.rand(5, 2)
        other = splits[1]
        other.grouped = "never"
        want = other(hidden, index, w)
        other.grouped = "always"
        got = other(hidden, index, w)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(got[3], torch.zeros_like(got[3]))  # routed nowhere: masked out
        if fmt == "w4s24":  # no host synchronization, no graph break: dynamo traces the grouped forward whole
            compiled = torch.compile(other, fullgraph=True, backend="aot_eager")
            torch.testing.assert_close(compiled(hidden, index, w), got, rtol=1e-6, atol=1e-6)


def test_experts_not_all_packed_alike_are_not_stacked(tmp_path):
    """An experts module whose projections are not all packed the same way (one left a dense nn.Linear) keeps
    its tensors as they are (stack_ says False) and runs expert by expert, even when grouped = "always"."""
    src = tiny_model_dir(tmp_path / "src", "qwen3_moe")
    api.compress(model=str(src), solver="magnitude", pattern="2:4", sparsity=0.5, out=str(tmp_path / "d"), eval=(),
                 progress=False)
    api.pack(str(tmp_path / "d"), str(tmp_path / "p"), fmt="w4s24", quant="rtn", group_size=16, save_dtype="float32",
             progress=False)
    model = load_packed(tmp_path / "p")
    m = next(x for x in model.modules() if isinstance(x, moe.SplitExperts))
    hidden, index, w = torch.randn(4, m[0].down_proj.out_features), torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0]]), torch.rand(4, 2)
    with torch.no_grad():
        want = m(hidden, index, w)
        lin = m[2].up_proj
        dense = torch.nn.Linear(lin.in_features, lin.out_features, bias=False)
        dense.weight.copy_(lin.dequantize())
        m[2].up_proj = dense
        m._stacks = {}
        assert not m.stack_() and not m._stacks
        m.grouped = "always"
        torch.testing.assert_close(m(hidden, index, w), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_gguf_q4_0_of_packed_experts_holds_their_own_codes(family, tmp_path, capsys, calib_txt):
    """`export --to gguf --type q4_0` of a w4s24 MoE output: the attention linears and the stacked experts hold
    their own codes, bit for bit (gguf_int4): each expert's projection's at its place in the stack llama.cpp
    reads, Mixtral's as stored, gpt-oss's (stored (in, out), gate and up interleaved) split and transposed back to
    (out, in), where its int4 groups run along llama.cpp's blocks again; the export counts them."""
    kept = 14
    import gguf
    import numpy as np

    from llmprune.cli import main

    p, g = tmp_path / "p", tmp_path / "g"
    api.compress(model=str(tiny_model_dir(tmp_path / "src", family)), solver="wanda", pattern="2:4",
                 format="w4s24", quant="rtn", group_size=32, out=str(p), calib=str(calib_txt), eval=(), **CAL)
    capsys.readouterr()
    assert main(["export", str(p), "--to", "gguf", "--type", "q4_0", "--out", str(g), "--no-progress"]) == 0
    again = 14 - kept  # 2 blocks of 4 attention linears and 3 expert stacks (gate, up, down)
    said = capsys.readouterr().out
    assert f"Q4_0 holds {kept} int4 tensors' own codes" + (f", {again} quantized again" if again else "\n") in said
    e = json.loads((g / "llmprune.json").read_text())["export"]
    assert e["int4_codes"] == {"q4_0": {"kept": kept, "requantized": again, "max_error_steps": 0.0}}
    packed = load_packed(p, dtype=torch.float32)
    t = {x.name: x for x in gguf.GGUFReader(g / e["files"][0]).tensors}

    def back(name):
        return gguf.quants.dequantize(t[name].data, t[name].tensor_type)

    want = packed.get_submodule("model.layers.1.self_attn.v_proj").dequantize().float().numpy()
    assert np.array_equal(back("blk.1.attn_v.weight").reshape(want.shape), want)
    up = back("blk.1.ffn_up_exps.weight")  # (experts, width, hidden)
    assert t["blk.1.ffn_up_exps.weight"].tensor_type.name == "Q4_0"
    for x in range(up.shape[0]):
        want = packed.get_submodule(f"model.layers.1.mlp.experts.{x}.up_proj").dequantize().float().numpy()
        assert np.array_equal(up[x], want), x


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_gguf_gptq_on_export_of_experts_is_pack_then_export(family, tmp_path, capsys, calib_txt):
    """`export --to gguf --quant gptq` of a pruned MoE output (Mixtral's, read whole: its checkpoint stores the
    experts one linear each; gpt-oss's, block by block, experts fused): every expert stack holds GPTQ's codes, block
    for block what `pack --format w4g128 --grid sym --group-size 32 --quant gptq` then `export --to gguf` writes."""
    import gguf
    import numpy as np

    from llmprune.cli import main

    d, p, one, two = (tmp_path / x for x in ("d", "p", "one", "two"))
    api.compress(model=str(tiny_model_dir(tmp_path / "src", family)), solver="wanda", pattern="2:4", out=str(d),
                 calib=str(calib_txt), eval=(), **CAL)
    calib = ["--calib", str(calib_txt), "--nsamples", "4", "--seqlen", "32", "--no-progress"]
    assert main(["export", str(d), "--to", "gguf", "--quant", "gptq", "--out", str(one), *calib]) == 0
    assert main(["pack", str(d), "--format", "w4g128", "--grid", "sym", "--group-size", "32", "--quant", "gptq",
                 "--out", str(p), *calib]) == 0
    assert main(["export", str(p), "--to", "gguf", "--type", "q4_0", "--out", str(two), "--no-progress"]) == 0
    capsys.readouterr()
    e = json.loads((one / "llmprune.json").read_text())["export"]
    assert e["int4_codes"] == {"q4_0": {"kept": 14, "requantized": 0, "max_error_steps": 0.0}}
    got = {x.name: x for x in gguf.GGUFReader(one / e["files"][0]).tensors}
    files = json.loads((two / "llmprune.json").read_text())["export"]["files"]
    want = {x.name: x for x in gguf.GGUFReader(two / files[0]).tensors}
    stacks = [n for n in got if "_exps.weight" in n]
    assert len(stacks) == 6 and all(got[n].tensor_type.name == "Q4_0" for n in stacks)
    linears = [x for x in got if x.startswith("blk.") and got[x].tensor_type.name == "Q4_0"]  # (the head: gguf's
    assert len(linears) == 14  # Q4_0 of the source's fp32 weight here, of the pack's fp16 copy there)
    for n in linears:
        assert np.array_equal(got[n].data, want[n].data), n
