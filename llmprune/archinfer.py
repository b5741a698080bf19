"""Inferring a decoder's Arch from its module tree, and each block's compute order from one forward.

Structure (`infer`), the way llm-compressor finds its sequential targets:
- blocks: the ModuleList whose children are instances of a class in the model's `_no_split_modules`
  (the longest such list; without `_no_split_modules`, the longest list of one class);
- embed / head: `get_input_embeddings()` / `get_output_embeddings()`, by their names in the tree;
- norm: the one norm module beside the blocks list (model.norm, decoder.final_layer_norm, ...);
- reads / writes (SliceGPT's residual wiring): the pre-norm LLaMA wiring, when a block has its names.

Compute order (`Planner`), per block: one forward of the block on its first calibration batch with
hooks on every nn.Linear and fused experts module records the order in which they first run and
the tensor each read. Consecutive linears that read the same tensor form a group (q, k, v; gate,
up; a fused qkv_proj's parts), solved together by sequential solvers; a linear reading anything
else starts the next group (o_proj reads attention's output, down_proj reads act(gate) * up). A
fused experts module counts as its gate/up projections (reading the module's input) followed by
its down projections. A direct child of the block whose output is the output of the last linear it
ran is a sublayer the engine may replay (walker.Block.replay; checked again on every batch).
Blocks with the same structure share one trace.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from . import moe
from .errors import LLMPruneError

_LLAMA_READS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
_LLAMA_WRITES = ("self_attn.o_proj", "mlp.down_proj")


def _is_norm(m: nn.Module) -> bool:
    return "norm" in type(m).__name__.lower() and not isinstance(m, nn.Linear)


def _name_of(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    return next((n for n, m in model.named_modules() if m is module), None)


def _get(module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def find_blocks(model: nn.Module) -> str:
    """Dotted path of the ModuleList of decoder blocks."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    found = [(n, m) for n, m in lists if all(type(c).__name__ in classes for c in m)]
    if not found and not classes:  # no declared block class: the longest list of one class
        found = [(n, m) for n, m in lists if len({type(c) for c in m}) == 1 and not isinstance(m[0], nn.Linear)]
    if not found:
        mt = model.config.model_type
        raise LLMPruneError(f"cannot find the decoder blocks of {mt!r} (no ModuleList of its _no_split_modules "
                            f"{sorted(classes)}): add OVERRIDES[{mt!r}] = {{'blocks': 'path.to.layers'}} to "
                            f"llmprune/arch.py")
    return max(found, key=lambda nm: len(nm[1]))[0]


def infer(model: nn.Module) -> dict:
    """The fields of a decoder-only causal LM's arch.Arch, from its module tree (see the module docstring)."""
    mt = model.config.model_type
    path = find_blocks(model)
    blocks = _get(model, path)
    parent = _get(model, path.rpartition(".")[0]) if "." in path else model
    embed = _name_of(model, model.get_input_embeddings())
    head = _name_of(model, model.get_output_embeddings())
    prefix = path.rpartition(".")[0] + "." if "." in path else ""
    norms = [prefix + n for n, m in parent.named_children() if _is_norm(m)]
    if embed is None:
        raise LLMPruneError(f"{mt!r} has no input embedding (get_input_embeddings): llmprune prunes decoder LMs; "
                            f"add an entry for it to llmprune/arch.py OVERRIDES")
    first = blocks[0]
    if not any(isinstance(m, nn.Linear) or moe.is_fused_experts(m) for m in first.modules()):
        kinds = sorted({type(m).__name__ for m in first.modules() if list(m.parameters(recurse=False))})
        raise LLMPruneError(f"{mt!r} blocks ({type(first).__name__}) hold no nn.Linear layers (they hold "
                            f"{', '.join(kinds)}): llmprune prunes nn.Linear and fused experts; add {mt!r} to "
                            f"llmprune/arch.py OVERRIDES with targets it can prune, or convert the model")
    odd = next((m for b in blocks for m in b.modules() if isinstance(getattr(m, "down_proj", None), nn.Parameter)
                and m.down_proj.dim() == 3 and not moe.is_fused_experts(m)), None)
    if odd is not None:  # experts llmprune cannot see would stay dense without a word
        raise LLMPruneError(f"{mt!r}: the experts module {type(odd).__name__} has a layout llmprune does not know (no "
                            f"use_experts_implementation flags): describe it in llmprune/moe.py UNDECORATED")
    wiring = [n for n, _ in _LLAMA_READS] + [r for _, rs in _LLAMA_READS for r in rs] + list(_LLAMA_WRITES)
    llama = all(set(wiring) <= {n for n, _ in b.named_modules()} for b in blocks)  # every block (hybrids differ)
    experts = any(moe.is_fused_experts(m) for b in blocks for m in b.modules())
    not_inv = None
    if experts:
        not_inv = (f"{mt} is a Mixture-of-Experts model: its experts are 3-D parameters (mlp.experts.*), which "
                   f"the rotation does not handle")
    return dict(blocks=path, embed=embed, norm=norms[-1] if norms else None, head=head,
                reads=_LLAMA_READS if llama else (), writes=_LLAMA_WRITES if llama else (), not_invariant=not_inv)


