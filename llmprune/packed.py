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

from . import formats, outdir
from . import manifest as mf
from .arch import set_module
from .errors import LLMPruneError
from .modules import PackedLinear

FORMAT_VERSION = 1  # of the manifest's "format" section
WEIGHTS = "model.safetensors"
MANIFEST = mf.NAME
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
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
            if isinstance(m, nn.Linear) and m is not out_emb and f"{n}.weight" not in tied_src]


def check_packable(model: nn.Module, fmt: str) -> None:
    """The formats pack nn.Linear layers: a model whose experts are fused 3-D parameters (transformers 5
    Mixture-of-Experts, moe.py) would keep most of its weights dense, so it is refused."""
    from .moe import is_fused_experts

    fused = next((n for n, m in model.named_modules() if is_fused_experts(m)), None)
    if fused is not None:
        raise LLMPruneError(f"--format {fmt} packs nn.Linear layers, but {model.config.model_type!r} keeps its experts "
                            f"as 3-D parameters ({fused}.down_proj, ...) that no packed format stores: use --format "
                            f"dense")


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
    (layer name -> quant.Quantized, e.g. from quant.sequential.gptq_sequential), packed as they are.
    group_size: int4 scale group; "auto" picks per layer the largest of 128/64/32/16 dividing
    in_features (SmolLM2's 576 = 9 x 64 has no 128 group). Recorded per layer in the manifest.
    dtype: floating tensors are stored in it (sparse24 values, biases, embeddings, norms; int4
    scales are fp16 by definition); fp16 by default, the baseline packed sizes are measured against.
    None keeps the model's dtype.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    f = formats.get(fmt)
    quant = f.check_options(quant, symmetric)
    if quant == "gptq" and quantized is None:
        raise LLMPruneError("--quant gptq needs the GPTQ codes (quant.sequential.gptq_sequential): run it through "
                            "compress or pack, or use --quant rtn")
    check_packable(model, fmt)
    base = f.options(group_size, symmetric)
    tied = _tied(model)
    names = _linears_to_pack(model, keep_masks, tied)

    def store(t: torch.Tensor) -> torch.Tensor:
        t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return t.contiguous().cpu()

    layers, left_dense, tensors = {}, {}, {}
    it = names
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(names, desc=f"pack {fmt}")
    for name in it:
        mod = model.get_submodule(name)
        w = mod.weight.detach()
        w = w.to(dtype) if dtype is not None else w
        keep = None if keep_masks is None else keep_masks[name].to(w.device).bool()
        try:  # does the layer fit the format? (structure, sizes); RTN codes are cheap to compute
            k, opts, packed = plan_layer(f, w, keep, base)
        except LLMPruneError as e:
            if keep_masks is not None:
                raise LLMPruneError(f"{name}: {e}") from None
            left_dense[name] = str(e)
            continue
        if quant == "gptq":
            if name not in quantized:
                raise LLMPruneError(f"--quant gptq: no GPTQ codes for {name}: quantize every packed layer")
            packed = f.pack(w.float(), k, quant=quantized[name], **opts)
        for tname, t in f.stored(packed).items():
            tensors[f"{name}.{tname}"] = t.contiguous().cpu()
        if mod.bias is not None:
            tensors[f"{name}.bias"] = store(mod.bias.detach())
        layers[name] = {"format": fmt, "pattern": f.pattern or "dense", "shape": [mod.out_features, mod.in_features],
                        **opts, "bytes": f.nbytes(packed), "dense_bytes": w.numel() * 2}  # the fp16 baseline
    if not layers:
        raise LLMPruneError(f"no layer fits --format {fmt}: " + (next(iter(left_dense.values()), "no linear layers")))

    skip = {f"{n}.weight" for n in layers} | {f"{n}.bias" for n in layers} | set(tied)
    for key, t in model.state_dict().items():
        if key not in skip:
            tensors[key] = store(t.detach())
    section = {
        "format_version": FORMAT_VERSION, "name": fmt, "quant": quant if f.quantized else None, **base,
        **({"quant_options": quant_opts} if quant_opts and f.quantized else {}),
        "layers": layers, "left_dense": left_dense, "tied": tied,
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "bytes": {"packed_layers": sum(v["bytes"] for v in layers.values()),
                  "packed_layers_dense": sum(v["dense_bytes"] for v in layers.values()),
                  "file": sum(t.numel() * t.element_size() for t in tensors.values())},
    }
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt", "llmprune": fmt})
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    return section


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
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
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


def _open_weights(out_dir: Path):
    from safetensors import SafetensorError, safe_open

    path = out_dir / WEIGHTS
    if not path.is_file():
        pickles = sorted(p.name for p in out_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise LLMPruneError(f"{out_dir} holds {pickles[0]}, a pickle file, which llmprune never loads (it can run "
                                f"code): convert it to {WEIGHTS} with a trusted tool first")
        raise LLMPruneError(f"{out_dir} has no {WEIGHTS}: re-create the folder with llmprune pack")
    with open(path, "rb") as fh:
        head = fh.read(9)  # safetensors: u64 header length, then the JSON header's "{"
    if head[8:9] != b"{" and (head[:2] == b"PK" or head[:1] == b"\x80"):  # torch.save zip / raw pickle stream
        raise LLMPruneError(f"{path} is a pickle file, not safetensors; llmprune never unpickles: re-create the folder")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise LLMPruneError(f"{path} is corrupted or truncated ({str(e).splitlines()[0][:120]}): re-create the folder") from None


def _get(fh, key: str, path: Path) -> torch.Tensor:
    from safetensors import SafetensorError

    try:
        return fh.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LLMPruneError(f"{path}: tensor {key} cannot be read ({str(e).splitlines()[0][:120]}): "
                            f"the file is corrupted, re-create the folder") from None


@torch.no_grad()
def load_packed(out_dir: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Build the model from config.json with packed linears as PackedLinear; tensors read with safetensors.

    dtype: floating dense tensors and sparse24 values are cast to it (None: as stored); int4 scales
    stay fp16 as the format defines. The result is in eval mode on `device`.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out_dir)
    if not out.is_dir():
        raise LLMPruneError(f"{out} is not a folder: give the output folder of llmprune pack / compress")
    doc = read_manifest(out)
    sec = doc["format"]
    path = out / WEIGHTS
    fh = _open_weights(out)
    keys = set(fh.keys())
    try:
        config = AutoConfig.from_pretrained(out)
    except (OSError, ValueError) as e:
        raise LLMPruneError(f"{out}/config.json cannot be read ({str(e).splitlines()[0][:120]}): re-create the folder") from None
    with init_empty_weights(include_buffers=False):  # parameters on meta, computed buffers (rotary) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    used = set()
    for name, layer in sec["layers"].items():
        f = formats.get(layer["format"])
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            mod = None
        if not isinstance(mod, nn.Linear) or [mod.out_features, mod.in_features] != list(layer["shape"]):
            raise LLMPruneError(f"manifest layer {name} {layer['shape']} does not match a linear of config.json: "
                                f"the folder is inconsistent, re-create it")
        out_f, in_f = layer["shape"]
        opts = {k: layer[k] for k in ("group_size", "symmetric") if k in layer}
        if f.quantized and "group_size" not in opts:
            raise LLMPruneError(f"{MANIFEST}: layer {name} lacks group_size: re-create the folder")
        packed = {}
        for tname, (shape, tdtype) in f.shapes(out_f, in_f, **opts).items():
            key = f"{name}.{tname}"
            if key not in keys:
                raise LLMPruneError(f"{path} lacks {key}, which the manifest's {f.name} layer needs: re-create the folder")
            t = _get(fh, key, path)
            if tuple(t.shape) != tuple(shape) or (tdtype is not None and t.dtype != tdtype) or \
                    (tdtype is None and not t.is_floating_point()):
                raise LLMPruneError(f"{key} is {tuple(t.shape)} {t.dtype} but the manifest's {f.name} layer "
                                    f"{layer['shape']} needs {tuple(shape)} {tdtype or 'float'}: re-create the folder")
            packed[tname] = t.to(dtype) if (tdtype is None and dtype is not None) else t
            used.add(key)
        packed = f.derive(packed)
        bias = None
        if f"{name}.bias" in keys:
            bias = _get(fh, f"{name}.bias", path)
            bias = bias.to(dtype) if dtype is not None else bias
            used.add(f"{name}.bias")
        set_module(model, name, PackedLinear(f.name, packed, bias, in_f, out_f, derived=f.derived))

    expected = model.state_dict()
    dense = {}
    for key in sorted(keys - used):
        if key not in expected:
            raise LLMPruneError(f"{path} has {key}, which the model of config.json does not: re-create the folder")
        t = _get(fh, key, path)
        if tuple(t.shape) != tuple(expected[key].shape):
            raise LLMPruneError(f"{key} is {tuple(t.shape)} but config.json implies {tuple(expected[key].shape)}: "
                                f"re-create the folder")
        dense[key] = t.to(dtype) if (dtype is not None and t.is_floating_point()) else t
    model.load_state_dict(dense, strict=False, assign=True)
    for name, src in sec.get("tied", {}).items():  # re-tie: the same Parameter object, as transformers does
        parent, _, leaf = name.rpartition(".")
        sparent, _, sleaf = src.rpartition(".")
        setattr(model.get_submodule(parent), leaf, getattr(model.get_submodule(sparent), sleaf))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise LLMPruneError(f"{path} lacks {left[0]} (and {len(left) - 1} more): re-create the folder")
    return model.to(device).eval()
