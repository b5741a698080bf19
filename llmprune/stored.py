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
  rows_of(model, memory, parts)  which rows of which in-memory tensor each stored tensor is, where a
                             conversion only moves whole rows (experts stacked and concatenated): a block
                             is then read and written one stored tensor at a time

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


def rows_of(model, memory: dict[str, tuple], parts: dict[str, tuple]) -> dict[str, tuple[str, torch.Tensor, int]] | None:
    """Where the rows of each stored tensor (`parts`: name -> shape) lie in the in-memory tensors a load
    converts them into (`memory`: name -> shape): {stored name: (in-memory name, the indices of its rows in
    that tensor seen as (rows, width), one per stored row in order, width)}; a 1-D tensor's rows are its
    elements (width 1: a renamed bias such as MiniMax-M2's `e_score_correction_bias`). Found by putting each
    stored tensor's row numbers (an int per row) through the conversion (to_memory). None when the conversion
    does more than move whole rows of 1-D and 2-D tensors, or does not give `memory`'s names and shapes: the
    caller converts the tensors themselves."""
    if any(len(shape) not in (1, 2) for shape in parts.values()):
        return None
    offsets, n = {}, 0
    for k, shape in parts.items():
        offsets[k], n = n, n + shape[0]
    probes = {k: torch.arange(o, o + parts[k][0]).view(-1, *([1] if len(parts[k]) == 2 else [])) for k, o in
              offsets.items()}
    try:
        got = to_memory(model, probes)
    except Exception:  # noqa: BLE001 - a conversion row numbers cannot go through: the caller converts tensors
        return None
    names = list(memory)
    if set(got) != set(names):
        return None
    where = torch.full((n,), -1, dtype=torch.long)  # stored row -> row of its in-memory tensor
    owner = torch.full((n,), -1, dtype=torch.long)  # stored row -> index of that tensor in `names`
    width = {}
    for i, name in enumerate(names):
        ids, shape = got[name], tuple(memory[name])
        if ids.dtype != torch.long:
            return None
        if tuple(ids.shape) == shape:  # one number an element: 1-D parts
            width[name] = 1
        elif len(shape) >= 2 and tuple(ids.shape) == shape[:-1] + (1,):  # one a row
            width[name] = shape[-1]
        else:
            return None
        ids = ids.reshape(-1)
        if bool(((ids < 0) | (ids >= n)).any()) or bool((owner[ids] != -1).any()):
            return None
        where[ids], owner[ids] = torch.arange(ids.numel()), i
    if bool((owner == -1).any()):
        return None
    out = {}
    for k, o in offsets.items():
        r = parts[k][0]
        own = owner[o:o + r]
        name = names[int(own[0])]
        if bool((own != own[0]).any()) or width[name] != (parts[k][1] if len(parts[k]) == 2 else 1):
            return None
        out[k] = (name, where[o:o + r], width[name])
    return out
