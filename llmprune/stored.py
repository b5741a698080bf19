"""Stored names and in-memory names of a model's tensors, one block at a time.

transformers 5 converts some tensors as it loads a whole model: the experts of Mixtral, Qwen2/3-MoE,
OLMoE and the other Mixture-of-Experts families are stored one linear per expert
(`mlp.experts.3.gate_proj.weight`, what vLLM, SGLang and llama.cpp's converter read) and fused in memory
into 3-D parameters (`mlp.experts.gate_up_proj`: every expert's gate and up stacked); `save_pretrained`
splits them again. A model walked block by block (lazy.LazyModel, onload.Output) does the same for one
block at a time, with transformers' own conversion table for the family (`conversion_mapping`), so
nothing here knows a family:

  to_stored(model, tensors)  in-memory names -> as `save_pretrained` stores them (meta tensors give the
                             names and shapes alone)
  to_memory(model, tensors)  stored tensors -> the in-memory tensors transformers' load makes of them

transformers keeps these functions internal; where they are missing or give something else than the
model's own names and shapes, the caller loads the model whole (onload.stored_as_in_memory).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch


def _conversions(model) -> list:
    """The family's conversions as `save_pretrained` reverts them for a model built from its config
    (no prefix changes); [] when there are none or this transformers has no such table."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange
    except ImportError:
        return []
    return [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]


def to_stored(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` (full in-memory names, all of each conversion's parts) as the checkpoint stores them: a
    block's experts split off the fused tensors (views, or copies where transformers' split makes them:
    gate and up)."""
    if not tensors or not _conversions(model):
        return dict(tensors)
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, tensors)


def to_memory(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stored `tensors` (full names) converted as a whole load converts them (a block's experts stacked
    into its fused parameters). transformers runs its conversions forwards only inside its loader, so
    this asks its reverting function to revert the reversed table (each reversal is exact: stacking is
    undone by splitting, concatenating by chunking); callers check the names and shapes that come out."""
    conv = _conversions(model) if tensors else []
    if not conv:
        return dict(tensors)
    from transformers.core_model_loading import revert_weight_conversion

    reversed_model = SimpleNamespace(_weight_conversions=[c.reverse_transform() for c in conv][::-1],
                                     config=model.config)
    return revert_weight_conversion(reversed_model, tensors)
