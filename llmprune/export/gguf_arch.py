"""Each family as llama.cpp reads its GGUF: what the file holds for it (`ARCHS`, `GGUFArch`; the tensors'
layout in gguf_tensors.py), what llama.cpp assumes for the architecture rather than reads, refused when the
model differs (`check_config`), the metadata it reads (`add_hparams`, `rope`), and what llama.cpp computes
otherwise from a file that holds the model exactly (`engine_note`).

Layout as llama.cpp's converter (convert_hf_to_gguf.py) writes these architectures (tensor names from
gguf's own TensorNameMap):
  llama, mistral,   q_proj / k_proj rows permuted per head (HF's rotate-half RoPE pairs -> llama.cpp's
  mixtral           adjacent pairs); Llama 3.1's RoPE scaling as the `rope_freqs` tensor; YaRN as metadata
                    (`add_yarn`: Llama, Mistral, and GLM-4, OLMo 2, SmolLM3, Seed-OSS, EXAONE 4.0, Apertus too)
  qwen2, qwen3      as stored (llama.cpp's NeoX RoPE is HF's rotate-half); q/k norms (Qwen3); YaRN (theirs and
                    their MoE's long-context configs) as metadata (`add_yarn`)
  MoE (mixtral,     the fused experts (experts, 2 x width, hidden) split into ffn_gate_exps / ffn_up_exps,
  qwen*_moe)        down as ffn_down_exps; the router F32; Qwen2-MoE's shared-expert gate as a vector
  phi3, glm4        fused qkv_proj / gate_up_proj as they are (llama.cpp splits them); GLM-4's partial RoPE;
                    Phi-3's LongRoPE (128k, Phi-3.5, Phi-4-mini) as `rope_factors_long` / `rope_factors_short`
  olmo2             as stored (post-norms, q/k norms over whole projections)
  gemma2, gemma3    every RMSNorm weight stored as 1 + w (Gemma scales by 1 + w; llama.cpp by w)
  smollm3           as llama (q/k permuted); llama.cpp leaves every 4th layer without RoPE (checked)
  seed_oss, exaone4 as stored (Seed-OSS' q/k/v biases; EXAONE 4.0's post-norms and q/k norms, its sliding
                    window and the layers' pattern at 64 layers, the only depth llama.cpp slides at)
  apertus           as stored; its xIELU activation's per-layer parameters as metadata (`SCALARS`)
  olmo3             as olmo2, with the sliding window and the layers' pattern; YaRN on the full layers alone
  glm4_moe, olmoe,  experts split as above; shared experts as ffn_*_shexp, the router's selection bias
  ernie4_5_moe,     (e_score_correction_bias) as exp_probs_b; leading dense blocks, sigmoid gating, routed
  hunyuan_v1_moe    scaling and top-k normalization (GLM-4.5) as metadata (`MOE_KV`); ERNIE's interleaved
                    RoPE as stored (llama.cpp's normal RoPE); HunYuan's NTK-alpha RoPE as its scaled base;
                    GLM-4.5's MTP layers, which transformers does not hold, not written
  minimax_m2        Mixtral's experts split as above, the router's bias (mlp.e_score_correction_bias) as
                    exp_probs_b, sigmoid gating (`MOE_KV`); q/k norms as stored (over whole projections, as
                    llama.cpp's); partial RoPE as rope.dimension_count; the tied head written out
  gpt_oss           experts (experts, hidden, 2 x width), gate / up alternating, split and transposed to
                    (experts, width, hidden), down transposed; their biases split alike, kept F32; attention
                    sinks; the sliding layers' pattern; dense experts (not MXFP4) in the chosen type; YaRN
                    as metadata (llama.cpp rounds its correction range, gpt-oss's own checkpoints do not:
                    written, and said in the export's note, `engine_note`)
  llama4_text       experts (experts, hidden, 2 x width), gate then up, split and transposed; the shared
                    expert as ffn_*_shexp; q/k as stored (its RoPE pairs are adjacent); the chunked layers'
                    pattern; llama.cpp's fixed 8192-token chunks and no-RoPE every 4th layer checked
  deepseek_v3       MLA: kv_b_proj split per head into attn_k_b (heads, rank, nope) and attn_v_b (heads, v,
                    rank), one KV head (llama.cpp runs MLA as MQA over the compressed KV); experts, shared
                    experts and routing as glm4_moe (`MOE_KV`); q_lora_rank 0 without a q rank (q_proj);
                    YaRN as metadata, mscale_all_dim as yarn_log_multiplier
  qwen3_5_text,     Gated DeltaNet layers: A_log as -exp(A_log) (ssm_a), dt_bias as ssm_dt.bias, the conv
  qwen3_next        kernel 2-D; Qwen3.5's V heads (grouped by K head in HF) in llama.cpp's tiled order in every
                    tensor holding them, Qwen3-Next's fused in_proj_qkvz split into attn_qkv and attn_gate;
                    every RMSNorm but the DeltaNet's gated one as 1 + w; the gated attention's q_proj as stored;
                    which layers are recurrent, Qwen3.5's M-RoPE sections as metadata (`add_hybrid_hparams`)
  lfm2              short-conv kernels 2-D; each layer's kind as head_count_kv (0: convolution)
  granitemoehybrid  Mamba2: A_log as -exp(A_log), A and D as (heads, 1), the gated norm (groups, width / groups),
                    all F32; the shared MLP's input_linear split into gate / up; q/k permuted as llama; the
                    multipliers as metadata, RoPE switched on by rope_finetuned; without experts (H-Micro) the
                    shared MLP as llama.cpp's dense one (`arch_for`)
  falcon_h1         Mamba2 as granitemoehybrid, beside attention in each block; q/k as stored (NeoX RoPE); its muP
                    multipliers (which llama.cpp does not read) folded into the weights they scale (`falcon_mup`),
                    the tied embedding written twice (embedding and head multipliers differ)
  nemotron_h        (llama.cpp's nemotron_h_moe; without experts, its nemotron_h) one mixer a layer, renamed to the
                    names gguf's map knows: Mamba2 as granitemoehybrid, attention as stored (no RoPE), gateless
                    experts or relu^2 MLPs as stored, the router's bias as exp_probs_b; each layer's kind as
                    per-layer head_count_kv / feed_forward_length
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import LLMPruneError
from ..llamacpp import llama3_factors, longrope_attention_factor, query_scale


@dataclass(frozen=True)
class GGUFArch:
    name: str  # gguf.MODEL_ARCH member name
    norm_plus_one: bool = False  # store RMSNorm weights as 1 + w
    permute_qk: bool = False  # llama.cpp's interleaved RoPE layout for q/k rows
    rope_types: tuple[str, ...] = ("default",)  # RoPE scalings llama.cpp reads for this architecture
    moe: bool = False  # fused 3-D experts (transformers' gate_up_proj / down_proj)
    head_required: bool = False  # llama.cpp's loader needs output.weight: a tied head is written out
    experts_transposed: bool = False  # experts stored (experts, in, out): gpt-oss, Llama 4
    experts_interleaved: bool = False  # gate_up_proj's gate and up alternate along its width (gpt-oss)
    expert_width: str = "moe_intermediate_size"  # the config field llama.cpp's expert_feed_forward_length is
    mla: bool = False  # DeepSeek's latent attention: kv_b_proj as attn_k_b / attn_v_b, one KV head (`add_mla_hparams`)
    plain_norms: tuple[str, ...] = ()  # with norm_plus_one: the norms (name suffixes) scaling by w, stored as they are
    linear_attn: str = ""  # Gated DeltaNet layers' V-head order llama.cpp wants: "tiled" (Qwen3.5), "grouped" (Next)
    kv_per_layer: bool = False  # head_count_kv an array, 0 for recurrent layers (how llama.cpp's LFM2 tells them)
    mamba: bool = False  # Mamba2 mixers (A_log as -exp, A and D as (heads, 1), the gated norm per group)
    renames: tuple[tuple[str, str], ...] = ()  # HF name parts -> the ones gguf's TensorNameMap knows them by


# YaRN where llama.cpp's graph passes its generic scaling into every RoPE (rope.scaling.*: `add_yarn`): Qwen's
# long-context configs, OLMo 3's full-attention layers, and the Llama-like families' (run by llama.cpp on each)
_YARN = ("default", "yarn")
_LLAMA3_YARN = ("default", "llama3", "yarn")
_GATED_NORM = ("linear_attn.norm.weight",)  # the DeltaNet output norm scales by w, every other norm by 1 + w
ARCHS = {"llama": GGUFArch("LLAMA", permute_qk=True, rope_types=_LLAMA3_YARN),
         "mistral": GGUFArch("LLAMA", permute_qk=True, rope_types=_YARN),
         "mixtral": GGUFArch("LLAMA", permute_qk=True, moe=True),
         "qwen2": GGUFArch("QWEN2", rope_types=_YARN), "qwen3": GGUFArch("QWEN3", rope_types=_YARN),
         "qwen2_moe": GGUFArch("QWEN2MOE", moe=True, head_required=True, rope_types=_YARN),
         "qwen3_moe": GGUFArch("QWEN3MOE", moe=True, rope_types=_YARN),
         "phi3": GGUFArch("PHI3", rope_types=("default", "longrope")),
         "olmo2": GGUFArch("OLMO2", head_required=True, rope_types=_YARN), "glm4": GGUFArch("GLM4", rope_types=_YARN),
         "gemma2": GGUFArch("GEMMA2", norm_plus_one=True), "gemma3_text": GGUFArch("GEMMA3", norm_plus_one=True),
         "smollm3": GGUFArch("SMOLLM3", permute_qk=True, rope_types=_YARN),
         "seed_oss": GGUFArch("SEED_OSS", rope_types=_YARN),
         "apertus": GGUFArch("APERTUS", rope_types=_LLAMA3_YARN, head_required=True),
         "exaone4": GGUFArch("EXAONE4", rope_types=_LLAMA3_YARN),
         "olmo3": GGUFArch("OLMO2", head_required=True, rope_types=_YARN),
         # MoE with shared experts, a leading dense block or a routing of their own (HunYuan's experts and shared
         # MLP are intermediate_size wide; OLMoE's too, which llama.cpp reads as feed_forward_length; MiniMax-M2's
         # experts, Mixtral's, intermediate_size wide, read as both)
         "glm4_moe": GGUFArch("GLM4_MOE", moe=True), "olmoe": GGUFArch("OLMOE", moe=True, head_required=True),
         "minimax_m2": GGUFArch("MINIMAXM2", moe=True, head_required=True, expert_width="intermediate_size"),
         "ernie4_5_moe": GGUFArch("ERNIE4_5_MOE", moe=True),
         "hunyuan_v1_moe": GGUFArch("HUNYUAN_MOE", moe=True, expert_width="intermediate_size",
                                    rope_types=("default", "dynamic")),
         # MoE whose experts transformers stores transposed (experts, in, out); DeepSeek's latent attention
         "gpt_oss": GGUFArch("GPT_OSS", moe=True, head_required=True, experts_transposed=True,
                             experts_interleaved=True, expert_width="intermediate_size", rope_types=_YARN),
         "llama4_text": GGUFArch("LLAMA4", rope_types=("default", "llama3"), moe=True, experts_transposed=True,
                                 expert_width="intermediate_size"),
         "deepseek_v3": GGUFArch("DEEPSEEK2", moe=True, mla=True, rope_types=_YARN),
         # hybrids: Gated DeltaNet + gated attention (Qwen3.5, Qwen3-Next), short convolutions + attention (LFM2)
         "qwen3_5_text": GGUFArch("QWEN35", norm_plus_one=True, plain_norms=_GATED_NORM, linear_attn="tiled"),
         "qwen3_next": GGUFArch("QWEN3NEXT", moe=True, norm_plus_one=True, plain_norms=_GATED_NORM,
                                linear_attn="grouped"),
         "lfm2": GGUFArch("LFM2", kv_per_layer=True),
         # Granite 4.0 (H): Mamba2 and attention blocks, experts and a shared MLP in each; llama-style q/k rows
         "granitemoehybrid": GGUFArch("GRANITE_HYBRID", moe=True, permute_qk=True, kv_per_layer=True, mamba=True,
                                      renames=(("block_sparse_moe.router.", "block_sparse_moe.router.layer."),
                                               ("block_sparse_moe.experts.", "mlp.experts."),
                                               ("shared_mlp.", "mlp.shared_expert."),
                                               ("shared_expert.output_linear", "shared_expert.down_proj"))),
         # Falcon-H1: Mamba2 and attention side by side in each block; its muP multipliers folded (`falcon_mup`)
         "falcon_h1": GGUFArch("FALCON_H1", mamba=True),
         # Nemotron-H: one mixer a layer (Mamba2, attention without RoPE, experts (Nemotron 3 Nano) or a relu^2 MLP
         # (Nemotron Nano 2: llama.cpp's nemotron_h, `arch_for`))
         "nemotron_h": GGUFArch("NEMOTRON_H_MOE", mamba=True, kv_per_layer=True, renames=(
             *((f"mixer.{x}_proj", f"self_attn.{x}_proj") for x in "qkvo"), ("mixer.experts.", "mlp.experts."),
             ("mixer.gate.", "mlp.gate."), ("mixer.shared_experts.", "mlp.shared_experts."),
             ("mixer.up_proj", "mlp.up_proj"), ("mixer.down_proj", "mlp.down_proj"), ("mixer.", "mamba.")))}
# Granite 4.0-H without experts (H-Micro): transformers runs its shared MLP alone, llama.cpp's dense MLP (`arch_for`)
GRANITE_DENSE = (("shared_mlp.output_linear", "mlp.down_proj"), ("shared_mlp.", "mlp."))
# Mamba2 sizes by the config fields each family names them: conv width, state size, groups, heads, head width
_NEMOTRON_MAMBA = ("conv_kernel", "ssm_state_size", "n_groups", "mamba_num_heads", "mamba_head_dim")
MAMBA_FIELDS = {"NEMOTRON_H_MOE": _NEMOTRON_MAMBA, "NEMOTRON_H": _NEMOTRON_MAMBA}
MAMBA2 = ("mamba_d_conv", "mamba_d_state", "mamba_n_groups", "mamba_n_heads", "mamba_d_head")  # Granite, Falcon-H1
# per-layer scalars llama.cpp reads as metadata arrays, not tensors: (HF name suffix, GGUFWriter method), by family
# (Apertus' xIELU activation: its parameters as stored, llama.cpp applies the softplus as transformers does)
SCALARS = {"APERTUS": ((".mlp.act_fn.alpha_n", "add_xielu_alpha_n"), (".mlp.act_fn.alpha_p", "add_xielu_alpha_p"),
                       (".mlp.act_fn.beta", "add_xielu_beta"), (".mlp.act_fn.eps", "add_xielu_eps"))}


def _sigmoid_gating(cfg):
    import gguf

    return gguf.ExpertGatingFuncType.SIGMOID


def _groups(cfg) -> bool:
    """Whether GLM-4.5's router picks experts from its topk_group best groups only (llama.cpp: expert_group_count,
    expert_group_used_count, fewer used than there are; all groups used is no restriction)."""
    return cfg.n_group > 1 and cfg.topk_group < cfg.n_group


# what llama.cpp reads of these families beyond expert counts and widths (add_hparams), by family: (GGUFWriter
# method, its value from the config; None: not written). GLM-4.5: sigmoid scores (the selection bias is the
# exp_probs_b tensor), top-k weights normalized (norm_topk_prob) then scaled (routed_scaling_factor), the first
# first_k_dense_replace blocks dense, n_shared_experts shared experts moe_intermediate_size wide each; ERNIE 4.5:
# blocks from moe_layer_start_index on MoE (check_arch: every one of them), a shared MLP of its shared experts'
# width; HunYuan: a shared MLP intermediate_size wide; MiniMax-M2: sigmoid scores, its selection bias as GLM-4.5's
# (llama.cpp normalizes the top-k weights and scales them by nothing whatever the file says, as transformers does)
MOE_KV = {"GLM4_MOE": (("add_expert_shared_count", lambda c: c.n_shared_experts),
                       ("add_leading_dense_block_count", lambda c: c.first_k_dense_replace),
                       ("add_expert_gating_func", _sigmoid_gating),
                       ("add_expert_weights_scale", lambda c: float(c.routed_scaling_factor)),
                       ("add_expert_weights_norm", lambda c: bool(c.norm_topk_prob)),
                       ("add_expert_group_count", lambda c: c.n_group if _groups(c) else None),
                       ("add_expert_group_used_count", lambda c: c.topk_group if _groups(c) else None)),
          "ERNIE4_5_MOE": (("add_leading_dense_block_count", lambda c: c.moe_layer_start_index),
                           ("add_interleave_moe_layer_step", lambda c: c.moe_layer_interval),
                           ("add_expert_shared_count", lambda c: c.moe_num_shared_experts),
                           ("add_expert_shared_feed_forward_length",
                            lambda c: c.moe_intermediate_size * c.moe_num_shared_experts)),
          "HUNYUAN_MOE": (("add_expert_shared_feed_forward_length", lambda c: c.intermediate_size),),
          "MINIMAXM2": (("add_expert_gating_func", _sigmoid_gating),)}
MOE_KV["DEEPSEEK2"] = MOE_KV["GLM4_MOE"]  # DeepSeek-V3's MoE is GLM-4.5's (transformers' GLM-4.5 copies it)
# families whose GGUF transformers' reader loads whole (its own rows, and llmprune's: models.GGUF_FAMILIES), so that
# `export --eval` can measure the file; it maps no other's tensors (Mixtral's experts, the 2025 families')
READ_BY_TRANSFORMERS = {"llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "phi3", "olmo2", "glm4",
                        "gemma2", "gemma3_text"}
ATTENTION = ("full_attention", "attention")  # layer_types with a KV cache (head_count_kv; 0 for every other)


def check_config(cfg) -> None:
    """What the model's config alone decides: a family GGUF is written for, a RoPE it can hold, nothing
    llama.cpp would misread (`check_arch`)."""
    if cfg.model_type not in ARCHS:
        raise LLMPruneError(f"--to gguf writes {', '.join(sorted(ARCHS))} models, not {cfg.model_type!r}: use --to "
                            f"compressed-tensors")
    rope(cfg, arch_for(cfg))
    check_arch(cfg)


def arch_for(cfg) -> GGUFArch:
    """The model's `ARCHS` entry, or the variant of it llama.cpp reads under another architecture: Nemotron-H with
    dense MLPs and no experts (Nemotron Nano 2), which llama.cpp's converter writes as nemotron_h (its nemotron_h_moe
    takes the experts' metadata and MTP layers); Granite 4.0-H without experts (H-Micro), still granitehybrid, whose
    loader takes dense ffn_gate / ffn_up / ffn_down when it reads no expert count, as its converter writes the
    shared MLP then (`GRANITE_DENSE`), with no experts' metadata (llama.cpp asserts none used of none)."""
    a = ARCHS[cfg.model_type]
    if cfg.model_type == "nemotron_h" and "moe" not in cfg.layers_block_type:
        return dataclasses.replace(a, name="NEMOTRON_H")
    if granite_dense(cfg):
        return dataclasses.replace(a, moe=False, renames=GRANITE_DENSE)
    return a


