"""Models whose weights stay on disk until a block needs them (sequential onloading), and output
folders written shard by shard. Think in 70B: nothing here holds more than one block.

- `WeightFiles`: a folder's safetensors tensors (one file, or shards with their index), read one
  tensor at a time with plain file reads straight into the tensor (no mapping).
- `LazyModel`: the transformers model of a folder built on the meta device (accelerate's
  init_empty_weights); `load(prefix, device)` reads the tensors under a module prefix and places
  them with accelerate's set_module_tensor_to_device in the compute dtype, `release(prefix)` puts
  them back on meta. Packed outputs get PackedLinear modules for their packed layers, or (`unpack`)
  nn.Linear modules holding the weights those tensors encode, for passes that read dense weights
  (exports, GPTQ on an export).
- `ShardWriter`: a dense HF folder written as standard sharded safetensors + index; every shard's
  header is fixed up front, so each tensor goes to its offset as it arrives (nothing buffered), and
  unchanged tensors are streamed file to file in chunks.
"""
from __future__ import annotations

import functools
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from . import formats, fp8, moe, mxfp4, sliced
from .errors import LLMPruneError
from .linalg import all_finite
from .modules import PackedLinear
from .runinfo import trim_heap

INDEX = "model.safetensors.index.json"
SHARD_BYTES = 2 * 2**30  # dense outputs: at most this much per file
# Walks read the next block's tensors on a background thread while a block computes: "gpu" when the blocks
# run on a GPU (the default: the CPU is idle and the disk read is the larger share), True everywhere, False
# never. Not on the CPU by default: there the reader takes the compute's cores and holds one more block (an
# 8B-width fp32 block is 0.87 GB), for 5% with a cold page cache and next to nothing warm
# (bench/results/read_ahead.txt).
READ_AHEAD = "gpu"
_READER = None


# safetensors' dtype names (the format's spec); a header is JSON after its u64 length
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
COPY_CHUNK = 64 * 2**20  # bytes moved at a time when a tensor is copied file to file


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(the JSON header, where the data starts) of a safetensors file, read without mapping it."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


@functools.lru_cache(maxsize=256)
def _header_at(path: str, size: int, mtime: int) -> tuple[dict, int]:
    return safetensors_header(Path(path))


def _header(path: Path) -> tuple[dict, int]:
    st = path.stat()
    return _header_at(str(path), st.st_size, st.st_mtime_ns)


