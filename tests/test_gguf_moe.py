"""`export --to gguf` of the Mixture-of-Experts families with shared experts, leading dense blocks or a routing of their
own: GLM-4.5 (glm4_moe), OLMoE, ERNIE 4.5 (ernie4_5_moe), HunYuan-A13B (hunyuan_v1_moe), MiniMax-M2 (minimax_m2). No
reader of transformers takes these GGUFs; llama.cpp runs them in bench/llamacpp_families.py. Here the F32 file, read
back with gguf's GGUFReader, holds the pruned model's tensors under the names llama.cpp's loader asks for (written
out below from its src/models/*.cpp, not from gguf's TensorNameMap), each expert's gate / up / down (taken from the
model with llmprune.moe's own views) at its index of the stacks, the metadata llama.cpp reads (widths read off the
model's tensors, the RoPE base and rotated dimensions off transformers' own frequencies), and the variants llama.cpp
would misread are refused.
"""
import numpy as np
import pytest
import torch

from llmprune.cli import main
from llmprune.testing import FAST_CLI

pytest.importorskip("gguf")

# the bench's variants (bench/llamacpp_families.py): GLM-4.5 with q/k norms, q/k/v biases, experts picked from the best
# of 2 groups and their weights scaled; OLMoE without GQA; HunYuan's NTK-alpha RoPE; and HunYuan's top-k given
# per layer (as HunYuan-A13B's config does); MiniMax-M2 as released (heads x head_dim twice the hidden size, half of
# each head rotated, said by the legacy rotary_dim its config.json has)
ALPHA_ROPE = {"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0}
GLM45 = {"use_qk_norm": True, "attention_bias": True, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5}
VARIANTS = {"glm4_moe": {}, "glm45": GLM45, "olmoe": {"num_key_value_heads": 4}, "ernie4_5_moe": {},
            "hunyuan_v1_moe": {"rope_parameters": ALPHA_ROPE}, "hunyuan_topk_per_layer": {"moe_topk": [2, 2]},
            "minimax_m2": {"head_dim": 32, "rotary_dim": 16}}
ARCH = {"glm45": "glm4_moe", "hunyuan_topk_per_layer": "hunyuan_v1_moe"}
GGUF_ARCH = {"glm4_moe": "glm4moe", "olmoe": "olmoe", "ernie4_5_moe": "ernie4_5-moe", "hunyuan_v1_moe": "hunyuan-moe",
             "minimax_m2": "minimax-m2"}

# HF name in a block (after `model.layers.N.`) -> the name llama.cpp's loader reads (blk.N.<name>), by family
ATTN = {f"self_attn.{p}_proj.{k}": f"attn_{n}.{k}" for p, n in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output"))
        for k in ("weight", "bias")} | {"input_layernorm.weight": "attn_norm.weight"}
DENSE = {f"mlp.{p}_proj.weight": f"ffn_{p}.weight" for p in ("gate", "up", "down")}


def shared(module: str) -> dict:
    return {f"mlp.{module}.{p}_proj.weight": f"ffn_{p}_shexp.weight" for p in ("gate", "up", "down")}


NAMES = {
    "glm4_moe": ATTN | DENSE | shared("shared_experts") | {
        "post_attention_layernorm.weight": "post_attention_norm.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
        "mlp.gate.e_score_correction_bias": "exp_probs_b.bias"},
    "olmoe": ATTN | {"post_attention_layernorm.weight": "ffn_norm.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
                     "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate.weight": "ffn_gate_inp.weight"},
    "ernie4_5_moe": ATTN | DENSE | shared("shared_experts") | {
        "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
        "mlp.gate.moe_statics.e_score_correction_bias": "exp_probs_b.bias"},
    "hunyuan_v1_moe": ATTN | shared("shared_mlp") | {
        "post_attention_layernorm.weight": "ffn_norm.weight", "self_attn.query_layernorm.weight": "attn_q_norm.weight",
        "self_attn.key_layernorm.weight": "attn_k_norm.weight", "mlp.gate.wg.weight": "ffn_gate_inp.weight"},
    "minimax_m2": ATTN | {  # (its q/k norms over whole projections: heads x head_dim values, as llama.cpp's)
        "post_attention_layernorm.weight": "ffn_norm.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
        "mlp.e_score_correction_bias": "exp_probs_b.bias"},
}
TIED_HEAD = ("olmoe", "minimax_m2")  # llama.cpp's loader requires output.weight: the tied head written out
EXPERTS = (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps"))
SIGMOID = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID


def _export(tmp_path, capsys, calib_txt, arch, **over):
    """A tiny `arch` model (vectors random), pruned with Wanda 50%, exported to GGUF F32: (pruned folder, file)."""
    from llmprune.testing import byte_tokenizer, random_vectors, tiny_model

    m, src, out = tmp_path / "m", tmp_path / "s", tmp_path / "g"
    model = random_vectors(tiny_model(arch, **over))
    model.save_pretrained(m)
    byte_tokenizer().save_pretrained(m)
    assert main([str(a) for a in ("compress", "--model", m, "--calib", calib_txt, "--out", src, *FAST_CLI)]) == 0
    rc = main([str(a) for a in ("export", src, "--to", "gguf", "--type", "f32", "--out", out, "--no-progress")])
    assert rc == 0, capsys.readouterr().err
    return src, next(out.glob("*-F32.gguf"))


def _experts_of(layer):
    """A block's fused experts module; None for a dense block."""
    return getattr(layer.mlp, "experts", None)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_moe_gguf_holds_the_pruned_tensors_where_llama_cpp_reads_them(tmp_path, capsys, calib_txt, variant):
    """Every tensor the file holds is one llama.cpp's loader reads, exactly the pruned model's (F32): dense and
    shared MLPs, q/k norms and biases, the router F32 and its selection bias as one value per expert, each expert's
    projections at its index; a tied head written out where llama.cpp requires one (OLMoE)."""
    import gguf

    import llmprune
    from llmprune.moe import ExpertProj

    arch = ARCH.get(variant, variant)
    src, path = _export(tmp_path, capsys, calib_txt, arch, **VARIANTS[variant])
    ref, _, _ = llmprune.load(str(src))
    cfg, layers = ref.config, ref.model.layers
    t = {x.name: np.array(x.data) for x in gguf.GGUFReader(path).tensors}
    want = {"token_embd.weight": ref.model.embed_tokens.weight, "output_norm.weight": ref.model.norm.weight}
    if arch in TIED_HEAD:
        want["output.weight"] = ref.model.embed_tokens.weight
    for i, layer in enumerate(layers):
        for k, w in layer.state_dict().items():
            if k in NAMES[arch]:
                want[f"blk.{i}.{NAMES[arch][k]}"] = w
        if (experts := _experts_of(layer)) is not None:
            n = experts.down_proj.shape[0]
            for proj, name in EXPERTS:  # each expert's (out, in) as llmprune's own view of the fused parameter has it
                want[f"blk.{i}.{name}.weight"] = torch.stack([ExpertProj(experts, e, proj).weight for e in range(n)])
    assert set(t) == set(want), (set(t) ^ set(want))
    for name, w in want.items():
        w = w.detach().float().numpy()
        if name.endswith("exp_probs_b.bias"):  # one value per expert (ERNIE stores (1, experts))
            assert t[name].shape == (cfg.num_local_experts if arch == "glm4_moe" else cfg.num_experts,), name
            w = w.reshape(-1)
        assert t[name].shape == w.shape and np.array_equal(t[name], w), name
    stacked = [v for k, v in t.items() if k.endswith("_exps.weight")]
    assert stacked and all((v == 0).mean() > 0.3 for v in stacked)  # the pruned experts, zeros kept
    assert any(k.endswith("exp_probs_b.bias") for k in t) == (arch in ("glm4_moe", "ernie4_5_moe", "minimax_m2"))


def _kv(path) -> dict:
    import gguf

    r = gguf.GGUFReader(path)
    name = r.fields["general.architecture"].contents()
    return {k.removeprefix(name + "."): f.contents() for k, f in r.fields.items()}, name


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_moe_gguf_says_what_llama_cpp_reads_of_the_routing(tmp_path, capsys, calib_txt, variant):
    """Expert counts and widths (read off the model's tensors), the dense blocks before the first MoE block, the
    shared experts' width, GLM-4.5's sigmoid gating, weight scale, top-k normalization and expert groups, and the
    RoPE llama.cpp applies: as many dimensions as transformers rotates, at the base of transformers' frequencies
    (HunYuan's NTK-alpha base included)."""
    import llmprune

    arch = ARCH.get(variant, variant)
    src, path = _export(tmp_path, capsys, calib_txt, arch, **VARIANTS[variant])
    ref, _, _ = llmprune.load(str(src))
    cfg, layers = ref.config, ref.model.layers
    kv, name = _kv(path)
    assert name == GGUF_ARCH[arch]
    moe = [i for i, layer in enumerate(layers) if _experts_of(layer) is not None]
    experts = _experts_of(layers[moe[0]])
    width = experts.down_proj.shape[-1]
    assert kv["block_count"] == len(layers) and "nextn_predict_layers" not in kv  # (no MTP layers: none written)
    assert kv["expert_count"] == experts.down_proj.shape[0]
    assert kv["expert_used_count"] == layers[moe[0]].mlp.gate.top_k  # (HunYuan's moe_topk may be one a layer)
    inv_freq = ref.model.rotary_emb.inv_freq.double()
    rot = 2 * inv_freq.numel()
    assert kv["rope.dimension_count"] == rot
    assert kv["rope.freq_base"] == pytest.approx(float(inv_freq[1] ** (-rot / 2)), rel=1e-4)
    if arch == "olmoe":  # llama.cpp's olmoe: experts feed_forward_length wide
        assert kv["feed_forward_length"] == width
        return
    assert kv["expert_feed_forward_length"] == width
    if arch == "minimax_m2":  # sigmoid gating; top-k normalization and no scaling are llama.cpp's own, not read
        head_dim = layers[0].self_attn.q_proj.weight.shape[0] // cfg.num_attention_heads
        assert kv["expert_gating_func"] == SIGMOID and kv["feed_forward_length"] == width
        assert kv["attention.key_length"] == kv["attention.value_length"] == head_dim == 2 * rot
        assert not {"expert_shared_count", "expert_weights_scale", "leading_dense_block_count"} & set(kv)
        return
    mlp = layers[moe[0]].mlp
    shared_width = (mlp.shared_mlp if arch == "hunyuan_v1_moe" else mlp.shared_experts).down_proj.weight.shape[1]
    if arch == "glm4_moe":
        assert kv["expert_shared_count"] * width == shared_width
        assert kv["leading_dense_block_count"] == moe[0] and kv["expert_gating_func"] == SIGMOID
        assert kv["expert_weights_scale"] == pytest.approx(cfg.routed_scaling_factor)
        assert kv["expert_weights_norm"] == cfg.norm_topk_prob
        groups = cfg.n_group > 1 and cfg.topk_group < cfg.n_group
        assert ("expert_group_count" in kv) == groups == (variant == "glm45")
        if groups:
            assert (kv["expert_group_count"], kv["expert_group_used_count"]) == (cfg.n_group, cfg.topk_group)
        assert kv["feed_forward_length"] == layers[0].mlp.down_proj.weight.shape[1]  # the dense block's
        return
    assert kv["expert_shared_feed_forward_length"] == shared_width
    if arch == "ernie4_5_moe":  # every block from the first MoE one on is one (check_arch refuses others)
        assert moe == list(range(moe[0], len(layers)))
        assert kv["leading_dense_block_count"] == moe[0] and kv["interleave_moe_layer_step"] == 1
        assert kv["feed_forward_length"] == layers[0].mlp.down_proj.weight.shape[1]
    else:  # HunYuan: llama.cpp sizes the experts by feed_forward_length
        assert kv["feed_forward_length"] == width == shared_width


@pytest.mark.parametrize("arch, over, want", [
    ("glm4_moe", {"hidden_act": "gelu"}, "activation (gelu)"),
    ("glm4_moe", {"n_shared_experts": 0}, "n_shared_experts 0"),
    ("minimax_m2", {"hidden_act": "gelu"}, "activation (gelu)"),
    ("minimax_m2", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}},
     "RoPE scaling 'yarn'"),
    ("olmoe", {}, "key-value heads (2 of 4)"),  # (GQA: llama.cpp's k_norm spans every head)
    ("olmoe", {"num_key_value_heads": 4, "norm_topk_prob": True}, "norm_topk_prob (True)"),
    ("olmoe", {"num_key_value_heads": 4, "clip_qkv": 8.0}, "clip_qkv (8.0)"),
    ("olmoe", {"num_key_value_heads": 4, "attention_bias": True}, "biases (True)"),
    ("ernie4_5_moe", {"num_hidden_layers": 4, "moe_layer_end_index": 3, "moe_layer_interval": 2}, "interval 2"),
    ("ernie4_5_moe", {"num_hidden_layers": 4, "moe_layer_end_index": 2}, "end_index 2"),
    ("ernie4_5_moe", {"use_bias": True}, "use_bias True"),
    ("hunyuan_v1_moe", {"moe_topk": [2, 1]}, "experts per token ([2, 1])"),
    ("hunyuan_v1_moe", {"attention_bias": True}, "attention biases (True)"),
    ("hunyuan_v1_moe", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
     "'dynamic' without alpha"),
])
def test_moe_variants_llama_cpp_would_misread_are_refused(arch, over, want):
    from llmprune.errors import LLMPruneError
    from llmprune.export.gguf_arch import check_config
    from llmprune.testing import tiny_config

    with pytest.raises(LLMPruneError, match="--to compressed-tensors") as e:
        check_config(tiny_config(arch, **over))
    assert want in str(e.value), str(e.value)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_moe_variants_llama_cpp_runs_are_not_refused(variant):
    from llmprune.export.gguf_arch import check_config
    from llmprune.testing import tiny_config

    check_config(tiny_config(ARCH.get(variant, variant), **VARIANTS[variant]))


def test_export_refuses_an_olmoe_with_gqa_in_one_line(tmp_path, capsys, calib_txt):
    """The refusal through the command: exit 2, one line, nothing written."""
    from llmprune.testing import tiny_model_dir

    src = tmp_path / "s"
    assert main([str(a) for a in ("compress", "--model", tiny_model_dir(tmp_path / "m", "olmoe"), "--calib",
                                  calib_txt, "--out", src, *FAST_CLI)]) == 0
    capsys.readouterr()
    out = tmp_path / "x"
    rc = main([str(a) for a in ("export", src, "--to", "gguf", "--out", out, "--no-progress")])
    err = capsys.readouterr().err
    assert rc == 2 and "key-value heads (2 of 4)" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
