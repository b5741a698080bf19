"""GGUF for llama.cpp and Ollama, written with the `gguf` package's GGUFWriter and gguf.quants.

One file per type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: the types gguf.quants can quantize;
it has no k-quant quantizer, so Q4_K etc. come from llama.cpp's llama-quantize run on our F16 file).
Layout as llama.cpp's converter (convert_hf_to_gguf.py) writes these architectures (tensor names from
gguf's own TensorNameMap; what each family needs is `ARCHS`, what llama.cpp assumes rather than reads is
refused by `check_arch`):
  llama, mistral,   q_proj / k_proj rows permuted per head (HF's rotate-half RoPE pairs -> llama.cpp's
  mixtral           adjacent pairs); Llama 3.1's RoPE scaling as the `rope_freqs` tensor
  qwen2, qwen3      as stored (llama.cpp's NeoX RoPE is HF's rotate-half); q/k norms (Qwen3)
  MoE (mixtral,     the fused experts (experts, 2 x width, hidden) split into ffn_gate_exps / ffn_up_exps,
  qwen*_moe)        down as ffn_down_exps; the router F32; Qwen2-MoE's shared-expert gate as a vector
  phi3, glm4        fused qkv_proj / gate_up_proj as they are (llama.cpp splits them); GLM-4's partial RoPE;
                    Phi-3's LongRoPE (128k, Phi-3.5, Phi-4-mini) as `rope_factors_long` / `rope_factors_short`
  olmo2             as stored (post-norms, q/k norms over whole projections)
  gemma2, gemma3    every RMSNorm weight stored as 1 + w (Gemma scales by 1 + w; llama.cpp by w)
1-D tensors (norms) stay F32; a matrix whose rows are not a multiple of the block (32) stays F16; with
Q4/Q5 types the (tied) embedding matrix is Q8_0, as the head reads it. Symmetric block types (Q8_0,
Q4_0, Q5_0) keep a pruned model's zeros exactly (a zero rounds to the block's zero code); Q4_1 and Q5_1
store a block minimum and do not.

Tokenizer and chat template: copied key by key from the GGUF the model was loaded from (the aliases
`llama`, `gemma3` and any --model x.gguf), so the round trip GGUF -> pruned -> GGUF keeps the exact
vocabulary, pre-tokenizer and template. Otherwise read from tokenizer.json: a byte-level BPE tokenizer
with the pre-tokenizer llama.cpp knows it by (`PRE_TOKENIZERS`: the same text splits the same way), or a
SentencePiece-style one (byte fallback: Llama 2, Mistral) as llama.cpp's `llama` vocabulary; any other
is refused rather than written with a pre-tokenizer that would split text differently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import LLMPruneError
from ..llamacpp import llama3_factors, longrope_attention_factor, query_scale
from .source import Source, Weights

NAME = "gguf"
PIP = "pip install 'llmprune[export]'"
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
EXACT_ZEROS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q5_0")
KQUANTS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s",
           "q5_k_m")


@dataclass(frozen=True)
class GGUFArch:
    name: str  # gguf.MODEL_ARCH member name
    norm_plus_one: bool = False  # store RMSNorm weights as 1 + w
    permute_qk: bool = False  # llama.cpp's interleaved RoPE layout for q/k rows
    rope_types: tuple[str, ...] = ("default",)  # RoPE scalings llama.cpp reads for this architecture
    moe: bool = False  # fused 3-D experts (transformers' gate_up_proj / down_proj)
    head_required: bool = False  # llama.cpp's loader needs output.weight: a tied head is written out


ARCHS = {"llama": GGUFArch("LLAMA", permute_qk=True, rope_types=("default", "llama3")),
         "mistral": GGUFArch("LLAMA", permute_qk=True), "mixtral": GGUFArch("LLAMA", permute_qk=True, moe=True),
         "qwen2": GGUFArch("QWEN2"), "qwen3": GGUFArch("QWEN3"),
         "qwen2_moe": GGUFArch("QWEN2MOE", moe=True, head_required=True), "qwen3_moe": GGUFArch("QWEN3MOE", moe=True),
         "phi3": GGUFArch("PHI3", rope_types=("default", "longrope")),
         "olmo2": GGUFArch("OLMO2", head_required=True), "glm4": GGUFArch("GLM4"),
         "gemma2": GGUFArch("GEMMA2", norm_plus_one=True), "gemma3_text": GGUFArch("GEMMA3", norm_plus_one=True)}

# tokenizer.json pre-tokenizers (byte-level BPE) by the name llama.cpp's `tokenizer.ggml.pre` gives them: the
# splits tokenizer.json applies, in order (a Split's regex; "<bytelevel>": ByteLevel splitting with GPT-2's
# own regex; "<digits>": Digits, one digit each), as llama.cpp's llama-vocab.cpp splits for that name, and
# whether a word found whole in the vocabulary skips the merges (BPE's ignore_merges: llama.cpp sets it for
# llama-bpe and tekken; found by running it, bench/llamacpp_families.py)
LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
               "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
TEKKEN_SPLIT = ("[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+|[^\\r\\n\\p{L}\\p{N}]?"
                "[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+"
                "|\\s+(?!\\S)|\\s+")
GPT4O_SPLIT = ("[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               "|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
PRE_TOKENIZERS = {(("<bytelevel>",), False): "gpt-2", (("<digits>", "<bytelevel>"), False): "smollm",
                  ((LLAMA3_SPLIT,), True): "llama-bpe", ((LLAMA3_SPLIT,), False): "dbrx",  # cl100k's split: Phi-4, OLMo 2
                  ((QWEN2_SPLIT,), False): "qwen2",
                  ((TEKKEN_SPLIT,), True): "tekken",  # Mistral NeMo, Mistral Small 3
                  ((GPT4O_SPLIT,), False): "gpt-4o"}  # o200k's split


def require() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise LLMPruneError(f"--to {NAME} needs the gguf package: {PIP}") from None


def check(src: Source, types) -> tuple[str, ...]:
    from transformers import AutoConfig

    types = parse_types(types)
    check_config(AutoConfig.from_pretrained(src.folder))
    if source_gguf(src) is None:
        tokenizer_kind(src.folder)  # refused before any weight is read
    return types


def check_config(cfg) -> None:
    """What the model's config alone decides: a family GGUF is written for, a RoPE it can hold, nothing
    llama.cpp would misread (`check_arch`)."""
    if cfg.model_type not in ARCHS:
        raise LLMPruneError(f"--to gguf writes {', '.join(sorted(ARCHS))} models, not {cfg.model_type!r}: use --to "
                            f"compressed-tensors")
    rope(cfg, ARCHS[cfg.model_type])
    check_arch(cfg)


def _refuse(cfg, what: str, assumed: str) -> None:
    raise LLMPruneError(f"this {cfg.model_type} variant's {what} differs from what llama.cpp assumes for the "
                        f"architecture rather than reads ({assumed}): use --to compressed-tensors")


def check_arch(cfg) -> None:
    """What llama.cpp (and transformers' GGUF reader) assume for an architecture rather than read."""
    kind = cfg.model_type
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


def parse_types(types) -> tuple[str, ...]:
    types = tuple(x.strip().lower() for x in (types.split(",") if isinstance(types, str) else types) if x.strip())
    if not types:
        raise LLMPruneError(f"--type: give one or more of {', '.join(TYPES)}")
    for t in types:
        if t in KQUANTS:
            raise LLMPruneError(f"--type {t}: the gguf package has no k-quant quantizer; export --type f16 and run "
                                f"llama.cpp's `llama-quantize FILE-F16.gguf OUT.gguf {t.upper()}`, or use q4_0 / q8_0")
        if t not in TYPES:
            raise LLMPruneError(f"unknown --type {t!r}: choose from {', '.join(TYPES)}")
    return types


# --- tensors --------------------------------------------------------------------------------------

def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF q/k rows (per head: first halves of the RoPE pairs, then second halves) -> llama.cpp's
    (pairs adjacent): (n_head, 2, d/2, in) -> (n_head, d/2, 2, in)."""
    out_f = w.shape[0]
    return w.reshape(n_head, 2, out_f // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def parts(key: str, shape: tuple[int, ...], a: GGUFArch) -> list[tuple[str, tuple[int, ...], slice | None]]:
    """The GGUF tensors one HF tensor becomes: (the HF name gguf's TensorNameMap knows it by, shape, the rows
    of dim 1 it takes or None). Fused experts' gate_up_proj (experts, 2 x width, hidden) is gate then up;
    Qwen2-MoE's shared-expert gate (1, hidden) is a vector."""
    if a.moe and key.endswith(".experts.gate_up_proj"):
        half = shape[1] // 2
        base = key.removesuffix("gate_up_proj")
        return [(base + "gate_proj", (shape[0], half, shape[2]), slice(0, half)),
                (base + "up_proj", (shape[0], half, shape[2]), slice(half, shape[1]))]
    if key.endswith("shared_expert_gate.weight"):
        return [(key, shape[1:], None)]
    return [(key, shape, None)]


def gguf_names(model, a: GGUFArch, keys) -> dict[str, str]:
    """HF name (as `parts` gives it) -> GGUF tensor name, for `keys`."""
    import gguf

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, a.name), model.config.num_hidden_layers)
    out = {}
    for key in keys:
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LLMPruneError(f"{key} has no GGUF name for {a.name.lower()}: this architecture variant cannot be "
                                f"exported to GGUF; use --to compressed-tensors")
        out[key] = name if name.endswith((".weight", ".bias")) else name + ".weight"  # fused experts: no suffix
    return out


