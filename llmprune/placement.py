"""Where a model lives while it trains (PERP, GPTQ's scale tuning): on one or several GPUs, the rest streamed.

Training reads every weight at every step, so a model larger than its GPU (a 70B model is 140 GB in
bf16) cannot simply be moved onto it. Here the decoder blocks fill the given devices in order, each
device holding as many consecutive blocks as its budget allows (the first also the embedding, the
final norm and the head); the blocks left over keep their frozen weights in CPU memory (pinned) and
compute on the last device, each frozen weight copied in just before the sublayer (attention, MLP,
norm) that reads it runs and let go after. Activation checkpointing reruns a block's forward in the backward pass,
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


def replicas() -> int:
    """Processes training one replica each (DDP under torchrun / accelerate launch: WORLD_SIZE)."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def check_one_process(command: str, trains: bool) -> None:
    """Under torchrun / accelerate launch (WORLD_SIZE > 1) the processes train PERP's replicas together, the first
    writing the output (writes_output); any other `command` would run once per process, each writing the same
    output: refused in one line."""
    from .errors import LLMPruneError

    if replicas() > 1 and not trains:
        raise LLMPruneError(f"{replicas()} processes (WORLD_SIZE: torchrun or accelerate launch) run `llmprune "
                            f"{command}` once each: only PERP's training (recover, compress --recover perp) runs as "
                            f"replicas; run it as one process")


def rank() -> int:
    """This process's place among the replicas (RANK; 0 alone)."""
    import os

    return int(os.environ.get("RANK", "0"))


def writes_output() -> bool:
    """Whether this process writes the output of a training: the first of the replicas (every process alone). The
    replicas end with the same weights (DDP averages their gradients), so one writes and measures them and the
    others stop after the training, not writing the same folder again."""
    return rank() == 0


def reads_to_devices(devices: tuple[str, ...]) -> bool:
    """Whether training on `devices` should read the weights from disk straight onto them (a GPU, in one
    process). On the CPU alone the model lives in CPU memory anyway, where transformers' whole load keeps
    it backed by the files; with one replica per process (DDP, WORLD_SIZE > 1) each process places its own."""
    return any(torch.device(d).type != "cpu" for d in devices) and replicas() <= 1


def check_blocks_onload(onload: str) -> None:
    """--onload blocks places one model over this process's devices: refused with one replica per process."""
    from .errors import LLMPruneError

    if onload == "blocks" and replicas() > 1:
        raise LLMPruneError(f"--onload blocks reads one model onto the devices of one process, but {replicas()} "
                            f"processes (WORLD_SIZE) train a replica each: use --onload whole (or auto)")


