"""Architecture knowledge as data: where the decoder blocks are, which linears they hold, and what
inference from the module tree gets wrong for a family.

Most of an `Arch` is inferred (archinfer.py): the decoder blocks (the model's `_no_split_modules`
class, the one long ModuleList of them), the embedding, final norm and head, every linear of a
block, and (per block, by tracing one forward) the order in which the block computes them. An
entry in OVERRIDES holds only what inference cannot see: fused projections whose rows are several
projections (Phi-3's qkv_proj, gate_up_proj), and why a family's residual stream is not
rotation-invariant (SliceGPT). A family without an entry works when inference finds its blocks and
linears; otherwise arch_of names what to add here.

Targets: what the engine prunes, each addressed by a full name. Most are nn.Linear modules
(`model.layers.0.self_attn.q_proj`); two kinds are views into a parameter, named with brackets:
  `...self_attn.qkv_proj[k]`   the rows of a fused linear that hold one projection (`Rows`)
  `...mlp.experts[3].down_proj` one expert of a fused 3-D experts parameter (moe.ExpertProj)
Both have what the engine uses of a linear: `weight` (out, in) (a view: writes reach the model),
`in_features`, `register_forward_hook`, plus `owner` (the module whose forward computes them) and
`stats_key` (targets with one key read the same inputs and share one statistics accumulator).
"""
from __future__ import annotations

import dataclasses
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from . import archinfer, moe
from .archinfer import BlockPlan, owner  # noqa: F401  (re-exported: the engine's view of a block)
from .errors import LLMPruneError


@dataclass(frozen=True)
class Split:
    """A fused nn.Linear whose output rows are several projections, in this order."""
    labels: tuple[str, ...]
    sizes: Callable | None = None  # config -> rows of each part; None: equal parts


@dataclass(frozen=True)
class Arch:
    blocks: str  # dotted path of the ModuleList of decoder blocks
    embed: str
    norm: str | None  # final norm, read by the head (None: the model has none)
    head: str | None
    # linears inside a block, relative names, in compute order (groups solved together in "true
    # sequential" mode). None: traced per block from one forward (Planner)
    groups: tuple[tuple[str, ...], ...] | None = None
    # (sublayer, its last linear): the sublayer returns that linear's output, so once the linear is
    # solved the engine replays the sublayer from the linear's recorded inputs instead of rerunning it
    # (checked on every batch when recorded; a sublayer that does not match is rerun as usual).
    # None: traced per block
    sublayers: tuple[tuple[str, str], ...] | None = None
    # where a pre-norm block reads and writes its residual stream (SliceGPT's rotation, transforms/fuse.py):
    reads: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (norm, linears that read its output), in order
    writes: tuple[str, ...] = ()  # linears whose outputs are added to the residual stream
    attn: str = "self_attn"
    mlp: str = "mlp"
    not_invariant: str | None = None  # why the residual stream cannot be rotated (None: it can)
    splits: tuple[tuple[str, Split], ...] = ()  # fused linears (relative name) -> their parts
    source: str = "inferred"  # "inferred", or "inferred + arch.py entry" when OVERRIDES has one


# Linears that stay dense: routers always (pruning one changes which experts run), shared experts'
# gates unless asked (prune_gates); regexes on names relative to the block. SliceGPT's residual
# shortcuts (sliced.py) are not model linears either. (A router may hold its linear: HunYuan's `mlp.gate.wg`.)
ROUTERS = (r"(^|\.)mlp\.gate$", r"(^|\.)mlp\.gate\.[^.]+$", r"(^|\.)router$")
SHORTCUTS = (r"(^|\.)(attn|mlp)_shortcut$",)
GATES = (r"shared_experts?_gate$",)


def _phi3_qkv(cfg) -> tuple[int, int, int]:
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return cfg.num_attention_heads * hd, kv * hd, kv * hd


_GATE_UP = Split(("gate", "up"))  # chunk(2): gate rows first
_SANDWICH = ("{name} blocks are not rotation-invariant: their extra post-sublayer norms ({norms}) normalize the "
             "sublayer outputs before they join the residual stream")
_POST_NORM = ("{name} blocks are post-norm (the norms sit on the sublayer outputs, post_attention_layernorm / "
              "post_feedforward_layernorm), not pre-norm")