def granite_dense(cfg) -> bool:
    """Granite 4.0-H without experts (H-Micro): its shared MLP is llama.cpp's dense one (`arch_for`, `ffn_width`)."""
    return cfg.model_type == "granitemoehybrid" and not cfg.num_local_experts


def check_readable(cfg) -> None:
    """`export --eval` reads the GGUF file back with transformers: refused, before anything is written, for a family
    whose file transformers does not read."""
    if cfg.model_type not in READ_BY_TRANSFORMERS:
        raise LLMPruneError(f"--eval reads the export with transformers, whose GGUF reader does not read a "
                            f"{cfg.model_type} file: drop --eval and measure the file with llama.cpp "
                            f"(llama-perplexity -m FILE.gguf -f wiki.test.raw), or export --to compressed-tensors")


def _refuse(cfg, what: str, assumed: str) -> None:
    raise LLMPruneError(f"this {cfg.model_type} variant's {what} differs from what llama.cpp assumes for the "
                        f"architecture rather than reads ({assumed}): use --to compressed-tensors")


def check_arch(cfg) -> None:
    """What llama.cpp (and transformers' GGUF reader) assume for an architecture rather than read."""
    kind = cfg.model_type
    check_hybrid(cfg)
    check_moe(cfg)
    if kind == "gemma3_text":
        standard = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(cfg.num_hidden_layers)]
        local = ((getattr(cfg, "rope_parameters", None) or {}).get("sliding_attention") or {}).get("rope_theta", 1e4)
        scale = query_scale(cfg)
        if list(cfg.layer_types) != standard or cfg.query_pre_attn_scalar != scale or float(local) != 1e4:
            _refuse(cfg, "layer pattern, query scale or local RoPE base",
                    f"5 sliding : 1 global, queries by 1/sqrt({scale}), local base 10000")
    elif kind == "gemma2":
        standard = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg.num_hidden_layers)]
        scale = query_scale(cfg)
        if list(cfg.layer_types) != standard or cfg.query_pre_attn_scalar != scale:
            _refuse(cfg, "layer pattern or query scale", f"sliding and global in turn, queries by 1/sqrt({scale})")
    elif kind in ("qwen2_moe", "qwen3_moe"):
        if getattr(cfg, "mlp_only_layers", None) or getattr(cfg, "decoder_sparse_step", 1) != 1:
            _refuse(cfg, "dense MLP layers (mlp_only_layers, decoder_sparse_step)", "experts in every layer")
        if bool(cfg.norm_topk_prob) != (kind == "qwen3_moe"):
            _refuse(cfg, f"norm_topk_prob ({cfg.norm_topk_prob})", f"norm_topk_prob {kind == 'qwen3_moe'}")
    elif kind == "qwen2" and getattr(cfg, "use_sliding_window", False):
        _refuse(cfg, "sliding-window attention (use_sliding_window)", "full attention")
    elif kind == "gpt_oss" and (float(cfg.swiglu_alpha) != 1.702 or float(cfg.swiglu_limit) != 7.0
                                or not cfg.attention_bias):  # (llama.cpp's loader requires attn_output.bias)
        _refuse(cfg, f"SwiGLU alpha / limit ({cfg.swiglu_alpha} / {cfg.swiglu_limit}) or attention biases "
                     f"({cfg.attention_bias})", "alpha 1.702, limit 7.0, attention biases")
    elif kind == "llama4_text":
        check_llama4(cfg)
    elif kind == "deepseek_v3":
        check_deepseek(cfg)
    elif kind == "smollm3":
        _check_no_rope(cfg)
        if cfg.use_sliding_window or cfg.attention_bias or cfg.mlp_bias:
            _refuse(cfg, "sliding window or biases", "full attention, no biases")
    elif kind == "seed_oss" and (cfg.attention_out_bias or cfg.mlp_bias):
        _refuse(cfg, "output-projection or MLP biases", "none")
    elif kind == "apertus" and (cfg.hidden_act != "xielu" or getattr(cfg, "mlp_bias", False)):
        _refuse(cfg, f"activation ({cfg.hidden_act}) or MLP biases", "xIELU, no MLP biases")
    elif kind == "olmo3":  # (llama.cpp's sliding layers: the full layers' base, unscaled)
        rp = getattr(cfg, "rope_parameters", None) or {}
        local, full = rp.get("sliding_attention") or {}, _rope_parameters(cfg)
        if local and (local.get("rope_type", "default") != "default"
                      or float(local.get("rope_theta", full["rope_theta"])) != float(full["rope_theta"])):
            _refuse(cfg, f"sliding layers' RoPE ({local})", "the full layers' base, unscaled")
    elif kind == "exaone4" and (cfg.num_hidden_layers == 64) != (cfg.sliding_window is not None):
        # llama.cpp slides (and leaves the global layers without RoPE, as transformers does when a window is set)
        # only for a 64-layer model (EXAONE 4.0 32B); any other depth is all global layers with RoPE (1.2B)
        _refuse(cfg, f"sliding window ({cfg.sliding_window}) at {cfg.num_hidden_layers} layers",
                "a window at 64 layers alone")


