"""PERP: Parameter-Efficient Retraining after Pruning (Zimmer et al. 2023, arXiv 2312.15230).

After pruning, retraining a tiny, expressive subset of parameters recovers most of the lost
quality (sec. 3): the normalization scales, the biases, and low-rank adapters that respect the
keep-masks (MaskLoRA, ScaleLoRA; see lora.py). Everything else stays frozen, the adapters are
merged at the end, and the merged weights keep exactly the zeros (so the N:M structure) they had.

The loop is ordinary causal-LM training through accelerate, so the same code runs on the CPU,
one GPU or several: AdamW, linear warmup then cosine decay, gradient accumulation, activation
checkpointing to bound memory.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from types import SimpleNamespace

import torch
from torch import nn

from .. import placement
from ..errors import LLMPruneError
from . import lora

TRAINABLE = ("norms", "biases", "masklora", "scalelora")
SCHEDULES = ("cosine", "linear", "constant")

# Default learning rate, not tuned here: PERP tunes it per method (sec. 4). With ~200 steps and B = 0
# at the start, a step a little above LoRA fine-tuning's usual 1e-4 moves the adapters and norm
# scales enough; lower it if the loss spikes in the first steps.
DEFAULT_LR = 2e-4
PRECISIONS = ("no", "bf16", "fp16")


def pruned_linears(model: nn.Module) -> list[str]:
    """The pruned linears: every nn.Linear with at least one zero, except the output head (tied to
    the embeddings in small models, never pruned). Their keep-masks are their nonzeros."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and mod is not head and not bool(mod.weight.detach().all())]


