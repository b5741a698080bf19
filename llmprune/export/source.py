"""The llmprune output an export starts from: what it is, whether a target can express it, and its
weights as a plain transformers model (packed linears unpacked to nn.Linear, exactly) plus, for the
int4 formats, the int4 grid each layer was stored on.

Packed int4 layers dequantize exactly (w = (q - z) * s with fp16 s, exact in fp32), so their codes
are recovered from the dense weight and the stored grid: q = round(w / s) + z, checked to reproduce
w bit for bit. This works the same for w4g128 and for w4s24, whose pruned weights are code z.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import manifest as mf
from ..errors import LLMPruneError

INT4_FORMATS = ("w4g128", "w4s24")  # int4 on contiguous groups of inputs: re-expressible as dense int4 groups


@dataclass
class Source:
    folder: Path
    manifest: mf.Manifest

    @property
    def fmt(self) -> str:
        return self.manifest.format_name

    @property
    def per_block_slicegpt(self) -> bool:
        sl = self.manifest.slicegpt or {}
        return sl.get("rotation") == "per-block" or sl.get("standard") is False

    def layer_grid(self, name: str) -> dict | None:
        """{"group_size", "symmetric"} of a packed int4 layer (None: not packed as int4)."""
        if self.fmt not in INT4_FORMATS:
            return None
        layer = ((self.manifest.format or {}).get("layers") or {}).get(name)
        return None if layer is None else {"group_size": layer["group_size"], "symmetric": layer["symmetric"]}

    def describe(self) -> str:
        steps = "+".join(self.manifest.steps) or "unpruned"
        return f"{self.fmt} ({steps})"


def open_source(folder: str | Path) -> Source:
    """The output folder's manifest, with the refusals every target shares."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LLMPruneError(f"{folder} is not a folder: give an llmprune output folder (made by `llmprune compress`)")
    m = mf.read(folder)
    if m.export:
        raise LLMPruneError(f"{folder} is already an export (to {m.export.get('to')}): export the llmprune output "
                            f"it came from ({m.exported_from or 'see its llmprune.json'})")
    src = Source(folder, m)
    if src.per_block_slicegpt:
        raise LLMPruneError(f"{folder} is a SliceGPT output with residual shortcuts (--rotation per-block, or shared "
                            f"without --slice-head): no stock architecture, so neither compressed-tensors nor GGUF "
                            f"can express it; export a --rotation shared --slice-head SliceGPT output, or any pruned "
                            f"or packed (w4g128, w4s24, sparse24) one")
    return src


def dense_model(src: Source, dtype=torch.float32):
    """(model with every linear an nn.Linear holding its exact dense weight, tokenizer)."""
    from ..checkpoint import load

    model, tok, _ = load(src.folder, dtype=dtype)
    for name, mod in list(model.named_modules()):
        if hasattr(mod, "dequantize") and hasattr(mod, "packed"):  # modules.PackedLinear
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, dtype=dtype)
            lin.weight.data = mod.dequantize(torch.float32).to(dtype)
            if mod.bias is not None:
                lin.bias.data = mod.bias.detach().to(dtype)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, lin)
    return model, tok


def stored_codes(src: Source, model) -> dict:
    """{layer: quant.Quantized} of the source's int4 layers, recovered exactly (module docstring)."""
    from ..lazy import WeightFiles
    from ..quant import MAXQ, SYM_ZERO, Quantized

    out = {}
    files = WeightFiles(src.folder)  # one file or shards with an index
    for name in (src.manifest.format or {}).get("layers") or {}:
        grid = src.layer_grid(name)
        if grid is None:
            continue
        w = model.get_submodule(name).weight.detach().float()  # (out, in)
        g = grid["group_size"]
        s = files.read([f"{name}.scales"])[f"{name}.scales"]  # (out, in/G) fp16
        z = (files.read([f"{name}.zeros"])[f"{name}.zeros"] if f"{name}.zeros" in files
             else torch.full_like(s, SYM_ZERO, dtype=torch.uint8))  # (out, in/G)
        sf, zf = s.float().repeat_interleave(g, 1), z.float().repeat_interleave(g, 1)  # (out, in)
        q = torch.clamp(torch.round(w / sf) + zf, 0, MAXQ)
        if not torch.equal((q - zf) * sf, w):
            raise LLMPruneError(f"{name}: the stored int4 grid does not reproduce the weights exactly: the "
                                f"folder is damaged; re-create it with llmprune pack")
        out[name] = Quantized(q.to(torch.uint8), s, z, g, grid["symmetric"])
    return out


def tied_names(model) -> set[str]:
    """State-dict names that repeat an earlier tensor (tied embeddings): written once."""
    seen, tied = set(), set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            tied.add(name)
        seen.add(key)
    return tied