def check_hybrid(cfg) -> None:
    """`check_arch` of the hybrid families: llama.cpp's Gated DeltaNet sizes its V heads as its K heads
    (ssm.state_size), runs SiLU MLPs and attention without biases, Qwen3-Next's experts in every layer with
    their top-k weights normalized; LFM2's short convolutions have no bias."""
    kind, types = cfg.model_type, list(getattr(cfg, "layer_types", None) or [])
    if kind in ("qwen3_5_text", "qwen3_next"):
        if cfg.linear_key_head_dim != cfg.linear_value_head_dim or set(types) - {"linear_attention", "full_attention"}:
            _refuse(cfg, f"linear-attention head sizes (key {cfg.linear_key_head_dim}, value "
                         f"{cfg.linear_value_head_dim}) or layer types", "equal sizes, linear or full attention")
        if cfg.hidden_act != "silu" or getattr(cfg, "attention_bias", False):
            _refuse(cfg, f"activation ({cfg.hidden_act}) or attention biases", "SiLU, no biases")
    if kind == "qwen3_5_text" and sum(mrope_sections(cfg)) > cfg.head_dim:  # (ggml's M-RoPE asserts it)
        _refuse(cfg, f"M-RoPE sections {mrope_sections(cfg)}", f"sections summing to at most head_dim {cfg.head_dim}")
    if kind == "qwen3_next" and (getattr(cfg, "mlp_only_layers", None) or cfg.decoder_sparse_step != 1
                                 or not cfg.norm_topk_prob):
        _refuse(cfg, "dense MLP layers or norm_topk_prob", "experts in every layer, norm_topk_prob True")
    if kind == "lfm2" and (cfg.conv_bias or set(types) - {"conv", "full_attention"}):
        _refuse(cfg, "convolution biases (conv_bias) or layer types", "no biases, conv or full attention")
    if kind == "granitemoehybrid":  # (llama.cpp asserts a Mamba2 width of 2 x hidden; it clamps no time step)
        if (cfg.mamba_n_heads * cfg.mamba_d_head != 2 * cfg.hidden_size
                or tuple(cfg.time_step_limit) != (0.0, float("inf"))):
            _refuse(cfg, "Mamba2 width or time-step limits", "2 x hidden_size, no limits")
        if cfg.mamba_proj_bias or not cfg.mamba_conv_bias or cfg.attention_bias or cfg.hidden_act != "silu":
            _refuse(cfg, "biases or activation", "a conv bias alone, SiLU")
    if kind == "nemotron_h":  # (llama.cpp: relu^2 experts or MLPs, not both; one expert group, no latent projections)
        if (set(types) - {"linear_attention", "full_attention", "moe", "mlp"} or {"moe", "mlp"} <= set(types)
                or cfg.moe_latent_size or cfg.n_group != 1):
            _refuse(cfg, "layer kinds (experts and dense MLPs together), latent MoE or expert groups",
                    "Mamba2 and attention layers with either experts or dense MLPs")
        if (cfg.mlp_hidden_act != "relu2" or cfg.mamba_hidden_act != "silu" or cfg.use_bias or cfg.mlp_bias
                or cfg.attention_bias or cfg.mamba_proj_bias or not cfg.use_conv_bias
                or tuple(cfg.time_step_limit) != (0.0, float("inf"))):
            _refuse(cfg, "activations, biases or time-step limits", "relu^2 and SiLU, a conv bias alone, no limits")
    if kind == "falcon_h1":  # (llama.cpp gates Mamba2's output before its norm and always adds the conv bias)
        if cfg.mamba_rms_norm and cfg.mamba_norm_before_gate or tuple(cfg.time_step_limit) != (0.0, float("inf")):
            _refuse(cfg, "Mamba2 norm before its gate or time-step limits", "gate, then norm; no limits")
        if (cfg.mamba_proj_bias or not cfg.mamba_conv_bias or cfg.attention_bias or cfg.mlp_bias
                or cfg.projectors_bias or cfg.hidden_act != "silu"):
            _refuse(cfg, "biases or activation", "a conv bias alone, SiLU")


