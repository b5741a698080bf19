"""GGUF for the hybrid families (Gated DeltaNet + gated attention: Qwen3.5, Qwen3-Next; short convolutions +
attention: LFM2; Mamba2 + attention: Granite 4.0-H, Falcon-H1, Nemotron-H): each tensor where and how llama.cpp
reads it, the metadata it reads, and the variants it would misread refused. llama.cpp itself runs these files in
bench/llamacpp_families.py (its logits against llmprune's)."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from test_export import _family_export, _refused

from llmprune.cli import main
from llmprune.testing import FAST_CLI

# Qwen3.5's M-RoPE sections within the tiny head (transformers' default, 11 + 11 + 10, is wider: refused below)
QWEN35 = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                              "mrope_section": [1, 1, 0]}}


def _read(path) -> tuple[dict, dict]:
    """({tensor name: (values as float32, GGML type name)}, {key: value}) of a GGUF file."""
    r = gguf.GGUFReader(path)
    tensors = {t.name: (np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32), t.tensor_type.name)
               for t in r.tensors}
    return tensors, {k: f.contents() for k, f in r.fields.items()}


def _pruned(src) -> tuple[object, dict]:
    import llmprune

    ref, _, _ = llmprune.load(str(src))
    return ref, {k: v.detach().float() for k, v in ref.state_dict().items()}


def _same(t: dict, name: str, want: torch.Tensor) -> None:
    got, kind = t[name]
    assert kind == "F32", (name, kind)
    assert got.shape == tuple(want.shape) and np.array_equal(got, want.numpy()), name


def _tiled(nk: int, nv: int) -> list[int]:
    """For each V head llama.cpp's Qwen3.5 graph holds (position p, its K head p % nk: the K heads broadcast
    whole), the HF V head it is: transformers gives K head k the V heads k * nv / nk ... (k + 1) * nv / nk - 1
    (repeat_interleave), the (p // nk)-th of them."""
    return [(p % nk) * (nv // nk) + p // nk for p in range(nv)]


def test_a_qwen3_5_gguf_holds_each_tensor_where_llama_cpp_reads_it(tmp_path, capsys, calib_txt):
    """Qwen3.5 (llama.cpp's qwen35): the DeltaNet layer's V heads moved to llama.cpp's tiled order in every tensor
    holding them (in_proj_qkv's V rows, the conv kernel's V channels, in_proj_z, in_proj_a / b, A_log, dt_bias,
    out_proj's columns), A_log as -exp(A_log), dt_bias as ssm_dt.bias, the conv kernel 2-D and F32 in every file;
    every RMSNorm as 1 + w but the DeltaNet's gated output norm; the gated attention's q_proj (query and gate per
    head) as stored; the metadata its loader reads (ssm sizes, which layers are recurrent, M-RoPE sections)."""
    src, out, e = _family_export(tmp_path, capsys, calib_txt, "qwen3_5_text", **QWEN35)
    ref, sd = _pruned(src)
    c = ref.config
    nk, nv, hk, hv = c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim
    assert nv > nk  # (the tiny model has V heads sharing a K head: the reorder is exercised)
    order = _tiled(nk, nv)
    t, kv = _read(out / e["files"][0])
    p, b = "model.layers.0.linear_attn.", "blk.0."

    def heads(w, size, dim=0):  # w's V heads (each `size` along dim) in llama.cpp's order
        chunks = torch.split(w, size, dim=dim)
        return torch.cat([chunks[h] for h in order], dim=dim)

    qkv = sd[p + "in_proj_qkv.weight"]
    assert int((qkv == 0).sum()) > 0  # (pruned: zeros stay zeros, nothing here adds to them)
    _same(t, b + "attn_qkv.weight", torch.cat([qkv[:2 * nk * hk], heads(qkv[2 * nk * hk:], hv)]))
    _same(t, b + "attn_gate.weight", heads(sd[p + "in_proj_z.weight"], hv))
    _same(t, b + "ssm_alpha.weight", heads(sd[p + "in_proj_a.weight"], 1))
    _same(t, b + "ssm_beta.weight", heads(sd[p + "in_proj_b.weight"], 1))
    _same(t, b + "ssm_a", heads(-torch.exp(sd[p + "A_log"]), 1))
    _same(t, b + "ssm_dt.bias", heads(sd[p + "dt_bias"], 1))
    conv = sd[p + "conv1d.weight"][:, 0]  # (channels, 1, width) -> (channels, width)
    _same(t, b + "ssm_conv1d.weight", torch.cat([conv[:2 * nk * hk], heads(conv[2 * nk * hk:], hv)]))
    _same(t, b + "ssm_out.weight", heads(sd[p + "out_proj.weight"], hv, dim=1))
    _same(t, b + "ssm_norm.weight", sd[p + "norm.weight"])  # scales by w
    for hf, name in (("model.layers.0.input_layernorm", "blk.0.attn_norm"),
                     ("model.layers.1.post_attention_layernorm", "blk.1.post_attention_norm"),
                     ("model.layers.1.self_attn.q_norm", "blk.1.attn_q_norm"),
                     ("model.layers.1.self_attn.k_norm", "blk.1.attn_k_norm"), ("model.norm", "output_norm")):
        _same(t, name + ".weight", sd[hf + ".weight"] + 1)
    for hf, name in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                     ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.down_proj", "ffn_down")):
        _same(t, f"blk.1.{name}.weight", sd[f"model.layers.1.{hf}.weight"])
    assert "output.weight" not in t  # tied: llama.cpp's qwen35 reads the embedding
    assert kv["general.architecture"] == "qwen35"
    assert (kv["qwen35.ssm.conv_kernel"], kv["qwen35.ssm.state_size"], kv["qwen35.ssm.group_count"],
            kv["qwen35.ssm.time_step_rank"], kv["qwen35.ssm.inner_size"]) == (c.linear_conv_kernel_dim, hk, nk, nv,
                                                                                nv * hv)
    assert kv["qwen35.attention.recurrent_layers"] == [True, False]
    assert kv["qwen35.rope.dimension_sections"] == [1, 1, 0, 0] and kv["qwen35.rope.dimension_count"] == hk // 4
    q8, _ = _read(out / e["files"][1])
    assert q8["blk.0.ssm_conv1d.weight"][1] == "F32" and q8["blk.0.ssm_a"][1] == "F32"  # (ggml_ssm_conv: F32)
    assert q8["blk.0.attn_qkv.weight"][1] == "Q8_0"


def test_a_qwen3_next_gguf_splits_the_fused_projection_as_its_layer_reads_it(tmp_path, capsys, calib_txt):
    """Qwen3-Next (llama.cpp's qwen3next): the fused in_proj_qkvz (per K head: q, k, v, z) as attn_qkv (q, k, v of
    all heads, what the conv runs over) and attn_gate (z), checked against transformers' own split of its output
    (fix_query_key_value_ordering); V heads in HF's grouped order (llama.cpp's qwen3next repeats each K head in
    place); in_proj_ba as stored (ssm_ba); experts split, the shared-expert gate a vector, the router F32."""
    src, out, e = _family_export(tmp_path, capsys, calib_txt, "qwen3_next")
    ref, sd = _pruned(src)
    c = ref.config
    t, kv = _read(out / e["files"][0])
    layer = ref.model.layers[0].linear_attn
    x = torch.randn(1, 3, c.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q, k, v, z, _, _ = layer.fix_query_key_value_ordering(layer.in_proj_qkvz(x), layer.in_proj_ba(x))
    flat = lambda y: y.reshape(1, 3, -1)
    qkv, gate = (torch.tensor(t[f"blk.0.{n}.weight"][0]) for n in ("attn_qkv", "attn_gate"))
    assert torch.allclose(x @ qkv.T, torch.cat([flat(q), flat(k), flat(v)], -1), atol=1e-6)
    assert torch.allclose(x @ gate.T, flat(z), atol=1e-6)
    p = "model.layers.0."
    _same(t, "blk.0.ssm_ba.weight", sd[p + "linear_attn.in_proj_ba.weight"])
    _same(t, "blk.0.ssm_a", -torch.exp(sd[p + "linear_attn.A_log"]))
    _same(t, "blk.0.ssm_dt.bias", sd[p + "linear_attn.dt_bias"])
    _same(t, "blk.0.ssm_conv1d.weight", sd[p + "linear_attn.conv1d.weight"][:, 0])
    _same(t, "blk.0.ssm_norm.weight", sd[p + "linear_attn.norm.weight"])
    _same(t, "blk.0.attn_norm.weight", sd[p + "input_layernorm.weight"] + 1)
    half = c.moe_intermediate_size
    _same(t, "blk.0.ffn_gate_exps.weight", sd[p + "mlp.experts.gate_up_proj"][:, :half])
    _same(t, "blk.0.ffn_up_exps.weight", sd[p + "mlp.experts.gate_up_proj"][:, half:])
    _same(t, "blk.0.ffn_gate_inp_shexp.weight", sd[p + "mlp.shared_expert_gate.weight"][0])
    _same(t, "blk.0.ffn_gate_inp.weight", sd[p + "mlp.gate.weight"])
    assert kv["general.architecture"] == "qwen3next" and kv["qwen3next.attention.recurrent_layers"] == [True, False]
    assert (kv["qwen3next.expert_count"], kv["qwen3next.expert_used_count"], kv["qwen3next.expert_feed_forward_length"],
            kv["qwen3next.expert_shared_feed_forward_length"]) == (c.num_experts, c.num_experts_per_tok, half,
                                                                   c.shared_expert_intermediate_size)


def test_an_lfm2_gguf_holds_its_short_convolutions_where_llama_cpp_reads_them(tmp_path, capsys, calib_txt):
    """LFM2 (llama.cpp's lfm2): the conv kernel 2-D and F32, in_proj / out_proj as stored, the final norm
    (transformers' embedding_norm) as token_embd_norm, each layer's kind as head_count_kv (0: convolution)."""
    src, out, e = _family_export(tmp_path, capsys, calib_txt, "lfm2")
    ref, sd = _pruned(src)
    c = ref.config
    t, kv = _read(out / e["files"][0])
    p = "model.layers.0.conv."
    _same(t, "blk.0.shortconv.conv.weight", sd[p + "conv.weight"][:, 0])
    _same(t, "blk.0.shortconv.in_proj.weight", sd[p + "in_proj.weight"])
    _same(t, "blk.0.shortconv.out_proj.weight", sd[p + "out_proj.weight"])
    _same(t, "token_embd_norm.weight", sd["model.embedding_norm.weight"])
    _same(t, "blk.1.attn_q_norm.weight", sd["model.layers.1.self_attn.q_layernorm.weight"])
    _same(t, "blk.1.attn_output.weight", sd["model.layers.1.self_attn.out_proj.weight"])
    _same(t, "blk.0.ffn_gate.weight", sd["model.layers.0.feed_forward.w1.weight"])
    assert kv["general.architecture"] == "lfm2" and kv["lfm2.attention.head_count_kv"] == [0, c.num_key_value_heads]
    assert kv["lfm2.shortconv.l_cache"] == c.conv_L_cache and kv["lfm2.attention.layer_norm_rms_epsilon"] == \
        pytest.approx(c.norm_eps)
    assert kv["lfm2.feed_forward_length"] == sd["model.layers.0.feed_forward.w1.weight"].shape[0]
    q8, _ = _read(out / e["files"][1])
    assert q8["blk.0.shortconv.conv.weight"][1] == "F32"


@pytest.mark.parametrize("rope", [None, "nope", "rope"])  # (Granite 4.0: "nope")
def test_a_granite_hybrid_gguf_holds_its_mamba2_layers_where_llama_cpp_reads_them(tmp_path, capsys, calib_txt, rope):
    """Granite 4.0-H (llama.cpp's granitehybrid): Mamba2's in_proj as ssm_in, A_log as -exp(A_log) and D as
    (heads, 1) F32 tensors without a suffix, dt_bias as ssm_dt.bias, the conv kernel 2-D and F32 with its bias, the
    gated norm per group (groups, width / groups) F32; the experts split, the router F32, the shared MLP's fused
    input_linear as its gate and up; q/k rows in llama.cpp's RoPE order; each layer's kind as head_count_kv, the
    multipliers, and RoPE switched on (rope_finetuned) exactly when transformers runs it."""
    from llmprune.export.gguf_tensors import permute_rows

    src, out, e = _family_export(tmp_path, capsys, calib_txt, "granitemoehybrid", position_embedding_type=rope)
    ref, sd = _pruned(src)
    c = ref.config
    t, kv = _read(out / e["files"][0])
    p, b = "model.layers.0.mamba.", "blk.0."
    _same(t, b + "ssm_in.weight", sd[p + "in_proj.weight"])
    _same(t, b + "ssm_a", -torch.exp(sd[p + "A_log"])[:, None])
    _same(t, b + "ssm_d", sd[p + "D"][:, None])
    _same(t, b + "ssm_dt.bias", sd[p + "dt_bias"])
    _same(t, b + "ssm_conv1d.weight", sd[p + "conv1d.weight"][:, 0])
    _same(t, b + "ssm_conv1d.bias", sd[p + "conv1d.bias"])
    _same(t, b + "ssm_norm.weight", sd[p + "norm.weight"].reshape(c.mamba_n_groups, -1))
    _same(t, b + "ssm_out.weight", sd[p + "out_proj.weight"])
    m, width, shared = "model.layers.1.", c.intermediate_size, c.shared_intermediate_size
    _same(t, "blk.1.ffn_gate_exps.weight", sd[m + "block_sparse_moe.experts.gate_up_proj"][:, :width])
    _same(t, "blk.1.ffn_up_exps.weight", sd[m + "block_sparse_moe.experts.gate_up_proj"][:, width:])
    _same(t, "blk.1.ffn_down_exps.weight", sd[m + "block_sparse_moe.experts.down_proj"])
    _same(t, "blk.1.ffn_gate_inp.weight", sd[m + "block_sparse_moe.router.weight"])
    _same(t, "blk.1.ffn_gate_shexp.weight", sd[m + "shared_mlp.input_linear.weight"][:shared])
    _same(t, "blk.1.ffn_up_shexp.weight", sd[m + "shared_mlp.input_linear.weight"][shared:])
    _same(t, "blk.1.ffn_down_shexp.weight", sd[m + "shared_mlp.output_linear.weight"])
    _same(t, "blk.1.attn_k.weight", permute_rows(sd[m + "self_attn.k_proj.weight"], c.num_key_value_heads))
    _same(t, "blk.1.ffn_norm.weight", sd[m + "post_attention_layernorm.weight"])
    a = "granitehybrid."
    assert kv["general.architecture"] == "granitehybrid" and kv[a + "attention.head_count_kv"] == [0, 2]
    assert kv[a + "rope.scaling.finetuned"] is (rope == "rope")
    assert [kv[a + k] for k in ("attention.scale", "embedding_scale", "residual_scale", "logit_scale")] == \
        [c.attention_multiplier, c.embedding_multiplier, c.residual_multiplier, c.logits_scaling]
    assert (kv[a + "ssm.inner_size"], kv[a + "ssm.time_step_rank"], kv[a + "ssm.state_size"], kv[a + "ssm.group_count"],
            kv[a + "ssm.conv_kernel"]) == (c.mamba_n_heads * c.mamba_d_head, c.mamba_n_heads, c.mamba_d_state,
                                           c.mamba_n_groups, c.mamba_d_conv)
    assert kv[a + "expert_shared_feed_forward_length"] == shared and kv[a + "feed_forward_length"] == width
    q8, _ = _read(out / e["files"][1])
    assert {q8[b + n][1] for n in ("ssm_a", "ssm_d", "ssm_norm.weight", "ssm_conv1d.weight")} == {"F32"}


def test_a_granite_hybrid_gguf_without_experts_holds_its_shared_mlp_as_the_dense_one(tmp_path, capsys, calib_txt):
    """Granite 4.0-H without experts (H-Micro: transformers runs its shared MLP alone) as llama.cpp's granitehybrid
    loads it when it reads no expert count, as its converter writes it: the fused input_linear's first half (SiLU'd:
    the gate) as ffn_gate, its second as ffn_up, output_linear as ffn_down; feed_forward_length the shared MLP's width
    (not intermediate_size, the absent experts'); no expert count, experts used (llama.cpp asserts none used of none)
    or shared-expert width. bench/llamacpp_families.py runs it (granite_dense; 0.147 off with gate and up swapped)."""
    src, out, e = _family_export(tmp_path, capsys, calib_txt, "granitemoehybrid", types="f32", num_local_experts=0,
                                 shared_intermediate_size=96)
    ref, sd = _pruned(src)
    c = ref.config
    assert ref.model.layers[1].block_sparse_moe is None and c.num_experts_per_tok  # (a leftover top-k: not written)
    t, kv = _read(out / e["files"][0])
    for i in range(c.num_hidden_layers):
        m, b = f"model.layers.{i}.shared_mlp.", f"blk.{i}."
        fused = sd[m + "input_linear.weight"]  # (2 x 96, hidden): gate, then up
        assert fused.shape[0] == 2 * 96 and int((fused == 0).sum()) > 0  # (pruned)
        _same(t, b + "ffn_gate.weight", fused[:96])
        _same(t, b + "ffn_up.weight", fused[96:])
        _same(t, b + "ffn_down.weight", sd[m + "output_linear.weight"])
        _same(t, b + "ffn_norm.weight", sd[f"model.layers.{i}.post_attention_layernorm.weight"])
    _same(t, "blk.0.ssm_in.weight", sd["model.layers.0.mamba.in_proj.weight"])
    assert not any("exps" in n or "shexp" in n or "gate_inp" in n for n in t)
    a = "granitehybrid."
    assert kv["general.architecture"] == "granitehybrid" and kv[a + "feed_forward_length"] == 96 != c.intermediate_size
    assert not {a + k for k in ("expert_count", "expert_used_count", "expert_shared_feed_forward_length")} & set(kv)
    assert kv[a + "attention.head_count_kv"] == [0, 2] and kv[a + "residual_scale"] == c.residual_multiplier


# Falcon-H1's muP multipliers, every one away from 1 (the tiny config's embedding and head ones too)
FALCON = {"attention_in_multiplier": 0.5, "attention_out_multiplier": 1.5, "key_multiplier": 0.75,
          "ssm_in_multiplier": 1.25, "ssm_out_multiplier": 0.5, "mlp_multipliers": [1.5, 0.75],
          "ssm_multipliers": [0.5, 1.5, 0.75, 1.25, 2.0]}


def test_a_falcon_h1_gguf_folds_its_multipliers_into_the_weights(tmp_path, capsys, calib_txt):
    """Falcon-H1 (llama.cpp's falcon-h1 reads none of its muP multipliers): each folded into the weight it scales
    as transformers applies it (attention inputs into q / k / v, the key multiplier into k, outputs into o_proj and
    Mamba2's out_proj, the MLP's into gate and down, in_proj's rows by transformers' own mup_vector times
    ssm_in_multiplier); the tied embedding written twice, as the embedding and as the head, each with its
    multiplier; pre_ff_layernorm as the suffixless ffn_norm llama.cpp's loader asks for; Mamba2 as Granite's."""
    from transformers.models.falcon_h1.modeling_falcon_h1 import compute_mup_vector

    src, out, e = _family_export(tmp_path, capsys, calib_txt, "falcon_h1", **FALCON)
    ref, sd = _pruned(src)
    c = ref.config
    assert c.tie_word_embeddings and c.embedding_multiplier != c.lm_head_multiplier
    t, kv = _read(out / e["files"][0])
    p, b = "model.layers.1.", "blk.1."
    mup = compute_mup_vector(c).reshape(-1, 1) * c.ssm_in_multiplier
    for hf, name, factor in (("self_attn.q_proj", "attn_q", 0.5), ("self_attn.k_proj", "attn_k", 0.5 * 0.75),
                             ("self_attn.v_proj", "attn_v", 0.5), ("self_attn.o_proj", "attn_output", 1.5),
                             ("feed_forward.gate_proj", "ffn_gate", 1.5), ("feed_forward.up_proj", "ffn_up", 1.0),
                             ("feed_forward.down_proj", "ffn_down", 0.75), ("mamba.out_proj", "ssm_out", 0.5)):
        _same(t, f"{b}{name}.weight", sd[f"{p}{hf}.weight"] * factor)
    _same(t, b + "ssm_in.weight", sd[p + "mamba.in_proj.weight"] * mup)
    _same(t, "token_embd.weight", sd["model.embed_tokens.weight"] * c.embedding_multiplier)
    _same(t, "output.weight", sd["model.embed_tokens.weight"] * c.lm_head_multiplier)
    _same(t, b + "ffn_norm", sd[p + "pre_ff_layernorm.weight"])
    _same(t, b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
    _same(t, b + "ssm_a", -torch.exp(sd[p + "mamba.A_log"])[:, None])
    _same(t, b + "ssm_d", sd[p + "mamba.D"][:, None])
    assert b + "ssm_norm.weight" not in t  # (mamba_rms_norm False: gated, not normalized)
    assert kv["general.architecture"] == "falcon-h1" and kv["falcon-h1.ssm.inner_size"] == c.mamba_d_ssm
    assert kv["falcon-h1.ssm.time_step_rank"] == c.mamba_n_heads and kv["falcon-h1.attention.head_count_kv"] == 2


def test_a_nemotron_h_gguf_holds_one_mixer_a_layer_where_llama_cpp_reads_it(tmp_path, capsys, calib_txt):
    """Nemotron-H (llama.cpp's nemotron_h_moe): each layer's one mixer under llama.cpp's name for it (Mamba2 as
    Granite's, attention's q/k as stored: no RoPE, the gateless experts up / down as stored, the shared expert, the
    router F32 and its selection bias as exp_probs_b); which layer is which as per-layer head_count_kv and
    feed_forward_length (0 where the layer has none); the routing as metadata."""
    from llmprune.testing import byte_tokenizer, tiny_model

    m, src, out = tmp_path / "m", tmp_path / "s", tmp_path / "g"
    model = tiny_model("nemotron_h", num_hidden_layers=4, hybrid_override_pattern="M*EM")
    with torch.no_grad():  # (a selection bias that matters: transformers initializes it to zeros)
        model.model.layers[2].mixer.gate.e_score_correction_bias.normal_(0, 0.5)
    model.save_pretrained(m)
    byte_tokenizer().save_pretrained(m)
    assert main([str(a) for a in ("compress", "--model", m, "--calib", calib_txt, "--out", src, *FAST_CLI)]) == 0
    assert main([str(a) for a in ("export", src, "--to", "gguf", "--type", "f32", "--out", out, "--no-progress")]) == 0
    ref, sd = _pruned(src)
    c = ref.config
    t, kv = _read(next(out.glob("*.gguf")))
    p = "model.layers.{}.mixer."
    _same(t, "blk.0.ssm_in.weight", sd[p.format(0) + "in_proj.weight"])
    _same(t, "blk.3.ssm_a", -torch.exp(sd[p.format(3) + "A_log"])[:, None])
    _same(t, "blk.0.ssm_norm.weight", sd[p.format(0) + "norm.weight"].reshape(c.n_groups, -1))
    _same(t, "blk.0.ssm_dt.bias", sd[p.format(0) + "dt_bias"])
    _same(t, "blk.1.attn_q.weight", sd[p.format(1) + "q_proj.weight"])
    _same(t, "blk.1.attn_output.weight", sd[p.format(1) + "o_proj.weight"])
    _same(t, "blk.2.ffn_up_exps.weight", sd[p.format(2) + "experts.up_proj"])
    _same(t, "blk.2.ffn_down_exps.weight", sd[p.format(2) + "experts.down_proj"])
    _same(t, "blk.2.ffn_up_shexp.weight", sd[p.format(2) + "shared_experts.up_proj.weight"])
    _same(t, "blk.2.ffn_gate_inp.weight", sd[p.format(2) + "gate.weight"])
    bias = sd[p.format(2) + "gate.e_score_correction_bias"]
    assert bool((bias != 0).all())
    _same(t, "blk.2.exp_probs_b.bias", bias)
    _same(t, "blk.2.attn_norm.weight", sd["model.layers.2.norm.weight"])
    _same(t, "output_norm.weight", sd["model.norm_f.weight"])
    a = "nemotron_h_moe."
    assert kv["general.architecture"] == "nemotron_h_moe"
    assert kv[a + "attention.head_count_kv"] == [0, c.num_key_value_heads, 0, 0]
    assert kv[a + "feed_forward_length"] == [0, 0, c.moe_intermediate_size, 0]
    assert (kv[a + "expert_count"], kv[a + "expert_used_count"], kv[a + "expert_shared_count"],
            kv[a + "expert_weights_norm"], kv[a + "ssm.time_step_rank"], kv[a + "ssm.inner_size"]) == \
        (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts, c.norm_topk_prob, c.mamba_num_heads,
         c.mamba_num_heads * c.mamba_head_dim)


def test_a_dense_nemotron_h_gguf_is_llama_cpps_nemotron_h(tmp_path, capsys, calib_txt):
    """Nemotron-H with relu^2 MLPs and no experts (Nemotron Nano 2): llama.cpp's nemotron_h (as its converter writes
    it; nemotron_h_moe is the experts' variant), each MLP's up / down as ffn_up / ffn_down, which layer is which as
    per-layer head_count_kv and feed_forward_length (the MLP's width, 0 elsewhere), no experts' metadata."""
    src, out, e = _family_export(tmp_path, capsys, calib_txt, "nemotron_h", types="f32", num_hidden_layers=4,
                                 hybrid_override_pattern="M*-M")
    ref, sd = _pruned(src)
    c = ref.config
    t, kv = _read(out / e["files"][0])
    p = "model.layers.2.mixer."
    up = sd[p + "up_proj.weight"]
    assert int((up == 0).sum()) > 0  # (pruned)
    _same(t, "blk.2.ffn_up.weight", up)
    _same(t, "blk.2.ffn_down.weight", sd[p + "down_proj.weight"])
    _same(t, "blk.3.ssm_in.weight", sd["model.layers.3.mixer.in_proj.weight"])
    assert not any("exps" in n or "exp_probs" in n for n in t)
    a = "nemotron_h."
    assert kv["general.architecture"] == "nemotron_h"
    assert kv[a + "attention.head_count_kv"] == [0, c.num_key_value_heads, 0, 0]
    assert kv[a + "feed_forward_length"] == [0, 0, up.shape[0], 0]
    assert a + "expert_count" not in kv


@pytest.mark.parametrize("over", [{"intermediate_size": 192}, {"intermediate_size": 200, "block_multiple_of": 32},
                                  {"intermediate_size": 300, "block_ffn_dim_multiplier": 1.5, "block_multiple_of": 64}])
def test_lfm2s_feed_forward_length_is_the_width_transformers_builds(over):
    """LFM2's real checkpoints adjust the MLP width from intermediate_size (block_auto_adjust_ff_dim): GGUF's
    feed_forward_length is the width of the model transformers builds from that config."""
    from llmprune.export.gguf_arch import ffn_width
    from llmprune.testing import tiny_model

    m = tiny_model("lfm2", block_auto_adjust_ff_dim=True, **over)
    assert ffn_width(m.config) == m.model.layers[0].feed_forward.w1.weight.shape[0]


@pytest.mark.parametrize("arch,over,want", [
    ("qwen3_5_text", {}, "M-RoPE sections [11, 11, 10, 0]"),  # transformers' default, wider than the tiny head
    ("qwen3_5_text", {**QWEN35, "linear_value_head_dim": 32}, "linear-attention head sizes"),
    ("qwen3_5_text", {**QWEN35, "layer_types": ["linear_attention", "sliding_attention"]}, "layer types"),
    ("qwen3_next", {"norm_topk_prob": False}, "norm_topk_prob"),
    ("qwen3_next", {"mlp_only_layers": [0]}, "dense MLP layers"),
    ("qwen3_next", {"attention_bias": True}, "attention biases"),
    ("lfm2", {"conv_bias": True}, "convolution biases"),
    ("granitemoehybrid", {"mamba_expand": 3, "mamba_d_head": 48}, "Mamba2 width"),
    ("granitemoehybrid", {"time_step_limit": (0.001, 0.1)}, "time-step limits"),
    ("granitemoehybrid", {"mamba_proj_bias": True}, "biases"),
    ("granitemoehybrid", {"num_local_experts": 0, "attention_bias": True}, "biases"),  # (without experts too)
    ("falcon_h1", {"mamba_rms_norm": True, "mamba_norm_before_gate": True}, "norm before its gate"),
    ("falcon_h1", {"time_step_limit": (0.001, 0.1)}, "time-step limits"),
    ("falcon_h1", {"projectors_bias": True}, "biases"),
    ("nemotron_h", {"hybrid_override_pattern": "M*-E"}, "experts and dense MLPs together"),
    ("nemotron_h", {"moe_latent_size": 32}, "latent MoE"),
    ("nemotron_h", {"mlp_hidden_act": "silu"}, "activations")])
def test_hybrid_variants_llama_cpp_would_misread_are_refused(arch, over, want):
    """What llama.cpp's graphs assume rather than read: refused from the config alone (`check_config`)."""
    from llmprune.errors import LLMPruneError
    from llmprune.export.gguf_arch import check_config
    from llmprune.testing import tiny_config

    with pytest.raises(LLMPruneError, match="compressed-tensors") as err:
        check_config(tiny_config(arch, **over))
    assert want in str(err.value)


def test_a_refused_hybrid_variant_writes_nothing(tmp_path, capsys, calib_txt):
    """The refusal as `llmprune export` gives it: one line, exit 2, no output folder."""
    from llmprune.testing import tiny_model_dir

    m = tiny_model_dir(tmp_path / "m", "lfm2", conv_bias=True)
    src = tmp_path / "s"
    assert main([str(a) for a in ("compress", "--model", m, "--calib", calib_txt, "--out", src, *FAST_CLI)]) == 0
    _refused(capsys, tmp_path, src, "--to", "gguf", want="convolution biases")
