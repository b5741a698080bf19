"""GGUF for gpt-oss, Llama 4 and DeepSeek-V3: large MoE families no transformers GGUF reader takes (llama.cpp runs
them in bench/llamacpp_families.py). Each F32 file is read back with gguf's GGUFReader: every tensor llama.cpp reads
of the pruned model where it reads it, checked against transformers' own modules computing with the pruned weights
(an expert, MLA's key / value decompression) through the arithmetic llama.cpp applies to the GGUF tensors, the
metadata llama.cpp reads, and the variants llama.cpp would misread refused."""
import json

import numpy as np
import pytest
import torch

from llmprune.cli import main
from llmprune.testing import FAST_CLI, byte_tokenizer, tiny_config, tiny_model

# tiny models of what llama.cpp assumes (Llama 4: 8192-token chunks and temperature tuning from 8192 tokens, every
# 4th layer without RoPE: 4 layers; experts every 2nd)
OVER = {"gpt_oss": {}, "deepseek_v3": {},
        "llama4_text": {"num_hidden_layers": 4, "no_rope_layer_interval": 4, "attention_chunk_size": 8192,
                        "floor_scale": 8192}}


def _export(arch, tmp_path_factory, calib_txt):
    """(the pruned model, {gguf name: array} of its F32 file, its metadata, {name: type} of its Q8_0 file)."""
    import gguf

    import llmprune

    root = tmp_path_factory.mktemp(arch)
    m, src, out = root / "m", root / "s", root / "g"
    tiny_model(arch, **OVER[arch]).save_pretrained(m)
    byte_tokenizer().save_pretrained(m)
    assert main([str(a) for a in ("compress", "--model", m, "--calib", calib_txt, "--out", src, *FAST_CLI)]) == 0
    assert main([str(a) for a in ("export", src, "--to", "gguf", "--type", "f32,q8_0", "--out", out,
                                  "--no-progress")]) == 0
    files = json.loads((out / "llmprune.json").read_text())["export"]["files"]
    r = gguf.GGUFReader(out / files[0])
    tensors = {t.name: np.array(t.data) for t in r.tensors}
    assert {t.tensor_type.name for t in r.tensors} == {"F32"}
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith(("GGUF.", "tokenizer."))}
    q8 = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / files[1]).tensors}
    ref, _, _ = llmprune.load(str(src))
    return ref.eval(), tensors, meta, q8


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory, calib_txt):
    return _export("gpt_oss", tmp_path_factory, calib_txt)


@pytest.fixture(scope="module")
def llama4(tmp_path_factory, calib_txt):
    return _export("llama4_text", tmp_path_factory, calib_txt)


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory, calib_txt):
    return _export("deepseek_v3", tmp_path_factory, calib_txt)


def _sd(model):
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _zeros_kept(want, got):
    """The pruned zeros are zeros where llama.cpp reads them (so the test sees a pruned model, not a dense one)."""
    return int((want == 0).sum()) > 0 and np.array_equal(want, got)


