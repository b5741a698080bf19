"""GGUF for llama.cpp and Ollama, written with the `gguf` package's GGUFWriter and gguf.quants.

One file per type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: the types gguf.quants can quantize;
it has no k-quant quantizer, so Q4_K etc. come from llama.cpp's llama-quantize run on our F16 file), each
holding the tokenizer (gguf_tokenizer.py). What each family is to llama.cpp, what it assumes rather than
reads (refused) and the metadata it reads: gguf_arch.py; each tensor's names, shape and values as llama.cpp
lays them out: gguf_tensors.py.

1-D tensors (norms) stay F32; a matrix whose rows are not a multiple of the block (32) stays F16; with
Q4/Q5 types the (tied) embedding matrix is Q8_0, as the head reads it. Symmetric block types (Q8_0,
Q4_0, Q5_0) keep a pruned model's zeros exactly (a zero rounds to the block's zero code); Q4_1 and Q5_1
store a block minimum and do not. The block types of an int4 output (w4g128, w4s24) hold its own codes and
scales where its grid fits them (gguf_int4.py), not gguf's rounding of the dequantized weights; with `--quant gptq`
an unquantized output's linears are quantized by GPTQ on export, block by block, and hold GPTQ's codes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import LLMPruneError
from . import gguf_int4
from .gguf_arch import GGUFArch, add_hparams, arch_for, check_config, engine_note, rope, scalars
from .gguf_tensors import gguf_names, parts, take, tensor_type, to_gguf
from .gguf_tokenizer import copy_tokenizer, hf_tokenizer, source_gguf, tokenizer_kind
from .source import INT4_FORMATS, Source, Weights

NAME = "gguf"
PIP = "pip install 'llmprune[export]'"
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
EXACT_ZEROS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q5_0")
KQUANTS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s",
           "q5_k_m")


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


GPTQ_GROUPS = (32, 64, 128)  # int4 groups whose 32-blocks are GGUF blocks (32: one fp16 step a block, as GGUF's own)


def check_quant(src: Source, quant: str, group_size, grid: str, types: tuple[str, ...]) -> tuple[int, bool]:
    """`--quant gptq` on a GGUF export: GPTQ's int4 codes written as the block types' codes (gguf_int4), which
    gguf's round-to-nearest would otherwise make; refused where they cannot be. Returns (group size, symmetric):
    auto is 32 (every GGUF block stores its own fp16 step, so smaller groups cost no bytes) and symmetric (the
    grid Q4_0 holds)."""
    if src.fmt not in ("dense", "sparse24"):
        raise LLMPruneError(f"{src.folder} is already int4 ({src.fmt}): its codes are exported as they are; drop "
                            f"--quant / --grid / --group-size, or export the dense output it was packed from")
    return check_quant_options(quant, group_size, grid, types)


def check_quant_options(quant: str, group_size, grid: str, types: tuple[str, ...]) -> tuple[int, bool]:
    """`check_quant`'s checks of the options alone (`compress --export gguf --export-quant` before it computes)."""
    from . import gguf_int4

    if quant != "gptq":
        raise LLMPruneError(f"--quant {quant} with --to gguf: GGUF's block types round to nearest themselves; use "
                            f"--quant gptq (GPTQ's codes in the blocks), or drop --quant")
    other = [t for t in types if t not in gguf_int4.TYPES]
    if other:
        raise LLMPruneError(f"--type {other[0]} with --quant gptq: GPTQ's codes go into GGUF's block types; use "
                            f"--type {', '.join(gguf_int4.TYPES)}, or export {other[0]} without --quant")
    group_size = 32 if group_size == "auto" else group_size
    if group_size not in GPTQ_GROUPS:
        raise LLMPruneError(f"--group-size {group_size} with --to gguf: GGUF's blocks take int4 groups of "
                            f"{', '.join(map(str, GPTQ_GROUPS))} (or auto: 32)")
    symmetric = grid != "asym"
    if not symmetric and "q4_0" in types:
        raise LLMPruneError("--grid asym with --type q4_0: Q4_0 stores no minimum, so it holds the symmetric grid "
                            "alone; use --grid sym (or auto), or --type q4_1 / q5_0")
    return group_size, symmetric


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