# --- compute order ----------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockPlan:
    """What the engine needs of one block: its targets and the order it computes them."""
    targets: dict  # relative name -> target (nn.Linear, arch.Rows, moe.ExpertProj), module order
    groups: tuple[tuple[str, ...], ...]  # target names in compute order; a group's members read one input
    sublayers: tuple[tuple[str, str], ...]  # (direct child, its last nn.Linear) whose output is that linear's
    linears: tuple[str, ...]  # every nn.Linear of the block that ran, in the order of first call

    @property
    def order(self) -> tuple[str, ...]:
        return tuple(n for g in self.groups for n in g)


def owner(t) -> nn.Module:
    """The module whose forward computes target t (t itself for an nn.Linear)."""
    return getattr(t, "owner", t)


def _same(a, b) -> bool:
    if a is None or b is None:
        return False
    if a is b:
        return True
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.stride() == b.stride() and a.data_ptr() == b.data_ptr() and a.dtype == b.dtype)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def trace(module: nn.Module, run, targets: dict, index: int = 0) -> tuple:
    """Run `run()` (one forward of `module`) with hooks; returns (groups, sublayers, linears)."""
    events: list[tuple[str, str, object, object]] = []  # (kind, relative name, input, output), first calls
    seen: set[str] = set()
    child_out: dict[str, object] = {}
    handles = []

    def on_linear(rel):
        def f(mod, inp, out):
            if rel not in seen:
                seen.add(rel)
                events.append(("linear", rel, inp[0] if inp else None, out))
        return f

    def on_experts(rel):
        def f(mod, args, kwargs):
            if rel not in seen:
                seen.add(rel)
                hidden, _ = moe.routing(args, kwargs)
                events.append(("experts", rel, hidden, None))
        return f

    def on_child(rel):
        def f(mod, inp, out):
            child_out.setdefault(rel, _first(out))
        return f

    try:
        for rel, m in module.named_modules():
            if isinstance(m, nn.Linear):
                handles.append(m.register_forward_hook(on_linear(rel)))
            elif moe.is_fused_experts(m):
                handles.append(m.register_forward_pre_hook(on_experts(rel), with_kwargs=True))
        for rel, m in module.named_children():
            if not isinstance(m, nn.Linear):
                handles.append(m.register_forward_hook(on_child(rel)))
        run()
    finally:
        for h in handles:
            h.remove()

    def parts(rel: str, pred=lambda n: True) -> list[str]:
        return [n for n in targets if (n == rel or n.startswith(rel + "[")) and pred(n)]

    groups: list[list[str]] = []
    last_input = None
    for kind, rel, x, _ in events:
        if kind == "experts":
            steps = [(parts(rel, lambda n: not n.endswith(".down_proj")), x),
                     (parts(rel, lambda n: n.endswith(".down_proj")), object())]  # down reads act(gate) * up
        else:
            steps = [(parts(rel), x)]
        for names, inp in steps:
            if not names:  # a linear that stays dense (a router): no group of its own
                continue
            if groups and _same(inp, last_input):
                groups[-1].extend(names)
            else:
                groups.append(list(names))
            last_input = inp
    ran = {n for g in groups for n in g}
    missing = [n for n in targets if n not in ran]
    if missing:
        raise LLMPruneError(f"{missing[0]} of block {index} did not run on the first calibration batch, so its "
                            f"place in the block's compute order is unknown: add --ignore '{re.escape(missing[0])}'")
    linear_events = [(rel, out) for kind, rel, _, out in events if kind == "linear"]
    sublayers = []
    for child, out in child_out.items():
        inside = [(rel, o) for rel, o in linear_events if rel.startswith(child + ".")]
        if inside and not any(rel.startswith(child + ".") for kind, rel, _, _ in events if kind == "experts") \
                and out is inside[-1][1]:
            sublayers.append((child, inside[-1][0]))
    return (tuple(tuple(g) for g in groups), tuple(sublayers), tuple(rel for rel, _ in linear_events))