def test_gpt_oss_experts_as_llama_cpp_computes_them(gpt_oss):
    """gpt-oss: transformers stores experts (experts, hidden, 2 x width), gate and up alternating along the width,
    with biases; llama.cpp's ffn_{gate,up,down}_exps are (experts, out, in) with biases of their own. Each expert
    through llama.cpp's SwiGLU-OAI (alpha 1.702, limit 7, up + 1) on the GGUF tensors gives what transformers'
    GptOssExperts gives for tokens routed to it alone."""
    ref, t, meta, q8 = gpt_oss
    cfg = ref.config
    for i in range(cfg.num_hidden_layers):
        b, mlp = f"blk.{i}.", ref.model.layers[i].mlp
        x = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(i))
        for e in range(cfg.num_local_experts):
            with torch.no_grad():
                want = mlp.experts(x, torch.full((5, 1), e), torch.ones(5, 1)).numpy()
            xn = x.numpy().astype(np.float64)
            gate = xn @ t[b + "ffn_gate_exps.weight"][e].T + t[b + "ffn_gate_exps.bias"][e]
            up = xn @ t[b + "ffn_up_exps.weight"][e].T + t[b + "ffn_up_exps.bias"][e]
            gate, up = np.minimum(gate, 7.0), np.clip(up, -7.0, 7.0)
            act = gate / (1 + np.exp(-1.702 * gate)) * (up + 1)
            got = act @ t[b + "ffn_down_exps.weight"][e].T + t[b + "ffn_down_exps.bias"][e]
            assert np.allclose(got, want, rtol=1e-4, atol=1e-5), (i, e, np.abs(got - want).max())
    sd = _sd(ref)
    p = "model.layers.1."
    assert _zeros_kept(sd[p + "mlp.experts.down_proj"].transpose(0, 2, 1), t["blk.1.ffn_down_exps.weight"])
    assert np.array_equal(t["blk.1.attn_sinks.weight"], sd[p + "self_attn.sinks"])
    assert np.array_equal(t["blk.1.ffn_gate_inp.weight"], sd[p + "mlp.router.weight"])
    assert np.array_equal(t["blk.1.ffn_gate_inp.bias"], sd[p + "mlp.router.bias"])
    assert np.array_equal(t["blk.1.attn_q.weight"], sd[p + "self_attn.q_proj.weight"])  # NeoX RoPE: as stored
    assert np.array_equal(t["blk.1.attn_output.bias"], sd[p + "self_attn.o_proj.bias"])
    assert np.array_equal(t["blk.1.post_attention_norm.weight"], sd[p + "post_attention_layernorm.weight"])
    assert np.array_equal(t["output.weight"], sd["model.embed_tokens.weight"])  # tied: llama.cpp requires the head
    # llama.cpp adds expert biases as F32 (ggml_add_id): F32 in the Q8_0 file too, the matrices Q8_0
    assert q8["blk.1.ffn_gate_exps.bias"] == q8["blk.1.ffn_down_exps.bias"] == "F32"
    assert q8["blk.1.ffn_gate_exps.weight"] == "Q8_0"
    assert meta["general.architecture"] == "gpt-oss"
    assert meta["gpt-oss.expert_feed_forward_length"] == cfg.intermediate_size
    assert meta["gpt-oss.expert_count"] == cfg.num_local_experts
    assert meta["gpt-oss.attention.sliding_window"] == cfg.sliding_window
    assert list(meta["gpt-oss.attention.sliding_window_pattern"]) == [x == "sliding_attention" for x in
                                                                       cfg.layer_types] == [True, False]


def test_llama4_experts_dense_and_shared_mlps_where_llama_cpp_reads_them(llama4):
    """Llama 4: experts (experts, hidden, 2 x width), gate then up along the width, down (experts, width, hidden):
    llama.cpp's (experts, out, in) give each expert transformers' Llama4TextExperts output; experts every
    interleave_moe_layer_step-th block, the other blocks' MLPs intermediate_size_mlp wide (feed_forward_length), the
    experts' and shared expert's intermediate_size (expert_feed_forward_length); the chunked layers as an array."""
    ref, t, meta, q8 = llama4
    cfg, sd = ref.config, _sd(ref)
    assert cfg.moe_layers == [1, 3]
    for i in cfg.moe_layers:
        b, ff = f"blk.{i}.", ref.model.layers[i].feed_forward
        x = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():  # transformers' experts take their tokens grouped by expert: every expert gets x
            want = ff.experts(x.repeat(cfg.num_local_experts, 1)).view(cfg.num_local_experts, 5, -1).numpy()
        xn = x.numpy().astype(np.float64)
        for e in range(cfg.num_local_experts):
            gate, up = xn @ t[b + "ffn_gate_exps.weight"][e].T, xn @ t[b + "ffn_up_exps.weight"][e].T
            got = (gate / (1 + np.exp(-gate)) * up) @ t[b + "ffn_down_exps.weight"][e].T
            assert np.allclose(got, want[e], rtol=1e-4, atol=1e-5), (i, e, np.abs(got - want[e]).max())
        p = f"model.layers.{i}.feed_forward."
        assert _zeros_kept(sd[p + "experts.down_proj"].transpose(0, 2, 1), t[b + "ffn_down_exps.weight"])
        assert np.array_equal(t[b + "ffn_gate_inp.weight"], sd[p + "router.weight"])
        for proj, name in (("gate_proj", "ffn_gate_shexp"), ("up_proj", "ffn_up_shexp"), ("down_proj", "ffn_down_shexp")):
            assert np.array_equal(t[f"{b}{name}.weight"], sd[f"{p}shared_expert.{proj}.weight"])
        assert f"blk.{i - 1}.ffn_gate_inp.weight" not in t
        assert np.array_equal(t[f"blk.{i - 1}.ffn_gate.weight"], sd[f"model.layers.{i - 1}.feed_forward.gate_proj.weight"])
    assert t["blk.0.ffn_down.weight"].shape == (cfg.hidden_size, cfg.intermediate_size_mlp)
    assert np.array_equal(t["blk.2.ffn_norm.weight"], sd["model.layers.2.post_attention_layernorm.weight"])
    # transformers' Llama 4 RoPE already rotates adjacent pairs, as llama.cpp's: q / k as stored
    assert np.array_equal(t["blk.0.attn_q.weight"], sd["model.layers.0.self_attn.q_proj.weight"])
    assert meta["general.architecture"] == "llama4"
    assert meta["llama4.feed_forward_length"] == cfg.intermediate_size_mlp
    assert meta["llama4.expert_feed_forward_length"] == cfg.intermediate_size
    assert meta["llama4.interleave_moe_layer_step"] == 2
    assert list(meta["llama4.attention.sliding_window_pattern"]) == [True, True, True, False]  # chunked layers
    assert "output.weight" not in t  # tied: llama.cpp's llama4 falls back to the embedding