def check_moe(cfg) -> None:
    """`check_arch` of glm4_moe, olmoe, ernie4_5_moe, hunyuan_v1_moe, minimax_m2: llama.cpp runs their experts, dense
    and shared MLPs SiLU-gated (MiniMax-M2's activation is all it could misread: the rest of its graph, q/k norms over
    whole projections, sigmoid scores, top-k weights normalized and unscaled, no shared expert, no biases, is fixed in
    transformers as in llama.cpp); GLM-4.5's shared experts always (n_shared_experts of them); OLMoE's softmax top-k
    weights as they are (not renormalized), q/k norms over every head (k_norm as wide as q_norm: no GQA), no
    clip_qkv, no biases; ERNIE 4.5's every block from moe_layer_start_index on an MoE block, no biases (o_proj's unread);
    HunYuan's one top-k for every layer, no attention biases (o_proj's unread)."""
    kind = cfg.model_type
    if kind not in ("glm4_moe", "olmoe", "ernie4_5_moe", "hunyuan_v1_moe", "minimax_m2"):
        return
    if cfg.hidden_act != "silu":
        _refuse(cfg, f"activation ({cfg.hidden_act})", "SiLU")
    if kind == "glm4_moe" and cfg.n_shared_experts < 1:
        _refuse(cfg, f"shared experts (n_shared_experts {cfg.n_shared_experts})", "one or more")
    if kind == "olmoe" and (cfg.norm_topk_prob or cfg.num_key_value_heads != cfg.num_attention_heads
                            or cfg.clip_qkv is not None or cfg.attention_bias):
        _refuse(cfg, f"norm_topk_prob ({cfg.norm_topk_prob}), key-value heads ({cfg.num_key_value_heads} of "
                     f"{cfg.num_attention_heads}), clip_qkv ({cfg.clip_qkv}) or biases ({cfg.attention_bias})",
                "norm_topk_prob False, no GQA, no clip_qkv, no biases")
    if kind == "ernie4_5_moe":
        start, end, step = cfg.moe_layer_start_index, cfg.moe_layer_end_index, cfg.moe_layer_interval
        theirs = [start <= i <= end and (i + 1) % step == 0 for i in range(cfg.num_hidden_layers)]
        if cfg.use_bias or theirs != [i >= start for i in range(cfg.num_hidden_layers)]:
            _refuse(cfg, f"MoE blocks (moe_layer_start_index {start}, end_index {end}, interval {step}) or biases "
                         f"(use_bias {cfg.use_bias})", "every block from moe_layer_start_index on, no biases")
    if kind == "hunyuan_v1_moe" and (len(set(_per_layer(cfg.moe_topk))) > 1 or cfg.attention_bias):
        _refuse(cfg, f"experts per token ({cfg.moe_topk}) or attention biases ({cfg.attention_bias})",
                "one top-k for every layer, no biases")


