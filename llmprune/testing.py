"""Tiny random models and tokenizers for tests: seconds, not minutes, and no download."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

# bytes + <bos>, <eos> + two merges (of NUL bytes: never in text, but BPE as llama.cpp loads it; two, as a GGUF
# array of one is read back as a string by transformers 5.17)
VOCAB = 256 + 2 + 2
# `llmprune compress` options that make a tiny-model run take seconds: little calibration, no evaluation
FAST_CLI = ["--nsamples", "6", "--seqlen", "32", "--calib-batch", "4", "--no-progress", "--eval", "none"]


def byte_tokenizer():
    """A byte-level BPE tokenizer (one token per UTF-8 byte; its two merges, of two and four NUL bytes, never meet
    text) as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<bos>"], vocab["<eos>"] = 256, 257
    nul = "\u0100"  # the character byte-level BPE maps byte 0 to
    vocab[nul * 2], vocab[nul * 4] = 258, 259
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(nul, nul), (nul * 2, nul * 2)]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split (llama.cpp: gpt-2)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>")


# Tiny configs of every family llmprune is tested on (README "Supported model families"), built from
# transformers' own config classes: model type -> options over the common ones (hidden 64, 2 layers).
# MoE families: 8 experts of width 32, 2 per token, so a tiny calibration set leaves some experts
# with few tokens.
_MOE = dict(num_experts_per_tok=2, router_aux_loss_coef=0.0)
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "qwen3_5_text": {"head_dim": 16, "layer_types": ["linear_attention", "full_attention"],
                     "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
                     "linear_value_head_dim": 16},
    "phi3": {"pad_token_id": 0},
    "gemma2": {"head_dim": 16, "sliding_window": 16},
    "gemma3_text": {"head_dim": 16, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]},
    "olmo2": {},
    "glm4": {"head_dim": 16},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64, "enable_bias": True, "do_layer_norm_before": True},
    "mixtral": {**_MOE, "num_local_experts": 8, "intermediate_size": 32, "sliding_window": None},
    "qwen3_moe": {**_MOE, "num_experts": 8, "moe_intermediate_size": 32, "head_dim": 16, "norm_topk_prob": True},
    "olmoe": {**_MOE, "num_experts": 8, "intermediate_size": 32},
    "gpt_oss": {**_MOE, "num_local_experts": 8, "intermediate_size": 32, "head_dim": 16, "sliding_window": 16,
                "rope_parameters": {"rope_type": "default", "rope_theta": 150000.0}},
    "qwen2_moe": {**_MOE, "num_experts": 8, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64},
    # DeepSeek-V3: MLA attention (low-rank q and kv), a dense first block, a shared expert, a sigmoid
    # router with a bias term; GLM-4.5: the same MoE layout with GQA attention; 3 blocks: one dense, two MoE
    "deepseek_v3": {**_MOE, "n_routed_experts": 8, "moe_intermediate_size": 32, "n_shared_experts": 1,
                    "first_k_dense_replace": 1, "num_hidden_layers": 3, "n_group": 1, "topk_group": 1,
                    "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                    "v_head_dim": 16},
    "glm4_moe": {**_MOE, "n_routed_experts": 8, "moe_intermediate_size": 32, "n_shared_experts": 1,
                 "first_k_dense_replace": 1, "num_hidden_layers": 3, "n_group": 1, "topk_group": 1, "head_dim": 16},
    # Qwen3-Next: linear-attention (Gated DeltaNet) and attention blocks, experts and a gated shared expert
    "qwen3_next": {**_MOE, "num_experts": 8, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
                   "head_dim": 16, "layer_types": ["linear_attention", "full_attention"], "linear_num_key_heads": 2,
                   "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16},
    "minimax_m2": {**_MOE, "num_local_experts": 8, "intermediate_size": 32, "head_dim": 16},
    # 2025-2026 families (4 experts where MoE, to keep the suite fast). Llama 4: a dense block (intermediate_size_mlp)
    # then an MoE one (experts dispatched densely, top-1, sigmoid scores scaling their inputs; a shared expert),
    # chunked attention on 16-token chunks, the MoE block without RoPE, attention temperature tuning from position 8
    "llama4_text": {"num_local_experts": 4, "num_experts_per_tok": 1, "intermediate_size": 32,
                    "intermediate_size_mlp": 128, "head_dim": 16, "interleave_moe_layer_step": 2,
                    "no_rope_layer_interval": 2, "attention_chunk_size": 16, "floor_scale": 8,
                    "router_aux_loss_coef": 0.0},
    # Granite 4.0: a Mamba2 block and an attention block, each with experts and a shared MLP (fused input_linear);
    # its multipliers (embeddings, residuals, attention, logits) away from 1
    "granitemoehybrid": {**_MOE, "layer_types": ["mamba", "attention"], "num_local_experts": 4,
                         "intermediate_size": 32, "shared_intermediate_size": 64, "mamba_n_heads": 4,
                         "mamba_d_head": 32, "mamba_d_state": 16, "mamba_n_groups": 1, "mamba_chunk_size": 16,
                         "embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.25,
                         "logits_scaling": 4.0},
    # Nemotron-H (Nano 2; Nemotron 3 Nano's MoE): a Mamba2 block, an attention block, an MoE block (gateless relu^2
    # experts, a shared expert, a sigmoid router): one block a layer, its mixer
    "nemotron_h": {"hybrid_override_pattern": "M*E", "num_hidden_layers": 3, "head_dim": 16, "mamba_num_heads": 4,
                   "mamba_head_dim": 32, "ssm_state_size": 16, "n_groups": 1, "chunk_size": 16, "n_routed_experts": 4,
                   "num_experts_per_tok": 2, "moe_intermediate_size": 32, "moe_shared_expert_intermediate_size": 32},
    # Falcon-H1: Mamba2 and attention side by side in every block, muP multipliers (embeddings, head) away from 1
    "falcon_h1": {"head_dim": 16, "mamba_d_ssm": 128, "mamba_n_heads": 4, "mamba_d_head": 32, "mamba_n_groups": 1,
                  "mamba_d_state": 16, "mamba_chunk_size": 16, "embedding_multiplier": 2.0, "lm_head_multiplier": 0.5},
    # LFM2: a short-convolution block, an attention block
    "lfm2": {"layer_types": ["conv", "full_attention"], "block_auto_adjust_ff_dim": False},
    # SmolLM3: every 2nd block without RoPE (NoPE)
    "smollm3": {"no_rope_layer_interval": 2},
    # ERNIE-4.5-MoE: a dense first block, then experts, a shared expert, a router with a score-correction bias
    "ernie4_5_moe": {"moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 32, "moe_num_shared_experts": 1,
                     "moe_layer_start_index": 1, "moe_layer_end_index": 1, "router_aux_loss_coef": 0.0},
    # HunYuan-A13B: experts, a shared MLP, a router holding its linear (mlp.gate.wg), q/k norms
    "hunyuan_v1_moe": {"num_experts": 4, "moe_topk": 2, "intermediate_size": 32, "head_dim": 16},
    # EXAONE 4.0 and OLMo 3: post-norm blocks, q/k norms, sliding-window and full attention
    "exaone4": {"head_dim": 16, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]},
    "olmo3": {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]},
    # Seed-OSS: q/k/v biases; Apertus: xIELU MLP without a gate, q/k norms, Llama 3.1's RoPE scaling
    "seed_oss": {"head_dim": 16, "attention_bias": True},
    "apertus": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
}
MOE_FAMILIES = ("mixtral", "qwen3_moe", "olmoe", "gpt_oss", "qwen2_moe", "deepseek_v3", "glm4_moe", "qwen3_next",
                "minimax_m2", "llama4_text", "granitemoehybrid", "nemotron_h", "ernie4_5_moe", "hunyuan_v1_moe")