def free_pinned() -> None:
    """Hand the page-locked CPU memory of released streamed weights back (PyTorch caches it)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        empty = getattr(torch._C, "_host_emptyCache", None) or getattr(torch._C, "_accelerator_emptyHostCache", None)
        if empty is not None:
            empty()


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


def fits(where: list[tuple[int, bool]], block_bytes: list[int], base_bytes: int, budgets: list[float]) -> bool:
    """Whether a plan's resident blocks (and the base, on the first device) fit each device's budget."""
    used = [0.0] * len(budgets)
    used[0] = base_bytes
    for (d, streamed), b in zip(where, block_bytes):
        used[d] += 0 if streamed else b
    return all(u <= r for u, r in zip(used, budgets))


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
    if any(torch.device(d).type == "cuda" for d in devices):
        torch.cuda.empty_cache()  # what the caching allocator keeps but does not use is free for the weights
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


def _holders(block: nn.Module) -> dict[nn.Module, list[tuple[nn.Module, str, str]]]:
    """The frozen tensors of a block, (owner, name, "p" for a parameter without gradient or "b" for a
    buffer), grouped by the direct child of the block (attention, MLP, a norm) whose subtree holds them:
    a sublayer's call encloses every read of its tensors, where a leaf's need not (an adapter reads
    `base.weight`, Qwen3.5's linear attention its conv1d's weight, without calling them). The block's
    own tensors are not streamed: hooks on the block itself run outside transformers' checkpoint of its
    forward, so the recomputation would not fetch them."""
    out: dict[nn.Module, list[tuple[nn.Module, str, str]]] = {}
    for child in block.children():
        items = [(mod, n, "p") for mod in child.modules() for n, p in mod.named_parameters(recurse=False)
                 if not p.requires_grad]
        items += [(mod, n, "b") for mod in child.modules() for n, _ in mod.named_buffers(recurse=False)]
        if items:
            out[child] = items
    return out


def _devices_of(model: nn.Module) -> list[tuple[nn.Module, str, str, torch.device]]:
    """(owner, name, "p" / "b", device) of every parameter and buffer of `model`."""
    return [(mod, n, k, t.device) for mod in model.modules()
            for k, ts in (("p", mod._parameters), ("b", mod._buffers)) for n, t in ts.items() if t is not None]


def _slot(owner: nn.Module, kind: str) -> dict:
    return owner._parameters if kind == "p" else owner._buffers


def _move(module: nn.Module, device, frozen_to=None, frozen=()) -> None:
    """Move the parameters and buffers of `module` and its submodules to `device`."""
    for mod in module.modules():
        _move_own(mod, device, frozen_to, frozen)


def _move_own(mod: nn.Module, device, frozen_to=None, frozen=()) -> None:
    """Move a module's own parameters (each Parameter object kept: the optimizer is built on them later)
    and buffers to `device`; those whose id is in `frozen` go to `frozen_to` instead."""
    for p in mod.parameters(recurse=False):
        p.data = p.data.to(frozen_to if id(p) in frozen else device)
    for name, b in list(mod.named_buffers(recurse=False)):
        mod._buffers[name] = b.to(frozen_to if id(b) in frozen else device)


def plan_model(model, devices: tuple[str, ...], resident_gib: float | None, batch_size: int, seqlen: int,
               compute: torch.dtype, checkpointing: bool, n_processes: int = 1, blocks=None, where=None):
    """Where each decoder block of `model` trains (`plan` over the devices' `budgets`), as (blocks, plan,
    what the manifest records of it); refuses a plan that cannot run: the embedding and head beyond the
    first device, streaming without activation checkpointing or with one replica per process. blocks:
    the decoder blocks, when the model's linears are replaced (default: arch.blocks). where: a plan made
    before (on the meta device, before the weights were read onto the devices it names), kept while it fits."""
    from . import arch
    from .errors import LLMPruneError

    blocks = list(arch.blocks(model) if blocks is None else blocks)
    sizes = [held_bytes(b) for b in blocks]
    base = held_bytes(model) - sum(sizes)
    dtype_bytes = torch.finfo(compute).bits // 8
    reserve = reserve_bytes(model.config, batch_size, seqlen, len(blocks), dtype_bytes)
    room = budgets(devices, resident_gib, reserve, model)
    if where is not None and len(where) == len(blocks) and not fits(where, sizes, base, room):
        where = None  # what the meta-device plan did not foresee (an adapter on a linear it did not count): plan afresh
    if where is None:
        if base > room[0]:
            raise LLMPruneError(f"the embedding, head and final norm ({base / GiB:.1f} GiB while training) do not "
                                f"fit the {room[0] / GiB:.1f} GiB {devices[0]} has for weights: free memory there, "
                                f"or lower --batch / --seqlen")
        where = plan(sizes, base, room)
    elif len(where) != len(blocks):
        raise LLMPruneError(f"internal: a placement of {len(where)} blocks for a model of {len(blocks)}")
    streamed = sum(s for _, s in where)
    if streamed and n_processes > 1:
        raise LLMPruneError(f"the model does not fit one GPU per process ({streamed} of {len(blocks)} blocks "
                            f"would stream): run in one process, with --device listing the GPUs")
    if streamed and not (checkpointing and getattr(model, "supports_gradient_checkpointing", False)):
        raise LLMPruneError(f"{streamed} of {len(blocks)} blocks do not fit {', '.join(devices)} and stream from CPU "
                            f"memory, which needs activation checkpointing (else every copy stays for the backward "
                            f"pass): drop --no-grad-checkpointing, or give more devices")
    resident = {d: sum(1 for i, s in where if devices[i] == d and not s) for d in devices}
    return blocks, where, {
        "devices": list(devices),
        "resident_blocks": resident,
        "streamed_blocks": streamed,
        "budget_gib": [None if b == float("inf") else round(b / GiB, 2) for b in room],
        "resident_gib": resident_gib,
        "block_gib": round(max(sizes) / GiB, 6),  # the largest block, as placed (trained tensors 4x)
        "base_gib": round(base / GiB, 6),  # the embedding, final norm and head
    }


@contextmanager
def training_mode(model, grad_checkpointing: bool):
    """Train mode + activation checkpointing (use_reentrant=False) + no KV cache, all undone after; yields
    whether checkpointing is on. Streamed blocks need it: their recomputation copies the weights again."""
    was_training, cfg = model.training, getattr(model, "config", None)
    use_cache = getattr(cfg, "use_cache", None)
    had_gc = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    turned_on = False
    if grad_checkpointing and not had_gc and getattr(model, "supports_gradient_checkpointing", False):
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        turned_on = True
    if cfg is not None and use_cache is not None:
        cfg.use_cache = False
    model.train()
    try:
        yield turned_on or had_gc
    finally:
        model.train(was_training)
        if cfg is not None and use_cache is not None:
            cfg.use_cache = use_cache
        if turned_on:
            disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            disable()
            if hasattr(model, "disable_input_require_grads") and getattr(model, "_require_grads_hooks", None):
                model.disable_input_require_grads()  # the embedding hook that checkpointing added


@contextmanager
def placed(model: nn.Module, blocks, devices: tuple[str, ...], where: list[tuple[int, bool]]):
    """Apply a `plan` (`where`, one entry per block of `blocks`) to `model` inside the `with`; yields
    a dict whose "streamed_bytes" counts the bytes copied to a device by streaming. On exit every
    tensor is back on the device it came on (the model may come on the CPU, or already spread over
    the devices as planned), hooks removed, each Parameter object the same."""
    home = _devices_of(model)
    first = torch.device(devices[0])
    blocks = list(blocks)
    stats = {"streamed_bytes": 0}
    hooks, stored = [], []  # stored: (owner, name, kind, its tensor in CPU memory) of every streamed one
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    try:
        for block, (d, streamed) in zip(blocks, where):
            dev = torch.device(devices[d])
            if not streamed:
                _move(block, dev)
                continue
            frozen = _holders(block)
            _move(block, dev, "cpu", {id(_slot(o, k)[n]) for items in frozen.values() for o, n, k in items})
            for holder, items in frozen.items():
                if dev.type == "cuda":  # page-locked: copies at full bus speed, asynchronously
                    for o, n, k in items:
                        t = _slot(o, k)[n]
                        if t.is_pinned():
                            continue
                        if k == "p":
                            t.data = t.data.pin_memory()
                        else:
                            o._buffers[n] = t.pin_memory()
                items = [(o, n, k, _slot(o, k)[n]) for o, n, k in items]
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
        for owner, name, kind, t in stored:
            _slot(owner, kind)[name] = t
        for mod, name, kind, dev in home:
            t = _slot(mod, kind)[name]
            if kind == "p":
                t.data = t.data.to(dev)
            else:
                mod._buffers[name] = t.to(dev)


def _stream(holder: nn.Module, items, dev: torch.device, stats: dict) -> list:
    """Hooks on `holder`: before its call, a device copy of each stored tensor in its owner's place;
    after, the stored one back. Autograd keeps a copy for the backward pass as long as it needs it;
    activation checkpointing's rerun of the block calls the holder (and copies) again."""
    def fetch(mod, args):
        for owner, name, kind, t in items:
            copy = t.data.to(dev, non_blocking=True)
            _slot(owner, kind)[name] = nn.Parameter(copy, requires_grad=False) if kind == "p" else copy
            stats["streamed_bytes"] += t.numel() * t.element_size()

    def drop(mod, args, out):
        for owner, name, kind, t in items:
            _slot(owner, kind)[name] = t

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