def _check_no_rope(cfg) -> None:
    """SmolLM3 and Llama 4: llama.cpp leaves every 4th layer without RoPE (n_no_rope_layer_step 4), whatever the
    model's no_rope_layers (1: RoPE) say."""
    if list(cfg.no_rope_layers) != [int((i + 1) % 4 != 0) for i in range(cfg.num_hidden_layers)]:
        _refuse(cfg, "no-RoPE layers (no_rope_layers)", "every 4th layer without RoPE")


def _per_layer(v) -> list:
    """A config value given once or per layer (HunYuan's moe_topk) as a list."""
    return list(v) if isinstance(v, (list, tuple)) else [v]


def check_llama4(cfg) -> None:
    """Llama 4: llama.cpp sets the chunk (8192) and temperature tuning (from 8192 tokens, by 0.1) itself, leaves
    every 4th layer without RoPE, q/k-normalizes unless there are 128 experts, and has no attention biases."""
    n, step = cfg.num_hidden_layers, cfg.interleave_moe_layer_step
    if (cfg.attention_chunk_size, cfg.floor_scale, float(cfg.attn_scale), bool(cfg.attn_temperature_tuning)) \
            != (8192, 8192, 0.1, True):
        _refuse(cfg, f"attention chunk ({cfg.attention_chunk_size}) or temperature tuning (floor_scale "
                     f"{cfg.floor_scale}, attn_scale {cfg.attn_scale})", "chunks of 8192, tuning from 8192 by 0.1")
    _check_no_rope(cfg)
    if step < 1 or list(cfg.moe_layers) != list(range(step - 1, n, step)):
        _refuse(cfg, f"MoE layers ({cfg.moe_layers})", f"every interleave_moe_layer_step-th ({step})")
    if bool(cfg.use_qk_norm) != (cfg.num_local_experts != 128) or cfg.attention_bias:
        _refuse(cfg, f"q/k norm ({cfg.use_qk_norm}) or attention biases", "q/k norm unless 128 experts, no biases")


