"""The llmprune output an export starts from: what it is, whether a target can express it, and its
weights as a plain transformers model (packed linears unpacked to nn.Linear, exactly) plus, for the
int4 formats, the int4 grid each layer was stored on.

Packed int4 layers dequantize exactly (w = (q - z) * s with fp16 s, exact in fp32), so their codes
are recovered from the dense weight and the stored grid: q = round(w / s) + z, checked to reproduce
w bit for bit. This works the same for w4g128 and for w4s24, whose pruned weights are code z.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import manifest as mf
from ..errors import LLMPruneError
from ..moe import stored_name
from ..runinfo import trim_heap

INT4_FORMATS = ("w4g128", "w4s24")  # int4 on contiguous groups of inputs: re-expressible as dense int4 groups


@dataclass
class Source:
    folder: Path
    manifest: mf.Manifest

    @property
    def fmt(self) -> str:
        return self.manifest.format_name

    @functools.cached_property
    def files(self):
        """lazy.WeightFiles of the folder (headers read once)."""
        from ..lazy import WeightFiles

        return WeightFiles(self.folder)

    @property
    def per_block_slicegpt(self) -> bool:
        sl = self.manifest.slicegpt or {}
        return sl.get("rotation") == "per-block" or sl.get("standard") is False

    def layer_grid(self, name: str) -> dict | None:
        """{"group_size", "symmetric"} of a packed int4 layer (None: not packed as int4)."""
        if self.fmt not in INT4_FORMATS:
            return None
        layers = (self.manifest.format or {}).get("layers") or {}
        layer = layers.get(stored_name(name))  # an expert's projection under its packed name
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


class Weights:
    """The source's weights for one pass in state-dict order, packed linears as the dense weights they
    encode (exact). `model` names the tensors and gives their shapes; it is on the meta device when the
    folder is read one decoder block at a time (`lazy`, the default: think in 70B), or in memory when
    some of its tensors are stored converted in a way only transformers' whole load reads (stored.py reads a
    Mixture-of-Experts block's experts block by block)."""

    def __init__(self, src: Source, dtype=torch.float32):
        from ..checkpoint import load_tokenizer
        from ..lazy import LazyModel
        from ..onload import stored_as_in_memory

        section = (src.manifest.format or None) if src.fmt != "dense" else None
        self.lazy = LazyModel(src.folder, dtype, section, unpack=True)
        self.tok = load_tokenizer(src.folder)
        if stored_as_in_memory(self.lazy):
            self.lazy = None
            self.model = _whole(src, dtype)
        else:
            self.model = self.lazy.model
        self.keys = [k for k in self.model.state_dict(keep_vars=True) if k not in self._tied()]

    def _tied(self) -> set[str]:
        from ..arch import arch_of

        if self.lazy is None:
            return tied_names(self.model)
        return {f"{arch_of(self.model).head}.weight"} if self.lazy.tied else set()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        sd = self.model.state_dict(keep_vars=True)
        return {k: tuple(sd[k].shape) for k in self.keys}

    def blocks(self) -> str:
        from ..arch import arch_of

        return arch_of(self.model).blocks

    def tensors(self, blocks: bool = True, only=None):
        """(name, tensor) for every key in order (`blocks` False: only those outside the decoder blocks; `only(key)`
        False: not that one, not read); from disk, one decoder block (or one tensor outside the blocks) in memory
        at a time."""
        for group in self._groups(blocks, only):
            yield from group.items()

    def stored_tensors(self, blocks: bool = True):
        """`tensors` under the names the checkpoint stores them (`as_stored`): (stored key, tensor,
        in-memory name)."""
        for group in self._groups(blocks):
            yield from self.as_stored(group)

    @torch.no_grad()
    def _groups(self, blocks: bool, only=None):
        """{name: tensor} of each decoder block in turn, and of each tensor outside the blocks alone, in key
        order; a block read from disk is in memory until the next group is asked for."""
        from ..arch import block_prefix

        inside = self.blocks() + "."
        keys = [k for k in self.keys if (blocks or not k.startswith(inside)) and (only is None or only(k))]
        sd = self.model.state_dict() if self.lazy is None else None
        i = 0
        while i < len(keys):
            k = keys[i]
            prefix = block_prefix(self.blocks(), k) or k
            if self.lazy is not None:
                self.lazy.load(prefix)
                sd = self.model.state_dict()
            group = {}
            while i < len(keys) and keys[i].startswith(prefix):
                group[keys[i]] = sd[keys[i]]
                i += 1
            yield group
            group.clear()  # the caller's reference too: the block's memory goes before the next one is read
            if self.lazy is not None:
                sd = None
                self.lazy.release(prefix)
                trim_heap()  # what the block freed goes back to the OS (runinfo.trim_heap), as a walk's blocks do

    def as_stored(self, block: dict[str, torch.Tensor]):
        """(stored key, tensor, in-memory name) for one decoder block's tensors (full in-memory names), as the
        checkpoint stores them (stored.py: a Mixture-of-Experts block's experts one linear per expert). The
        in-memory name of an expert's stored weight is its projection's target name plus ".weight"
        (`...mlp.experts[3].gate_proj.weight`, the name its codes have), found by putting row markers through
        the same conversion (moe.row_markers); anything else is its block key (a renamed tensor is the same
        tensor), or else its stored key."""
        from .. import moe, stored
        from ..arch import block_prefix

        prefix = block_prefix(self.blocks(), next(iter(block)))
        views: dict[str, str] = {}  # stored key -> view target
        if prefix is not None:
            for rel, m in self.model.get_submodule(prefix[:-1]).named_modules():
                if moe.is_fused_experts(m):
                    marks, names = moe.row_markers(m, prefix + rel)
                    ids = {k: t.unique() for k, t in stored.to_stored(self.model, marks).items()}
                    found = {k: names[i.item()] + ".weight" for k, i in ids.items() if i.numel() == 1}
                    views.update(found)
                    if not names or sorted(found.values()) != sorted(n + ".weight" for n in names):
                        raise LLMPruneError(f"{prefix + rel}: the checkpoint does not store its experts one linear "
                                            f"per expert, which is what this export writes")
        mem = {id(t): k for k, t in block.items()}
        for k, t in stored.to_stored(self.model, block).items():
            name = views.get(k) or mem.get(id(t))
            if name is None:
                raise LLMPruneError(f"{k}: the checkpoint stores this tensor converted in a way this export cannot "
                                    f"trace back to the model's layers; export --to gguf, or serve the dense output")
            yield k, t, name

    def targets(self) -> list[str]:
        """The layers a quantizer may pack (arch.py's pruning targets: linears, experts' projections, no
        routers, no shared experts' gates)."""
        from .. import arch

        return arch.linear_names(self.model)

    def linear_like(self) -> set[str]:
        """Layer names that a serving engine builds as linear layers: every nn.Linear, every target (experts'
        projections), routers and shared experts' gates; what of these an export leaves dense it must list
        as such (compressed-tensors' `ignore`)."""
        from .. import arch

        inside = self.blocks() + "."
        out = set(arch.linear_names(self.model, gates=True))
        for n, m in self.model.named_modules():
            w = getattr(m, "weight", None)
            router = (n.startswith(inside) and arch.is_dense(n[len(inside):].split(".", 1)[-1], gates=True)
                      and isinstance(w, torch.Tensor) and w.dim() == 2)
            if isinstance(m, torch.nn.Linear) or router:
                out.add(n)
        return out