# What inference gets wrong, per model_type: only these fields, merged over the inferred Arch.
OVERRIDES: dict[str, dict] = {
    "phi3": {"splits": (("self_attn.qkv_proj", Split(("q", "k", "v"), _phi3_qkv)), ("mlp.gate_up_proj", _GATE_UP))},
    "glm4": {"splits": (("mlp.gate_up_proj", _GATE_UP),),
             "not_invariant": _SANDWICH.format(name="GLM-4", norms="post_self_attn_layernorm / post_mlp_layernorm")},
    "gemma2": {"not_invariant": _SANDWICH.format(
        name="Gemma-2", norms="post_attention_layernorm / post_feedforward_layernorm") + ", and their RMSNorm "
        "scales by (1 + weight)"},
    "gemma3_text": {"not_invariant": _SANDWICH.format(
        name="Gemma-3", norms="post_attention_layernorm / post_feedforward_layernorm") + ", and their RMSNorm "
        "scales by (1 + weight)"},
    "olmo2": {"not_invariant": _POST_NORM.format(name="OLMo-2")},
    "olmo3": {"not_invariant": _POST_NORM.format(name="OLMo-3")},
    "exaone4": {"not_invariant": _POST_NORM.format(name="EXAONE-4")},
    "granitemoehybrid": {"splits": (("shared_mlp.input_linear", _GATE_UP),)},
    # LLaMA's residual wiring under other names, and an MLP without a gate (up -> xIELU -> down)
    "apertus": {"reads": (("attention_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                          ("feedforward_layernorm", ("mlp.up_proj",))),
                "writes": ("self_attn.o_proj", "mlp.down_proj")},
}
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> Arch: the tree is walked once


def arch_of(model) -> Arch:
    """The model's Arch: inferred from its module tree, with its OVERRIDES entry applied."""
    hit = _CACHE.get(model)
    if hit is not None:
        return hit
    mt = model.config.model_type
    a = Arch(**archinfer.infer(model))
    if mt in OVERRIDES:
        a = dataclasses.replace(a, **OVERRIDES[mt], source="inferred + arch.py entry")
    _CACHE[model] = a
    return a


def block_prefix(blocks: str, name: str) -> str | None:
    """The prefix of the decoder block a full name lies in ('model.layers.3.' for
    'model.layers.3.mlp.up_proj.weight', blocks 'model.layers'); None outside the blocks."""
    inside = blocks + "."
    return inside + name[len(inside):].split(".")[0] + "." if name.startswith(inside) else None


def block_index(blocks: str, name: str) -> int | None:
    """The index of the decoder block a full name lies in (3 for 'model.layers.3.mlp.up_proj.weight', blocks
    'model.layers'); None outside the blocks: the unit lazy.ShardWriter keeps together in one file."""
    prefix = block_prefix(blocks, name)
    return None if prefix is None else int(prefix[len(blocks) + 1:-1])


def get(module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def set_module(model, dotted: str, new) -> None:
    """Replace the submodule at `dotted` (e.g. "model.layers.0.mlp.up_proj") with `new`."""
    parent, _, leaf = dotted.rpartition(".")
    setattr(get(model, parent) if parent else model, leaf, new)


# Config fields by which a family's forward scales the head's output, and how: Granite's (3.x, 4.0) logits_scaling
# divides, Falcon-H1's lm_head_multiplier and Cohere's logit_scale multiply
LOGIT_SCALES = (("logits_scaling", "div"), ("lm_head_multiplier", "mul"), ("logit_scale", "mul"))


def logits(model, hidden):
    """Output-head logits (fp32) of final hidden states, scaled as the family's forward scales them (LOGIT_SCALES)
    and with the architecture's final logit soft-capping (Gemma-2/3: cap * tanh(logits / cap)) when its config
    sets one."""
    import torch

    out = model.get_output_embeddings()(hidden)
    for field, how in LOGIT_SCALES:
        f = getattr(model.config, field, None)
        if isinstance(f, (int, float)) and not isinstance(f, bool) and f != 1:
            out = out / f if how == "div" else out * f
    out = out.float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(out / cap) * cap if cap else out


def base(model):
    """The decoder under the head, whose forward returns `last_hidden_state`: `model.base_model`, or, where that is
    the model itself (Llama 4's text model: base_model_prefix 'language_model', its decoder at `model`), the module
    that holds the decoder blocks."""
    b = model.base_model
    if b is not model:
        return b
    path = arch_of(model).blocks.rpartition(".")[0]
    return get(model, path) if path else model


def blocks(model):
    return get(model, arch_of(model).blocks)


class Rows:
    """Rows [start, stop) of a fused linear's weight: one projection of it, as a target."""

    def __init__(self, linear: nn.Linear, start: int, stop: int):
        self.linear, self.start, self.stop = linear, start, stop
        self.owner = linear
        self.stats_key = id(linear)  # every part reads the linear's input

    @property
    def weight(self):
        return self.linear.weight.data[self.start:self.stop]  # (rows, in) view

    @property
    def bias(self):
        b = self.linear.bias
        return None if b is None else b.data[self.start:self.stop]

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.stop - self.start

    def register_forward_hook(self, fn):
        return self.linear.register_forward_hook(lambda mod, inp, out: fn(self, inp, None))


def split_rows(model, split: Split, linear: nn.Linear) -> dict[str, tuple[int, int]]:
    """label -> (start, stop) rows of each part of a fused linear."""
    n = len(split.labels)
    sizes = split.sizes(model.config.get_text_config()) if split.sizes else (linear.out_features // n,) * n
    if sum(sizes) != linear.out_features:
        raise LLMPruneError(f"fused linear with {linear.out_features} rows does not split into {split.labels} of "
                            f"{sizes} rows: fix its Split in llmprune/arch.py OVERRIDES")
    out, start = {}, 0
    for label, size in zip(split.labels, sizes):
        out[label] = (start, start + size)
        start += size
    return out


def is_dense(rel: str, gates: bool = False) -> bool:
    """Whether the linear `rel` (a block-relative or full name) stays dense: a router, a SliceGPT residual shortcut
    (a small (d, d) basis change on the stream every later block reads), or a shared expert's gate (unless gates).
    The pruning passes leave these alone, and the packed formats keep them dense (gates too), as compressed-tensors
    exports do."""
    return any(re.search(p, rel) for p in ROUTERS + SHORTCUTS + (() if gates else GATES))


def is_router(name: str) -> bool:
    """Whether linear `name` decides which experts run (a router, a shared expert's gate): packed formats keep it
    dense, as compressed-tensors exports do."""
    return any(re.search(p, name) for p in ROUTERS + GATES)


def block_targets(model, index: int, gates: bool = False, module: nn.Module | None = None) -> dict:
    """Relative name -> target of block `index` (or of `module`, the block as the walker holds it),
    in module order (see the module docstring)."""
    a = arch_of(model)
    splits = dict(a.splits)
    block = module if module is not None else get(model, a.blocks)[index]
    out: dict = {}
    inside_experts: list[str] = []
    for rel, m in block.named_modules():
        if any(rel.startswith(e + ".") for e in inside_experts):
            continue
        if moe.is_fused_experts(m):
            inside_experts.append(rel)
            out.update((n, target(block, n)) for n in moe.view_names(rel, m))
        elif isinstance(m, nn.Linear) and not is_dense(rel, gates):
            if rel in splits:
                for label, (s, e) in split_rows(model, splits[rel], m).items():
                    out[f"{rel}[{label}]"] = Rows(m, s, e)
            else:
                out[rel] = m
    return out


def target(root, name: str, model=None):
    """The target called `name` under `root` (the model, or a block with a relative name): an
    nn.Linear, a Rows part of a fused linear (needs the model's config: pass model), or an expert's
    projection."""
    if "[" not in name:
        return get(root, name)
    path, _, tail = name.partition("[")
    inner, _, rest = tail.partition("]")
    mod = get(root, path)
    if moe.is_fused_experts(mod):
        return moe.resolve(mod, inner, rest)
    model = model if model is not None else root
    a = arch_of(model)
    split = next((s for rel, s in a.splits if path == rel or path.endswith("." + rel)), None)
    if split is None or not isinstance(mod, nn.Linear) or rest:
        raise LLMPruneError(f"{name!r} names no part of a fused linear or expert: check the name")
    s, e = split_rows(model, split, mod)[inner]
    return Rows(mod, s, e)


def linear_names(model, gates: bool = False) -> list[str]:
    """Full names of every prunable target, block by block (module order within a block)."""
    a = arch_of(model)
    return [f"{a.blocks}.{i}.{rel}" for i in range(len(get(model, a.blocks)))
            for rel in block_targets(model, i, gates)]


class Planner:
    """The BlockPlan of each block the walker yields: its targets and, traced from one forward on
    the block's first calibration batch (archinfer.trace), their compute order; one trace per
    distinct block structure. An Arch with fixed `groups` skips the trace."""

    def __init__(self, model: nn.Module, gates: bool = False):
        self.model, self.gates = model, gates
        self.arch = arch_of(model)
        self._cache: dict[tuple, tuple] = {}

    def __call__(self, block) -> BlockPlan:
        """block: a walker.Block (its index, module and calibration inputs)."""
        targets = block_targets(self.model, block.index, self.gates, block.module)
        a = self.arch
        if a.groups is not None:
            lins = tuple(n for n, m in block.module.named_modules() if isinstance(m, nn.Linear))
            groups = tuple(tuple(n for n in g if n in targets) for g in a.groups)
            missing = [n for n in targets if not any(n in g for g in groups)]
            if missing:
                raise LLMPruneError(f"the OVERRIDES groups of {self.model.config.model_type!r} leave out {missing[0]} "
                                    f"of block {block.index}: add it to them in llmprune/arch.py")
            return BlockPlan(targets, tuple(g for g in groups if g), a.sublayers or (), lins)
        key = (type(block.module), tuple((n, tuple(t.weight.shape)) for n, t in targets.items()),
               tuple(n for n, _ in block.module.named_children()))
        if key not in self._cache:
            args, kwargs = block.calls[0]
            self._cache[key] = archinfer.trace(block.module, lambda: block.module(block.inputs[0], *args, **kwargs),
                                               targets, block.index)
        groups, sublayers, linears = self._cache[key]
        return BlockPlan(targets, groups, a.sublayers if a.sublayers is not None else sublayers, linears)
