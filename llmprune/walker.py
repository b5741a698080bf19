"""The sequential calibration engine: block by block, as SparseGPT and Wanda do, but general.

1. catch: every decoder block is swapped for a recorder and the model runs once per batch of
   calibration samples; the recorders keep each block's positional and keyword arguments (rotary
   embeddings, per-layer masks, cache position: whatever this transformers version passes) and
   the first block's hidden states. Only embeddings and mask building run here.
2. walk: one block at a time on the compute device, the caller collects statistics through
   forward hooks (`collect`) while running the block (`run`), changes the block's weights, and
   the walker reruns the block with the new weights to produce the next block's inputs.
Memory holds one block plus the calibration activations, never a second copy of the model.

Sequential onloading: inside `onload(model, store)` the model's weights may live on disk (a
lazy.LazyModel on the meta device); every walk then asks the store to place a block's weights
before the block is used (`store.load_block`), hands it the block once rerun (`store.done`: the
block is final for this pass, e.g. written to the output) and frees it (`store.release_block`);
the catch pass places only what runs before the first block (`store.load_outside`).
"""
from __future__ import annotations

import contextvars
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from . import arch as archmod
from . import moe
from .stats import LayerStats


class _Stop(Exception):
    """Raised by a hook to end a forward early once what we need has been seen."""


class _Recorder(nn.Module):
    def __init__(self, inner: nn.Module, calls: list, last: bool):
        super().__init__()
        self.calls, self.last = calls, last
        object.__setattr__(self, "inner", inner)  # not a submodule: keeps its weights off the device

    def __getattr__(self, name):  # the model's loop may read attributes such as attention_type
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "inner"), name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.calls.append((hidden, args[1:], kwargs))
        if self.last:
            raise _Stop
        return hidden


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class Tape:
    """One sublayer's recorded calls, batch by batch: its last linear's input and the rest of the
    sublayer's output (e.g. attention weights, None under SDPA). `exact` stays True while every
    batch's sublayer output was exactly that linear's output."""

    def __init__(self):
        self.inputs: list[torch.Tensor] = []
        self.rests: list[tuple | None] = []
        self.exact = True


class Block:
    """One decoder block with its calibration inputs; `run()` pushes every batch through it."""

    def __init__(self, index: int, module: nn.Module, inputs: list[torch.Tensor], calls: list[tuple],
                 device=None):
        self.index, self.module, self.inputs, self.calls = index, module, inputs, calls  # calls: (args, kwargs)
        self.device = device  # where the block computes; inputs may live elsewhere (CPU) and move per batch
        self.outputs: list[torch.Tensor] | None = None  # set once the walker has rerun the block
        self._replays: list[tuple[nn.Module, nn.Module, Tape]] = []
        self._batch = 0

    @torch.no_grad()
    def run(self, stop_after: nn.Module | None = None) -> list[torch.Tensor] | None:
        """Run all batches; with stop_after, end each forward once that module has run (its
        hooks have fired) and return None. Replayed sublayers (`replay`) are not recomputed."""
        handle = stop_after.register_forward_hook(lambda *_: (_ for _ in ()).throw(_Stop())) if stop_after else None
        saved = [(sub, vars(sub).get("forward")) for sub, _, _ in self._replays]  # e.g. an accelerate hook
        for sub, linear, tape in self._replays:
            sub.forward = self._replayer(linear, tape)  # instance attribute: shadows the class's forward
        outs = []
        try:
            for k, (h, (args, kwargs)) in enumerate(zip(self.inputs, self.calls)):
                self._batch = k
                try:
                    home = h.device
                    if self.device is not None and home != torch.device(self.device):
                        h = h.to(self.device, non_blocking=True)
                    outs.append(_first(self.module(h, *args, **kwargs)).to(home))
                except _Stop:
                    pass
        finally:
            if handle:
                handle.remove()
            for sub, prev in saved:
                if prev is None:
                    del sub.forward
                else:
                    sub.forward = prev
        return None if stop_after else outs

    @contextmanager
    def record(self, sub: nn.Module, linear: nn.Module) -> Iterator[Tape]:
        """Record `linear`'s input and `sub`'s output for each batch of the runs inside the block."""
        tape, last = Tape(), {}

        def on_linear(mod, inp, out):
            last["in"], last["out"] = inp[0].detach(), out

        def on_sub(mod, inp, out):
            first, rest = (out[0], tuple(out[1:])) if isinstance(out, tuple) else (out, None)
            seen = last.pop("out", None)
            tape.exact &= seen is not None and (first is seen or torch.equal(first, seen))
            tape.inputs.append(last.pop("in", None))
            tape.rests.append(rest)

        handles = [linear.register_forward_hook(on_linear), sub.register_forward_hook(on_sub)]
        try:
            yield tape
        finally:
            for h in handles:
                h.remove()

    def replay(self, sub: nn.Module, linear: nn.Module, tape: Tape) -> bool:
        """From now on, `sub` is not recomputed: its output is `linear` (with its current weights)
        applied to the recorded input. Only for a complete, exact tape; returns whether it is used."""
        if not tape.exact or len(tape.inputs) != len(self.inputs) or any(x is None for x in tape.inputs):
            return False
        self._replays.append((sub, linear, tape))
        return True

    def _replayer(self, linear: nn.Module, tape: Tape):
        def forward(*_, **__):
            out = linear(tape.inputs[self._batch])
            rest = tape.rests[self._batch]
            return out if rest is None else (out, *rest)

        return forward


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