def _whole(src: Source, dtype):
    """The output loaded whole, every packed linear an nn.Linear holding its exact dense weight."""
    from ..checkpoint import load
    from ..lazy import unpacked

    if (src.manifest.format or {}).get("experts"):  # loaded whole they would be split (moe.SplitExperts)
        raise LLMPruneError(f"{src.folder}: its packed experts are exported read block by block, which this folder "
                            f"cannot be: export the dense output it was packed from")
    model, _, _ = load(src.folder, dtype=dtype)
    for name, mod in list(model.named_modules()):
        if hasattr(mod, "dequantize") and hasattr(mod, "packed"):  # modules.PackedLinear
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, unpacked(mod, dtype))
    return model


def stored_code(src: Source, name: str, w: torch.Tensor):
    """quant.Quantized of the source's int4 layer `name` with dense weight `w`, recovered exactly (module
    docstring); None when the layer is not stored as int4."""
    from ..quant import MAXQ, SYM_ZERO, Quantized

    grid = src.layer_grid(name)
    if grid is None:
        return None
    name = stored_name(name)
    files = src.files
    g = grid["group_size"]
    s = files.get(f"{name}.scales")  # (out, in/G) fp16
    z = (files.get(f"{name}.zeros") if f"{name}.zeros" in files
         else torch.full_like(s, SYM_ZERO, dtype=torch.uint8))  # (out, in/G)
    wg = w.detach().float().reshape(w.shape[0], -1, g)  # (out, in/G, G): scales broadcast, never repeated
    sf, zf = s.float().unsqueeze(-1), z.float().unsqueeze(-1)
    q = (wg / sf).round_().add_(zf).clamp_(0, MAXQ)
    if not torch.equal((q - zf).mul_(sf), wg):
        raise LLMPruneError(f"{name}: the stored int4 grid does not reproduce the weights exactly: the "
                            f"folder is damaged; re-create it with llmprune pack")
    return Quantized(q.reshape(w.shape).to(torch.uint8), s, z, g, grid["symmetric"])


def tied_names(model) -> set[str]:
    """State-dict names that repeat an earlier tensor (tied embeddings): written once."""
    seen, tied = set(), set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            tied.add(name)
        seen.add(key)
    return tied
