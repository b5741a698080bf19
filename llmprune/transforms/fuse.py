"""Computational invariance (SliceGPT, Ashkboos et al. 2024, arXiv:2401.15024, sec. 3.1-3.2).

A pre-norm transformer reads its residual stream x only through RMSNorm(x) = x / rms(x) * g
followed by linears. Folding the scale g into those linears (W <- W diag(g)) and setting g = 1
leaves the function unchanged, and then RMSNorm commutes with any orthogonal Q:
RMSNorm(x Q) = RMSNorm(x) Q, because ||x Q|| = ||x||. That is what lets SliceGPT rotate the
residual stream. This file holds the per-architecture layout that the rotation needs (as data)
and the fusion itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..arch import get
from ..errors import LLMPruneError


@dataclass(frozen=True)
class Layout:
    """Where a pre-norm block reads and writes its residual stream (names relative to a block)."""

    blocks: str
    embed: str
    norm: str  # final norm, read by the head
    head: str
    reads: tuple[tuple[str, tuple[str, ...]], ...]  # (norm, linears that read its output), in order
    writes: tuple[str, ...]  # linears whose outputs are added to the residual stream
    attn: str = "self_attn"
    mlp: str = "mlp"


_LLAMA = Layout(
    "model.layers", "model.embed_tokens", "model.norm", "lm_head",
    reads=(("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
           ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
    writes=("self_attn.o_proj", "mlp.down_proj"),
)
# The lead's llmprune/arch.py lists these families too; SliceGPT also needs the norm wiring above,
# and only architectures whose blocks are invariant to a residual rotation may appear here.
LAYOUTS: dict[str, Layout] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA}

_GEMMA = ("{mt} blocks are not rotation-invariant: their extra post-sublayer norms "
          "(post_attention_layernorm / post_feedforward_layernorm after attention and MLP) normalize the "
          "sublayer outputs before they join the residual stream, and their RMSNorm scales by (1 + weight)")
NOT_INVARIANT = {mt: _GEMMA.format(mt=name) for mt, name in
                 (("gemma", "Gemma"), ("gemma2", "Gemma-2"), ("gemma3", "Gemma-3"), ("gemma3_text", "Gemma-3"))}


def layout_of(model) -> Layout:
    """The model's layout, or an LLMPruneError saying why SliceGPT cannot rotate it."""
    mt = model.config.model_type
    if mt in NOT_INVARIANT:
        raise LLMPruneError(f"SliceGPT cannot slice {mt!r}: {NOT_INVARIANT[mt]}; use an unstructured or N:M solver")
    if mt not in LAYOUTS:
        raise LLMPruneError(f"SliceGPT supports {', '.join(sorted(LAYOUTS))} (RMSNorm pre-norm blocks), "
                            f"not {mt!r}; add its layout to llmprune/transforms/fuse.py")
    lay = LAYOUTS[mt]
    for i, block in enumerate(get(model, lay.blocks)):
        norms = {n for n, m in block.named_children() if "norm" in type(m).__name__.lower() or n.endswith("norm")}
        extra = norms - {n for n, _ in lay.reads}
        if extra:  # e.g. a sandwich norm: the sublayer output is normalized, the rotation cannot pass it
            raise LLMPruneError(f"SliceGPT cannot slice block {i} of {mt!r}: extra norms {sorted(extra)} "
                                "break the rotation invariance")
    return lay


def set_linear(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Replace a linear's weight (out, in) (and bias) in place, keeping its dtype, device and sizes in sync."""
    old = lin.weight
    lin.weight = nn.Parameter(weight.to(old.device, old.dtype).contiguous(), requires_grad=old.requires_grad)
    lin.out_features, lin.in_features = weight.shape
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(old.device, old.dtype).contiguous(), requires_grad=old.requires_grad)


def untie_head(model) -> bool:
    """Give the head its own weight when it shares the embedding's; returns whether it was tied.

    After fusion the head reads W_head diag(g) and the embedding stays E, so they can no longer be one tensor.
    """
    lay = layout_of(model)
    head, embed = get(model, lay.head), get(model, lay.embed)
    tied = head.weight.data_ptr() == embed.weight.data_ptr()
    if tied:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cfg.tie_word_embeddings = False
    model.config.tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys"):  # transformers 5 caches the mapping at init
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=False)
    return tied


@torch.no_grad()
def _fold(norm: nn.Module, linears: list[nn.Linear]) -> None:
    g = norm.weight.detach().double()  # (hidden,)
    for lin in linears:
        set_linear(lin, lin.weight.double() * g)  # W diag(g): (out, hidden) * (hidden,)
    norm.weight.data.fill_(1.0)


@torch.no_grad()
def fuse_norms(model) -> dict:
    """Fold every RMSNorm scale into the linears that read it and set the scale to 1 (function unchanged).

    LLaMA-family: input_layernorm -> q, k, v; post_attention_layernorm -> gate, up; final norm -> head.
    The head is untied from the embedding first. RMSNorm has no mean to subtract, so unlike LayerNorm
    models (arXiv:2401.15024 sec. 3.2) nothing has to be folded into the layers that write the stream.
    Returns {"untied": bool}.
    """
    lay = layout_of(model)
    tied = untie_head(model)
    for block in get(model, lay.blocks):
        for norm, readers in lay.reads:
            _fold(get(block, norm), [get(block, r) for r in readers])
    _fold(get(model, lay.norm), [get(model, lay.head)])
    return {"untied": tied}