# RoPE scalings that GGUF holds in tensors, on a 16-token original context so that 48 tokens exercise them: Llama
# 3.1's (its factors not all 1 or 8 there)
LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
# Phi-3's LongRoPE (128k, Phi-3.5), config options of a tiny phi3: a 16-token original context (the long factors on
# 48 tokens, the short ones on 16; Phi3Config takes it from its own field), factors a float32 holds exactly;
# Phi-4-mini's shape of it: half of each head rotated (3/4 there), an attention factor of its own
_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16}
PHI3_LONGROPE = {"original_max_position_embeddings": 16, "rope_parameters": {
    **_LONGROPE, "long_factor": [1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0],
    "short_factor": [1.0, 1.0, 1.125, 1.25, 1.25, 1.5, 1.5, 2.0]}}
PHI4_LONGROPE = {"original_max_position_embeddings": 16, "rope_parameters": {
    **_LONGROPE, "partial_rotary_factor": 0.5, "attention_factor": 1.25, "long_factor": [1.0, 1.5, 3.0, 6.0],
    "short_factor": [1.0, 1.25, 1.5, 2.0]}}


def tiny_config(arch: str = "llama", **over):
    """A tiny config of `arch`: "llama", "gemma3" (= gemma3_text) or any model type in FAMILIES."""
    from transformers import AutoConfig

    arch = {"gemma3": "gemma3_text"}.get(arch, arch)
    if arch not in FAMILIES:
        raise ValueError(f"tiny models exist for {', '.join(FAMILIES)}, not {arch!r}")
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=256, eos_token_id=257, pad_token_id=257, tie_word_embeddings=True,
    )
    if arch == "opt":  # OPT names its sizes differently and has no GQA
        common = {k: v for k, v in common.items() if k not in ("intermediate_size", "num_key_value_heads")}
    common.update(copy.deepcopy(FAMILIES[arch]))
    common.update(copy.deepcopy(over))  # (a config class may fill in the dicts it is given, rope_parameters' defaults)
    if arch == "gemma3_text" and common["num_hidden_layers"] != 2 and "layer_types" not in over:
        common["layer_types"] = None
    return AutoConfig.for_model(arch, **common)


def tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32, **over):
    """A random causal LM (hidden 64, 2 layers) with weights scaled so its outputs are not flat."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **over), dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() in (2, 3):  # matrices, and fused experts' (experts, out, in) stacks
                p.normal_(0, 0.08)
    return model.eval()


def tiny_model_dir(path: str | Path, arch: str = "llama", seed: int = 0, **over) -> Path:
    """Save a tiny model and its byte tokenizer as a plain HF folder; returns the folder."""
    path = Path(path)
    tiny_model(arch, seed, **over).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def random_vectors(model, seed: int = 1):
    """Every 1-D parameter and buffer (norms, biases) and the routers' selection biases (`e_score_correction_bias`)
    of `model` random, norms near 1: the tiny models leave them ones and zeros, so that an export writing one under
    another's name, or not at all, would still match. Returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and "inv_freq" not in n and (t.dim() == 1 or "e_score" in n):
                noise = torch.randn(t.shape, generator=g)
                t.copy_(1 + 0.3 * noise if "norm" in n else 0.3 * noise)
    return model


def fp8_model_dir(path: str | Path, arch: str = "llama", block: tuple[int, int] = (8, 8), seed: int = 0,
                  unquantized: torch.dtype = torch.float32, head: bool = False, **over) -> Path:
    """A tiny model saved as a block-scaled FP8 checkpoint (to_fp8); returns the folder."""
    return to_fp8(tiny_model_dir(path, arch, seed, **over), block, unquantized, head)


def read_block_as_transformers(src: str | Path, ref: dict, prefix: str = "model.layers.1."):
    """Block `prefix` of the quantized checkpoint `src` read by llmprune (lazy.LazyModel: FP8 or MXFP4 dequantized
    as it is read) against `ref`, the state dict transformers' dequantizing load gives: the checkpoint readable, no
    quantization_config left, the block's tensors those of `ref` by name and bit for bit. Returns the LazyModel and
    the block's tensors."""
    from . import lazy

    lz = lazy.LazyModel(src, torch.float32)
    assert lz.unreadable() is None and not hasattr(lz.config, "quantization_config")
    lz.load(prefix)
    got = {n: t for n, t in lz.model.state_dict().items() if n.startswith(prefix)}
    assert got and set(got) == {n for n in ref if n.startswith(prefix)}
    for n, t in got.items():
        assert torch.equal(t, ref[n]), n
    return lz, got


def unquantized_copy(src: str | Path, dst: str | Path, tensors) -> Path:
    """`src` copied to `dst` with the tensors of each safetensors file rewritten by `tensors` (dict -> dict: a
    quantized checkpoint's weights dequantized by a test's oracle) and no quantization_config; returns `dst`."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    dst = Path(dst)
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        save_file(tensors(load_file(f)), f, metadata={"format": "pt"})
    c = json.loads((dst / "config.json").read_text())
    del c["quantization_config"]
    (dst / "config.json").write_text(json.dumps(c))
    return dst


def mxfp4_model_dir(path: str | Path, seed: int = 0, unquantized: torch.dtype | None = torch.bfloat16,
                    **over) -> Path:
    """A tiny gpt-oss saved as OpenAI's MXFP4 checkpoints are (to_mxfp4); returns the folder."""
    return to_mxfp4(tiny_model_dir(path, "gpt_oss", seed, **over), unquantized)


