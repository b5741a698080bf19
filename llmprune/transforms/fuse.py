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

from ..arch import Arch, arch_of, get
from ..errors import LLMPruneError
from ..sliced import set_linear

Layout = Arch  # the residual wiring lives in arch.py (reads, writes, attn, mlp), one table


def _scales_like_rmsnorm(norm: nn.Module) -> bool:
    """Whether norm(x) == x / rms(x) * weight (what the fusion folds), checked on random rows."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or getattr(norm, "bias", None) is not None:
        return False
    if w.device.type == "meta":  # weights still on disk: fuse_norms checks again once they are loaded
        return True
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None) or 1e-6
    x = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)  # (3, D)
    with torch.no_grad():
        got = norm(x).float()
    xf = x.float()
    want = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()
    tol = 1e-4 if w.element_size() >= 4 else 2e-2
    return bool(torch.allclose(got, want, rtol=tol, atol=tol))


def layout_of(model) -> Layout:
    """The model's layout (arch.py), or an LLMPruneError saying why SliceGPT cannot rotate it."""
    mt = model.config.model_type
    a = arch_of(model)
    if a.not_invariant:
        raise LLMPruneError(f"SliceGPT cannot slice {mt!r}: {a.not_invariant}; use an unstructured or N:M solver")
    if not a.reads or a.norm is None:
        raise LLMPruneError(f"SliceGPT needs pre-norm blocks with LLaMA's residual wiring (input_layernorm -> "
                            f"q/k/v_proj, post_attention_layernorm -> gate/up_proj, o_proj and down_proj write the "
                            f"stream) and a final norm, which {mt!r} lacks: add its reads and writes to llmprune/arch.py "
                            f"OVERRIDES, or use an unstructured or N:M solver")
    blocks = get(model, a.blocks)
    for i, block in enumerate(blocks):
        norms = {n for n, m in block.named_children() if "norm" in type(m).__name__.lower() or n.endswith("norm")}
        extra = norms - {n for n, _ in a.reads}
        if extra:  # e.g. a sandwich norm: the sublayer output is normalized, the rotation cannot pass it
            raise LLMPruneError(f"SliceGPT cannot slice block {i} of {mt!r}: extra norms {sorted(extra)} "
                                "break the rotation invariance")
    for name in [f"{a.blocks}.0.{n}" for n, _ in a.reads] + ([a.norm] if a.norm else []):
        check_norm(model, name, get(model, name))
    return a


def check_norm(model, name: str, norm: nn.Module) -> None:
    """An LLMPruneError unless `norm` computes x / rms(x) * weight (what the fusion folds). A norm whose
    weight is still on disk passes; the caller checks it again once read (onload_slicegpt)."""
    if not _scales_like_rmsnorm(norm):
        raise LLMPruneError(f"SliceGPT cannot slice {model.config.model_type!r}: its norm {name} "
                            f"({type(norm).__name__}) does not compute x / rms(x) * weight, which the rotation needs "
                            f"(fuse.py folds RMSNorm only); use an unstructured or N:M solver")


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
def fold(norm: nn.Module, linears: list[nn.Linear]) -> None:
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
            fold(get(block, norm), [get(block, r) for r in readers])
    fold(get(model, lay.norm), [get(model, lay.head)])
    return {"untied": tied}
