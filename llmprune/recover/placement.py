"""Where a model lives while PERP trains it: resident on one or several GPUs, the rest streamed.

Training reads every weight at every step, so a model larger than its GPU (a 70B model is 140 GB in
bf16) cannot simply be moved onto it. Here the decoder blocks fill the given devices in order, each
device holding as many consecutive blocks as its budget allows (the first also the embedding, the
final norm and the head); the blocks left over keep their frozen weights in CPU memory (pinned) and
compute on the last device, each frozen weight copied in just before the module that multiplies by
it runs and let go after. Activation checkpointing reruns a block's forward in the backward pass,
and that rerun copies its weights in again, so the streamed weights on the GPU at any time are those
of the block being recomputed. The trained tensors (norm scales, biases, adapters) always live on a
device, next to their gradients and optimizer state. With several devices each block's inputs move
to its device before it runs and the last block's outputs back to the first: naive pipeline (model)
parallelism, one device busy at a time, which is all a few hundred PERP steps need.

`plan` is the arithmetic; `placed` applies it for the duration of a `with` block and undoes it.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

GiB = 1 << 30


def plan(block_bytes: list[int], base_bytes: int, budgets: list[float]) -> list[tuple[int, bool]]:
    """Per decoder block, (index of the device it computes on, whether its frozen weights stream).

    Blocks fill the devices in order, the first device also holding `base_bytes` (embedding, final
    norm, head); a device takes consecutive blocks while its budget holds them. Blocks beyond every
    budget stream from CPU memory and compute on the last device."""
    out, dev, room = [], 0, budgets[0] - base_bytes
    for b in block_bytes:
        while dev < len(budgets) and b > room:
            dev += 1
            room = budgets[dev] if dev < len(budgets) else 0
        if dev < len(budgets):
            out.append((dev, False))
            room -= b
        else:
            out.append((len(budgets) - 1, True))
    return out


def held_bytes(module: nn.Module) -> int:
    """What a module's tensors take on a device while training: its frozen parameters and buffers as
    they are, each trained parameter 4 times (fp32 value, gradient and AdamW's two moments)."""
    params = sum(p.numel() * p.element_size() * (4 if p.requires_grad else 1) for p in module.parameters())
    return params + sum(b.numel() * b.element_size() for b in module.buffers())


def reserve_bytes(config, batch: int, seqlen: int, n_blocks: int, dtype_bytes: int) -> int:
    """Memory a training step needs beside the weights, on every device (an upper estimate).

    fp32 logits with their log-softmax and its gradient (3 x tokens x vocabulary x 4 bytes), each
    checkpointed block's input (blocks x tokens x hidden), one recomputed block's activations and
    their gradients in fp32 (tokens x (6 hidden + 3 intermediate) x 8 bytes), and 1 GiB for the CUDA
    context and the allocator's slack."""
    t = batch * seqlen
    h = config.hidden_size
    inter = getattr(config, "intermediate_size", None) or 4 * h
    return 12 * t * config.vocab_size + n_blocks * t * h * dtype_bytes + 8 * t * (6 * h + 3 * inter) + GiB


def budgets(devices: tuple[str, ...], resident_gib: float | None, reserve: int, model: nn.Module | None = None) -> list[float]:
    """Bytes of weights each device keeps: `resident_gib` where given; else a GPU's free memory (plus
    what `model` already holds there) less `reserve`, and no limit on the CPU (CPU memory holds the
    streamed weights anyway)."""
    if resident_gib is not None:
        return [resident_gib * GiB] * len(devices)
    held: dict[int, int] = {}  # GPU index -> bytes of the model already on it
    if model is not None:
        for t in [*model.parameters(), *model.buffers()]:
            if t.device.type == "cuda":
                held[t.device.index] = held.get(t.device.index, 0) + t.numel() * t.element_size()
    out = []
    for d in devices:
        dev = torch.device(d)
        if dev.type == "cuda":
            index = torch.cuda.current_device() if dev.index is None else dev.index
            out.append(max(0.0, torch.cuda.mem_get_info(index)[0] + held.get(index, 0) - reserve))
        else:
            out.append(float("inf"))
    return out


def _holders(block: nn.Module) -> dict[nn.Module, list[tuple[nn.Module, str]]]:
    """The frozen parameters of a block grouped by the module whose call multiplies by them: the
    owning module, or the adapter wrapping it (an adapter reads `base.weight` without calling base)."""
    from .lora import SparseAdapterLinear

    out: dict[nn.Module, list[tuple[nn.Module, str]]] = {}
    for mod in block.modules():
        wrapper = mod if isinstance(mod, SparseAdapterLinear) else None
        for child in ([mod.base] if wrapper is not None else [mod]):
            for name, p in child.named_parameters(recurse=False):
                if not p.requires_grad:
                    out.setdefault(wrapper or child, []).append((child, name))
    for wrapper in [m for m in out if isinstance(m, SparseAdapterLinear)]:
        out.pop(wrapper.base, None)  # listed under its wrapper
    return out


def _move(module: nn.Module, device, frozen_to=None, frozen=()) -> None:
    """Move the parameters and buffers of `module` and its submodules to `device`."""
    for mod in module.modules():
        _move_own(mod, device, frozen_to, frozen)


def _move_own(mod: nn.Module, device, frozen_to=None, frozen=()) -> None:
    """Move a module's own parameters (each Parameter object kept: the optimizer is built on them later)
    and buffers to `device`; the parameters whose id is in `frozen` go to `frozen_to` instead."""
    for p in mod.parameters(recurse=False):
        p.data = p.data.to(frozen_to if id(p) in frozen else device)
    for name, b in list(mod.named_buffers(recurse=False)):
        mod._buffers[name] = b.to(device)


@contextmanager
def placed(model: nn.Module, blocks, devices: tuple[str, ...], where: list[tuple[int, bool]]):
    """Apply a `plan` (`where`, one entry per block of `blocks`) to `model` inside the `with`; yields
    a dict whose "streamed_bytes" counts the bytes copied to a device by streaming. On exit every
    tensor is back on the device the model came on, hooks removed, each Parameter object the same."""
    home = next(model.parameters()).device
    first = torch.device(devices[0])
    blocks = list(blocks)
    stats = {"streamed_bytes": 0}
    hooks, stored = [], []  # stored: (owner, name, its Parameter) of every streamed weight
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    try:
        for block, (d, streamed) in zip(blocks, where):
            dev = torch.device(devices[d])
            if not streamed:
                _move(block, dev)
                continue
            frozen = _holders(block)
            _move(block, dev, "cpu", {id(o._parameters[n]) for items in frozen.values() for o, n in items})
            for holder, items in frozen.items():
                items = [(o, n, o._parameters[n]) for o, n in items]
                if dev.type == "cuda":  # page-locked: copies at full bus speed, asynchronously
                    for _, _, p in items:
                        p.data = p.data.pin_memory()
                stored += items
                hooks += _stream(holder, items, dev, stats)
        for mod in model.modules():  # the embedding, final norm, head, rotary tables: the first device
            if id(mod) not in in_blocks:
                _move_own(mod, first)
        hooks += _route(blocks, where, devices)
        yield stats
    finally:
        for h in hooks:
            h.remove()
        for owner, name, p in stored:
            owner._parameters[name] = p
        _move(model, home)


def _stream(holder: nn.Module, items, dev: torch.device, stats: dict) -> list:
    """Hooks on `holder`: before its call, a device copy of each stored weight in its owner's place;
    after, the stored Parameter back. Autograd keeps the copy for the backward pass as long as it
    needs it; activation checkpointing's rerun of the block calls the holder (and copies) again."""
    def fetch(mod, args):
        for owner, name, p in items:
            owner._parameters[name] = nn.Parameter(p.data.to(dev, non_blocking=True), requires_grad=False)
            stats["streamed_bytes"] += p.numel() * p.element_size()

    def drop(mod, args, out):
        for owner, name, p in items:
            owner._parameters[name] = p

    return [holder.register_forward_pre_hook(fetch), holder.register_forward_hook(drop)]


def _route(blocks, where, devices) -> list:
    """With several devices: each block's inputs (hidden states, masks, rotary tables) to its device,
    the last block's outputs back to the first device (final norm and head)."""
    from accelerate.utils import send_to_device

    first = torch.device(devices[0])
    if all(torch.device(devices[d]) == first for d, _ in where):
        return []
    hooks = []
    for block, (d, _) in zip(blocks, where):
        dev = torch.device(devices[d])
        if dev != first:
            hooks.append(block.register_forward_pre_hook(
                lambda m, args, kwargs, dev=dev: (send_to_device(args, dev), send_to_device(kwargs, dev)),
                with_kwargs=True))
    hooks.append(blocks[-1].register_forward_hook(lambda m, args, out: send_to_device(out, first)))
    return hooks