def test_deepseek_v3_mla_and_moe_where_llama_cpp_reads_them(deepseek):
    """DeepSeek-V3: kv_b_proj as llama.cpp's MLA reads it, attn_k_b (heads, rank, nope) and attn_v_b (heads, v,
    rank): absorbed into the query and applied to the attention output as llama.cpp does, they give transformers'
    decompressed keys and values; the leading dense block, the shared expert, the router's selection bias as
    exp_probs_b; MLA's lengths, one KV head, sigmoid gating, the routed scaling."""
    ref, t, meta, q8 = deepseek
    cfg, sd = ref.config, _sd(ref)
    h, nope, v, rank = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    c = torch.randn(7, rank, generator=torch.Generator().manual_seed(0))
    for i in range(cfg.num_hidden_layers):
        b, attn = f"blk.{i}.", ref.model.layers[i].self_attn
        with torch.no_grad():  # transformers: kv_b_proj, then per head the no-RoPE key part and the value
            kv = attn.kv_b_proj(c).view(7, h, nope + v)
        k_b, v_b = t[b + "attn_k_b.weight"], t[b + "attn_v_b.weight"]
        assert k_b.shape == (h, rank, nope) and v_b.shape == (h, v, rank)
        q = np.random.default_rng(i).standard_normal((h, nope))
        for j in range(h):  # llama.cpp: q_nope absorbed by attn_k_b scores against the compressed kv
            absorbed = k_b[j] @ q[j]
            assert np.allclose(c.numpy() @ absorbed, kv[:, j, :nope].numpy() @ q[j], rtol=1e-4, atol=1e-5)
            assert np.allclose(c.numpy() @ v_b[j].T, kv[:, j, nope:].numpy(), rtol=1e-4, atol=1e-5)
        p = f"model.layers.{i}."
        for name, key in (("attn_q_a", "q_a_proj"), ("attn_q_b", "q_b_proj"), ("attn_kv_a_mqa", "kv_a_proj_with_mqa"),
                          ("attn_q_a_norm", "q_a_layernorm"), ("attn_kv_a_norm", "kv_a_layernorm")):
            assert np.array_equal(t[f"{b}{name}.weight"], sd[f"{p}self_attn.{key}.weight"]), name
    assert np.array_equal(t["blk.0.ffn_gate.weight"], sd["model.layers.0.mlp.gate_proj.weight"])  # dense lead
    assert "blk.0.ffn_gate_inp.weight" not in t
    p, width = "model.layers.2.mlp.", cfg.moe_intermediate_size
    experts = sd[p + "experts.gate_up_proj"]  # (experts, 2 x width, hidden): gate, then up
    assert np.array_equal(t["blk.2.ffn_gate_exps.weight"], experts[:, :width])
    assert np.array_equal(t["blk.2.ffn_up_exps.weight"], experts[:, width:])
    assert _zeros_kept(sd[p + "experts.down_proj"], t["blk.2.ffn_down_exps.weight"])
    assert np.array_equal(t["blk.2.exp_probs_b.bias"], sd[p + "gate.e_score_correction_bias"])
    assert np.array_equal(t["blk.2.ffn_up_shexp.weight"], sd[p + "shared_experts.up_proj.weight"])
    assert q8["blk.2.exp_probs_b.bias"] == q8["blk.2.ffn_gate_inp.weight"] == "F32"
    n = "deepseek2."
    assert meta["general.architecture"] == "deepseek2"
    assert meta[n + "attention.head_count_kv"] == 1  # llama.cpp runs MLA as MQA over the compressed kv
    assert (meta[n + "attention.q_lora_rank"], meta[n + "attention.kv_lora_rank"]) == (cfg.q_lora_rank, rank)
    assert (meta[n + "attention.key_length"], meta[n + "attention.value_length"]) == (rank + cfg.qk_rope_head_dim,
                                                                                        rank)
    assert (meta[n + "attention.key_length_mla"], meta[n + "attention.value_length_mla"]) == (
        nope + cfg.qk_rope_head_dim, v)
    assert meta[n + "rope.dimension_count"] == cfg.qk_rope_head_dim
    assert meta[n + "leading_dense_block_count"] == cfg.first_k_dense_replace == 1
    assert meta[n + "expert_shared_count"] == cfg.n_shared_experts
    assert meta[n + "expert_feed_forward_length"] == width
    assert meta[n + "expert_weights_scale"] == pytest.approx(cfg.routed_scaling_factor)
    assert meta[n + "expert_weights_norm"] is True
    assert meta[n + "expert_gating_func"] == 2  # sigmoid (llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID)


