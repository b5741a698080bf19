"""GGUF for llama.cpp and Ollama, written with the `gguf` package's GGUFWriter and gguf.quants.

One file per type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: the types gguf.quants can quantize;
it has no k-quant quantizer, so Q4_K etc. come from llama.cpp's llama-quantize run on our F16 file).
Layout as llama.cpp's converter writes these architectures (its tensor names come from gguf's own
TensorNameMap):
  llama   q_proj / k_proj rows permuted per head (HF's rotate-half RoPE pairs -> llama.cpp's adjacent pairs)
  gemma3  every RMSNorm weight stored as 1 + w (Gemma scales by 1 + w; llama.cpp by w)
1-D tensors (norms) stay F32; a matrix whose rows are not a multiple of the block (32) stays F16; with
Q4/Q5 types the (tied) embedding matrix is Q8_0, as the head reads it. Symmetric block types (Q8_0,
Q4_0, Q5_0) keep a pruned model's zeros exactly (a zero rounds to the block's zero code); Q4_1 and Q5_1
store a block minimum and do not.

Tokenizer and chat template: copied key by key from the GGUF the model was loaded from (the aliases
`llama`, `gemma3` and any --model x.gguf), so the round trip GGUF -> pruned -> GGUF keeps the exact
vocabulary, pre-tokenizer and template; other models' BPE tokenizers are read from tokenizer.json.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import LLMPruneError
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
    norm_plus_one: bool  # store RMSNorm weights as 1 + w
    permute_qk: bool  # llama.cpp's interleaved RoPE layout for q/k rows


ARCHS = {"llama": GGUFArch("LLAMA", False, True), "mistral": GGUFArch("LLAMA", False, True),
         "gemma3_text": GGUFArch("GEMMA3", True, False)}


def require() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise LLMPruneError(f"--to {NAME} needs the gguf package: {PIP}") from None


def check(src: Source, types) -> tuple[str, ...]:
    from transformers import AutoConfig

    types = parse_types(types)
    cfg = AutoConfig.from_pretrained(src.folder)
    if cfg.model_type not in ARCHS:
        raise LLMPruneError(f"--to gguf writes {', '.join(sorted(ARCHS))} models, not {cfg.model_type!r}: use --to "
                            f"compressed-tensors")
    _rope_theta(cfg)
    if ARCHS[cfg.model_type].name == "GEMMA3":
        check_gemma3(cfg)
    return types


def check_gemma3(cfg) -> None:
    """What llama.cpp's gemma3 (and transformers' GGUF reader) assume rather than read: every 6th layer
    global, the others sliding with RoPE base 10000, queries scaled by 1/sqrt(head_dim)."""
    standard = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(cfg.num_hidden_layers)]
    local = ((getattr(cfg, "rope_parameters", None) or {}).get("sliding_attention") or {}).get("rope_theta", 10000.0)
    if list(cfg.layer_types) != standard or cfg.query_pre_attn_scalar != cfg.head_dim or float(local) != 10000.0:
        raise LLMPruneError("this Gemma-3 variant (layer pattern, query scale or local RoPE base) differs from what "
                            "GGUF readers assume for gemma3 (5 sliding : 1 global, 1/sqrt(head_dim), base 10000): "
                            "use --to compressed-tensors")


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


def gguf_names(model, a: GGUFArch, keys) -> dict[str, str]:
    """HF state-dict key -> GGUF tensor name, for `keys`."""
    import gguf

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, a.name), model.config.num_hidden_layers)
    out = {}
    for key in keys:
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LLMPruneError(f"{key} has no GGUF name for {a.name.lower()}: this architecture variant cannot be "
                                f"exported to GGUF; use --to compressed-tensors")
        out[key] = name
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
    if len(shape) < 2 or want == "f32":
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

def _rope_theta(cfg) -> float:
    rp = getattr(cfg, "rope_parameters", None) or {}
    rp = rp.get("full_attention", rp) if isinstance(rp, dict) else {}
    kind = rp.get("rope_type", "default")
    if kind != "default":
        raise LLMPruneError(f"RoPE scaling {kind!r} is not written to GGUF yet: export --to compressed-tensors")
    return float(rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def add_hparams(w, cfg, a: GGUFArch) -> None:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_vocab_size(cfg.vocab_size)
    if a.name == "GEMMA3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(cfg.sliding_window)
    else:
        w.add_rope_dimension_count(head_dim)
        if head_dim * cfg.num_attention_heads != cfg.hidden_size:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)


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


def copy_tokenizer(w, path: Path) -> None:
    """Every tokenizer.* key of the GGUF at `path`, value and type as stored."""
    import gguf

    r = gguf.GGUFReader(path)
    for key, f in r.fields.items():
        if key.startswith("tokenizer."):
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, f.contents(), f.types[0], sub)


def hf_tokenizer(w, folder: Path, n_vocab: int) -> None:
    """A GPT-2-style BPE tokenizer.json as GGUF metadata (gguf.vocab), padded to the model's vocabulary."""
    import gguf

    try:
        vocab = gguf.vocab.BpeVocab(folder)
    except (FileNotFoundError, ValueError) as e:
        raise LLMPruneError(f"{folder}: only GPT-2-style BPE tokenizers are written from tokenizer.json ({e}); "
                            f"export a model loaded from a GGUF (its tokenizer is copied)") from None
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text.encode() if isinstance(text, str) else text)
        scores.append(score)
        types.append(kind)
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)  # transformers' reader rebuilds merges from them when a vocabulary has none
    w.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)