def derive_keep_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Keep-masks (weight != 0) of the pruned linears, materialized (recover never needs them: it
    reads each mask off its frozen weight)."""
    return {name: model.get_submodule(name).weight.detach() != 0 for name in pruned_linears(model)}


def _is_norm(module: nn.Module) -> bool:
    # RMSNorm / LayerNorm classes of any architecture (LlamaRMSNorm, Gemma3RMSNorm, nn.LayerNorm...)
    return "Norm" in type(module).__name__ and isinstance(getattr(module, "weight", None), nn.Parameter)


def _select(model: nn.Module, train: tuple[str, ...]) -> tuple[dict[str, list[nn.Parameter]], list[str]]:
    """The existing parameters to unfreeze, per kind ("norms", "biases"), and notes for the info."""
    chosen: dict[str, list[nn.Parameter]] = {}
    notes = []
    if "norms" in train:
        chosen["norms"] = [p for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)]
        if not chosen["norms"]:
            notes.append("no normalization layers found: 'norms' trains nothing")
    if "biases" in train:
        chosen["biases"] = [m.bias for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None]
        if not chosen["biases"]:
            notes.append(f"{type(model).__name__} has no linear biases: 'biases' trains nothing")
    return chosen, notes


def check_options(method="perp", train=("norms", "biases", "masklora"), rank=16, steps=200, lr=DEFAULT_LR,
                  batch_size=4, grad_accum=1, schedule="cosine", mixed_precision="no", **_) -> None:
    """Validate recovery options before any model or data is loaded (the CLI fails fast)."""
    _check(lr, steps, batch_size, grad_accum, method, tuple(train), schedule, torch.zeros(1, 2, dtype=torch.long),
           rank, mixed_precision)


def _check(lr, steps, batch_size, grad_accum, method, train, schedule, train_ids, rank, mixed_precision) -> None:
    if method != "perp":
        raise LLMPruneError(f"unknown recovery method {method!r}: use --method perp")
    if not lr > 0:
        raise LLMPruneError(f"--lr {lr} must be > 0, e.g. --lr {DEFAULT_LR:g}")
    if steps <= 0:
        raise LLMPruneError(f"--steps {steps} must be >= 1, e.g. --steps 200")
    if batch_size <= 0 or grad_accum <= 0:
        raise LLMPruneError(f"--batch {batch_size} and --grad-accum {grad_accum} must be >= 1")
    bad = [t for t in train if t not in TRAINABLE]
    if bad or not train:
        raise LLMPruneError(f"--train {','.join(train) or '(empty)'}: choose from {','.join(TRAINABLE)}, "
                            f"e.g. --train norms,biases,masklora")
    if mixed_precision not in PRECISIONS:
        raise LLMPruneError(f"mixed precision {mixed_precision!r}: use one of {', '.join(PRECISIONS)}")
    if schedule not in SCHEDULES:
        raise LLMPruneError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    if "masklora" in train and rank < 1:
        raise LLMPruneError(f"--rank {rank} must be >= 1 for masklora, e.g. --rank 16")
    if train_ids.dim() != 2 or train_ids.shape[0] < 1 or train_ids.shape[1] < 2:
        raise LLMPruneError(f"training data must be token windows (n, seqlen >= 2), got shape "
                            f"{tuple(train_ids.shape)}: check --data and --seqlen")


def _scheduler(name: str, optimizer, warmup: int, steps: int):
    import transformers

    if name == "cosine":
        return transformers.get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    if name == "linear":
        return transformers.get_linear_schedule_with_warmup(optimizer, warmup, steps)
    return transformers.get_constant_schedule_with_warmup(optimizer, warmup)


def _order(n: int, total: int, seed: int) -> list[int]:
    """`total` window indices: seeded shuffles of range(n), back to back (each window once per epoch)."""
    gen = torch.Generator().manual_seed(seed)
    idx: list[int] = []
    while len(idx) < total:
        idx += torch.randperm(n, generator=gen).tolist()
    return idx[:total]


def _compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the frozen weights are stored and multiplied in: the input embedding's, else the
    most common floating dtype of the parameters."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None and emb.weight.is_floating_point():
        return emb.weight.dtype
    count: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            count[p.dtype] = count.get(p.dtype, 0) + p.numel()
    return max(count, key=count.get) if count else torch.float32


def _upcast(tensors) -> dict[int, torch.dtype]:
    """Cast the given floating tensors to fp32 in place; returns their former dtypes."""
    dtypes = {}
    for t in tensors:
        if t.is_floating_point() and t.dtype != torch.float32 and id(t) not in dtypes:
            dtypes[id(t)] = t.dtype
            t.data = t.data.float()
    return dtypes


def _restore(model: nn.Module, dtypes: dict[int, torch.dtype]) -> None:
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in dtypes:
            t.data = t.data.to(dtypes[id(t)])


@contextmanager
def _trainable(model: nn.Module, keep_masks, *args):
    """_trainable_linears, a Mixture-of-Experts model's fused experts split into nn.Linear layers first
    (moe.split_linears: the pruned experts' projections get adapters, their biases train like any linear's) and
    put back last, with what training wrote. `keep_masks` may name an expert's projection `<experts>[e].<proj>`;
    None: every experts module holding zeros is split."""
    from .. import moe

    if keep_masks is None:
        paths = [n for n, m in model.named_modules() if moe.is_fused_experts(m) and moe.has_zeros(m)]
    else:
        paths = [v[0] for v in map(moe.parse_view, keep_masks) if v]
        keep_masks = {moe.stored_name(n): k for n, k in keep_masks.items()}
    with moe.split_linears(model, paths), _trainable_linears(model, keep_masks, *args) as s:
        yield s


@contextmanager
def _trainable_linears(model: nn.Module, keep_masks, train: tuple[str, ...], rank: int, alpha, seed: int,
                       mixed_precision: str):
    """The model made ready to train, undone on exit. The selected norms and biases unfrozen and in fp32
    (AdamW steps of ~1e-4 vanish in bf16), everything else frozen in its dtype (fp16 without loss
    scaling: all in fp32, fp16 gradients underflow), adapters attached to the pruned linears. On exit
    the adapters are merged if `merge` was set on the yielded namespace, else dropped (the model's
    classes are never left wrapped), and every tensor gets its requires_grad and dtype back (fp32
    holds every bf16/fp16 value exactly). Yields the compute dtype, autocast, the parameter counts
    and notes; `n_merged` is set on exit."""
    if keep_masks is None:
        keep_masks = dict.fromkeys(pruned_linears(model))
    adapt = "masklora" in train or "scalelora" in train
    _check_masks(model, keep_masks)
    # Count before any adapter exists; tied weights once (parameters() deduplicates them).
    n_total = sum(p.numel() for p in model.parameters())
    chosen, notes = _select(model, train)
    if adapt and not keep_masks:
        notes.append("no pruned linears (no zeros in any weight, no keep_masks): no adapters attached")
    if "masklora" in train and keep_masks:  # a rank above min(out, in) adds nothing: such linears get min(out, in)
        narrow = {n: min(model.get_submodule(n).weight.shape) for n in keep_masks
                  if min(model.get_submodule(n).weight.shape) < rank}
        if narrow and len(narrow) == len(keep_masks):
            raise LLMPruneError(f"--rank {rank} exceeds min(out, in) of every adapted linear: use --rank "
                                f"{max(narrow.values())} or less")
        if narrow:
            n0 = next(iter(narrow))
            notes.append(f"MaskLoRA rank capped at min(out, in) for {len(narrow)} linear(s), e.g. {n0}: {narrow[n0]}")
    if sum(p.numel() for ps in chosen.values() for p in ps) == 0 and not (adapt and keep_masks):
        raise LLMPruneError(f"--train {','.join(train)} selects no parameters in this model: "
                            f"add masklora or norms, e.g. --train norms,masklora")
    compute = _compute_dtype(model)
    s = SimpleNamespace(compute=compute, autocast=compute == torch.bfloat16 and mixed_precision == "no",
                        notes=notes, n_total=n_total, counts={}, merge=False, n_merged=0)
    requires0 = {id(p): p.requires_grad for p in model.parameters()}
    dtypes0: dict[int, torch.dtype] = {}
    try:
        if compute == torch.float16 and mixed_precision == "no":
            s.compute = torch.float32
            notes.append("fp16 weights trained in fp32 (fp16 gradients underflow without loss scaling): "
                         "load the model in bfloat16, or pass mixed precision fp16, to keep them in 16 bits")
            dtypes0 = _upcast(list(model.parameters()) + list(model.buffers()))
        else:
            dtypes0 = _upcast([p for ps in chosen.values() for p in ps])
        model.requires_grad_(False)
        for ps in chosen.values():
            for p in ps:
                p.requires_grad_(True)
        wrapped = lora.attach(model, keep_masks, rank if "masklora" in train else 0, "scalelora" in train,
                              alpha, seed) if adapt else {}
        s.counts = {k: sum(p.numel() for p in ps) for k, ps in chosen.items()}
        for kind, attr in (("masklora", "lora_"), ("scalelora", "s_")):
            if kind in train:
                s.counts[kind] = sum(p.numel() for w in wrapped.values() for n, p in w.named_parameters()
                                     if n.startswith(attr))
        yield s
    finally:
        try:
            s.n_merged = lora.detach(model, merge=s.merge)
        finally:  # even if a merge fails, every tensor gets its requires_grad and dtype back
            for p in model.parameters():
                p.requires_grad_(requires0.get(id(p), False))
            _restore(model, dtypes0)


def plan(model: nn.Module, keep_masks: dict, devices: tuple[str, ...], seqlen: int,
         train=("norms", "biases", "masklora"), rank: int = 16, batch_size: int = 4, resident_gib: float | None = None,
         grad_checkpointing: bool = True, mixed_precision: str = "no", alpha: float | None = None, **_) -> list:
    """Where `recover` will put each decoder block (placement.plan_model's plan), worked out before any
    weight is read: `model`'s weights may be on the meta device, `keep_masks` names the linears to
    adapt (their masks unread). Raises what recover's planning would refuse. Loading each block
    straight onto its device then keeps a model larger than CPU memory out of it (api.recover)."""
    with _trainable(model, keep_masks, tuple(train), rank, alpha, 0, mixed_precision) as s:
        return placement.plan_model(model, tuple(devices), resident_gib, batch_size, seqlen, s.compute,
                                    grad_checkpointing)[1]


def trainable(model: nn.Module, keep_masks: dict, train=("norms", "biases", "masklora"), rank: int = 16,
              alpha: float | None = None, mixed_precision: str = "no", **_) -> int:
    """How many parameters `recover` trains in `model` (its weights may be on the meta device): what its
    checkpoints hold, 12 bytes each with AdamW's two moments (resume.Training)."""
    with _trainable(model, keep_masks, tuple(train), rank, alpha, 0, mixed_precision) as s:
        return sum(s.counts.values())


def recover(
    model: nn.Module,
    train_ids: torch.Tensor,
    keep_masks: dict[str, torch.Tensor | None] | None = None,
    method: str = "perp",
    train: tuple[str, ...] | list[str] = ("norms", "biases", "masklora"),
    rank: int = 16,
    steps: int = 200,
    lr: float = DEFAULT_LR,
    batch_size: int = 4,
    grad_accum: int = 1,
    warmup: int | None = None,
    schedule: str = "cosine",
    weight_decay: float = 0.0,
    seed: int = 0,
    grad_checkpointing: bool = True,
    progress: bool = True,
    alpha: float | None = None,
    max_grad_norm: float | None = 1.0,
    mixed_precision: str = "no",
    devices: tuple[str, ...] | None = None,
    resident_gib: float | None = None,
    where: list[tuple[int, bool]] | None = None,
    checkpoint=None,
) -> dict:
    """Retrain the selected subset of a pruned causal LM in place (PERP, arXiv 2312.15230).

    model: a transformers causal LM whose pruned linears hold zeros. train_ids: (n, seqlen) token
    windows, trained on with labels = input ids. keep_masks: {linear name: bool (out, in), True =
    weight stays, or None = its nonzeros}; None adapts every pruned linear (`pruned_linears`), each
    mask read off its frozen weight, never stored. train: any of "norms", "biases",
    "masklora", "scalelora". steps counts optimizer updates, each over batch_size * grad_accum
    windows per process; warmup defaults to 10% of steps. alpha: MaskLoRA scaling alpha / rank
    (default alpha = rank). mixed_precision is passed to accelerate ("bf16" on a GPU).

    Memory: the frozen weights stay in their dtype. The trained parameters (norm scales, biases,
    adapters) are fp32 (AdamW steps of ~1e-4 vanish in bf16), and a bf16 model runs its forward
    under bf16 autocast, as LoRA fine-tuning does; an 8B bf16 model trains in about 18 GB (its 16 GB,
    the trained tensors with their gradients and AdamW state) plus activations (docs/scale.md). fp16 weights have no such path without loss scaling (fp16 gradients underflow):
    with mixed_precision "no" the whole model is trained in fp32, as if loaded in fp32 (2x its
    memory; a note says so), and with "fp16" accelerate scales the loss and the weights stay fp16.

    devices: where to train (default: the model's device). Decoder blocks fill them in order, each GPU
    keeping what fits beside a step's activations (or `resident_gib` of weights); the blocks beyond
    keep their frozen weights in CPU memory and stream them in as they run (placement.py: a 70B model
    on one or a few GPUs). The model may come on the CPU, or already placed as `plan` said (read
    from disk straight onto its devices: pass that plan as `where`); every tensor ends on the device
    it came on.

    checkpoint: where the training state goes every so often and comes back from (resume.Training: `resumed()`,
    the state a killed run saved, or None; `due()`; `save(state)`). A resumed training loads the trained tensors,
    AdamW's and the schedule's state, the losses and the random state of the step saved, and goes on with the
    windows after the ones it had trained on: the same updates as a training that never stopped. Under DDP (one
    replica per process) the first process alone passes a `checkpoint`: it decides when one is due and writes it,
    with every replica's random state; a resumed state goes from it to the other replicas (one pickled broadcast,
    the size of the file, in CPU memory).

    Afterwards the adapters are merged, every module is a plain nn.Linear again, the zeros of each
    pruned weight are unchanged bit for bit, and the model is back in its dtype, devices and mode.
    Returns info: trainable parameter counts and fraction, the loss of every step, wall time.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    train = tuple(train)
    _check(lr, steps, batch_size, grad_accum, method, train, schedule, train_ids, rank, mixed_precision)
    set_seed(seed)  # dropout, if the model has any; adapter init and data order use their own generators
    # on the CPU alone, `cpu` lets accelerate join the processes of torchrun (WORLD_SIZE > 1) over gloo (DDP)
    on_cpu = all(torch.device(d).type == "cpu" for d in (devices or (str(next(model.parameters()).device),)))
    try:
        accelerator = Accelerator(gradient_accumulation_steps=grad_accum, mixed_precision=mixed_precision,
                                  device_placement=False, cpu=on_cpu)  # placement.placed puts the model, the loop the data
    except ValueError as e:  # accelerate fixes the precision (and the CPU or not) once per process
        raise LLMPruneError(f"mixed precision {mixed_precision!r} (on {'the CPU' if on_cpu else 'the GPU'}) differs "
                            f"from an earlier run in this process: run recovery in a fresh process") from e
    t0, losses = time.perf_counter(), []
    with _trainable(model, keep_masks, train, rank, alpha, seed, mixed_precision) as s:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        n_trainable = sum(p.numel() for p in params)
        ddp = accelerator.num_processes > 1
        saves, resumed = checkpoint is not None, checkpoint.resumed() if checkpoint is not None else None
        if ddp:  # one replica per process: each on its process's device, the first one's checkpoints for all
            devices, where = (str(accelerator.device),), None
            saves, resumed = _from_first(saves, resumed)
        devices = tuple(devices or (str(next(model.parameters()).device),))
        blocks, where, place_info = placement.plan_model(model, devices, resident_gib, batch_size, train_ids.shape[1],
                                                         s.compute, grad_checkpointing, accelerator.num_processes,
                                                         where=where)
        with placement.training_mode(model, grad_checkpointing) as checkpointing, \
                placement.placed(model, blocks, devices, where) as streamed:
            per_step = grad_accum * batch_size * accelerator.num_processes
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
            # The scheduler stays outside prepare(): it steps once per optimizer update, on every process.
            sched = _scheduler(schedule, optimizer, steps // 10 if warmup is None else warmup, steps)
            rng = _load(resumed, named, optimizer, sched, losses) if resumed else None
            scaler_state = resumed.get("scaler") if resumed else None
            del resumed  # now in the trained tensors and the optimizer: not held beside them for the whole training
            if isinstance(rng, list):  # (every replica's, under DDP)
                rng = rng[accelerator.process_index]
            loader = torch.utils.data.DataLoader(  # the windows of the steps still to do
                torch.utils.data.TensorDataset(train_ids.long()), batch_size=batch_size,
                sampler=_order(train_ids.shape[0], steps * per_step, seed)[len(losses) * per_step:],
            )
            pmodel, optimizer, loader = accelerator.prepare(model, optimizer, loader)
            if accelerator.scaler is not None and scaler_state:
                accelerator.scaler.load_state_dict(scaler_state)
            bar = tqdm(total=steps, initial=len(losses), desc="PERP",
                       disable=not (progress and accelerator.is_local_main_process))
            micro = []
            dev_type = torch.device(devices[0]).type
            for (batch,) in loader:
                if rng is not None:  # (after the loader's iterator drew its seed, as the killed run's had)
                    _set_rng(rng)
                    rng = None
                batch = batch.to(devices[0])
                with accelerator.accumulate(pmodel):
                    with torch.autocast(dev_type, dtype=s.compute, enabled=s.autocast):
                        loss = pmodel(input_ids=batch, labels=batch).loss
                    accelerator.backward(loss)  # divides by grad_accum itself
                    micro.append(loss.detach())
                    if accelerator.sync_gradients and max_grad_norm:
                        accelerator.clip_grad_norm_(params, max_grad_norm)
                    optimizer.step()  # a no-op until the last micro-batch of the accumulation
                    optimizer.zero_grad()
                if accelerator.sync_gradients:
                    sched.step()
                    losses.append(accelerator.reduce(torch.stack(micro).mean(), "mean").item())
                    micro = []
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
                    if saves and len(losses) < steps and _due(checkpoint, ddp):
                        states = _gather(_rng()) if ddp else _rng()
                        if checkpoint is not None:
                            checkpoint.save(_state(named, optimizer, sched, losses, accelerator.scaler, states))
            bar.close()
            accelerator.free_memory()
        s.merge = True

    return {
        "method": "perp",
        "cite": "Zimmer et al. 2023, arXiv 2312.15230",
        "train": list(train),
        "rank": rank if "masklora" in train else 0,
        "n_trainable": n_trainable,
        "n_total": s.n_total,
        "fraction": n_trainable / s.n_total,
        "trainable_by_kind": s.counts,
        "adapted_linears": s.n_merged,
        "steps": len(losses),
        "losses": losses,
        "lr": lr,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "processes": accelerator.num_processes,  # DDP replicas, each its own batch_size windows a micro-step
        "grad_checkpointing": bool(checkpointing),
        "frozen_dtype": str(s.compute).removeprefix("torch."),
        "autocast": "bf16" if s.autocast else mixed_precision,
        "wall_s": time.perf_counter() - t0,
        "placement": {**place_info, "streamed_gb": round(streamed["streamed_bytes"] / 1e9, 3)},
        "notes": s.notes,
    }


def _rng() -> dict:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _from_first(*objs) -> list:
    """The first DDP process's `objs`, in every process."""
    import torch.distributed as dist

    box = list(objs)
    dist.broadcast_object_list(box, src=0)
    return box


def _due(checkpoint, ddp: bool) -> bool:
    """Whether a checkpoint is due: the first process's clock decides for every DDP replica."""
    due = checkpoint is not None and checkpoint.due()
    return _from_first(due)[0] if ddp else due


def _gather(obj) -> list:
    """Every DDP process's `obj`, by rank, in every process."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _state(named, optimizer, sched, losses: list[float], scaler, rng) -> dict:
    """What a training resumes from after its last finished update: the trained tensors by name, AdamW's and the
    schedule's state, the losses so far, the random state (dropout; under DDP a list, every replica's) and fp16's
    loss scale."""
    return {"step": len(losses), "params": {n: p.detach() for n, p in named}, "optimizer": optimizer.state_dict(),
            "scheduler": sched.state_dict(), "losses": list(losses), "rng": rng,
            "scaler": scaler.state_dict() if scaler is not None else None}


def _load(state: dict, named, optimizer, sched, losses: list[float]) -> dict:
    """A saved `_state` put back into the freshly made trainable tensors, optimizer and schedule; returns the
    random state, to set once the data loader has started."""
    saved = state["params"]
    if set(saved) != {n for n, _ in named}:
        raise RuntimeError("internal: the saved training state does not name this model's trained tensors")
    with torch.no_grad():
        for n, p in named:
            p.copy_(saved[n])
    optimizer.load_state_dict(state["optimizer"])  # (moves AdamW's moments to each tensor's device)
    sched.load_state_dict(state["scheduler"])
    losses[:] = state["losses"]
    return state["rng"]


def _set_rng(rng: dict) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _check_masks(model: nn.Module, keep_masks: dict[str, torch.Tensor | None]) -> None:
    for name, keep in keep_masks.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise LLMPruneError(f"keep-mask for {name!r}: the model has no such module; "
                                f"use full module names such as model.layers.0.mlp.up_proj") from None
        if not isinstance(mod, nn.Linear):
            raise LLMPruneError(f"keep-mask for {name!r}: it is a {type(mod).__name__}, not an nn.Linear")
        if keep is not None and (tuple(keep.shape) != tuple(mod.weight.shape) or keep.dtype != torch.bool):
            raise LLMPruneError(f"keep-mask for {name!r} is {keep.dtype} {tuple(keep.shape)}, the weight is "
                                f"{tuple(mod.weight.shape)}: give a bool mask of the weight's shape")
