"""Save and load packed checkpoints: a plain config + safetensors of packed tensors + a manifest.

Folder layout:
    config.json, generation_config.json, tokenizer files   as transformers writes them
    model.safetensors   dense tensors under their usual names; each packed linear as
                        `<layer>.<tensor>` (e.g. model.layers.0.self_attn.q_proj.values / .meta)
                        and `<layer>.bias`; tied weights stored once
    llmprune.json       manifest; its "format" section lists every packed layer:
                        {format, pattern, shape, group_size, symmetric, bytes, dense_bytes}
Loading builds the model from config.json on the meta device, swaps packed linears for
PackedLinear, and reads tensors with safetensors only: pickle files are refused, never opened.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import formats, lazy, moe, outdir
from . import manifest as mf
from .arch import is_dense, set_module
from .errors import LLMPruneError
from .sliced import on_meta

FORMAT_VERSION = 1  # of the manifest's "format" section
MANIFEST = mf.NAME
LAYER_KEYS = ("format", "shape")


# ----------------------------------------------------------------------------------------- save
def _tied(model: nn.Module) -> dict[str, str]:
    """name -> first name of every state-dict tensor that shares storage with an earlier one."""
    seen, tied = {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.device.type != "meta" and key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
    return tied


def _linears_to_pack(model: nn.Module, keep_masks: dict | None, tied: dict[str, str]) -> list[str]:
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied_src = set(tied) | set(tied.values())
    if keep_masks is not None:
        names = list(keep_masks)
        for n in names:
            try:
                mod = model.get_submodule(n)
            except AttributeError:
                mod = None
            if not isinstance(mod, nn.Linear):
                raise LLMPruneError(f"keep-mask for {n!r}, which is not a linear layer of the model: check the names")
            if f"{n}.weight" in tied_src:
                raise LLMPruneError(f"{n} shares its weight with another tensor (tied embeddings): leave it dense")
        return names
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not out_emb and f"{n}.weight" not in tied_src and not is_dense(n)]


class PackWriter:
    """Pack linears into `fmt` one at a time and write the folder's tensors shard by shard, so the
    sequential (block by block) pipeline never holds the whole model; `write_packed` drives it over
    a model in memory. `finish` writes the index and returns the manifest's format section."""

    def __init__(self, folder: str | Path, fmt: str, quant: str | None = None, group_size: int | str = 128,
                 symmetric: bool | None = None, dtype: torch.dtype | None = torch.float16,
                 quant_opts: dict | None = None, shard_bytes: int | None = None):
        self.folder = Path(folder)
        self.f = formats.get(fmt)
        self.quant = self.f.check_options(quant, symmetric)
        self.base = self.f.options(group_size, symmetric)
        self.dtype, self.quant_opts = dtype, quant_opts
        self.layers, self.left_dense, self.tied = {}, {}, {}
        self.experts: list[str] = []  # fused experts modules whose experts are stored one linear each
        self.out = lazy.ShardBuffer(self.folder, "model-packed", {"llmprune": self.f.name}, shard_bytes)

    def _store(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t

    @torch.no_grad()
    def add_linear(self, name: str, mod: nn.Module, keep: torch.Tensor | None = None, quantized=None,
                   strict: bool = False) -> bool:
        """Pack one linear (its weight in the storage dtype); a layer the format cannot hold is kept
        dense (recorded in left_dense) unless `strict`. Returns whether it was packed."""
        w = mod.weight.detach().contiguous()  # an expert's gate or up rows may be strided (interleaved)
        w = w.to(self.dtype) if self.dtype is not None else w
        keep = None if keep is None else keep.to(w.device).bool()
        try:  # does the layer fit the format? (structure, sizes); RTN codes are cheap to compute
            k, opts, packed = plan_layer(self.f, w, keep, self.base)
        except LLMPruneError as e:
            if strict:
                raise LLMPruneError(f"{name}: {e}") from None
            self.left_dense[name] = str(e)
            self.add_tensor(f"{name}.weight", mod.weight)
            if mod.bias is not None:
                self.add_tensor(f"{name}.bias", mod.bias)
            return False
        if self.quant == "gptq":
            if quantized is None:
                raise LLMPruneError(f"--quant gptq: no GPTQ codes for {name}: quantize every packed layer")
            packed = self.f.pack(w.float(), k, quant=quantized.full(), **opts)
        for tname, t in self.f.stored(packed).items():
            self.out.put(f"{name}.{tname}", t)
        if mod.bias is not None:
            self.out.put(f"{name}.bias", self._store(mod.bias))
        self.layers[name] = {"format": self.f.name, "pattern": self.f.pattern or "dense",
                             "shape": [mod.out_features, mod.in_features], **opts, "bytes": self.f.nbytes(packed),
                             "dense_bytes": w.numel() * 2,  # the fp16 baseline
                             # weights the stored codes decode to zero: the pruned ones, and kept ones rounded to 0
                             "zeros": int((self.f.unpack(packed, torch.float16) == 0).sum())}
        return True

    def add_experts(self, name: str, experts: nn.Module, quantized: dict | None = None) -> list[str]:
        """Pack every expert's projections of the fused experts module `name` as linears stored under
        moe.stored_name (`<name>.<e>.<proj>`, as moe.SplitExperts names them); GPTQ codes are looked up by view
        name (`<name>[e].<proj>`). Listed in the manifest's `experts`: the loader runs them as moe.SplitExperts.
        Returns the fused module's tensors, now written."""
        self.experts.append(name)
        for e in range(moe.num_experts(experts)):
            for proj in moe.projections(experts):
                view = f"{name}[{e}].{proj}"
                self.add_linear(moe.stored_name(view), moe.ExpertProj(experts, e, proj), quantized=(quantized or {}).get(view))
        return [f"{name}.{p}" for p, _ in experts.named_parameters()]

    def add_tensor(self, name: str, t: torch.Tensor) -> None:
        """A tensor stored as it is (norms, embeddings, the head, layers left dense)."""
        self.out.put(name, self._store(t))

    def finish(self, config, generation_config=None) -> dict:
        if not self.layers:
            raise LLMPruneError(f"no layer fits --format {self.f.name}: "
                                + (next(iter(self.left_dense.values()), "no linear layers")))
        files = self.out.finish()
        outdir.save_side_files(self.folder, config, generation_config)
        weights = sum(v["shape"][0] * v["shape"][1] for v in self.layers.values())
        return {
            "format_version": FORMAT_VERSION, "name": self.f.name, "quant": self.quant if self.f.quantized else None,
            **self.base, **({"quant_options": self.quant_opts} if self.quant_opts and self.f.quantized else {}),
            "layers": self.layers, "left_dense": self.left_dense, "tied": self.tied,
            **({"experts": self.experts} if self.experts else {}),
            "dtype": str(self.dtype).replace("torch.", "") if self.dtype is not None else None,
            "stored_zeros": sum(v["zeros"] for v in self.layers.values()) / weights,  # of the packed layers' weights
            "bytes": {"packed_layers": sum(v["bytes"] for v in self.layers.values()),
                      "packed_layers_dense": sum(v["dense_bytes"] for v in self.layers.values()),
                      "file": sum((self.folder / f).stat().st_size for f in files)},  # headers included
        }


def check_packable(model: nn.Module, fmt: str, group_size: int | str = "auto") -> None:
    """The formats pack nn.Linear layers and each expert's projections of a fused experts module (moe.py), run
    at load by moe.SplitExperts; experts it cannot run as their fused class does are refused. An int4 `group_size`
    that divides no layer's inputs is refused here, before any work (a layer it does not divide stays dense)."""
    widths = set()
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            widths.add(m.in_features)
        if not moe.is_fused_experts(m):
            continue
        why = moe.packable(m)
        if why:
            raise LLMPruneError(f"--format {fmt}: the experts of {model.config.model_type!r} ({n}) cannot be packed: "
                                f"their module {why}, which llmprune's packed experts do not: use --format dense")
        widths |= {moe.ExpertProj(m, 0, p).in_features for p in moe.projections(m)}
    if formats.get(fmt).quantized and isinstance(group_size, int) and widths and not any(
            group_size % 2 == 0 and w % group_size == 0 for w in widths):
        from .quant.rtn import check_group

        check_group(min(widths), group_size)


class ModelPacker:
    """`write_packed` of a model in memory, in steps: `block(i, quantized)` packs the linears (and fused experts)
    of decoder block i with their codes as soon as GPTQ's pass has made them (gptq_sequential's `on_block`: then
    only one block's codes are alive, where the whole model's held until the end were a byte a weight, 70 GB at
    70B); `finish` packs every linear not packed yet, the other tensors, and returns the manifest's format section.
    A block is packed from the weights it holds when handed over: the last change to them (GPTQ writes each
    quantized linear's dequantized weights before it hands the block over)."""

    def __init__(self, model: nn.Module, folder: str | Path, fmt: str, keep_masks: dict[str, torch.Tensor] | None = None,
                 quant: str | None = None, *, group_size: int | str = 128, symmetric: bool | None = None,
                 dtype: torch.dtype | None = torch.float16, quant_opts: dict | None = None):
        self.model, self.keep_masks = model, keep_masks
        self.w = PackWriter(folder, fmt, quant, group_size, symmetric, dtype, quant_opts)
        check_packable(model, fmt)
        self.w.tied = _tied(model)
        self.names = _linears_to_pack(model, keep_masks, self.w.tied)
        self.done: set[str] = set()  # state-dict names written

    @torch.no_grad()
    def _linear(self, name: str, quantized: dict | None) -> None:
        keep = None if self.keep_masks is None else self.keep_masks[name]
        self.w.add_linear(name, self.model.get_submodule(name), keep, (quantized or {}).get(name),
                          strict=self.keep_masks is not None)
        self.done |= {f"{name}.weight", f"{name}.bias"}

    @torch.no_grad()
    def _experts(self, prefix: str, quantized: dict | None) -> None:
        for name, mod in self.model.named_modules():
            if name.startswith(prefix) and moe.is_fused_experts(mod) and name not in self.w.experts:
                self.done |= set(self.w.add_experts(name, mod, quantized))

    def block(self, index: int, quantized: dict | None) -> None:
        """Pack decoder block `index`'s linears and experts (`quantized`: their codes, by name)."""
        from .arch import arch_of

        prefix = f"{arch_of(self.model).blocks}.{index}."
        for name in self.names:
            if name.startswith(prefix) and f"{name}.weight" not in self.done:
                self._linear(name, quantized)
        self._experts(prefix, quantized)

    def finish(self, quantized: dict | None = None, progress: bool = False) -> dict:
        """Pack what `block` did not, write every other tensor and the index; the manifest's format section."""
        todo = [n for n in self.names if f"{n}.weight" not in self.done]
        if progress:
            from tqdm.auto import tqdm

            todo = tqdm(todo, desc=f"pack {self.w.f.name}")
        for name in todo:
            self._linear(name, quantized)
        self._experts("", quantized)
        for key, t in self.model.state_dict().items():
            if key not in self.done and key not in self.w.tied:
                self.w.add_tensor(key, t)
        return self.w.finish(self.model.config, getattr(self.model, "generation_config", None))


@torch.no_grad()
def write_packed(model: nn.Module, folder: str | Path, fmt: str, keep_masks: dict[str, torch.Tensor] | None = None,
                 quant: str | None = None, *, group_size: int | str = 128, symmetric: bool | None = None,
                 progress: bool = False, dtype: torch.dtype | None = torch.float16, quantized: dict | None = None,
                 quant_opts: dict | None = None) -> dict:
    """Pack the model's linears into `fmt` and write the weights and config into the existing
    `folder`; returns the manifest's format section.

    keep_masks: layer name -> keep-mask (True = stays); None packs every linear except the output
    head whose non-zeros fit the format (others stay dense, listed in "left_dense").
    quant: None | "rtn" | "gptq" for the int4 formats (None means rtn); "gptq" needs `quantized`
    (layer name -> quant.Quantized, e.g. from quant.sequential.gptq_sequential), packed as they are
    (ModelPacker takes them block by block instead, as GPTQ makes them).
    group_size: int4 scale group; "auto" picks per layer the largest of 128/64/32/16 dividing
    in_features (SmolLM2's 576 = 9 x 64 has no 128 group). Recorded per layer in the manifest.
    dtype: floating tensors are stored in it (sparse24 values, biases, embeddings, norms; int4
    scales are fp16 by definition); fp16 by default, the baseline packed sizes are measured against.
    None keeps the model's dtype.
    """
    if formats.get(fmt).check_options(quant, symmetric) == "gptq" and quantized is None:
        raise LLMPruneError("--quant gptq needs the GPTQ codes (quant.sequential.gptq_sequential): run it through "
                            "compress or pack, or use --quant rtn")
    packer = ModelPacker(model, folder, fmt, keep_masks, quant, group_size=group_size, symmetric=symmetric,
                         dtype=dtype, quant_opts=quant_opts)
    return packer.finish(quantized, progress)


def save_packed(model: nn.Module, out_dir: str | Path, fmt: str, keep_masks: dict[str, torch.Tensor] | None = None,
                quant: str | None = None, *, tokenizer=None, manifest: dict | None = None, overwrite: bool = False,
                **opts) -> dict:
    """write_packed into a new output folder (written next to it and renamed at the end) with the
    tokenizer and a manifest; returns the format section. For library use: the pipeline composes
    write_packed with its own evaluation of the folder."""
    f = formats.get(fmt)
    f.check_options(quant, opts.get("symmetric"))  # fail before the work, not after
    outdir.check_out(out_dir, overwrite)
    with outdir.atomic_dir(out_dir, overwrite) as tmp:
        section = write_packed(model, tmp, fmt, keep_masks, quant, **opts)
        outdir.save_side_files(tmp, tokenizer=tokenizer)
        doc = mf.Manifest.from_dict({"format_version": mf.VERSION, "llmprune_version": mf.Manifest().llmprune_version,
                                     "model": {}, **(manifest or {})})
        doc.format = section
        doc.steps = [*doc.steps, *(["quantize"] if section["quant"] else []), "pack"]
        mf.write(tmp, doc)
    return section


def plan_layer(f: formats.Format, w: torch.Tensor, keep: torch.Tensor | None, base: dict):
    """(keep-mask, layer options, RTN-packed tensors) for weight w in format f; raises LLMPruneError
    when the layer does not fit the format (structure, sizes)."""
    opts = f.layer_options(base, w.shape[1])
    k = keep if keep is not None else f.infer_keep(w)
    return k, opts, f.pack(w.float() if f.quantized else w, k, **opts)


# ----------------------------------------------------------------------------------------- load
def read_manifest(out_dir: str | Path) -> dict:
    """llmprune.json (as a dict) with a valid "format" section (version, layers with format and shape)."""
    path = Path(out_dir) / MANIFEST
    doc = mf.read(out_dir).to_dict()  # exists, JSON, top-level keys and version
    sec = doc.get("format")
    if not isinstance(sec, dict) or not isinstance(sec.get("layers", {}), dict):
        raise LLMPruneError(f"{path} has no \"format\" section: a dense checkpoint, load it with llmprune.load")
    missing = [k for k in ("format_version", "name", "layers") if k not in sec]
    if missing:
        raise LLMPruneError(f"{path}: the format section lacks {', '.join(missing)}: re-create the folder")
    if not isinstance(sec["format_version"], int) or sec["format_version"] > FORMAT_VERSION:
        raise LLMPruneError(f"{path} has format_version {sec['format_version']}, newer than this llmprune reads "
                            f"({FORMAT_VERSION}): upgrade llmprune")
    for name, layer in sec["layers"].items():
        lack = [k for k in LAYER_KEYS if k not in layer]
        if lack:
            raise LLMPruneError(f"{path}: layer {name} lacks {', '.join(lack)}: re-create the folder")
    return doc


@torch.no_grad()
def load_packed(out_dir: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Build the model from config.json with packed linears as PackedLinear; tensors read with safetensors.

    dtype: floating dense tensors and sparse24 values are cast to it (None: as stored); int4 scales
    stay fp16 as the format defines. The result is in eval mode on `device`.
    """
    from transformers import AutoConfig

    out = Path(out_dir)
    if not out.is_dir():
        raise LLMPruneError(f"{out} is not a folder: give the output folder of llmprune pack / compress")
    doc = read_manifest(out)
    sec = doc["format"]
    files = lazy.WeightFiles(out)
    keys = set(files.keys())
    try:
        config = AutoConfig.from_pretrained(out)
    except (OSError, ValueError) as e:
        raise LLMPruneError(f"{out}/config.json cannot be read ({str(e).splitlines()[0][:120]}): re-create the folder") from None
    model = on_meta(config, dtype)  # (SliceGPT's residual shortcuts rebuilt when it was sliced)
    moe.split_packed(model, sec, out)  # packed experts: one module each

    used = set()
    for name, layer in sec["layers"].items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            mod = None
        if not isinstance(mod, nn.Linear) or [mod.out_features, mod.in_features] != list(layer["shape"]):
            raise LLMPruneError(f"manifest layer {name} {layer['shape']} does not match a linear of config.json: "
                                f"the folder is inconsistent, re-create it")
        set_module(model, name, lazy.build_layer(files, name, layer, dtype).to(device))  # straight there: a 70B
        # model's packed weights are not staged whole in CPU memory first
        used |= {k for k in keys if k.startswith(f"{name}.")}

    expected = model.state_dict()
    dense = {}
    for key in sorted(keys - used):
        if key not in expected:
            raise LLMPruneError(f"{out} has {key}, which the model of config.json does not: re-create the folder")
        t = files.get(key)
        if tuple(t.shape) != tuple(expected[key].shape):
            raise LLMPruneError(f"{key} is {tuple(t.shape)} but config.json implies {tuple(expected[key].shape)}: "
                                f"re-create the folder")
        dense[key] = (t.to(dtype) if (dtype is not None and t.is_floating_point()) else t).to(device)
    model.load_state_dict(dense, strict=False, assign=True)
    for name, src in sec.get("tied", {}).items():  # re-tie: the same Parameter object, as transformers does
        parent, _, leaf = name.rpartition(".")
        sparent, _, sleaf = src.rpartition(".")
        setattr(model.get_submodule(parent), leaf, getattr(model.get_submodule(sparent), sleaf))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise LLMPruneError(f"{out} lacks {left[0]} (and {len(left) - 1} more): re-create the folder")
    moe.stack_packed(model)  # packed experts stacked per projection for the grouped decode kernels (no 2nd copy)
    return model.to(device).eval()