def check_deepseek(cfg) -> None:
    """DeepSeek-V3: llama.cpp's RoPE takes the rotated dims as adjacent pairs (transformers' rope_interleave), reads
    the q rank only of a model not of a DeepSeek-V2-Lite depth (26, 27 layers; 48 with a 128256 vocabulary: it
    runs those as q_proj ones), has no attention biases, SiLU MLPs."""
    lite = cfg.num_hidden_layers in (26, 27) or (cfg.num_hidden_layers == 48 and cfg.vocab_size == 128256)
    if not getattr(cfg, "rope_interleave", True) or cfg.attention_bias or cfg.hidden_act != "silu":
        _refuse(cfg, f"rope_interleave ({getattr(cfg, 'rope_interleave', True)}), attention biases "
                     f"({cfg.attention_bias}) or activation ({cfg.hidden_act})", "interleaved RoPE, no biases, SiLU")
    if lite and cfg.q_lora_rank:
        _refuse(cfg, f"q_lora_rank ({cfg.q_lora_rank}) at {cfg.num_hidden_layers} layers",
                "DeepSeek-V2-Lite's depths without a q rank")


def check_yarn(cfg, rp: dict) -> None:
    """YaRN as llama.cpp runs it: the ramp between beta_fast 32 and beta_slow 1 rotations (it reads neither), its
    correction range rounded outwards (transformers' truncate; gpt-oss's is not: `engine_note`), the attention
    factor its own from the factor (0.1 ln(factor) + 1) times rope.scaling.attn_factor (a model's own
    attention_factor: `add_yarn`); DeepSeek's mscale equal to mscale_all_dim, which scales the softmax as
    transformers' yarn_apply_mscale (llama.cpp reads mscale_all_dim alone), and no attention_factor of its own."""
    mla = ARCHS[cfg.model_type].mla
    mscale, all_dim = rp.get("mscale"), rp.get("mscale_all_dim")
    ours = (not mscale or not all_dim) if not mla else bool(all_dim) and float(mscale or 0) == float(all_dim)
    if (float(rp.get("beta_fast") or 32), float(rp.get("beta_slow") or 1)) != (32.0, 1.0) \
            or (mla and rp.get("attention_factor") is not None) or not rp.get("factor") or not ours:
        _refuse(cfg, f"YaRN (beta_fast {rp.get('beta_fast')}, beta_slow {rp.get('beta_slow')}, attention_factor "
                     f"{rp.get('attention_factor')}, mscale {mscale}, mscale_all_dim {all_dim})",
                "beta 32 / 1, its own attention factor" + (", mscale = mscale_all_dim" if mla else ", no mscale"))


def engine_note(cfg) -> str | None:
    """What llama.cpp computes otherwise than transformers from a file that holds the model exactly, said in the
    export's manifest and on screen: an unrounded YaRN correction range (transformers' truncate: false, gpt-oss as
    released), which llama.cpp rounds outwards whatever the file says (ggml_rope_yarn_corr_dims), as it runs every
    gpt-oss GGUF; how many frequencies differ, from transformers' own YaRN with and without the rounding."""
    rp = _rope_parameters(cfg)
    if rp.get("rope_type") != "yarn" or rp.get("truncate", True):
        return None
    import copy

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rounded = copy.deepcopy(cfg)
    rounded.rope_parameters = {**cfg.rope_parameters, "truncate": True}
    ours, theirs = (ROPE_INIT_FUNCTIONS["yarn"](c, "cpu")[0] for c in (cfg, rounded))
    n = int((ours != theirs).sum())
    return (f"llama.cpp rounds YaRN's correction range outwards, which this model's (truncate: false) is not: {n} of "
            f"its {len(ours)} RoPE frequencies differ from transformers' (by up to "
            f"{float(((ours - theirs).abs() / theirs).max()):.0%}), as in every gpt-oss GGUF llama.cpp runs")


