"""Architecture knowledge as data: where the decoder blocks are and which linears they hold,
in the order a block computes them (groups solved together in "true sequential" mode)."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import LLMPruneError


@dataclass(frozen=True)
class Arch:
    blocks: str  # dotted path of the ModuleList of decoder blocks
    embed: str
    norm: str
    head: str
    groups: tuple[tuple[str, ...], ...]  # linears inside a block, relative names, in compute order
    # (sublayer, its last linear): the sublayer returns that linear's output, so once the linear is
    # solved the engine replays the sublayer from the linear's recorded inputs instead of rerunning it
    # (checked on every batch when recorded; a sublayer that does not match is rerun as usual)
    sublayers: tuple[tuple[str, str], ...] = ()


_LLAMA_SUBLAYERS = (("self_attn", "self_attn.o_proj"), ("mlp", "mlp.down_proj"))
_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

ARCHS: dict[str, Arch] = {
    "llama": Arch("model.layers", "model.embed_tokens", "model.norm", "lm_head", _LLAMA_GROUPS, _LLAMA_SUBLAYERS),
    "mistral": Arch("model.layers", "model.embed_tokens", "model.norm", "lm_head", _LLAMA_GROUPS, _LLAMA_SUBLAYERS),
    "qwen2": Arch("model.layers", "model.embed_tokens", "model.norm", "lm_head", _LLAMA_GROUPS, _LLAMA_SUBLAYERS),
    "gemma3_text": Arch("model.layers", "model.embed_tokens", "model.norm", "lm_head", _LLAMA_GROUPS, _LLAMA_SUBLAYERS),
}


def arch_of(model) -> Arch:
    mt = model.config.model_type
    if mt not in ARCHS:
        raise LLMPruneError(
            f"architecture {mt!r} is not supported yet: supported are {', '.join(sorted(ARCHS))} "
            f"(add an entry to llmprune/arch.py)"
        )
    return ARCHS[mt]


def get(module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def set_module(model, dotted: str, new) -> None:
    """Replace the submodule at `dotted` (e.g. "model.layers.0.mlp.up_proj") with `new`."""
    parent, _, leaf = dotted.rpartition(".")
    setattr(get(model, parent) if parent else model, leaf, new)


def logits(model, hidden):
    """Output-head logits (fp32) of final hidden states, with the architecture's final logit
    soft-capping (Gemma-2/3: cap * tanh(logits / cap)) when its config sets one."""
    import torch

    out = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(out / cap) * cap if cap else out


def blocks(model):
    return get(model, arch_of(model).blocks)


def linear_names(model) -> list[str]:
    """Full names of every prunable linear, block by block in compute order."""
    a = arch_of(model)
    return [f"{a.blocks}.{i}.{lin}" for i in range(len(get(model, a.blocks))) for g in a.groups for lin in g]
