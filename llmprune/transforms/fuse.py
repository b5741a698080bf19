"""Computational invariance (SliceGPT, Ashkboos et al. 2024, arXiv:2401.15024, sec. 3.1-3.2).

A pre-norm transformer reads its residual stream x only through RMSNorm(x) = x / rms(x) * g
followed by linears. Folding the scale g into those linears (W <- W diag(g)) and setting g = 1
leaves the function unchanged, and then RMSNorm commutes with any orthogonal Q:
RMSNorm(x Q) = RMSNorm(x) Q, because ||x Q|| = ||x||. That is what lets SliceGPT rotate the
residual stream. This file holds the per-architecture layout that the rotation needs (as data)
and the fusion itself.
"""
from __future__ import annotations

import torch
from torch import nn

from ..arch import ARCHS, Arch, get
from ..errors import LLMPruneError
from ..sliced import set_linear

Layout = Arch  # the residual wiring lives in arch.py (reads, writes, attn, mlp), one table


def layout_of(model) -> Layout:
    """The model's layout (arch.py), or an LLMPruneError saying why SliceGPT cannot rotate it."""
    mt = model.config.model_type
    a = ARCHS.get(mt)
    if a is not None and a.not_invariant:
        raise LLMPruneError(f"SliceGPT cannot slice {mt!r}: {a.not_invariant}; use an unstructured or N:M solver")
    if a is None or not a.reads:
        ok = sorted(n for n, x in ARCHS.items() if x.reads and not x.not_invariant)
        raise LLMPruneError(f"SliceGPT supports {', '.join(ok)} (RMSNorm pre-norm blocks), not {mt!r}; add its "
                            f"residual wiring (reads, writes) to llmprune/arch.py")
    for i, block in enumerate(get(model, a.blocks)):
        norms = {n for n, m in block.named_children() if "norm" in type(m).__name__.lower() or n.endswith("norm")}
        extra = norms - {n for n, _ in a.reads}
        if extra:  # e.g. a sandwich norm: the sublayer output is normalized, the rotation cannot pass it
            raise LLMPruneError(f"SliceGPT cannot slice block {i} of {mt!r}: extra norms {sorted(extra)} "
                                "break the rotation invariance")
    return a


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
