"""Architecture knowledge as data: where the decoder blocks are and which linears they hold,
in the order a block computes them (groups solved together in "true sequential" mode)."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import LLMPruneError


@dataclass(frozen=True)
class Arch:
    blocks: str  # dotted path of the ModuleList of decoder blocks
    embed: str
    norm: str  # final norm, read by the head
    head: str
    groups: tuple[tuple[str, ...], ...]  # linears inside a block, relative names, in compute order
    # (sublayer, its last linear): the sublayer returns that linear's output, so once the linear is
    # solved the engine replays the sublayer from the linear's recorded inputs instead of rerunning it
    # (checked on every batch when recorded; a sublayer that does not match is rerun as usual)
    sublayers: tuple[tuple[str, str], ...] = ()
    # where a pre-norm block reads and writes its residual stream (SliceGPT's rotation, transforms/fuse.py):
    reads: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (norm, linears that read its output), in order
    writes: tuple[str, ...] = ()  # linears whose outputs are added to the residual stream
    attn: str = "self_attn"
    mlp: str = "mlp"
    not_invariant: str | None = None  # why the residual stream cannot be rotated (None: it can)


_LLAMA_SUBLAYERS = (("self_attn", "self_attn.o_proj"), ("mlp", "mlp.down_proj"))
_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

_LLAMA_READS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
_LLAMA_WRITES = ("self_attn.o_proj", "mlp.down_proj")
_LLAMA = Arch("model.layers", "model.embed_tokens", "model.norm", "lm_head", _LLAMA_GROUPS, _LLAMA_SUBLAYERS,
              _LLAMA_READS, _LLAMA_WRITES)
_GEMMA = ("{name} blocks are not rotation-invariant: their extra post-sublayer norms "
          "(post_attention_layernorm / post_feedforward_layernorm after attention and MLP) normalize the "
          "sublayer outputs before they join the residual stream, and their RMSNorm scales by (1 + weight)")

ARCHS: dict[str, Arch] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gemma3_text": Arch("model.layers", "model.embed_tokens", "model.norm", "lm_head", _LLAMA_GROUPS, _LLAMA_SUBLAYERS,
                        not_invariant=_GEMMA.format(name="Gemma-3")),
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