def _rope_parameters(cfg) -> dict:
    rp = getattr(cfg, "rope_parameters", None) or {}
    rp = rp.get("full_attention", rp) if isinstance(rp, dict) else {}
    return {"rope_theta": getattr(cfg, "rope_theta", 10000.0), **rp}


def rotary_dims(cfg, a: GGUFArch) -> int:
    """How many of each head's dimensions RoPE rotates (llama.cpp's rope.dimension_count; Phi-3's converter takes
    the partial factor of hidden / heads)."""
    rot = getattr(cfg, "partial_rotary_factor", None) or _rope_parameters(cfg).get("partial_rotary_factor", 1.0)
    if a.name == "PHI3":
        return int(rot * cfg.hidden_size) // cfg.num_attention_heads
    return int((getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads) * rot)


def rope(cfg, a: GGUFArch) -> tuple[float, list[tuple[str, np.ndarray]]]:
    """(RoPE base, the tensors llama.cpp reads a RoPE scaling from, each (name, F32 values)): Llama 3.1's (rope_type
    "llama3") as `rope_freqs`, each frequency's divisor; Phi-3's LongRoPE ("longrope") as `rope_factors_long` and
    `rope_factors_short`, llama.cpp taking the long ones when its context is longer than the original one
    (transformers: when a sequence is); other scalings are refused."""
    rp = _rope_parameters(cfg)
    kind = rp.get("rope_type", "default")
    if kind not in a.rope_types:
        raise LLMPruneError(f"RoPE scaling {kind!r} is not written to GGUF for {cfg.model_type}: export --to "
                            f"compressed-tensors")
    theta = float(rp["rope_theta"])
    if kind == "llama3":
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return theta, [("rope_freqs.weight", llama3_factors(
            theta, head_dim, rp.get("factor", 8.0), rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0),
            rp.get("original_max_position_embeddings", 8192)))]
    if kind == "longrope":  # (one factor per rotated pair: transformers' config checks the lengths)
        return theta, [(f"rope_factors_{k}.weight", np.asarray(rp[f"{k}_factor"], dtype=np.float32))
                       for k in ("long", "short")]
    if kind == "dynamic":  # HunYuan's NTK-alpha: a fixed base, theta * alpha^(d / (d - 2)), as transformers' ntk_alpha
        if not rp.get("alpha"):  # (without alpha, dynamic NTK: frequencies that change with the sequence length)
            raise LLMPruneError(f"RoPE scaling 'dynamic' without alpha is not written to GGUF for {cfg.model_type}: "
                                f"export --to compressed-tensors")
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return theta * float(rp["alpha"]) ** (d / (d - 2)), []
    if kind == "yarn":  # metadata (`add_yarn`)
        check_yarn(cfg, rp)
    return theta, []


def add_yarn(w, cfg, rp: dict) -> None:
    """YaRN's metadata (`check_yarn`): the factor, the original context; DeepSeek's mscale_all_dim as llama.cpp's
    converter writes it (0.1 x, which llama.cpp divides out); another model's own attention_factor as the multiple
    of llama.cpp's (0.1 ln(factor) + 1) it is (rope.scaling.attn_factor, which llama.cpp's loader reads for every
    architecture; not the converter's yarn_attn_factor, which it does not)."""
    import gguf

    factor = float(rp["factor"])
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(factor)
    w.add_rope_scaling_orig_ctx_len(int(rp.get("original_max_position_embeddings") or cfg.max_position_embeddings))
    if ARCHS[cfg.model_type].mla:
        w.add_rope_scaling_yarn_log_mul(0.1 * float(rp["mscale_all_dim"]))
    elif rp.get("attention_factor") is not None:  # as a multiple of llama.cpp's own (which it multiplies by this)
        ratio = float(rp["attention_factor"]) / (0.1 * math.log(factor) + 1)
        if abs(ratio - 1) > 1e-6:  # (OLMo 3's is llama.cpp's own)
            w.add_rope_scaling_attn_factors(ratio)