def to_gguf(key: str, t: torch.Tensor, a: GGUFArch, cfg) -> np.ndarray:
    """One HF tensor as llama.cpp lays it out (module docstring), fp32."""
    t = t.detach().float()
    if a.permute_qk and key.endswith("q_proj.weight"):
        t = permute_rows(t, cfg.num_attention_heads)
    elif a.permute_qk and key.endswith("k_proj.weight"):
        t = permute_rows(t, cfg.num_key_value_heads)
    if a.norm_plus_one and key.endswith("norm.weight"):
        t = t + 1
    return t.numpy()


def tensor_type(name: str, shape: tuple[int, ...], want: str) -> str:
    """The type a tensor is stored in (module docstring)."""
    if len(shape) < 2 or want == "f32" or name.endswith("ffn_gate_inp.weight"):  # the MoE router too, as llama.cpp
        return "f32"
    if want in ("f16", "bf16"):
        return want
    if shape[-1] % 32:
        return "f16"
    if name == "token_embd.weight" and want.startswith(("q4", "q5")):
        return "q8_0"
    return want


ENCODE_CHUNK = 64 * 2**20  # bytes of fp32 rows quantized at a time (gguf's quantizers make several copies)


def encode(data: np.ndarray, t: str):
    """(array for GGUFWriter.write_tensor_data, raw GGML type or None). Block types quantize rows
    independently, so a large tensor (a 128k-token embedding) goes through in pieces of rows: the
    quantizer's temporaries are those of one piece, not of the whole tensor."""
    import gguf

    if t == "f32":
        return data.astype(np.float32, copy=False), None
    if t == "f16":
        return data.astype(np.float16), None
    q = getattr(gguf.GGMLQuantizationType, t.upper())
    rows = data.reshape(-1, data.shape[-1])
    out = np.empty(gguf.quants.quant_shape_to_byte_shape(data.shape, q), dtype=np.uint8)
    flat = out.reshape(-1, out.shape[-1])
    step = max(1, ENCODE_CHUNK // (rows.shape[1] * 4))
    for i in range(0, rows.shape[0], step):
        flat[i:i + step] = gguf.quants.quantize(rows[i:i + step].astype(np.float32, copy=False), q)
    return out, q


def tensor_info(shape: tuple[int, ...], t: str) -> tuple[tuple[int, ...], np.dtype, int, object]:
    """(shape, dtype, bytes, raw GGML type) of what `encode` makes of a tensor of `shape` as type `t`,
    known before the data (GGUF's header lists every tensor first)."""
    import gguf

    if t in ("f32", "f16"):
        dt = np.dtype(np.float32 if t == "f32" else np.float16)
        return tuple(shape), dt, int(np.prod(shape)) * dt.itemsize, None
    q = getattr(gguf.GGMLQuantizationType, t.upper())
    raw = gguf.quants.quant_shape_to_byte_shape(shape, q)  # quantize() returns uint8 rows of this shape
    return tuple(raw), np.dtype(np.uint8), int(np.prod(raw)), q


# --- metadata -------------------------------------------------------------------------------------

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
    return theta, []


def add_hparams(w, cfg, a: GGUFArch) -> None:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(rope(cfg, a)[0])
    w.add_vocab_size(cfg.vocab_size)
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
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if a.moe:  # Mixtral's experts are intermediate_size wide (llama.cpp's llama reads feed_forward_length)
        w.add_expert_count(getattr(cfg, "num_experts", None) or cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        if getattr(cfg, "moe_intermediate_size", None):
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if getattr(cfg, "shared_expert_intermediate_size", None):
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)


def source_gguf(src: Source) -> Path | None:
    """The GGUF file the source model was loaded from, when it is still there."""
    from .. import models

    info = src.manifest.model or {}
    if info.get("source") == "alias" and info.get("asked") in models.ALIASES:
        try:
            p = models.alias_gguf(info["asked"])
        except LLMPruneError:
            return None
    elif info.get("source") == "gguf":
        p = Path(info.get("loaded", ""))
    else:
        return None
    return p if p.is_file() else None


def copy_tokenizer(path: Path):
    """Every tokenizer.* key of the GGUF at `path`, value and type as stored: a function writing them into a
    GGUFWriter (the file is read once for every type exported)."""
    import gguf

    fields = [(key, f.contents(), f.types[0], f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
              for key, f in gguf.GGUFReader(path).fields.items() if key.startswith("tokenizer.")]

    def add(w) -> None:
        for key, value, kind, sub in fields:
            w.add_key_value(key, value, kind, sub)

    return add


def _splits(pre) -> tuple[str, ...] | None:
    """A tokenizer.json pre-tokenizer as the splits it applies, in order (PRE_TOKENIZERS); None: one
    that is not only splitting (e.g. Metaspace, Whitespace)."""
    if pre is None:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        out: tuple[str, ...] = ()
        for p in pre.get("pretokenizers", []):
            sub = _splits(p)
            if sub is None:
                return None
            out += sub
        return out
    if kind == "Split" and "Regex" in pre.get("pattern", {}) and pre.get("behavior") == "Isolated" \
            and not pre.get("invert"):
        return (pre["pattern"]["Regex"],)
    if kind == "ByteLevel":
        return ("<bytelevel>",) if pre.get("use_regex", True) else ()
    if kind == "Digits" and pre.get("individual_digits"):
        return ("<digits>",)
    return None


def tokenizer_kind(folder: Path) -> tuple[str, str | None, dict]:
    """("gpt2", llama.cpp's pre-tokenizer name, tokenizer.json) for a byte-level BPE tokenizer.json, ("llama",
    None, tokenizer.json) for a SentencePiece-style one (BPE with byte fallback: Llama 2, Mistral, Gemma); refused
    otherwise (module docstring)."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise LLMPruneError(f"{folder} has no tokenizer.json: GGUF holds the tokenizer, so export a model loaded "
                            f"from a GGUF (its tokenizer is copied) or one with a fast tokenizer")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model, decoder = tj.get("model") or {}, tj.get("decoder") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback") and decoder.get("type") == "Sequence":
        return "llama", None, tj
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise LLMPruneError(f"{path}: only byte-level BPE and SentencePiece-style (byte fallback) tokenizers are "
                            f"written to GGUF: export a model loaded from a GGUF (its tokenizer is copied)")
    splits = (_splits(tj.get("pre_tokenizer")), bool(model.get("ignore_merges")))
    if not model.get("merges"):
        raise LLMPruneError(f"{path}: a BPE tokenizer without merges, which llama.cpp cannot load: export a model "
                            f"loaded from a GGUF (its tokenizer is copied)")
    if splits not in PRE_TOKENIZERS:
        raise LLMPruneError(f"{path}: its pre-tokenizer is none llmprune knows llama.cpp's name of "
                            f"({', '.join(sorted(PRE_TOKENIZERS.values()))}), and another would tokenize text "
                            f"differently: export a model loaded from a GGUF (its tokenizer is copied)")
    return "gpt2", PRE_TOKENIZERS[splits], tj


def spm_scores(tj: dict) -> dict[str, float]:
    """Scores for llama.cpp's `llama` vocabulary from tokenizer.json's merges. llama.cpp merges the adjacent
    pair whose joined piece scores highest, HF's BPE the pair of lowest merge rank: a piece scores minus the
    rank of the first merge making it (gguf's LlamaHfVocab writes -1000 for every piece, which would merge
    left to right instead)."""
    out: dict[str, float] = {}
    for rank, m in enumerate(tj["model"].get("merges") or []):
        pair = m.split(" ") if isinstance(m, str) else m
        if len(pair) == 2:
            out.setdefault(pair[0] + pair[1], -float(rank + 1))
    return out


def space_prefix(tj: dict) -> bool:
    """Whether a SentencePiece-style tokenizer.json puts "▁" before the text (Llama 2, Mistral: a Prepend
    normalizer or a Metaspace pre-tokenizer; Gemma: neither), which llama.cpp reads as add_space_prefix."""
    def walk(x):
        if isinstance(x, dict):
            yield x
            for v in x.values():
                yield from walk(v)
        elif isinstance(x, list):
            for v in x:
                yield from walk(v)

    parts = [*walk(tj.get("normalizer")), *walk(tj.get("pre_tokenizer"))]
    return any(p.get("type") == "Prepend" and p.get("prepend") == "\u2581" for p in parts) or any(
        p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never" and p.get("add_prefix_space", True)
        for p in parts)


def hf_tokenizer(folder: Path, n_vocab: int):
    """The tokenizer.json of `folder` as GGUF metadata (gguf.vocab, as llama.cpp's converter reads it), padded
    to the model's vocabulary: (a function writing it into a GGUFWriter, what the manifest says of it). The
    vocabulary is read once for every type exported."""
    import gguf

    model, pre, tj = tokenizer_kind(folder)
    vocab = gguf.vocab.BpeVocab(folder) if model == "gpt2" else gguf.vocab.LlamaHfVocab(folder)
    ranked = spm_scores(tj) if model == "llama" else {}
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text.encode() if isinstance(text, str) else text)
        normal = kind == gguf.TokenType.NORMAL
        scores.append(ranked.get(tokens[-1].decode("utf-8", "replace"), score) if normal else score)
        types.append(kind)
    if len(tokens) > n_vocab:
        raise LLMPruneError(f"{folder}: the tokenizer has {len(tokens)} tokens but the model embeds {n_vocab}: GGUF "
                            f"readers size the vocabulary from the tokens; resize the embeddings or fix the tokenizer")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    special = gguf.SpecialVocab(folder, load_merges=model == "gpt2", n_vocab=len(tokens))

    def add(w) -> None:
        w.add_tokenizer_model(model)
        w.add_tokenizer_pre(pre or "default")
        if model == "llama":
            w.add_add_space_prefix(space_prefix(tj))
        w.add_token_list(tokens)
        w.add_token_scores(scores)  # transformers' reader rebuilds merges from them when a vocabulary has none
        w.add_token_types(types)
        special.add_to_gguf(w, quiet=True)

    return add, f"tokenizer.json ({'SentencePiece-style' if pre is None else 'pre-tokenizer: ' + pre})"


# --- write ----------------------------------------------------------------------------------------

def open_file(path: Path, want: str, a: GGUFArch, cfg, plan, add_tokenizer, name: str):
    """A GGUFWriter for one type with its metadata (`add_tokenizer(writer)` writes the tokenizer's) and every
    tensor's info written (`plan`: (gguf name, shape) in data order); returns (writer, {gguf type: tensor
    count}). The data follows tensor by tensor."""
    import gguf

    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, a.name)])
    w.add_name(name)
    w.add_file_type(getattr(gguf.LlamaFileType, "ALL_F32" if want == "f32" else f"MOSTLY_{want.upper()}"))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hparams(w, cfg, a)
    add_tokenizer(w)
    counts: dict[str, int] = {}
    for tname, shape in plan:
        t = tensor_type(tname, shape, want)
        w.add_tensor_info(tname, *tensor_info(shape, t))
        counts[t] = counts.get(t, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    return w, counts


@torch.no_grad()
def write(weights: Weights, folder: Path, types: tuple[str, ...], src: Source, progress: bool = False) -> dict:
    """One GGUF file per type into `folder` (the tokenizer is inside each); returns the export section.
    Every file's header is written first (names, shapes, types are known without the data), then each
    tensor is encoded into every file as it arrives from the source (one decoder block in memory)."""
    from tqdm.auto import tqdm

    from ..arch import arch_of

    model = weights.model
    a = ARCHS[model.config.model_type]
    cfg = model.config
    gg = source_gguf(src)
    add_tokenizer, said = (copy_tokenizer(gg), f"copied from {gg.name}") if gg else hf_tokenizer(src.folder,
                                                                                              cfg.vocab_size)
    name = Path(src.folder).name
    shapes = weights.shapes()
    split = {k: parts(k, shapes[k], a) for k in shapes}
    embed, head = (f"{n}.weight" for n in (arch_of(model).embed, arch_of(model).head))
    if a.head_required and head not in shapes:  # tied: the embedding once more, as the head
        split[embed].append((head, shapes[embed], None))
    gnames = gguf_names(model, a, [p[0] for k in shapes for p in split[k]])
    plan = [(gnames[p[0]], p[1]) for k in shapes for p in split[k]]
    extra = rope(cfg, a)[1]
    plan[:0] = [(n, f.shape) for n, f in extra]  # llama.cpp's converter writes them first
    files = [f"{name}-{t.upper()}.gguf" for t in types]
    writers, layout = {}, {}
    try:
        for t, fname in zip(types, files):
            writers[t], layout[fname] = open_file(folder / fname, t, a, cfg, plan, add_tokenizer, name)
        for _, f in extra:
            for w in writers.values():
                w.write_tensor_data(f)
        for key, tensor in tqdm(weights.tensors(), total=len(shapes), desc="gguf", disable=not progress):
            data = to_gguf(key, tensor, a, cfg)
            for hf_name, shape, rows in split[key]:
                piece = np.ascontiguousarray(data[:, rows] if rows is not None else data).reshape(shape)
                for t, w in writers.items():
                    w.write_tensor_data(encode(piece, tensor_type(gnames[hf_name], shape, t))[0])
    finally:
        for w in writers.values():
            w.close()
    return {"to": NAME, "files": files, "bytes": {f: (folder / f).stat().st_size for f in files},
            "types": list(types), "tensor_types": layout,
            "exact_zeros": [t for t in types if t in EXACT_ZEROS],
            "tokenizer": said, "gguf": _version()}


def _version() -> str:
    from importlib.metadata import version

    return version("gguf")