def to_mxfp4(path: str | Path, unquantized: torch.dtype | None = None) -> Path:
    """Rewrite the gpt-oss folder `path` as gpt-oss-20b/120b are stored (llmprune/mxfp4.py): each fused expert
    tensor X, (experts, in, out) in memory, as `X_blocks` (its rows (experts, out, in) cut in blocks of 32 FP4
    E2M1 codes, two a byte, the low nibble first) and `X_scales` (the block's exponent, biased by 127: the
    largest weight of the block lands in [4, 8), above 6 clamped), the other floating tensors in `unquantized`
    (None: as they are), and config.json's quantization_config saying so; returns the folder."""
    import json

    from safetensors.torch import load_file, save_file

    from .mxfp4 import BLOCKS, FP4, SCALES

    path = Path(path)
    lut = torch.tensor(FP4[:8])
    for f in sorted(path.glob("*.safetensors")):
        out = {}
        for k, w in load_file(f).items():
            if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
                rows = w.float().transpose(1, 2)  # (experts, out, in)
                e, o, i = rows.shape
                g = rows.reshape(e, o, i // 32, 32)
                exp = torch.floor(torch.log2(g.abs().amax(-1).clamp(min=2.0**-100))) - 2
                v = (g / torch.exp2(exp)[..., None]).clamp(-6, 6)
                codes = (v.abs()[..., None] - lut).abs().argmin(-1) + 8 * (v < 0)
                codes = codes.to(torch.uint8).reshape(e, o, i // 32, 16, 2)
                out[k + BLOCKS] = codes[..., 0] | (codes[..., 1] << 4)
                out[k + SCALES] = (exp + 127).to(torch.uint8)
            else:
                out[k] = w.to(unquantized) if unquantized is not None and w.is_floating_point() else w
        save_file(out, f, metadata={"format": "pt"})
    c = json.loads((path / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(c, indent=2))
    return path


def to_fp8(path: str | Path, block: tuple[int, int] = (128, 128), unquantized: torch.dtype | None = None,
           head: bool = False) -> Path:
    """Rewrite the model folder `path` as a block-scaled FP8 checkpoint, as DeepSeek-V3's is stored
    (llmprune/fp8.py): every 2-D projection weight of the decoder blocks (not the routers, embeddings, norms or
    head) in float8_e4m3fn with a float32 `weight_scale_inv` per `block` (amax / 448, the last blocks cut short),
    the other floating tensors in `unquantized` (None: as they are; `head`: an untied head quantized too), and
    config.json's quantization_config saying so; returns the folder."""
    import json
    import re

    from safetensors.torch import load_file, save_file

    path = Path(path)
    bm, bn = block
    for f in sorted(path.glob("*.safetensors")):
        out = {}
        for k, w in load_file(f).items():
            if w.dim() == 2 and ((".layers." in k and re.search(r"(proj|w1|w2|w3|fc1|fc2|mqa)\.weight$", k))
                                 or (head and k == "lm_head.weight")):
                r, c = w.shape
                pad = torch.zeros(-(-r // bm) * bm, -(-c // bn) * bn)
                pad[:r, :c] = w.float()
                blocks = pad.view(pad.shape[0] // bm, bm, pad.shape[1] // bn, bn)
                s = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
                q = (blocks / s[:, None, :, None]).view_as(pad)[:r, :c]
                out[k], out[k + "_scale_inv"] = q.to(torch.float8_e4m3fn), s
            else:
                out[k] = w.to(unquantized) if unquantized is not None and w.is_floating_point() else w
        save_file(out, f, metadata={"format": "pt"})
    c = json.loads((path / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [bm, bn]}
    (path / "config.json").write_text(json.dumps(c, indent=2))
    return path


def folder_tensors(folder: str | Path) -> dict:
    """Every tensor of a folder's safetensors files, by name (an output, a cached GGUF copy, a model folder)."""
    from safetensors.torch import load_file

    return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(f).items()}


def random_text(n_words: int = 2000, seed: int = 0) -> str:
    import random

    rnd = random.Random(seed)
    words = ["the", "model", "prunes", "weights", "of", "a", "layer", "and", "keeps", "quality", "sparse",
             "dense", "tokens", "calibration", "data", "is", "small", "fast", "kernel", "matrix"]
    return " ".join(rnd.choice(words) for _ in range(n_words))


def hold_one_block(monkeypatch, limit: int | None = 1) -> list[int]:
    """Within `monkeypatch`'s context, fail if anything loads a whole model (llmprune's loader,
    transformers' from_pretrained) or holds the weights of more than `limit` decoder blocks at once
    (None: any number, read from disk one tensor at a time); returns [the most blocks held at once],
    updated as blocks are loaded."""
    from transformers import AutoModelForCausalLM

    from llmprune import arch, checkpoint, lazy

    def whole(*a, **k):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(checkpoint, "load", whole)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", whole)
    most = [0]
    real = lazy.LazyModel.load

    def load(self, prefix="", device="cpu", exclude=()):
        real(self, prefix, device, exclude)
        held = sum(any(p.device.type != "meta" for p in b.parameters()) for b in arch.blocks(self.model))
        most[0] = max(most[0], held)
        assert limit is None or held <= limit, f"{held} blocks in memory"

    monkeypatch.setattr(lazy.LazyModel, "load", load)
    return most