def indexed(folder: Path) -> list[str] | None:
    """The files the folder's model.safetensors.index.json names (None: it has none). Only they hold the model, as
    transformers reads it: a repo may keep other safetensors beside them (Mistral's consolidated.safetensors, the
    same weights under other names), which must not mix into its tensors."""
    path = folder / INDEX
    if not path.is_file():
        return None
    try:
        names = sorted(set(json.loads(path.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise LLMPruneError(f"{path} is damaged ({type(e).__name__}): re-create the folder") from None
    bad = [n for n in names if not isinstance(n, str) or n in ("", ".", "..") or "/" in n or "\\" in n]
    if bad or not names:
        raise LLMPruneError(f"{path} is damaged (its weight_map names {bad[0] if bad else 'no file'!r}): re-create "
                            f"the folder")
    return names


def indexed_files(folder: Path) -> list[Path] | None:
    """`indexed`, as paths, each one there (a missing one is an LLMPruneError naming it)."""
    names = indexed(folder)
    if names is None:
        return None
    lacking = [n for n in names if not (folder / n).is_file()]
    if lacking:
        more = f" and {len(lacking) - 1} more" if len(lacking) > 1 else ""
        raise LLMPruneError(f"{folder / lacking[0]} is missing ({INDEX} names it{more}): re-create the folder")
    return [folder / n for n in names]


def model_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder's model, as transformers picks them: model.safetensors, else the files its
    index names (`indexed_files`), else every one there (a folder llmprune wrote holds one of the first two)."""
    one = folder / "model.safetensors"
    if one.is_file():
        return [one]
    files = indexed_files(folder)
    return sorted(folder.glob("*.safetensors")) if files is None else files


class WeightFiles:
    """name -> tensor over a folder's safetensors files (`model_files`), each header checked up front. Files are
    opened (memory-mapped) only while tensors are copied out of them and closed right after: a file
    kept mapped would count every page read so far in the process's resident memory."""

    def __init__(self, folder: str | Path):
        from safetensors import SafetensorError, safe_open

        self.folder = Path(folder)
        files = model_files(self.folder)
        if not files:
            pickles = sorted(p.name for p in self.folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
            if pickles:
                raise LLMPruneError(f"{self.folder} holds {pickles[0]}, pickle weights: llmprune loads safetensors "
                                    f"only (pickle can run code): convert it with a trusted tool first")
            raise LLMPruneError(f"{self.folder} has no .safetensors weights: re-create the folder")
        self.where: dict[str, Path] = {}
        for f in files:
            with open(f, "rb") as raw:
                head = raw.read(9)  # safetensors: u64 header length, then the JSON header's "{"
            if head[8:9] != b"{" and (head[:2] == b"PK" or head[:1] == b"\x80"):  # torch.save zip / pickle stream
                raise LLMPruneError(f"{f} is a pickle file, not safetensors; llmprune never unpickles: re-create the "
                                    f"folder")
            try:
                with safe_open(str(f), framework="pt", device="cpu") as fh:
                    names = list(fh.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise LLMPruneError(f"{f} is corrupted or truncated ({str(e).splitlines()[0][:120]}): "
                                    f"re-create the folder") from None
            for n in names:
                self.where[n] = f
        self.fp8_block: tuple[int, int] | None = None  # block-scaled FP8 (fp8.py): read dequantized
        self.mxfp4: set[str] = set()  # names stored as MXFP4 blocks and scales (mxfp4.py): read dequantized
        self.stored: dict[str, str] = {}  # name -> the name the file stores it under, where they differ (prefixed)

    def read_prefixed(self, names, prefix: str | None) -> None:
        """Read tensors stored under other names as transformers' load reads them, when the model's tensors
        `names` are stored with its base model prefix before them (Llama 4 as released: `language_model.model.
        layers...`, read by its text model as `model.layers...`) or without it (a checkpoint of the base model
        alone): every stored name is seen through the same change (an FP8 weight's scales, MXFP4's blocks too);
        what is still lacking after it (a tied head) is for the caller to judge."""
        lacking = [n for n in names if n not in self.where]
        if not prefix or not lacking:
            return
        head = prefix + "."
        if any(head + n in self.where for n in lacking):
            seen = {k[len(head):]: k for k in self.where if k.startswith(head)}
        elif any(n.startswith(head) and n[len(head):] in self.where for n in lacking):
            seen = {head + k: k for k in self.where if not k.startswith(head)}
        else:
            return
        for n, k in seen.items():
            if n not in self.where:
                self.alias(n, k)

    def alias(self, name: str, stored: str) -> None:
        """Read `name` as the tensor stored under the name `stored` (itself possibly an alias)."""
        self.where[name], self.stored[name] = self.where[stored], self.stored.get(stored, stored)

    def read_mxfp4(self) -> None:
        """Read the tensors an MXFP4 checkpoint stores as `X_blocks` and `X_scales` (mxfp4.py) as `X`, dequantized."""
        n = len(mxfp4.BLOCKS)
        self.mxfp4 = {k[:-n] for k in self.where
                      if k.endswith(mxfp4.BLOCKS) and k[:-n] + mxfp4.SCALES in self.where and k[:-n] not in self.where}
        for k in self.mxfp4:
            self.where[k] = self.where[k + mxfp4.BLOCKS]

    def scaled(self, name: str) -> bool:
        """Whether `name` is read dequantized: a block-scaled FP8 weight stored in FP8 beside its scales (fp8.py),
        or an MXFP4 one stored as its blocks and scales (mxfp4.py); not a weight written unquantized since, to a
        scratch file read in its place (onload.Scratch)."""
        if name in self.mxfp4:
            return self.where.get(name) == self.where.get(name + mxfp4.BLOCKS)
        if self.fp8_block is None or name not in self.where or name + fp8.SCALE not in self.where:
            return False
        head, _ = _header(self.where[name])
        return ST_DTYPES.get(head[self.stored.get(name, name)]["dtype"]) in fp8.FP8

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def keys(self) -> list[str]:
        return list(self.where)

    def read(self, names) -> dict[str, torch.Tensor]:
        """The named tensors, as stored."""
        return {n: self.get(n) for n in names}

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, read with plain file reads (no mapping: the file's pages never count in our
        resident memory) straight into its tensor; a floating tensor converted to `dtype` chunk by
        chunk, so a conversion holds the result and one chunk, not the tensor twice. A block-scaled FP8 or an
        MXFP4 weight is read dequantized (in float32 when `dtype` is None)."""
        if name in self.mxfp4 and self.scaled(name):
            return mxfp4.dequantize(self._get(name + mxfp4.BLOCKS), self._get(name + mxfp4.SCALES),
                                    dtype or torch.float32)
        if self.scaled(name):
            w = fp8.dequantize(self._get(name), self._get(name + fp8.SCALE), self.fp8_block)
            return w if dtype in (None, torch.float32) else w.to(dtype)
        return self._get(name, dtype)

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows start:stop of a tensor (a vocabulary-sized embedding or head, a chunk at a time), read as `get`
        reads a whole one; a dequantized one (FP8, MXFP4) is read whole and cut."""
        if self.scaled(name):
            return self.get(name, dtype)[start:stop]
        return self._get(name, dtype, (start, stop))

    def _get(self, name: str, dtype: torch.dtype | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if name not in self.where:
            raise LLMPruneError(f"{self.folder} lacks {name}: re-create the folder")
        path = self.where[name]
        try:
            head, start = _header(path)
            e = head[self.stored.get(name, name)]
            sdt, shape = ST_DTYPES[e["dtype"]], tuple(e["shape"])
        except (OSError, ValueError, KeyError) as err:
            raise LLMPruneError(f"{path}: {name} cannot be read ({str(err)[:120]}): the file is corrupted, "
                                f"re-create the folder") from None
        a, b = e["data_offsets"]
        if rows is not None:  # the rows' bytes only (row-major)
            r0, r1 = max(0, rows[0]), min(shape[0], rows[1])
            row = math.prod(shape[1:]) * sdt.itemsize
            a, b, shape = a + r0 * row, a + max(r0, r1) * row, (max(0, r1 - r0), *shape[1:])
        want = dtype if (dtype is not None and sdt.is_floating_point) else sdt
        out = torch.empty(shape, dtype=want)
        flat = out.view(-1)
        with open(path, "rb") as f:
            f.seek(start + a)
            if want == sdt:
                got = f.readinto(flat.view(torch.uint8).numpy()) if b > a else 0
                if got != b - a:
                    raise LLMPruneError(f"{path} is truncated ({name}): re-create the folder")
                return out
            step = COPY_CHUNK // sdt.itemsize
            buf = torch.empty(min(step, flat.numel()), dtype=sdt)  # one chunk as stored, read into in place
            raw = buf.view(torch.uint8).numpy()
            for i in range(0, flat.numel(), step):
                k = min(step, flat.numel() - i)
                if f.readinto(raw[: k * sdt.itemsize]) != k * sdt.itemsize:
                    raise LLMPruneError(f"{path} is truncated ({name}): re-create the folder")
                flat[i:i + k] = buf[:k]
        return out

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in set(self.where.values()))


def build_layer(files: WeightFiles, name: str, layer: dict, dtype: torch.dtype | None) -> PackedLinear:
    """The PackedLinear of one manifest layer, its tensors read from `files` and checked against
    the format's shapes and dtypes (a mismatch is a damaged folder, named)."""
    f = formats.get(layer["format"])
    out_f, in_f = layer["shape"]
    opts = {k: layer[k] for k in ("group_size", "symmetric") if k in layer}
    if f.quantized and "group_size" not in opts:
        raise LLMPruneError(f"llmprune.json: layer {name} lacks group_size: re-create the folder")
    packed = {}
    for tname, (shape, tdtype) in f.shapes(out_f, in_f, **opts).items():
        key = f"{name}.{tname}"
        if key not in files:
            raise LLMPruneError(f"{files.folder} lacks {key}, which the manifest's {f.name} layer needs: "
                                f"re-create the folder")
        t = files.get(key)
        if tuple(t.shape) != tuple(shape) or (tdtype is not None and t.dtype != tdtype) or \
                (tdtype is None and not t.is_floating_point()):
            raise LLMPruneError(f"{key} is {tuple(t.shape)} {t.dtype} but the manifest's {f.name} layer "
                                f"{layer['shape']} needs {tuple(shape)} {tdtype or 'float'}: re-create the folder")
        packed[tname] = t.to(dtype) if (tdtype is None and dtype is not None) else t
    packed = f.derive(packed)
    bias = files.get(f"{name}.bias") if f"{name}.bias" in files else None
    if bias is not None and dtype is not None:
        bias = bias.to(dtype)
    return PackedLinear(f.name, packed, bias, in_f, out_f, derived=f.derived)


def unpacked(layer: PackedLinear, dtype: torch.dtype) -> nn.Linear:
    """The nn.Linear holding the dense weight a packed layer encodes (exact: its dequantization)."""
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta", dtype=dtype)
    lin.weight = nn.Parameter(layer.dequantize(torch.float32).to(dtype), requires_grad=False)
    if layer.bias is not None:
        lin.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
    return lin


def reads_ahead(device) -> bool:
    """Whether a walk on `device` reads its next block ahead (READ_AHEAD)."""
    return READ_AHEAD is True or (READ_AHEAD == "gpu" and torch.device(device).type != "cpu")


def _reader():
    """The one background thread that reads ahead (file reads and copies: they release the GIL)."""
    global _READER
    if _READER is None:
        from concurrent.futures import ThreadPoolExecutor

        _READER = ThreadPoolExecutor(1, thread_name_prefix="llmprune-read-ahead")
    return _READER


class _ReadAhead:
    """What `LazyModel.load` reads from: `files`, with the tensors read ahead handed over first (each
    once, keyed like `WeightFiles.get`'s arguments); anything else is read as usual."""

    def __init__(self, files: WeightFiles, got: dict):
        self.files, self.got, self.folder = files, got, files.folder

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self.got.pop((name, dtype), None)
        return t if t is not None else self.files.get(name, dtype)


def _tensor_names(model: nn.Module) -> list[str]:
    """State-dict names (persistent tensors) in order, tied duplicates once."""
    return list(model.state_dict(keep_vars=True))


def placed_on(device):
    """The device a tensor placed on `device` names: "cpu" for any CPU device ("cpu:0" would make
    accelerate drop Parameter), the current GPU for "cuda" (as tensors name it)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return "cpu"
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class LazyModel:
    """A folder's model on the meta device, its tensors placed block by block on demand."""

    def __init__(self, folder: str | Path, dtype: torch.dtype, packed_section: dict | None = None,
                 unpack: bool = False):
        from transformers import AutoConfig

        self.folder = Path(folder)
        try:
            config = AutoConfig.from_pretrained(self.folder)
        except (OSError, ValueError) as e:
            raise LLMPruneError(f"{self.folder}/config.json cannot be read ({str(e).splitlines()[0][:120]}): "
                                f"re-create the folder") from None
        block = fp8.check(config, self.folder)  # block-scaled FP8: read dequantized, written unquantized
        stored_mxfp4 = mxfp4.stored(config)  # gpt-oss' MXFP4 experts: the same
        fp8.unquantized(config)
        self.model = sliced.on_meta(config, dtype).eval()  # (SliceGPT's shortcuts rebuilt when it was sliced)
        # packed experts: one module each (moe.SplitExperts), as load_packed builds them; `unpack` (a dense model's
        # tensors, for exports) keeps them fused, each expert's projection decoded into its rows as a block is read
        self._packed_experts = set()
        if packed_section and unpack:
            self._packed_experts = set(moe.packed_experts(self.model, packed_section, self.folder))
        elif packed_section:
            moe.split_packed(self.model, packed_section, self.folder)
        self.files = WeightFiles(self.folder)
        self.files.fp8_block = block
        self.dtype = dtype
        self.section = packed_section
        self.unpack = unpack
        emb, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        # (tied where the config asks and the class ties: Nemotron-H's says tie_word_embeddings but ties nothing)
        self.tied = (head is not None and emb is not None and bool(getattr(text, "tie_word_embeddings", False))
                     and bool(getattr(self.model, "_tied_weights_keys", True)))
        if self.tied:  # one Parameter already on meta, as after a load (sizes of the model count it once)
            head.weight = emb.weight
        self._names = [n for n in _tensor_names(self.model)]
        self._shapes = {n: tuple(t.shape) for n, t in self.model.state_dict(keep_vars=True).items()}
        self._head = next((f"{n}.weight" for n, m in self.model.named_modules() if m is head), None)
        self._meta_modules: dict[str, nn.Module] = {}
        self._loaded: set[str] = set()
        self._ahead = None  # (prefix, {name: file}, future) of a read_ahead not taken yet
        self.files.read_prefixed(self._names, getattr(self.model, "base_model_prefix", None))
        if stored_mxfp4:
            self.files.read_mxfp4()
        self._read_renamed()

    def _read_renamed(self) -> None:
        """Tensors the checkpoint stores under another name, one for one (transformers' renamings: Nemotron-H's
        `backbone.embeddings.weight`, read as `model.embeddings.weight`), read under their in-memory names
        (WeightFiles.stored); a conversion of several tensors (experts) is read as `_load_converted` reads it."""
        for n in self._converted(self._names):
            k = self.stored_name(n)
            if k != n and k in self.files:
                self.files.alias(n, k)

    def stored_name(self, name: str) -> str:
        """The name a checkpoint saved by transformers gives the in-memory tensor `name` when a conversion renames
        it alone (stored.to_stored: Nemotron-H's `backbone.`), else `name`."""
        try:
            parts = self._parts([name])
        except Exception:  # noqa: BLE001 - part of a conversion of several tensors: the caller converts those
            return name
        k, t = next(iter(parts.items())) if len(parts) == 1 else (name, None)
        return k if t is not None and tuple(t.shape) == self._shapes[name] else name

    @property
    def config(self):
        return self.model.config

    def names(self, prefix: str = "", exclude: tuple[str, ...] = ()) -> list[str]:
        return [n for n in self._names if n.startswith(prefix) and not any(n.startswith(e) for e in exclude)]

    def _packed_layers(self, names: list[str]) -> dict:
        layers = (self.section or {}).get("layers", {})
        return {ln: spec for ln, spec in layers.items() if f"{ln}.weight" in names}

    def _converted(self, names) -> list[str]:
        """Those of `names` the files hold under other names (stored.py: a Mixture-of-Experts block's
        experts, one linear per expert on disk, fused in memory); a tied head is not stored at all."""
        return [n for n in names if n not in self.files and not (self.tied and n == self._head)]

    def _parts(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The stored tensors (meta: names and shapes) that hold the in-memory tensors `names`."""
        from . import stored

        return stored.to_stored(self.model, {n: torch.empty(self._shapes[n], device="meta") for n in names})

    def unreadable(self) -> str | None:
        """None when every tensor can be read block by block: stored under its in-memory name, or, inside
        a decoder block, converted from what is stored as a whole load converts it; else the first tensor
        that only a whole load converts, and how many more. A tensor the files lack under any name is an
        LLMPruneError: transformers' whole load would fill it with random values."""
        from . import stored
        from .arch import arch_of, block_prefix

        packed = {f"{ln}.{t}" for ln in ((self.section or {}).get("layers") or {}) for t in ("weight", "bias")}
        missing = [n for n in self._converted(self._names) if n not in packed and not self._expert_param(n)]
        blocks = arch_of(self.model).blocks
        groups: dict[str, list[str]] = {}  # by block (a conversion stays within one), each outside tensor alone
        for n in missing:
            groups.setdefault(block_prefix(blocks, n) or n, []).append(n)
        bad = []
        for unit, names in groups.items():
            parts = self._parts(names)
            lacking = [k for k in parts if k not in self.files]
            if lacking:
                raise LLMPruneError(f"{self.folder} lacks {lacking[0]} (and {len(lacking) - 1} more), which "
                                    f"transformers would fill with random values: re-create or re-download the folder")
            back = stored.to_memory(self.model, parts) if unit != names[0] else {}
            bad += [n for n in names if n not in back or tuple(back[n].shape) != self._shapes[n]]
        return f"{bad[0]} (and {len(bad) - 1} more)" if bad else None

    def _reads(self, prefix: str) -> list[tuple[str, torch.dtype | None]]:
        """The stored tensors `load(prefix)` reads, as the arguments of its `WeightFiles.get` calls:
        the parts of a packed layer as stored, every other tensor in the compute dtype."""
        names = set(self.names(prefix))
        packed = self._packed_layers(list(names))
        names |= set(self._parts(self._converted([n for n in names if n.rsplit(".", 1)[0] not in packed])))
        return [(k, None) if k.rsplit(".", 1)[0] in packed else (k, self.dtype)
                for k in self.files.where if k.startswith(prefix) and (k in names or k.rsplit(".", 1)[0] in packed)]

    def read_ahead(self, prefix: str) -> None:
        """Start reading what `load(prefix)` will read on a background thread (the next block of a walk,
        while this one computes: the disk read overlaps the compute, for one more block in CPU memory;
        BlockStore asks for it as READ_AHEAD says); that load takes it. Only a speed-up: a tensor whose
        file changed since, or a read that failed, is read again by the load itself."""
        files, reads = self.files, self._reads(prefix)
        self._ahead = (prefix, {n: files.where[n] for n, _ in reads},
                       _reader().submit(lambda: {(n, d): files.get(n, d) for n, d in reads}))

    def drop_ahead(self) -> None:
        """Forget a read-ahead that no load took (a walk that ended or stopped)."""
        if self._ahead is not None:
            self._ahead[2].cancel()
        self._ahead = None

    def _source(self, prefix: str):
        """The files `load(prefix)` reads: with what was read ahead for it, when that still holds."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead[0] != prefix:
            self._ahead = ahead  # for another prefix: it waits for its own load
            return self.files
        try:
            got = ahead[2].result()
        except Exception:  # noqa: BLE001 - the load reads it again and raises what it raises
            return self.files
        return _ReadAhead(self.files, {k: t for k, t in got.items() if self.files.where.get(k[0]) == ahead[1][k[0]]})

    @torch.no_grad()
    def load(self, prefix: str = "", device="cpu", exclude: tuple[str, ...] = ()) -> None:
        """Place every tensor under `prefix` (minus `exclude`) on `device` in the compute dtype."""
        from accelerate.utils import set_module_tensor_to_device

        from .arch import set_module

        device = placed_on(device)
        names = self.names(prefix, exclude)
        packed = self._packed_layers(names)
        files = self._source(prefix)
        skip = set()
        for ln, spec in packed.items():
            self._meta_modules.setdefault(ln, self.model.get_submodule(ln))
            layer = build_layer(files, ln, spec, self.dtype)
            set_module(self.model, ln, (unpacked(layer, self.dtype) if self.unpack else layer).to(device))
            skip |= {f"{ln}.weight", f"{ln}.bias"}
        todo = [n for n in names if n not in skip and not (self.tied and n == self._head and n not in self.files)]
        experts = [n for n in todo if self._expert_param(n)]
        if experts:
            self._load_packed_experts(experts, files, device)
            todo = [n for n in todo if n not in set(experts)]
        converted = self._converted(todo)
        for n in todo:  # one tensor at a time, read in the compute dtype (the tied head is re-tied below)
            if n not in converted:
                value = files.get(n, self.dtype)
                if tuple(value.shape) != self._shapes[n]:  # (accelerate's own refusal is a traceback)
                    raise LLMPruneError(f"{self.folder}: {n} is stored as {tuple(value.shape)}, but config.json makes "
                                        f"it {self._shapes[n]}: the config does not match the weights; re-create or "
                                        f"re-download the folder")
                set_module_tensor_to_device(self.model, n, device, value=value, clear_cache=False)
                self._loaded.add(n)
        if converted:
            self._load_converted(converted, files, device)
        if self.tied and self._head:
            emb = self.model.get_input_embeddings()
            if emb.weight.device.type != "meta":
                self.model.get_output_embeddings().weight = emb.weight  # one Parameter, as transformers ties them
        for n, b in self.model.named_buffers():  # computed buffers (rotary tables) follow the device
            if n.startswith(prefix) and b.device.type != "meta" and b.device != torch.device(device):
                set_module_tensor_to_device(self.model, n, device, value=b, clear_cache=False)

    def _expert_param(self, name: str) -> bool:
        """Whether `name` is a tensor of a fused experts module whose experts the packed folder stores one
        packed linear each (read with `unpack`)."""
        return name.rsplit(".", 1)[0] in self._packed_experts

    def _load_packed_experts(self, names: list[str], files, device) -> None:
        """Place the fused experts tensors `names` (`unpack`): each expert's projection, stored as a packed linear
        (or left dense) under moe.stored_name, decoded (exact) into its rows of the fused tensor, one at a time."""
        from accelerate.utils import set_module_tensor_to_device

        layers = self.section.get("layers", {})
        for n in names:
            set_module_tensor_to_device(self.model, n, device, clear_cache=False,
                                        value=torch.empty(self._shapes[n], dtype=self.dtype, device=device))
            self._loaded.add(n)
        for en in dict.fromkeys(n.rsplit(".", 1)[0] for n in names):
            m = self.model.get_submodule(en)
            for e in range(moe.num_experts(m)):
                for proj in moe.projections(m):
                    view, key = moe.ExpertProj(m, e, proj), moe.stored_name(f"{en}[{e}].{proj}")
                    if key in layers:
                        layer = build_layer(files, key, layers[key], self.dtype)
                        w, b = layer.dequantize(torch.float32), layer.bias
                    else:  # left dense
                        w = files.get(f"{key}.weight", self.dtype)
                        b = files.get(f"{key}.bias", self.dtype) if f"{key}.bias" in files else None
                    view.weight.copy_(w)
                    if view.bias is not None:
                        view.bias.copy_(b)

    def _load_converted(self, names: list[str], files, device) -> None:
        """Place `names` (stored under other names) as a whole load converts them. When the conversion moves
        whole rows (a block's experts stacked and concatenated: every family transformers fuses here), each
        stored part is read and copied straight into its rows of the in-memory tensor, allocated once on
        `device`: one part at a time beside it, in CPU memory only that part. Else the parts are read, converted
        (stored.to_memory: one fused copy while all parts are held) and checked against the model's own names
        and shapes."""
        from accelerate.utils import set_module_tensor_to_device

        from . import stored

        parts = self._parts(names)
        lacking = [k for k in parts if k not in files]
        if lacking:
            raise LLMPruneError(f"{self.folder}: {names[0]} is stored neither as it is nor as {lacking[0]}: "
                                f"re-create the folder, or load it with --onload whole")
        rows = stored.rows_of(self.model, {n: self._shapes[n] for n in names},
                              {k: tuple(t.shape) for k, t in parts.items()})
        if rows is not None:
            got: dict[str, torch.Tensor] = {}
            for k, (name, at, width) in rows.items():
                t = files.get(k, self.dtype)
                if name not in got:
                    got[name] = torch.empty(self._shapes[name], dtype=t.dtype, device=device)
                dest = got[name]
                dest.view(-1, width).index_copy_(0, at.to(dest.device), t.to(dest.device).view(-1, width))
                del t
            for n in names:
                set_module_tensor_to_device(self.model, n, device, value=got.pop(n), clear_cache=False)
                self._loaded.add(n)
            return
        got = stored.to_memory(self.model, {k: files.get(k, self.dtype) for k in parts})
        if set(got) != set(names) or any(tuple(got[n].shape) != self._shapes[n] for n in names):
            raise LLMPruneError(f"{self.folder}: {names[0]} and its stored parts do not convert into the "
                                f"model's tensors block by block: load it with --onload whole")
        for n in names:
            set_module_tensor_to_device(self.model, n, device, value=got.pop(n).contiguous(), clear_cache=False)
            self._loaded.add(n)

    @torch.no_grad()
    def release(self, prefix: str = "", exclude: tuple[str, ...] = ()) -> None:
        """Put the tensors under `prefix` back on the meta device (their memory is freed)."""
        from accelerate.utils import set_module_tensor_to_device

        from .arch import set_module

        for ln, mod in list(self._meta_modules.items()):
            if ln.startswith(prefix) and not any(ln.startswith(e) for e in exclude):
                set_module(self.model, ln, mod)
                del self._meta_modules[ln]
        for n in self.names(prefix, exclude):
            if n in self._loaded:
                set_module_tensor_to_device(self.model, n, "meta", clear_cache=False)
                self._loaded.discard(n)
        if self.tied:  # the head shares the embedding's Parameter: point it at the (meta) embedding again
            self.model.get_output_embeddings().weight = self.model.get_input_embeddings().weight


def fsync(paths) -> None:
    """Files already closed, flushed to the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class ShardWriter:
    """Write a dense model as sharded safetensors (+ index) into `folder`. `specs` (name, shape,
    dtype) in state-dict order fix every shard's header up front, so each tensor is written at its
    offset the moment it arrives (`add`) and nothing is buffered: peak memory is the tensor being
    written. `copy` streams a tensor that is not changed (embeddings, head) from its source file in
    chunks, converting the dtype on the way, without reading it whole. The plan groups whole units (a
    decoder block, or each tensor outside the blocks) into shards of at most `shard_bytes`."""

    def __init__(self, folder: str | Path, specs: list[tuple[str, tuple, torch.dtype]], unit_of,
                 shard_bytes: int | None = None):
        self.folder = Path(folder)
        shard_bytes = shard_bytes or SHARD_BYTES
        self.spec = {n: (tuple(shape), dtype) for n, shape, dtype in specs}
        size = {n: math.prod(shape) * dtype.itemsize for n, (shape, dtype) in self.spec.items()}
        units: list[list[str]] = []
        for name in self.spec:
            u = unit_of(name)
            if units and unit_of(units[-1][-1]) == u:
                units[-1].append(name)
            else:
                units.append([name])
        if sum(size.values()) <= shard_bytes:  # a small model: one file
            units = [list(self.spec)]
            unit_of = lambda _n: 0
        shards: list[list[str]] = []
        cur, cur_b, cur_block = [], 0, None
        for unit in units:
            b = sum(size[n] for n in unit)
            is_block = unit_of(unit[0]) is not None
            if cur and (cur_b + b > shard_bytes or is_block != cur_block):
                shards.append(cur)
                cur, cur_b = [], 0
            cur, cur_b, cur_block = cur + unit, cur_b + b, is_block
        if cur:
            shards.append(cur)
        k = len(shards)
        self.file_of, self.offset, self.headers = {}, {}, {}
        for i, names in enumerate(shards, 1):
            f = f"model-{i:05d}-of-{k:05d}.safetensors" if k > 1 else "model.safetensors"
            specs = [(n, self.spec[n][1], self.spec[n][0], size[n]) for n in names]  # (name, dtype, shape, bytes)
            raw, offsets, pos = st_header(specs, {"format": "pt"})
            for n in names:
                self.file_of[n], self.offset[n] = f, offsets[n]
            self.headers[f] = (raw, pos)
        self.pending = {f: set() for f in self.headers}
        for name, f in self.file_of.items():
            self.pending[f].add(name)
        self.open: dict[str, object] = {}
        self.total = sum(size.values())
        self.written_bytes = 0
        self.kept: set[str] = set()  # files a resumed run found partly written (`written`): updated, not truncated
        self.closed: list[str] = []  # files finished since the last `sync`
        self.rows_written: dict[str, int] = {}  # rows of the tensors written a chunk at a time (`add_rows`)

    def _file(self, name: str):
        f = self.file_of.get(name)
        if f is None:
            raise LLMPruneError(f"internal: {name} is not in the output's shard plan")
        if f not in self.open:
            raw, _ = self.headers[f]
            if f in self.kept:  # a resumed run's file: its header and earlier tensors stay
                fh = open(self.folder / f, "r+b")  # noqa: SIM115
                if fh.read(8 + len(raw)) != len(raw).to_bytes(8, "little") + raw:
                    fh.close()
                    raise LLMPruneError(f"{self.folder / f} does not have the header this run plans: delete "
                                        f"{self.folder} and run again")
            else:
                fh = open(self.folder / f, "wb")  # noqa: SIM115  # open until the shard's last tensor is written
                fh.write(len(raw).to_bytes(8, "little"))
                fh.write(raw)
            self.open[f] = fh
        fh = self.open[f]
        fh.seek(8 + len(self.headers[f][0]) + self.offset[name])
        return f, fh

    def _done(self, f: str, name: str) -> None:
        self.pending[f].discard(name)
        if not self.pending[f]:
            fh = self.open.pop(f)
            fh.close()
            self.closed.append(f)
            self.written_bytes += (self.folder / f).stat().st_size

    def written(self, names) -> None:
        """Take `names` as already in their files: a resumed run (resume.py) writes only the rest, into
        the files as they are."""
        for name in names:
            f = self.file_of[name]
            if name in self.pending[f]:
                self.kept.add(f)
                self.pending[f].discard(name)
                if not self.pending[f]:
                    self.written_bytes += (self.folder / f).stat().st_size

    def sync(self) -> dict[str, int]:
        """Everything written so far flushed to the disk (os.fsync: it survives the machine going down,
        not only the process); returns each started file's size."""
        fsync(self.folder / f for f in self.closed)
        self.closed = []
        for fh in self.open.values():
            fh.flush()
            os.fsync(fh.fileno())
        return {f: (self.folder / f).stat().st_size for f in self.headers if (self.folder / f).exists()}

    def _check(self, name: str, shape, dtype) -> None:
        want = self.spec.get(name)
        if want is not None and want != (tuple(shape), dtype):
            raise LLMPruneError(f"internal: {name} is {tuple(shape)} {dtype}, the shard plan says {want[0]} {want[1]}")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous().cpu()
        self._check(name, t.shape, t.dtype)
        f, fh = self._file(name)
        fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # the tensor's own memory, no copy
        self._done(f, name)

    def add_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Rows start:start + len(rows) of tensor `name` (a vocabulary-sized one written a chunk at a time); it is
        done once all of its rows are written."""
        t = rows.detach().contiguous().cpu()
        shape, dtype = self.spec[name]
        if tuple(t.shape[1:]) != shape[1:] or t.dtype != dtype or not 0 <= start <= start + len(t) <= shape[0]:
            raise LLMPruneError(f"internal: rows {start}:{start + len(t)} of {name} are {tuple(t.shape)} {t.dtype}, "
                                f"the shard plan says {shape} {dtype}")
        f, fh = self._file(name)
        fh.seek(fh.tell() + start * math.prod(shape[1:]) * dtype.itemsize)
        fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.rows_written[name] = self.rows_written.get(name, 0) + len(t)
        if self.rows_written[name] == shape[0]:
            self._done(f, name)

    def copy(self, name: str, src: Path, src_name: str | None = None) -> None:
        """Stream tensor `src_name` (default `name`) of safetensors file `src` into the output as
        `name`, in COPY_CHUNK pieces, converting to the planned dtype."""
        head, start = _header(Path(src))
        e = head[src_name or name]
        sdt = ST_DTYPES[e["dtype"]]
        shape, dtype = self.spec[name]
        if tuple(e["shape"]) != shape:
            raise LLMPruneError(f"internal: {src}: {src_name or name} is {e['shape']}, the plan says {shape}")
        a, b = e["data_offsets"]
        step = COPY_CHUNK // sdt.itemsize  # values a chunk
        f, fh = self._file(name)
        n = (b - a) // sdt.itemsize
        buf = torch.empty(min(step, n), dtype=sdt)  # one chunk as stored, read into in place
        conv = torch.empty(min(step, n), dtype=dtype) if sdt != dtype else buf  # and converted
        raw, out = buf.view(torch.uint8).numpy(), conv.view(torch.uint8).numpy()
        with open(src, "rb") as r:
            r.seek(start + a)
            for i in range(0, n, step):
                k = min(step, n - i)
                if r.readinto(raw[: k * sdt.itemsize]) != k * sdt.itemsize:
                    raise LLMPruneError(f"{src} is truncated: re-create the folder")
                if conv is not buf:
                    conv[:k] = buf[:k]
                fh.write(out[: k * conv.element_size()])
        self._done(f, name)

    def finish(self) -> None:
        left = sorted(n for p in self.pending.values() for n in p)
        if left:
            raise LLMPruneError(f"internal: the output lacks {left[0]} (and {len(left) - 1} more)")
        if len(self.pending) > 1:  # one file needs no index, as transformers writes small models
            (self.folder / INDEX).write_text(json.dumps({"metadata": {"total_size": self.total},
                                                         "weight_map": dict(sorted(self.file_of.items()))}, indent=2))


def st_header(specs, metadata: dict[str, str]) -> tuple[bytes, dict[str, int], int]:
    """A safetensors header for tensors laid out in the order of `specs` ((name, dtype, shape, bytes)):
    (its JSON, padded so the data is 8-byte aligned as safetensors writes it; each tensor's offset in the
    data; the data's bytes)."""
    head, offsets, pos = {"__metadata__": metadata}, {}, 0
    for name, dtype, shape, nbytes in specs:
        head[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets[name], pos = pos, pos + nbytes
    raw = json.dumps(head, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8), offsets, pos


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file whose bytes follow from its tensors and metadata alone: safetensors' own
    writer orders the metadata by a hash seeded per process, so the same tensors written by two runs
    differ. Tensors go by alignment (widest first, as safetensors lays them out), then name."""
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    raw, _, _ = st_header([(n, tensors[n].dtype, tensors[n].shape, tensors[n].numel() * tensors[n].element_size())
                           for n in order], dict(sorted(metadata.items())))
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        f.writelines(memoryview(tensors[n].contiguous().reshape(-1).view(torch.uint8).numpy()) for n in order)


class ShardBuffer:
    """Tensors gathered into safetensors files of about `shard_bytes` (a file's header names all its tensors),
    each written as soon as it is full (`save_tensors`): peak memory one shard. `finish` names a single file
    model.safetensors, as transformers does, or writes the index of several."""

    def __init__(self, folder: str | Path, stem: str, metadata: dict[str, str] | None = None,
                 shard_bytes: int | None = None):
        self.folder, self.stem = Path(folder), stem
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shard_bytes = shard_bytes or SHARD_BYTES
        self.shard: dict[str, torch.Tensor] = {}
        self.shard_nbytes = 0  # of the tensors gathered for the next file
        self.files: dict[str, str] = {}  # tensor name -> file
        self.nbytes = 0  # of every tensor put
        self.held = False  # inside `unit`: a full shard waits for the unit's end
        self.unsynced: list[str] = []  # files written since the last `sync`

    def put(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().contiguous().cpu()
        self.shard[name] = t
        self.shard_nbytes += t.numel() * t.element_size()
        self.nbytes += t.numel() * t.element_size()
        if self.shard_nbytes >= self.shard_bytes and not self.held:
            self.flush()

    @contextmanager
    def unit(self):
        """Tensors put inside go to one file (a decoder block's): a shard full in between is written at the end,
        so the files written so far hold whole blocks (a checkpoint commits when nothing waits: resume.py)."""
        self.held = True
        try:
            yield
        finally:
            self.held = False
        if self.shard_nbytes >= self.shard_bytes:
            self.flush()

    def sync(self) -> dict[str, int]:
        """The files written so far flushed to the disk (os.fsync); returns their sizes."""
        fsync(self.folder / f for f in self.unsynced)
        self.unsynced = []
        return {f: (self.folder / f).stat().st_size for f in sorted(set(self.files.values()))}

    def restore(self, files: dict[str, str], nbytes: int) -> None:
        """Go on from a killed run's files (`files`, `nbytes` as its `sync` saw them): files it wrote later are
        removed, the next file takes the next number."""
        self.files, self.nbytes = dict(files), nbytes
        keep = set(files.values())
        for p in self.folder.glob(f"{self.stem}-*.safetensors"):
            if p.name not in keep:
                p.unlink()

    def hold(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put back, after `restore`, the tensors a killed run had put but not yet written (its checkpoint kept
        them: resume.py); `nbytes`, restored, already counts them."""
        for name, t in tensors.items():
            self.shard[name] = t
            self.shard_nbytes += t.numel() * t.element_size()

    def flush(self) -> None:
        if not self.shard:
            return
        name = f"{self.stem}-{len(set(self.files.values())) + 1:05d}.safetensors"
        save_tensors(self.shard, self.folder / name, self.metadata)
        self.unsynced.append(name)
        self.files.update(dict.fromkeys(self.shard, name))
        self.shard, self.shard_nbytes = {}, 0

    def finish(self) -> list[str]:
        """Write what is left, the index when there are several files; returns the file names."""
        self.flush()
        shards = sorted(set(self.files.values()))
        if len(shards) == 1:  # a small model: one plain model.safetensors
            (self.folder / shards[0]).rename(self.folder / "model.safetensors")
            self.files = dict.fromkeys(self.files, "model.safetensors")
            return ["model.safetensors"]
        (self.folder / INDEX).write_text(json.dumps({"metadata": {"total_size": self.nbytes},
                                                     "weight_map": dict(sorted(self.files.items()))}, indent=2))
        return shards


class BlockStore:
    """What walker.onload needs to walk a LazyModel: place and free its decoder blocks, and hand
    each block finished by a pass to `sink(index, block)` (None: a read-only pass, e.g. OWL's or an
    evaluation). Loaded tensors are checked finite (a damaged file is named, not found later as a
    singular Hessian). `late` prefixes (the head, the final norm) are not needed before the blocks."""

    def __init__(self, lazy: LazyModel, blocks: str, late: tuple[str, ...] = (), sink=None, check: bool = True,
                 read_ahead: bool = False):
        self.lazy, self.blocks, self.late, self.sink, self.check = lazy, blocks, late, sink, check
        self.ahead = len(lazy.model.get_submodule(blocks)) if read_ahead else 0  # a walk's blocks, read in order

    def _check(self, prefix: str) -> None:
        if not self.check:
            return
        for n, t in self.lazy.model.named_parameters():
            if n.startswith(prefix) and t.is_floating_point() and t.device.type != "meta" and \
                    not all_finite(t.detach()):
                raise LLMPruneError(f"{n} holds NaN/inf values: the model file is damaged; re-download or re-create it")

    def load_block(self, i: int, device, exclude: tuple[str, ...] = ()) -> None:
        self.lazy.load(f"{self.blocks}.{i}.", device, exclude)
        self._check(f"{self.blocks}.{i}.")
        if i + 1 < self.ahead and reads_ahead(device):
            self.lazy.read_ahead(f"{self.blocks}.{i + 1}.")

    def done(self, i: int, module: nn.Module) -> None:
        if self.sink is not None:
            self.sink(i, module)

    def release_block(self, i: int) -> None:
        self.lazy.release(f"{self.blocks}.{i}.")
        trim_heap()  # what the block's work freed goes back to the OS, not into a heap that creeps up

    def load_outside(self, device) -> None:
        self.lazy.load("", device, exclude=(f"{self.blocks}.", *self.late))
        self._check("")
        if self.ahead and reads_ahead(device):
            self.lazy.read_ahead(f"{self.blocks}.0.")

    def close(self) -> None:
        self.lazy.drop_ahead()

    def release_outside(self) -> None:
        self.lazy.release("", exclude=(f"{self.blocks}.",))
        trim_heap()