# --- write ----------------------------------------------------------------------------------------

def open_file(path: Path, want: str, a: GGUFArch, cfg, plan, tokenizer_from: Path, from_gguf: bool, name: str):
    """A GGUFWriter for one type with its metadata and every tensor's info written (`plan`: (gguf name,
    shape) in data order); returns (writer, {gguf type: tensor count}). The data follows tensor by tensor."""
    import gguf

    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, a.name)])
    w.add_name(name)
    w.add_file_type(getattr(gguf.LlamaFileType, "ALL_F32" if want == "f32" else f"MOSTLY_{want.upper()}"))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hparams(w, cfg, a)
    if from_gguf:
        copy_tokenizer(w, tokenizer_from)
    else:
        hf_tokenizer(w, tokenizer_from, cfg.vocab_size)
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

    model = weights.model
    a = ARCHS[model.config.model_type]
    cfg = model.config
    gg = source_gguf(src)
    tokenizer_from = gg or src.folder
    name = Path(src.folder).name
    shapes = weights.shapes()
    gnames = gguf_names(model, a, shapes)
    plan = [(gnames[k], shapes[k]) for k in shapes]
    files = [f"{name}-{t.upper()}.gguf" for t in types]
    writers, layout = {}, {}
    try:
        for t, fname in zip(types, files):
            writers[t], layout[fname] = open_file(folder / fname, t, a, cfg, plan, tokenizer_from, gg is not None, name)
        for key, tensor in tqdm(weights.tensors(), total=len(shapes), desc="gguf", disable=not progress):
            gname = gnames[key]
            data = to_gguf(key, tensor, a, cfg)
            for t, w in writers.items():
                w.write_tensor_data(encode(data, tensor_type(gname, data.shape, t))[0])
    finally:
        for w in writers.values():
            w.close()
    return {"to": NAME, "files": files, "bytes": {f: (folder / f).stat().st_size for f in files},
            "types": list(types), "tensor_types": layout,
            "exact_zeros": [t for t in types if t in EXACT_ZEROS],
            "tokenizer": f"copied from {gg.name}" if gg else "tokenizer.json (pre-tokenizer: default)",
            "gguf": _version()}


def _version() -> str:
    from importlib.metadata import version

    return version("gguf")