def test_deepseek_v3_without_a_q_rank_is_written_with_rank_0(tmp_path, calib_txt):
    """DeepSeek-V2-Lite-style queries (one q_proj): q_lora_rank 0, which llama.cpp reads as attn_q."""
    import gguf

    m, src, out = tmp_path / "m", tmp_path / "s", tmp_path / "g"
    tiny_model("deepseek_v3", q_lora_rank=None).save_pretrained(m)
    byte_tokenizer().save_pretrained(m)
    assert main([str(a) for a in ("compress", "--model", m, "--calib", calib_txt, "--out", src, *FAST_CLI)]) == 0
    assert main([str(a) for a in ("export", src, "--to", "gguf", "--type", "f32", "--out", out, "--no-progress")]) == 0
    r = gguf.GGUFReader(next(out.glob("*.gguf")))
    assert r.fields["deepseek2.attention.q_lora_rank"].contents() == 0
    names = {x.name for x in r.tensors}
    assert "blk.1.attn_q.weight" in names and "blk.1.attn_q_a.weight" not in names


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "original_max_position_embeddings": 4096}


@pytest.mark.parametrize("arch, over", [
    ("gpt_oss", {"rope_parameters": {**YARN, "truncate": True}}),
    ("deepseek_v3", {"rope_parameters": {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}}),
])
def test_yarn_metadata_llama_cpp_reads(tmp_path, arch, over):
    """YaRN as llama.cpp reads it for gpt-oss and DeepSeek (bench/llamacpp_families.py runs both): the type, the
    factor, the original context; DeepSeek's mscale_all_dim as its yarn_log_multiplier (0.1 x, llama.cpp divides
    it out) which scales the softmax as transformers' yarn_apply_mscale does."""
    import gguf

    from llmprune.export.gguf_arch import ARCHS, add_hparams, check_config

    cfg = tiny_config(arch, max_position_embeddings=131072, **over)
    check_config(cfg)
    a = ARCHS[arch]
    w = gguf.GGUFWriter(tmp_path / "h.gguf", gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, a.name)])
    add_hparams(w, cfg, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    name = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, a.name)]
    f = {k: v.contents() for k, v in gguf.GGUFReader(tmp_path / "h.gguf").fields.items()}
    assert f[f"{name}.rope.scaling.type"] == "yarn"
    assert f[f"{name}.rope.scaling.factor"] == 32.0
    assert f[f"{name}.rope.scaling.original_context_length"] == 4096
    assert (f.get(f"{name}.rope.scaling.yarn_log_multiplier") is not None) == (arch == "deepseek_v3")
    if arch == "deepseek_v3":
        assert f[f"{name}.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.0707)


def test_gpt_oss_as_released_is_written_with_what_llama_cpp_computes_otherwise(tmp_path, capsys, calib_txt):
    """gpt-oss's own YaRN leaves its correction range unrounded (truncate: false), which llama.cpp rounds whatever
    the file says, as it runs every gpt-oss GGUF: written (refusing it refused every gpt-oss), and the export's note,
    in its manifest and on screen, says how many frequencies differ: those whose ramp the rounding moves, counted
    here from the YaRN formula (transformers' own with truncate true and false is what the code compares)."""
    import math

    from transformers import GptOssConfig

    from llmprune.export.gguf_arch import engine_note

    rp = GptOssConfig().rope_parameters  # as released: factor 32 over 4096 tokens, base 150000, truncate false
    assert rp["rope_type"] == "yarn" and rp["truncate"] is False
    m, src, out = tmp_path / "m", tmp_path / "s", tmp_path / "g"
    tiny_model("gpt_oss", max_position_embeddings=131072, rope_parameters=dict(rp)).save_pretrained(m)
    byte_tokenizer().save_pretrained(m)
    assert main([str(a) for a in ("compress", "--model", m, "--calib", calib_txt, "--out", src, *FAST_CLI)]) == 0
    capsys.readouterr()
    assert main([str(a) for a in ("export", src, "--to", "gguf", "--type", "f32", "--out", out, "--no-progress")]) == 0
    e = json.loads((out / "llmprune.json").read_text())["export"]
    cfg = tiny_config("gpt_oss", rope_parameters=dict(rp))
    d = cfg.head_dim

    def dim(beta):  # the dimension whose wavelength is orig / beta rotations (YaRN's find_correction_dim)
        return d * math.log(4096 / (beta * 2 * math.pi)) / (2 * math.log(150000.0))

    lo, hi = dim(32.0), dim(1.0)
    moved = sum(1 for i in range(d // 2) if (i - lo) / (hi - lo) != (i - math.floor(lo)) / (math.ceil(hi) -
                                                                                              math.floor(lo))
                and not (i <= math.floor(lo) and i <= lo) and not (i >= math.ceil(hi) and i >= hi))
    assert moved > 0 and e["note"].startswith(f"llama.cpp rounds YaRN's correction range outwards, which this "
                                              f"model's (truncate: false) is not: {moved} of its {d // 2} RoPE")
    assert e["note"] in capsys.readouterr().out
    assert engine_note(tiny_config("gpt_oss", rope_parameters={**rp, "truncate": True})) is None


@pytest.mark.parametrize("arch, over, want", [
    ("gpt_oss", {"swiglu_limit": 8.0}, "SwiGLU alpha / limit"),
    ("gpt_oss", {"attention_bias": False}, "attention biases"),
    ("gpt_oss", {"rope_parameters": {**YARN, "beta_fast": 16.0}}, "beta_fast 16.0"),
    ("llama4_text", {}, "attention chunk (16)"),  # the tiny family's 16-token chunks
    ("llama4_text", {**OVER["llama4_text"], "no_rope_layer_interval": 2}, "no-RoPE layers"),
    ("llama4_text", {**OVER["llama4_text"], "moe_layers": [0, 1, 2, 3]}, "MoE layers"),
    ("llama4_text", {**OVER["llama4_text"], "use_qk_norm": False}, "q/k norm"),
    ("deepseek_v3", {"rope_interleave": False}, "rope_interleave"),
    ("deepseek_v3", {"attention_bias": True}, "attention biases"),
    ("deepseek_v3", {"num_hidden_layers": 27}, "q_lora_rank (32) at 27 layers"),
    ("deepseek_v3", {"rope_parameters": YARN}, "mscale None"),  # its rotary dims scaled, not the softmax
    ("deepseek_v3", {"rope_parameters": {**YARN, "mscale": 1.0, "mscale_all_dim": 0.707}}, "mscale 1.0"),
    ("llama4_text", {**OVER["llama4_text"], "rope_parameters": YARN}, "RoPE scaling 'yarn'"),
])
def test_big_variants_llama_cpp_would_misread_are_refused(arch, over, want):
    from llmprune.errors import LLMPruneError
    from llmprune.export.gguf_arch import check_config

    with pytest.raises(LLMPruneError, match="compressed-tensors") as e:
        check_config(tiny_config(arch, **over))
    assert want in str(e.value)
    check_config(tiny_config(arch, **OVER[arch]))  # the family itself is written
