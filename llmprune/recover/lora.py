"""Sparsity-preserving adapters for PERP (Zimmer et al. 2023, arXiv 2312.15230, sec. 3.2).

Plain LoRA (W + B A) cannot be merged into a pruned W without filling in its zeros. PERP's two
variants can:

- MaskLoRA:  W' = (W + s * B A) ⊙ K          K = keep-mask, s = alpha / rank
- ScaleLoRA: W' = W ⊙ (u v^T)               here rank 1, u = 1 + s_row, v = 1 + s_col

Both start at the identity (B = 0, s_row = s_col = 0), so training begins at the pruned model,
and both merge into a weight whose zeros are exactly those of W (see `merged_weight`).
K defaults to W != 0, read off the frozen weight whenever it is needed: no mask is stored (a
bool mask per weight would add half a bf16 model's bytes).
ScaleLoRA never builds u v^T: y = ((x ⊙ v) W^T) ⊙ u, which costs two vector products.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..arch import set_module


class SparseAdapterLinear(nn.Module):
    """A frozen nn.Linear plus a MaskLoRA and/or ScaleLoRA adapter; `merged_weight` folds them in."""

    def __init__(self, base: nn.Linear, keep: torch.Tensor | None = None, rank: int = 0, scale: bool = False,
                 alpha: float | None = None, generator: torch.Generator | None = None):
        super().__init__()
        out_f, in_f = base.weight.shape
        if keep is not None and keep.shape != (out_f, in_f):
            raise ValueError(f"keep-mask {tuple(keep.shape)} does not match weight {(out_f, in_f)}")
        self.base = base
        self.rank = rank
        self.scaling = (alpha if alpha is not None else rank) / rank if rank else 0.0
        dev = base.weight.device
        # An explicit mask is kept (it may keep a weight that is zero); None: K = W != 0, never stored.
        self.register_buffer("keep_mask", None if keep is None else keep.to(device=dev, dtype=torch.bool),
                             persistent=False)
        # Adapters train in fp32 whatever the model's dtype: AdamW steps of ~1e-4 vanish in bf16.
        if rank:
            a = torch.empty(rank, in_f)
            # LoRA's init (Hu et al. 2021, arXiv 2106.09685): A ~ kaiming-uniform, B = 0, so B A = 0.
            bound = 1.0 / math.sqrt(in_f)  # = kaiming_uniform_(a=sqrt(5)), as nn.Linear and PEFT use
            a.uniform_(-bound, bound, generator=generator)
            self.lora_A = nn.Parameter(a.to(dev))  # (rank, in)
            self.lora_B = nn.Parameter(torch.zeros(out_f, rank, device=dev))  # (out, rank)
        if scale:
            self.s_row = nn.Parameter(torch.zeros(out_f, device=dev))  # (out,)
            self.s_col = nn.Parameter(torch.zeros(in_f, device=dev))  # (in,)
        self.scale = scale

    def adapter_numel(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("base."))

    def keep(self) -> torch.Tensor:
        """K: the given mask, else W != 0 (the frozen weight's zeros, which training never changes)."""
        return self.keep_mask if self.keep_mask is not None else self.base.weight != 0

    def _weight(self) -> torch.Tensor:
        """W + s (B A) ⊙ K, in W's dtype; equal to (W + s B A) ⊙ K since W is zero where K is False."""
        w = self.base.weight
        if not self.rank:
            return w
        delta = (self.lora_B @ self.lora_A) * self.scaling  # (out, in)
        return w + torch.where(self.keep(), delta, 0).to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._weight()
        if not self.scale:
            return F.linear(x, w, self.base.bias)
        x = x * (1 + self.s_col).to(x.dtype)  # column scale v acts on the inputs
        y = F.linear(x, w) * (1 + self.s_row).to(x.dtype)  # row scale u on the outputs, bias untouched
        return y + self.base.bias if self.base.bias is not None else y

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """(W + s B A) ⊙ K ⊙ (u v^T) where K is True, W itself (its zeros, bit for bit) elsewhere."""
        w = self.base.weight
        new = w.float()
        if self.rank:
            new = new + (self.lora_B @ self.lora_A).float() * self.scaling
        if self.scale:
            new = new * (1 + self.s_row.float())[:, None] * (1 + self.s_col.float())[None, :]
        # torch.where, not a multiply by K: (W + d) * 0 can be -0.0, which differs from 0.0 in bits.
        return torch.where(self.keep(), new.to(w.dtype), w)


def attach(model: nn.Module, keep_masks: dict[str, torch.Tensor | None], rank: int = 0, scale: bool = False,
           alpha: float | None = None, seed: int = 0) -> dict[str, SparseAdapterLinear]:
    """Wrap each named nn.Linear of `keep_masks` in a SparseAdapterLinear, in place (a None mask:
    the weight's own zeros); a linear narrower than `rank` gets rank min(out, in), all a product B A of
    its shape can use."""
    gen = torch.Generator().manual_seed(seed)
    wrapped = {}
    for name, keep in keep_masks.items():
        base = model.get_submodule(name)
        wrapper = SparseAdapterLinear(base, keep, min(rank, *base.weight.shape), scale, alpha, gen)  # rank <= min(out, in)
        set_module(model, name, wrapper)
        wrapped[name] = wrapper
    return wrapped


@torch.no_grad()
def detach(model: nn.Module, merge: bool = True) -> int:
    """Put the plain nn.Linear back in place of every SparseAdapterLinear, folding the adapters in
    when `merge` (else dropping them). Returns how many were replaced."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, SparseAdapterLinear)]
    for name, wrapper in found:
        base = wrapper.base
        if merge:
            base.weight.copy_(wrapper.merged_weight())
        set_module(model, name, base)
    return len(found)