_STORE = "_llmprune_onload"  # model attribute holding the store of an `onload` context


@contextmanager
def onload(model, store):
    """Within this context every walk over `model` places and frees its blocks through `store`."""
    object.__setattr__(model, _STORE, store)
    try:
        yield store
    finally:
        object.__delattr__(model, _STORE)
        store.close()


def store_of(model):
    return getattr(model, _STORE, None)


def batches(input_ids: torch.Tensor | list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """The batches a walk runs: a tensor (n, T) cut into `batch_size` rows, or a list of batches (b, T_b)
    as they are (their widths may differ: zero-shot requests padded per batch)."""
    return list(input_ids.split(batch_size)) if isinstance(input_ids, torch.Tensor) else list(input_ids)


@torch.no_grad()
def catch(model, input_ids: torch.Tensor | list[torch.Tensor], batch_size: int,
          device) -> tuple[list[torch.Tensor], list[list]]:
    """Returns (first block's hidden states per batch, per block: per batch (args, kwargs))."""
    layers = archmod.blocks(model)
    n = len(layers)
    calls: list[list] = [[] for _ in range(n)]
    originals = list(layers)
    store = store_of(model)
    home = None if store else next(model.parameters()).device
    try:
        for i in range(n):
            layers[i] = _Recorder(originals[i], calls[i], last=i == n - 1)
        if store:
            store.load_outside(device)  # what runs before the first block (embeddings, rotary tables)
        else:
            model.to(device)  # only what is left outside the blocks: embeddings, norm, head, rotary
        for batch in batches(input_ids, batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for i in range(n):
            layers[i] = originals[i]
        if store:
            store.release_outside()
        else:
            model.to(home)
    hidden = [h for h, _, _ in calls[0]]
    return hidden, [[(_to(a, device), _to(k, device)) for _, a, k in per] for per in calls]


ACTIVATIONS_ON_DEVICE = 0.25  # at most this fraction of a GPU's memory holds calibration activations


def device_memory(device) -> int:
    """A GPU's memory; for the CPU the physical memory, or the container's limit when lower (cgroup v2, v1)."""
    d = torch.device(device)
    if d.type == "cuda":
        return torch.cuda.get_device_properties(d).total_memory
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): no limit
        return 2**62
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(f) as fh:
                limit = fh.read().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
    return total


def activation_home(model, input_ids: torch.Tensor | list[torch.Tensor], device) -> torch.device:
    """Where the calibration activations live between blocks: on the compute device when they fit
    in ACTIVATIONS_ON_DEVICE of it (twice: a block's inputs and outputs), else in CPU memory, moved
    to the device one batch at a time (a 70B model's 128 x 2048 windows are 4 GiB in bf16)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    p = next((t for t in model.parameters()), None)
    item = p.element_size() if p is not None and p.is_floating_point() else 4
    tokens = input_ids.numel() if isinstance(input_ids, torch.Tensor) else sum(b.numel() for b in input_ids)
    need = 2 * tokens * model.config.hidden_size * item
    return device if need <= ACTIVATIONS_ON_DEVICE * device_memory(device) else torch.device("cpu")


def walk(model, input_ids: torch.Tensor | list[torch.Tensor], batch_size: int = 8, device="cpu",
         progress: bool = True, desc: str = "blocks", start: int = 0, hidden=None, after=None) -> Iterator[Block]:
    """Yield each decoder block (on `device`) with its calibration inputs (`batches`), in order. When the
    caller hands control back, the block is rerun with its current weights; the results
    (block.outputs) are the next block's inputs, and the block moves back where it was. A resumed pass
    (resume.py) starts at block `start` from `hidden(device)`, that block's saved inputs; `after(i, outputs)`
    is called once block i is final (handed to the store)."""
    from tqdm.auto import tqdm

    first, calls = catch(model, input_ids, batch_size, device)
    act = activation_home(model, input_ids, device)
    if start:
        first = hidden(act)  # the activations of the blocks before it, saved (the caught ones are dropped)
    hidden = first if act == torch.device(device) else [h.to(act) for h in first]
    del first  # (block 0's inputs are let go once block 0's outputs replace them)
    layers = archmod.blocks(model)
    store = store_of(model)
    for i in tqdm(range(start, len(layers)), desc=desc, disable=not progress, initial=start, total=len(layers)):
        if store:
            store.load_block(i, device)
        module = layers[i]
        home = None if store else next(module.parameters()).device
        if not store:
            module.to(device)
        block = Block(i, module, hidden, calls[i], device)
        try:
            yield block
            hidden = block.run()
            block.outputs = hidden
            if store:
                store.done(i, module)
            if after is not None:
                after(i, hidden)
        finally:
            if store:
                store.release_block(i)
            else:
                module.to(home)


STATS_ON_DEVICE = 0.25  # at most this fraction of the solving devices' memory (CPU: RAM) holds Hessians at once
_STATS_GIB: contextvars.ContextVar[float | None] = contextvars.ContextVar("hessian_gib", default=None)


@contextmanager
def hessian_memory(gib: float | None):
    """Within it, `stats_budget` is `gib` GiB whatever the devices (`--hessian-gib`); None: STATS_ON_DEVICE of
    their memory. Only where the runs cut falls moves with it, never the weights (`chunks`)."""
    token = _STATS_GIB.set(gib)
    try:
        yield
    finally:
        _STATS_GIB.reset(token)


def stats_budget(devices: Sequence) -> int:
    """Bytes of Hessians (X^T X in fp32) one collection may hold: what `hessian_memory` set, else STATS_ON_DEVICE
    of the devices' memory (each device once: `--device cpu,cpu` runs two solving threads in one RAM)."""
    gib = _STATS_GIB.get()
    if gib is not None:
        return int(min(gib * 2**30, 2**62))  # (inf: no limit)
    return int(STATS_ON_DEVICE * sum(device_memory(d) for d in {str(torch.device(d)) for d in devices}))


def runs_record(budget: int, extra: int) -> dict:
    """What a manifest records when Hessians were collected a run at a time: the budget and the runs beyond one
    per group (the weights are the same; only the time differs)."""
    return {"budget_gib": round(budget / 2**30, 2), "extra": extra}


def chunks(modules: dict[str, nn.Module], needs, budget: int) -> list[list[str]]:
    """The names of `modules`, in order, cut into runs whose Hessians together stay within `budget` bytes, so
    that one run's statistics are collected, solved and freed before the next run's are collected. Only a
    Mixture-of-Experts block comes near it: DeepSeek-V3's 256 experts' gate/up Hessians are 53 GB in fp32 (57 GB
    with the downs, which GPTQ collects with them), a Qwen3-30B-A3B block's 2.2 GB. Names sharing statistics
    (`stats_key`: an expert's gate and up) stay in one run; a Hessian larger than the budget is a run of its
    own. Without a Hessian, one run."""
    if "hessian" not in needs:
        return [list(modules)]
    units: dict = {}  # stats key -> the names sharing it, in order
    for name, m in modules.items():
        units.setdefault(getattr(m, "stats_key", None) or name, []).append(name)
    members = list(units.values())
    sizes = [4 * modules[names[0]].in_features ** 2 for names in members]
    return [[n for i in run for n in members[i]] for run in within(sizes, budget)]


def within(sizes: Sequence[int], budget: float) -> list[list[int]]:
    """The indices of `sizes`, in order, cut into runs whose sizes add up to at most `budget`; an item larger
    than the budget is a run of its own."""
    runs: list[list[int]] = []
    used = 0
    for i, size in enumerate(sizes):
        if runs and used + size <= budget:
            runs[-1].append(i)
            used += size
        else:
            runs.append([i])
            used = size
    return runs


@contextmanager
def collect(modules: dict[str, nn.Module], needs, sink_weight: float = 1.0,
            devices: Sequence[str] | None = None) -> Iterator[dict[str, LayerStats]]:
    """Forward hooks that accumulate each module's input statistics; always removed. Targets with
    the same `stats_key` (parts of one fused linear, an expert's gate and up: arch.py) read the same
    inputs and share one accumulator and one hook. With several `devices`, the accumulators take them
    in turn (parallel.slots; `LayerStats.slot` says which) and the inputs are copied there."""
    from . import parallel

    keys = {name: getattr(m, "stats_key", None) or name for name, m in modules.items()}
    spread = parallel.slots(list(keys.values()), devices) if devices and len(devices) > 1 else None
    shared: dict = {}
    stats, handles = {}, []
    try:
        for name, m in modules.items():
            key = keys[name]
            if key in shared:
                stats[name] = shared[key]
                continue
            dev = devices[spread[key]] if spread else m.weight.device
            stats[name] = shared[key] = LayerStats(m.in_features, needs, device=dev, sink_weight=sink_weight)
            stats[name].slot = spread[key] if spread else 0
            handles.append(m.register_forward_hook(lambda mod, inp, out, s=stats[name]: s.add(inp[0].detach())))
        yield stats
    finally:
        for h in handles:
            h.remove()


def pool(block: Block, targets: dict, stats: dict, use: dict, needs, devices=None) -> None:
    """Replace in `stats` the statistics of the experts' projections that fall back to `pooled` (`use`, from
    moe.fallbacks) by those of every token that reached the layer pushed through them: one more run of `block`
    up to the experts. Their routed statistics leave `stats` first, so they are freed before the pooled ones
    are made."""
    views = {n: moe.pooled(targets[n]) for n, u in use.items() if u == "pooled"}
    if not views:
        return
    for n in views:
        del stats[n]
    with collect(views, needs, devices=devices) as more:
        block.run(stop_after=archmod.owner(next(iter(views.values()))))
    stats.update(more)
