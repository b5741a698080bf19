"""One HF tensor as the GGUF tensors llama.cpp reads, family by family as gguf_arch.py's table says: their
names and shapes and what each takes of it (`parts`, `gguf_names`), their values (`to_gguf`), the type each is
stored in (`tensor_type`). Each transform reads one HF tensor: the writer streams them one at a time.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import LLMPruneError
from .gguf_arch import SCALARS, GGUFArch


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF q/k rows (per head: first halves of the RoPE pairs, then second halves) -> llama.cpp's
    (pairs adjacent): (n_head, 2, d/2, in) -> (n_head, d/2, 2, in)."""
    out_f = w.shape[0]
    return w.reshape(n_head, 2, out_f // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _transposed(cols: slice):
    """A part of a transposed stack (..., in, out): its columns `cols`, as (..., out, in)."""
    return lambda d: d[..., cols].swapaxes(-1, -2)


def take(data: np.ndarray, how) -> np.ndarray:
    """What a part (`parts`) takes of its HF tensor: all of it (None), rows of dim 1 (a slice) or a transform."""
    return data if how is None else data[:, how] if isinstance(how, slice) else how(data)


def _gate_up(n: int, a: GGUFArch) -> tuple[slice, slice]:
    """Gate's and up's indices in a fused gate_up of width n: halves, or alternating (gpt-oss)."""
    return (slice(0, n, 2), slice(1, n, 2)) if a.experts_interleaved else (slice(0, n // 2), slice(n // 2, n))


def parts(key: str, shape: tuple[int, ...], a: GGUFArch, cfg=None) -> list[tuple[str, tuple[int, ...], object]]:
    """The GGUF tensors one HF tensor becomes: (the HF name gguf's TensorNameMap knows it by, shape, what it
    takes: None (all), a slice (rows of dim 1) or a function of the array, `take`). Fused experts' gate_up_proj
    (experts, 2 x width, hidden) is gate then up; transposed ones (experts, hidden, 2 x width: gpt-oss, Llama 4)
    are split along the width and transposed, down_proj (experts, width, hidden) transposed, as llama.cpp's
    (experts, out, in); gpt-oss's expert biases (experts, 2 x width) split as their weights;
    Qwen2-MoE's shared-expert gate (1, hidden) is a vector; the hybrid families' own, `hybrid_parts`."""
    if (hybrid := hybrid_parts(key, shape, a, cfg)) is not None:
        return hybrid
    if a.moe and key.endswith(".experts.gate_up_proj"):
        base = key.removesuffix("gate_up_proj")
        if a.experts_transposed:
            gate, up = _gate_up(shape[2], a)
            out = (shape[0], shape[2] // 2, shape[1])
            return [(base + "gate_proj", out, _transposed(gate)), (base + "up_proj", out, _transposed(up))]
        half = shape[1] // 2
        return [(base + "gate_proj", (shape[0], half, shape[2]), slice(0, half)),
                (base + "up_proj", (shape[0], half, shape[2]), slice(half, shape[1]))]
    if a.mla and key.endswith("self_attn.kv_b_proj.weight"):  # (heads x (nope + v), rank), per head k then v
        h, nope, v, rank = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, shape[1]
        base = key.removesuffix("kv_b_proj.weight")
        return [(base + "k_b_proj", (h, rank, nope), lambda d: d.reshape(h, nope + v, rank)[:, :nope].swapaxes(1, 2)),
                (base + "v_b_proj", (h, v, rank), lambda d: d.reshape(h, nope + v, rank)[:, nope:])]
    if a.experts_transposed and key.endswith(".experts.down_proj"):
        return [(key, (shape[0], shape[2], shape[1]), _transposed(slice(None)))]
    if a.moe and key.endswith(".experts.gate_up_proj_bias"):
        base = key.removesuffix("gate_up_proj_bias")
        gate, up = _gate_up(shape[1], a)
        return [(base + "gate_proj.bias", (shape[0], shape[1] // 2), gate),
                (base + "up_proj.bias", (shape[0], shape[1] // 2), up)]
    if a.moe and key.endswith(".experts.down_proj_bias"):
        return [(key.removesuffix("_bias") + ".bias", shape, None)]
    if key.endswith("shared_expert_gate.weight"):
        return [(key, shape[1:], None)]
    if a.moe and key.endswith(".e_score_correction_bias"):  # `router_bias`
        return [(router_bias(key), (shape[-1],), None)]
    if key.endswith(tuple(suffix for suffix, _ in SCALARS.get(a.name, ()))):  # metadata, not a tensor (`scalars`)
        return []
    return [(key, shape, None)]


def hybrid_parts(key: str, shape: tuple[int, ...], a: GGUFArch, cfg):
    """`parts` of the hybrid families' own tensors (None for any other): DeltaNet's dt_bias as ssm_dt.bias, its
    A_log as ssm_a (no suffix, `gguf_names`), conv kernels (channels, 1, width) as (channels, width); Qwen3-Next's
    fused in_proj_qkvz (reordered by `to_gguf` to q, k, v, z) as attn_qkv and attn_gate, as llama.cpp's converter
    writes it."""
    if not (a.linear_attn or a.kv_per_layer or a.mamba):
        return None
    if a.name == "FALCON_H1" and key.endswith(("embed_tokens.weight", "lm_head.weight")):  # (scaled apart: tied too)
        em, lm = cfg.embedding_multiplier, cfg.lm_head_multiplier
        if key.endswith("lm_head.weight"):
            return [(key, shape, lambda d: d * lm)]
        return [(key, shape, lambda d: d * em)] + ([("lm_head.weight", shape, lambda d: d * lm)]
                                                   if cfg.tie_word_embeddings else [])
    if key.endswith(".dt_bias"):
        return [(key.removesuffix("dt_bias") + "dt_proj.bias", shape, None)]
    if key.endswith(("conv1d.weight", "conv.conv.weight")) and len(shape) == 3:
        return [(key, (shape[0], shape[2]), None)]
    if a.mamba and key.endswith((".A_log", ".D")):  # (llama.cpp's ssm_a / ssm_d: {1, heads})
        return [(key, (shape[0], 1), None)]
    if a.mamba and key.endswith(("mamba.norm.weight", "mixer.norm.weight")) and len(shape) == 1:  # per group:
        groups = getattr(cfg, "mamba_n_groups", None) or cfg.n_groups  # (groups, width / groups)
        return [(key, (groups, shape[0] // groups), None)]
    if key.endswith(".e_score_correction_bias"):  # Nemotron-H's router bias (`router_bias`)
        return [(router_bias(key), shape, None)]
    if key.endswith("shared_mlp.input_linear.weight"):  # (2 x width, hidden): gate, then up
        half = shape[0] // 2
        base = key.removesuffix("input_linear.weight")
        return [(base + "gate_proj.weight", (half, shape[1]), lambda d: d[:half]),
                (base + "up_proj.weight", (half, shape[1]), lambda d: d[half:])]
    if key.endswith(".linear_attn.in_proj_qkvz.weight"):
        n = (2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim
             + cfg.linear_num_value_heads * cfg.linear_value_head_dim)
        base = key.removesuffix("qkvz.weight")
        return [(base + "qkv.weight", (n, shape[1]), lambda d: d[:n]),
                (base + "z.weight", (shape[0] - n, shape[1]), lambda d: d[n:])]
    return None


def router_bias(key: str) -> str:
    """A router's expert-selection bias (GLM-4.5's `mlp.gate.e_score_correction_bias` (experts,), ERNIE 4.5's
    `mlp.gate.moe_statics.e_score_correction_bias` (1, experts), MiniMax-M2's `mlp.e_score_correction_bias`
    (experts,), beside its router) by the name gguf's TensorNameMap knows it by
    (exp_probs_b, one value per expert: llama.cpp adds it to the scores it selects experts by)."""
    return key.replace(".gate.moe_statics.", ".moe_statics.").removesuffix("_bias") + ".bias"


BARE = (".ssm_a", ".ssm_d")  # GGUF tensor names llama.cpp reads without .weight (an SSM's A, from A_log; its D)


def gguf_names(model, a: GGUFArch, keys) -> dict[str, str]:
    """HF name (as `parts` gives it) -> GGUF tensor name, for `keys`."""
    import gguf

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, a.name), model.config.num_hidden_layers)
    out = {}
    for key in keys:
        known = key
        for old, new in a.renames:
            known = known.replace(old, new)
        name = names.get_name(known, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LLMPruneError(f"{key} has no GGUF name for {a.name.lower()}: this architecture variant cannot be "
                                f"exported to GGUF; use --to compressed-tensors")
        bare = name.endswith(BARE) or key.endswith((".weight", ".bias")) and not name.endswith((".weight", ".bias"))
        # (llama.cpp reads these without a suffix; gguf's map gives Falcon-H1's pre_ff_layernorm.weight as ffn_norm)
        out[key] = name if bare or name.endswith((".weight", ".bias")) else name + ".weight"  # fused experts: none
    return out


def to_gguf(key: str, t: torch.Tensor, a: GGUFArch, cfg) -> np.ndarray:
    """One HF tensor as llama.cpp lays it out (gguf_arch.py's table), fp32."""
    t = t.detach().float()
    if a.permute_qk and key.endswith("q_proj.weight"):
        t = permute_rows(t, cfg.num_attention_heads)
    elif a.permute_qk and key.endswith("k_proj.weight"):
        t = permute_rows(t, cfg.num_key_value_heads)
    if (a.mamba or a.linear_attn) and key.endswith(".A_log"):  # (llama.cpp's ssm_a multiplies the softplus)
        t = -torch.exp(t)
    if a.linear_attn:
        t = linear_attn(key, t, a, cfg)
    if a.name == "FALCON_H1":
        t = falcon_mup(key, t, cfg)
    if a.norm_plus_one and key.endswith("norm.weight") and not key.endswith(a.plain_norms):
        t = t + 1
    return t.numpy()


# Qwen3.5's Gated DeltaNet tensors holding V heads: (name suffix, dim, whether q and k come first along it, whether a
# head is linear_value_head_dim wide along it, else 1)
V_HEADS = (("in_proj_qkv.weight", 0, True, True), ("conv1d.weight", 0, True, True),
           ("in_proj_z.weight", 0, False, True), ("in_proj_a.weight", 0, False, False),
           ("in_proj_b.weight", 0, False, False), (".A_log", 0, False, False),
           (".dt_bias", 0, False, False), ("out_proj.weight", 1, False, True))


def tiled_v_heads(t: torch.Tensor, dim: int, start: int, size: int, cfg) -> torch.Tensor:
    """`t`'s V heads along `dim` from `start` (HF: grouped by the K head they share, k0v0 k0v1 k1v0 k1v1) in
    llama.cpp's tiled order (k0v0 k1v0 k0v1 k1v1: its broadcast repeats the K heads whole)."""
    nk, nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    t = t.movedim(dim, 0)
    v = t[start:].reshape(nk, nv // nk, size, *t.shape[1:]).transpose(0, 1).reshape(-1, *t.shape[1:])
    return torch.cat([t[:start], v]).movedim(0, dim)


def linear_attn(key: str, t: torch.Tensor, a: GGUFArch, cfg) -> torch.Tensor:
    """A Gated DeltaNet tensor as llama.cpp reads it (A_log already -exp(A_log): `to_gguf`): Qwen3-Next's
    in_proj_qkvz (per K head: q, k, its V heads' v, their z) as q, k, v, z of all heads; Qwen3.5's V heads in
    llama.cpp's tiled order (`V_HEADS`, `tiled_v_heads`)."""
    if ".linear_attn." not in key:
        return t
    nk, hk = cfg.linear_num_key_heads, cfg.linear_key_head_dim
    if a.linear_attn == "grouped" and key.endswith("in_proj_qkvz.weight"):
        rv = cfg.linear_num_value_heads // nk * cfg.linear_value_head_dim
        g = t.reshape(nk, 2 * hk + 2 * rv, t.shape[-1])
        return torch.cat([x.reshape(-1, t.shape[-1]) for x in g.split([hk, hk, rv, rv], dim=1)])
    if a.linear_attn == "tiled" and cfg.linear_num_value_heads != nk:
        for suffix, dim, after_qk, wide in V_HEADS:
            if key.endswith(suffix):
                return tiled_v_heads(t, dim, 2 * nk * hk if after_qk else 0, cfg.linear_value_head_dim if wide else 1,
                                     cfg)
    return t


# Falcon-H1's muP multipliers, each folded into the linear it scales (transformers scales inputs or outputs):
# (name suffix, its factor from the config)
FALCON_MUP = (("self_attn.q_proj.weight", lambda c: c.attention_in_multiplier),
              ("self_attn.k_proj.weight", lambda c: c.attention_in_multiplier * c.key_multiplier),
              ("self_attn.v_proj.weight", lambda c: c.attention_in_multiplier),
              ("self_attn.o_proj.weight", lambda c: c.attention_out_multiplier),
              ("feed_forward.gate_proj.weight", lambda c: c.mlp_multipliers[0]),
              ("feed_forward.down_proj.weight", lambda c: c.mlp_multipliers[1]),
              ("mamba.out_proj.weight", lambda c: c.ssm_out_multiplier))


def falcon_mup(key: str, t: torch.Tensor, cfg) -> torch.Tensor:
    """A Falcon-H1 tensor with its multiplier folded in (`FALCON_MUP`); the Mamba2 in_proj's rows by
    ssm_in_multiplier times their section's ssm_multipliers (z, x, B, C, dt: transformers' mup_vector)."""
    for suffix, factor in FALCON_MUP:
        if key.endswith(suffix):
            return t * factor(cfg)
    if key.endswith("mamba.in_proj.weight"):
        d, gs = cfg.mamba_d_ssm, cfg.mamba_n_groups * cfg.mamba_d_state
        sizes = (d, d, gs, gs, t.shape[0] - 2 * d - 2 * gs)
        rows = torch.cat([torch.full((n,), float(m)) for n, m in zip(sizes, cfg.ssm_multipliers, strict=True)])
        return t * (rows * cfg.ssm_in_multiplier)[:, None]
    return t


def tensor_type(name: str, shape: tuple[int, ...], want: str) -> str:
    """The type a tensor is stored in (gguf.py's docstring)."""
    if len(shape) < 2 or want == "f32" or name.endswith("ffn_gate_inp.weight"):  # the MoE router too, as llama.cpp
        return "f32"
    if name.endswith(".bias"):  # gpt-oss's expert biases (experts, width): llama.cpp adds them as F32 (ggml_add_id)
        return "f32"
    if name.endswith(("ssm_conv1d.weight", "shortconv.conv.weight", "ssm_norm.weight", *BARE)):  # as llama.cpp's
        return "f32"  # converter: ggml_ssm_conv's kernel, ggml_ssm_scan's A, Mamba2's D and grouped norm (2-D) F32
    if want in ("f16", "bf16"):
        return want
    if shape[-1] % 32:
        return "f16"
    if name == "token_embd.weight" and want.startswith(("q4", "q5")):
        return "q8_0"
    return want