def open_file(path: Path, want: str, a: GGUFArch, cfg, plan, add_tokenizer, name: str, kv=()):
    """A GGUFWriter for one type with its metadata (`add_tokenizer(writer)` writes the tokenizer's; `kv`: more,
    each (GGUFWriter method, value)) and every tensor's info written (`plan`: (gguf name, shape) in data order);
    returns (writer, {gguf type: tensor count}). The data follows tensor by tensor."""
    import gguf

    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, a.name)])
    w.add_name(name)
    w.add_file_type(getattr(gguf.LlamaFileType, "ALL_F32" if want == "f32" else f"MOSTLY_{want.upper()}"))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hparams(w, cfg, a)
    for method, value in kv:
        getattr(w, method)(value)
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
def write(weights: Weights, folder: Path, types: tuple[str, ...], src: Source, progress: bool = False,
          quantize=None) -> dict:
    """One GGUF file per type into `folder` (the tokenizer is inside each); returns the export section.
    Every file's header is written first (names, shapes, types are known without the data), then each
    tensor is encoded into every file as it arrives from the source (one decoder block in memory).
    `quantize(put)`: quantizes the source on export (GPTQ's pass, export._gguf_gptq) and calls `put(key, tensor,
    code_of)` for every tensor in `weights.keys`' order, each block's as it is done, `code_of(layer, weight)`
    giving its layers' codes; without it, the source's tensors are written, an int4 output's with its codes."""
    from tqdm.auto import tqdm

    from ..arch import arch_of

    model = weights.model
    a = arch_for(model.config)
    cfg = model.config
    gg = source_gguf(src)
    add_tokenizer, said = (copy_tokenizer(gg), f"copied from {gg.name}") if gg else hf_tokenizer(src.folder,
                                                                                              cfg.vocab_size)
    name = Path(src.folder).name
    shapes = weights.shapes()
    split = {k: parts(k, shapes[k], a, cfg) for k in shapes}
    embed, head = (f"{n}.weight" for n in (arch_of(model).embed, arch_of(model).head))
    if a.head_required and head not in shapes:  # tied: the embedding once more, as the head
        split[embed].append((head, shapes[embed], None))
    gnames = gguf_names(model, a, [p[0] for k in shapes for p in split[k]])
    plan = [(gnames[p[0]], p[1]) for k in shapes for p in split[k]]
    extra, kv = rope(cfg, a)[1], scalars(src.files, weights.blocks(), cfg.num_hidden_layers, a)
    plan[:0] = [(n, f.shape) for n, f in extra]  # llama.cpp's converter writes them first
    files = [f"{name}-{t.upper()}.gguf" for t in types]
    writers, layout = {}, {}
    codes = {t: {"kept": 0, "requantized": 0, "max_error_steps": 0.0} for t in types if t in gguf_int4.TYPES}
    if quantize is not None:
        int4 = gguf_int4.modules(weights.targets())
    else:
        int4 = gguf_int4.modules((src.manifest.format or {}).get("layers") or {}) \
            if codes and src.fmt in INT4_FORMATS else set()
    order = iter(shapes)  # the order the headers promise
    bar = tqdm(total=len(shapes), desc="gguf", disable=not progress)

    def put(key: str, tensor: torch.Tensor, code_of) -> None:
        if key != next(order, None):
            raise AssertionError(f"gguf: {key} written out of the headers' order")
        data = to_gguf(key, tensor, a, cfg)
        held = key.rsplit(".", 1)[0] in int4  # (an int4 layer's: its codes kept where gguf_int4 can)
        for hf_name, shape, rows in split[key]:
            piece = np.ascontiguousarray(take(data, rows)).reshape(shape)
            tts = {t: tensor_type(gnames[hf_name], shape, t) for t in writers}
            want = {*tts.values()} & {*gguf_int4.TYPES} if held else set()  # (types its codes can be kept in)
            coded = gguf_int4.blocks(code_of, model, key, tensor, piece, rows, want, a, cfg) if want else {}
            for t, w in writers.items():
                kept = coded.get(tts[t])
                if tts[t] in coded:
                    c = codes[tts[t]]
                    c["kept" if kept else "requantized"] += 1
                    c["max_error_steps"] = max(c["max_error_steps"], kept[1] if kept else 0.0)
                w.write_tensor_data(kept[0] if kept else encode(piece, tts[t])[0])
        bar.update()

    try:
        for t, fname in zip(types, files):
            writers[t], layout[fname] = open_file(folder / fname, t, a, cfg, plan, add_tokenizer, name, kv)
        for _, f in extra:
            for w in writers.values():
                w.write_tensor_data(f)
        if quantize is not None:
            quantize(put)
        else:
            stored = gguf_int4.stored(src)
            for key, tensor in weights.tensors():
                put(key, tensor, stored)
        if next(order, None) is not None:
            raise AssertionError("gguf: a tensor the headers promise was not written")
    finally:
        bar.close()
        for w in writers.values():
            w.close()
    note = engine_note(cfg)
    codes = {t: c for t, c in codes.items() if c["kept"] or c["requantized"]}
    return {"to": NAME, "files": files, "model_type": cfg.model_type, **({"note": note} if note else {}),
            **({"int4_codes": codes} if codes else {}),
            "bytes": {f: (folder / f).stat().st_size for f in files},
            "types": list(types), "tensor_types": layout,
            "exact_zeros": [t for t in types if t in EXACT_ZEROS],
            "tokenizer": said, "gguf": _version()}


def _version() -> str:
    from importlib.metadata import version

    return version("gguf")