def ffn_width(cfg) -> int:
    """The MLP's width (llama.cpp's feed_forward_length): intermediate_size, or LFM2's adjusted from it as
    transformers sizes its w1 / w3 (block_auto_adjust_ff_dim: 2/3 of it, times the multiplier, rounded up); Granite
    4.0-H's without experts, its shared MLP's (`arch_for`)."""
    ff = getattr(cfg, "intermediate_size_mlp", None) or cfg.intermediate_size  # Llama 4's dense layers: _mlp
    if granite_dense(cfg):
        return cfg.shared_intermediate_size
    if cfg.model_type == "nemotron_h":  # one mixer a layer: an array, the MLP's width where there is one
        return [{"moe": cfg.moe_intermediate_size, "mlp": ff}.get(t, 0) for t in cfg.layers_block_type]
    if getattr(cfg, "block_auto_adjust_ff_dim", False):
        ff = int(2 * ff / 3)
        if cfg.block_ffn_dim_multiplier is not None:
            ff = int(cfg.block_ffn_dim_multiplier * ff)
        ff = cfg.block_multiple_of * ((ff + cfg.block_multiple_of - 1) // cfg.block_multiple_of)
    return ff


def mrope_sections(cfg) -> list[int]:
    """Qwen3.5's M-RoPE sections (transformers' default 11, 11, 10) and llama.cpp's fourth, unused."""
    return [*(_rope_parameters(cfg).get("mrope_section") or [11, 11, 10]), 0][:4]


def add_hparams(w, cfg, a: GGUFArch) -> None:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(ffn_width(cfg))
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv([cfg.num_key_value_heads if t in ATTENTION else 0 for t in cfg.layer_types] if a.kv_per_layer
                        else 1 if a.mla else cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps if a.name == "LFM2"
                             else cfg.layer_norm_epsilon if a.name.startswith("NEMOTRON_H") else cfg.rms_norm_eps)
    w.add_rope_freq_base(rope(cfg, a)[0])
    w.add_vocab_size(cfg.vocab_size)
    add_hybrid_hparams(w, cfg, a)
    if a.name in ("GEMMA2", "GEMMA3"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(cfg.sliding_window)
        if a.name == "GEMMA2":
            w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        return
    rp = _rope_parameters(cfg)
    w.add_rope_dimension_count(rotary_dims(cfg, a))  # GLM-4 rotates half of each head, Phi-4-mini 3/4
    if a.name == "PHI3":  # as llama.cpp's converter (window 0 when none); LongRoPE's attention factor the model's
        old = rp.get("original_max_position_embeddings") or getattr(cfg, "original_max_position_embeddings", None)
        if old:
            w.add_rope_scaling_orig_ctx_len(old)
        if rp.get("rope_type") == "longrope":
            w.add_rope_scaling_attn_factors(longrope_attention_factor({"original_max_position_embeddings": old, **rp},
                                                                      cfg.max_position_embeddings))
        w.add_sliding_window(getattr(cfg, "sliding_window", None) or 0)
        return
    # the window and the layers using it, which llama.cpp reads as an array: OLMo 3, EXAONE 4.0 32B, gpt-oss
    if a.name in ("OLMO2", "EXAONE4", "GPT_OSS") and getattr(cfg, "sliding_window", None):
        w.add_sliding_window(cfg.sliding_window)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
    if rp.get("rope_type") == "yarn":
        add_yarn(w, cfg, rp)
    if a.name == "LLAMA4":  # experts every step-th layer; the chunked layers (llama.cpp's chunk: 8192, check_arch)
        w.add_interleave_moe_layer_step(cfg.interleave_moe_layer_step)
        w.add_sliding_window(cfg.attention_chunk_size)
        w.add_sliding_window_pattern([t == "chunked_attention" for t in cfg.layer_types])
    if a.mla:
        add_mla_hparams(w, cfg)
    elif head_dim * cfg.num_attention_heads != cfg.hidden_size:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if a.moe:  # Mixtral's experts are intermediate_size wide (llama.cpp's llama reads feed_forward_length)
        w.add_expert_count(getattr(cfg, "num_experts", None) or cfg.num_local_experts)
        w.add_expert_used_count(_per_layer(cfg.num_experts_per_tok)[0])  # (HunYuan's per layer: check_moe)
        if getattr(cfg, a.expert_width, None):
            w.add_expert_feed_forward_length(getattr(cfg, a.expert_width))
        if getattr(cfg, "shared_expert_intermediate_size", None):
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
        for method, value in ((m, f(cfg)) for m, f in MOE_KV.get(a.name, ())):
            if value is not None:
                getattr(w, method)(value)


def add_hybrid_hparams(w, cfg, a: GGUFArch) -> None:
    """What llama.cpp reads of the hybrid families: the Gated DeltaNet's sizes as ssm.* (conv width, K head size as
    the state size, K heads as groups, V heads as the time-step rank, all V heads' width as the inner size), which
    layers are linear attention (an array), Qwen3.5's M-RoPE sections (required; on text every section rotates by the
    same position, so they equal plain RoPE); LFM2's convolution width."""
    if a.linear_attn:
        w.add_ssm_conv_kernel(cfg.linear_conv_kernel_dim)
        w.add_ssm_state_size(cfg.linear_key_head_dim)
        w.add_ssm_group_count(cfg.linear_num_key_heads)
        w.add_ssm_time_step_rank(cfg.linear_num_value_heads)
        w.add_ssm_inner_size(cfg.linear_value_head_dim * cfg.linear_num_value_heads)
        w.add_array(f"{w.arch}.attention.recurrent_layers", [t == "linear_attention" for t in cfg.layer_types])
    if a.name == "QWEN35":
        w.add_rope_dimension_sections(mrope_sections(cfg))
    if a.name == "LFM2":
        w.add_shortconv_l_cache(cfg.conv_L_cache)
    if a.mamba:  # Mamba2: heads as the time-step rank, their width together as the inner size
        conv, state, groups, heads, width = (getattr(cfg, f) for f in MAMBA_FIELDS.get(a.name, MAMBA2))
        w.add_ssm_conv_kernel(conv)
        w.add_ssm_state_size(state)
        w.add_ssm_group_count(groups)
        w.add_ssm_time_step_rank(heads)
        w.add_ssm_inner_size(getattr(cfg, "mamba_d_ssm", None) or heads * width)
    if a.name.startswith("NEMOTRON_H"):
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)  # (read, for its MTP head's norm)
    if a.name == "NEMOTRON_H_MOE":  # its experts: sigmoid scores (the graph's), selection bias as exp_probs_b
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(cfg.moe_shared_expert_intermediate_size)
        w.add_expert_shared_count(cfg.n_shared_experts)
        w.add_expert_weights_norm(bool(cfg.norm_topk_prob))
        w.add_expert_weights_scale(float(cfg.routed_scaling_factor))
        w.add_expert_group_count(cfg.n_group)
    if a.name == "GRANITE_HYBRID":  # its multipliers; RoPE switched on by rope_finetuned (Granite 4.0: none)
        w.add_attention_scale(cfg.attention_multiplier)
        w.add_embedding_scale(cfg.embedding_multiplier)
        w.add_residual_scale(cfg.residual_multiplier)
        w.add_logit_scale(cfg.logits_scaling)
        w.add_rope_scaling_finetuned(cfg.position_embedding_type == "rope")
        if a.moe:  # (without experts the shared MLP is the dense one: feed_forward_length, `ffn_width`)
            w.add_expert_shared_feed_forward_length(cfg.shared_intermediate_size)


def add_mla_hparams(w, cfg) -> None:
    """DeepSeek's latent attention as llama.cpp runs it (MQA over the compressed KV, one head): the q and kv ranks
    (q_lora_rank 0: queries by one q_proj), key / value lengths as cached (kv_lora_rank + the RoPE part /
    kv_lora_rank) and per head once decompressed (_mla: qk_nope + qk_rope / v_head_dim)."""
    w.add_q_lora_rank(cfg.q_lora_rank or 0)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)


def scalars(files, blocks: str, n_layers: int, a: GGUFArch) -> list[tuple[str, list[float]]]:
    """The per-layer scalars `SCALARS` lists, each (GGUFWriter method, one value a layer), read from the stored
    files (4 numbers a layer: before the header, which holds them, is written)."""
    return [(method, [files.get(f"{blocks}.{i}{suffix}", torch.float32).item() for i in range(n_layers)])
            for suffix, method in SCALARS.get(a.name, ())]
