"""Runtime modules of SliceGPT outputs (arXiv 2401.15024): blocks with residual shortcuts, and the
loader that rebuilds them from a saved folder. Storage level: transforms/slicegpt.py makes these
models; checkpoint.load reads them back without importing the algorithm.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .arch import Arch, arch_of, get
from .errors import LLMPruneError


def set_linear(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Replace a linear's weight (out, in) (and bias) in place, keeping its dtype, device and sizes in sync."""
    old = lin.weight
    lin.weight = nn.Parameter(weight.to(old.device, old.dtype).contiguous(), requires_grad=old.requires_grad)
    lin.out_features, lin.in_features = weight.shape
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(old.device, old.dtype).contiguous(), requires_grad=old.requires_grad)


class SlicedDecoderLayer(nn.Module):
    """Mixin for a pre-norm decoder block whose residual connections carry SliceGPT's basis changes:

        h   = attn_shortcut(x) + attn(norm1(x))      # x in the block-input basis, h in the MLP-input basis
        out = mlp_shortcut(h)  + mlp(norm2(h))       # out in the next block's basis

    `add_shortcuts` turns a block into an instance of a subclass of (this, the block's own class), in
    place: attributes, state-dict keys (plus `attn_shortcut.weight`, `mlp_shortcut.weight`) and
    isinstance checks (transformers' hidden-state capture, gradient checkpointing) stay as they were.
    A shortcut of None is the identity.
    """

    attn_shortcut: nn.Linear | None
    mlp_shortcut: nn.Linear | None
    _slicegpt_names: tuple[str, str, str, str]  # norm1, attn, norm2, mlp

    def attn_residual(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        norm1, attn, _, _ = self._slicegpt_names
        a = getattr(self, attn)(hidden_states=getattr(self, norm1)(x), **kwargs)[0]
        return (x if self.attn_shortcut is None else self.attn_shortcut(x)) + a

    def mlp_residual(self, h: torch.Tensor) -> torch.Tensor:
        _, _, norm2, mlp = self._slicegpt_names
        m = getattr(self, mlp)(getattr(self, norm2)(h))
        return (h if self.mlp_shortcut is None else self.mlp_shortcut(h)) + m

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.mlp_residual(self.attn_residual(hidden_states, **kwargs))


_SLICED: dict[type, type] = {}


def add_shortcuts(block: nn.Module, lay: Arch, attn_shortcut: nn.Linear | None = None,
                  mlp_shortcut: nn.Linear | None = None) -> SlicedDecoderLayer:
    """Make `block` a SlicedDecoderLayer in place (see there) holding the given shortcuts."""
    base = type(block)
    if not isinstance(block, SlicedDecoderLayer):
        if base not in _SLICED:
            _SLICED[base] = type(f"Sliced{base.__name__}", (SlicedDecoderLayer, base), {"__module__": __name__})
        block.__class__ = _SLICED[base]
    (norm1, _), (norm2, _) = lay.reads
    block._slicegpt_names = (norm1, lay.attn, norm2, lay.mlp)
    block.attn_shortcut = attn_shortcut
    block.mlp_shortcut = mlp_shortcut
    return block


def unit_norm(norm: nn.Module, d: int, eps: float) -> None:
    norm.weight = nn.Parameter(torch.ones(d, dtype=norm.weight.dtype, device=norm.weight.device),
                               requires_grad=norm.weight.requires_grad)
    for attr in ("variance_epsilon", "eps"):
        if hasattr(norm, attr):
            setattr(norm, attr, eps)


def shortcut(weight: torch.Tensor, like: torch.Tensor) -> nn.Linear:
    """nn.Linear computing x @ S for S = weight^T; weight is (out, in) like any linear's."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=like.device, dtype=like.dtype)
    set_linear(lin, weight)
    return lin


def rebuild_per_block(model, manifest: dict | None = None) -> None:
    """Give a model built from a saved per-block config its shortcut modules (weights uninitialized),
    so a state dict saved from a per-block sliced model loads into it. manifest defaults to
    model.config.slicegpt (written by `slice_model`)."""
    man = manifest if manifest is not None else getattr(model.config, "slicegpt", None)
    if not man or man.get("method") != "slicegpt":
        raise LLMPruneError("this checkpoint has no SliceGPT manifest (config.slicegpt); it is not per-block sliced")
    lay = arch_of(model)
    blocks = get(model, lay.blocks)
    d, like = man["new_dim"], get(model, lay.embed).weight
    empty = lambda *shape: torch.empty(*shape, dtype=like.dtype, device=like.device)
    for i in man["shortcuts"]:
        if not isinstance(blocks[i], SlicedDecoderLayer):
            add_shortcuts(blocks[i], lay, shortcut(empty(d, d), like), shortcut(empty(d, d), like))
    for i in man.get("mlp_shortcuts", []):
        if not isinstance(blocks[i], SlicedDecoderLayer):
            add_shortcuts(blocks[i], lay, None, shortcut(empty(d, d), like))
    width = man.get("head_width", d)
    if width != d:  # the head, the final norm and the last block's MLP output keep the full width
        last, head = blocks[-1], get(model, lay.head)
        down = get(last, lay.writes[-1])
        set_linear(down, empty(width, down.in_features), None if down.bias is None else empty(width))
        last.mlp_shortcut = shortcut(empty(width, d), like)
        set_linear(head, empty(head.out_features, width), None if head.bias is None else head.bias.data)
        unit_norm(get(model, lay.norm), width, man["norm_eps"])


def on_meta(config, dtype: torch.dtype | None = None):
    """The model of `config` on the meta device (computed buffers, the rotary tables, real), with SliceGPT's
    residual shortcuts and full-width head when the config says it was sliced (config.slicegpt): what every
    reader of a folder builds before it places the tensors (load_sliced, lazy.LazyModel, packed.load_packed)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if getattr(config, "slicegpt", None):
            rebuild_per_block(model, config.slicegpt)
    return model


def load_sliced(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a folder saved with `save_pretrained` after per-block (or shared) slicing, strictly:
    every tensor in the folder must find its place and every parameter must be filled. The model is
    built on the meta device and takes the tensors one shard at a time: the model's size, not twice it."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = Path(path)
    cfg = AutoConfig.from_pretrained(path)
    if dtype is None:
        dtype = getattr(cfg, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = on_meta(cfg, dtype)
    expected = set(model.state_dict())
    for f in sorted(path.glob("*.safetensors")):
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(f).items()}
        extra = sorted(set(sd) - expected)
        if extra:
            raise LLMPruneError(f"{f} holds {extra[0]} (and {len(extra) - 1} more), which this model has no place "
                                f"for: the folder is damaged; re-create it")
        model.load_state_dict(sd, strict=False, assign=True)
        del sd
    if getattr(cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg, "tie_word_embeddings", False):
        model.tie_weights()
    empty = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    if empty:
        raise LLMPruneError(f"{path} lacks {empty[0]} (and {len(empty) - 1} more): the folder is damaged; re-create it")
    return model.to(device).eval()
