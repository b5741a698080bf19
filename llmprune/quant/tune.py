"""End-to-end tuning of the int4 scales after GPTQ: the codes stay, the fp16 scales learn.

EfficientQAT's E2E-QP (Chen et al. 2024, arXiv 2407.11062, sec. 3.3) and PEQA (Kim et al. 2023,
arXiv 2305.14152): with the integer codes, the zero points and the sparsity mask frozen, the
per-group scales are the only parameters, trained end to end. GPTQ fits each layer to its own
inputs; the errors it leaves in 200 layers add up, and this corrects them jointly. The format and
the bytes do not change.

The loss is distillation from the model being quantized, on its calibration windows:
    L = KL(p_unquantized || p_quantized), per token, averaged,
so tuning removes quantization error only: the target is the unquantized pruned model, not the
data (next-token training would also repair pruning damage; that is `llmprune recover`).
Each scale is s = s0 (1 + t) with t from 0, trained with Adam (so the learning rate is a relative
step), linear warmup then cosine decay. Scales are rounded to fp16 at the end, as stored; if the
rounded result is not closer to the unquantized model on the calibration windows than GPTQ's
scales were, GPTQ's are kept.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .. import moe
from ..arch import base, logits, set_module, target
from ..arch import blocks as blocks_of
from ..config import TUNE_LR
from ..errors import LLMPruneError
from . import Quantized
from .rtn import FP16_MAX, FP16_TINY

BATCH = 2  # calibration windows per optimizer step
DEFAULT_LR = TUNE_LR  # relative: with 64 steps the scales move by 0.4% on average (SmolLM2-135M, README)


def check(steps: int, lr: float) -> None:
    if not isinstance(steps, int) or steps < 0:
        raise LLMPruneError(f"--tune-steps {steps}: must be an integer >= 0 (0 = no tuning, e.g. 64)")
    if not lr > 0:
        raise LLMPruneError(f"--tune-lr {lr}: must be > 0, e.g. {DEFAULT_LR:g}")


def _head_logp(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """log p over the vocabulary from final hidden states (the output head, logit soft-capping if any)."""
    return F.log_softmax(logits(model, hidden), -1)


def _hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return base(model)(input_ids=ids, use_cache=False).last_hidden_state


@torch.no_grad()
def final_states(norm: nn.Module, hidden: list[torch.Tensor], device) -> torch.Tensor:
    """norm(h) of every batch of the last block's outputs, in fp32 on the CPU, written into one (n, seqlen, hidden)
    tensor as each is computed (a list of them and its torch.cat would hold the teacher twice: 8.6 GB each at 70B
    under the paper's 128 x 2048)."""
    out, at = None, 0
    for h in hidden:
        y = norm(h.to(device)).float().cpu()
        if out is None:
            out = torch.empty((sum(x.shape[0] for x in hidden), *y.shape[1:]), dtype=torch.float32)
        out[at:at + y.shape[0]] = y
        at += y.shape[0]
    return out


@torch.no_grad()
def teacher_states(model: nn.Module, ids: torch.Tensor, batch_size: int = 8, device="cpu") -> torch.Tensor:
    """Final hidden states (n, seqlen, hidden) of the model as it is now (call before quantizing), on
    the CPU: n x seqlen x hidden floats instead of n x seqlen x vocab logits. The blocks run on `device`
    one at a time (walker.walk), so the model need not fit it."""
    from .. import walker
    from ..arch import arch_of, get

    block = None
    for block in walker.walk(model, ids, batch_size, device, progress=False, desc="teacher"):
        pass  # each block runs as it is once control comes back; its outputs feed the next one
    name = arch_of(model).norm
    norm = get(model, name) if name else nn.Identity()
    home = next(norm.parameters(), torch.empty(0)).device
    norm.to(device)  # the final norm where the last block ran
    try:
        return final_states(norm, block.outputs, device)
    finally:
        norm.to(home)


def _kl(model: nn.Module, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(target || model) over the windows of `ids` (n, seqlen)."""
    student = _head_logp(model, _hidden(model, ids))
    teacher = _head_logp(model, target.to(student.device))
    return F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")


@torch.no_grad()
def _mean_kl(model, ids, targets, device) -> float:
    return sum(_kl(model, ids[i:i + 1].to(device), targets[i:i + 1]).item() for i in range(len(ids))) / len(ids)


class _GroupScaledLinear(torch.autograd.Function):
    """y = x W^T + b with W = L * s, s repeated over each group of g inputs; the gradient reaches s only.

    Autograd would keep every layer's dequantized W from the forward pass until the backward one: a
    second copy of the whole model (fp32 here). The backward pass rebuilds W from the int8 levels
    and the scales instead, one layer at a time; what stays saved is x, L and s.
    """

    @staticmethod
    def forward(ctx, x, levels, scales, group_size, bias):
        w = levels.float() * scales.repeat_interleave(group_size, dim=1)  # (out, in)
        ctx.save_for_backward(x, levels, scales)
        ctx.group_size = group_size
        return F.linear(x, w.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, gy):
        x, levels, scales = ctx.saved_tensors
        g = ctx.group_size
        lv = levels.float()
        gx = None
        if ctx.needs_input_grad[0]:
            gx = gy @ (lv * scales.repeat_interleave(g, dim=1)).to(x.dtype)  # dL/dx = dL/dy W
        gw = (gy.reshape(-1, gy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])).float()  # dL/dW = dL/dy^T x
        gs = (gw.mul_(lv)).view(*scales.shape, g).sum(-1)  # dL/ds = sum over its group of dL/dW * L
        return gx, None, gs, None, None


class ScaledLinear(nn.Module):
    """A quantized linear whose group scales train: w = (q - z) * s0 * (1 + t)."""

    def __init__(self, q: Quantized, bias: torch.Tensor | None, device):
        super().__init__()
        q, g = q.full(), q.group_size  # (GPTQ's codes wait two a byte: Quantized.compact)
        # q - z in [-15, 15]: int8, one byte a weight (fp32 levels were four); 0 where pruned (q = z)
        levels = q.codes.to(torch.int16) - q.zeros.to(torch.int16).repeat_interleave(g, dim=1)
        self.register_buffer("levels", levels.to(device=device, dtype=torch.int8))
        self.register_buffer("s0", q.scales.float().to(device))
        self.t = nn.Parameter(torch.zeros_like(self.s0))
        self.bias, self.group_size = bias, g

    def scales(self) -> torch.Tensor:
        return self.s0 * (1 + self.t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GroupScaledLinear.apply(x, self.levels, self.scales(), self.group_size, self.bias)

    def stored_scales(self) -> torch.Tensor:
        """The trained scales as fp16, the way the formats store them."""
        s = (self.s0.to(self.t.device) * (1 + self.t)).detach()  # s0 may wait in CPU memory (streamed block)
        if not torch.isfinite(s).all():
            raise LLMPruneError("scale tuning diverged (non-finite scales): lower --tune-lr, e.g. 3e-4")
        return s.clamp(FP16_TINY, FP16_MAX).half()


def scaled_in_place(model: nn.Module, quantized: dict[str, Quantized], device=None) -> dict[str, nn.Module]:
    """Put a ScaledLinear in place of each named linear of `model`, built from its `quantized` codes on the
    linear's device (or `device`); an expert's projection (`<experts>[e].<proj>`, moe.py) turns its fused experts
    module into a moe.SplitExperts (scaled_experts). Returns the modules it replaced, for `restore`."""
    originals, experts = {}, {}
    for n, q in quantized.items():
        view = moe.parse_view(n)
        if view is not None:
            experts.setdefault(view[0], {})[view[1:]] = q
            continue
        lin = originals[n] = model.get_submodule(n)
        set_module(model, n, ScaledLinear(q, lin.bias, device or lin.weight.device))
    for n, views in experts.items():
        fused = originals[n] = model.get_submodule(n)
        set_module(model, n, scaled_experts(fused, views, device))
    return originals


def scaled_experts(fused: nn.Module, quantized: dict[tuple[int, str], Quantized], device=None) -> moe.SplitExperts:
    """The fused experts module `fused` as a moe.SplitExperts (the expert-by-expert forward of transformers' eager
    experts, differentiable) whose projections are ScaledLinear where `quantized` ({(expert, projection):
    Quantized}) has their codes, on `device` (default: the fused weights'), and frozen views of the fused
    weights where it has none. Its trained scales: `.get_submodule(f"{e}.{proj}").s0` (moe.stored_name)."""
    split = moe.view_split(fused)
    for (e, proj), q in quantized.items():
        lin = getattr(split[e], proj)
        setattr(split[e], proj, ScaledLinear(q, lin.bias, device or lin.weight.device))
    return split


def restore(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    for n, lin in originals.items():
        set_module(model, n, lin)


@contextmanager
def no_dropout(model: nn.Module):
    """Every dropout of `model` at p = 0 inside the `with`: training mode (which activation checkpointing
    needs) would otherwise switch it on (OPT's 0.1), and the distillation target, the KL figures and the
    choice between tuned and GPTQ's scales are those of the deterministic model. nn.Dropout modules and the
    float `*dropout*` attributes transformers' layers pass to F.dropout / attention."""
    saved = []
    for m in model.modules():
        for k, v in vars(m).items():
            if (k == "p" and isinstance(m, nn.Dropout) or "dropout" in k) and isinstance(v, float) and v > 0:
                saved.append((m, k, v))
    try:
        for m, k, _ in saved:
            setattr(m, k, 0.0)
        yield
    finally:
        for m, k, v in saved:
            setattr(m, k, v)


def placement_of(model: nn.Module, blocks, devices: tuple[str, ...], seqlen: int, where=None):
    """placement.plan_model for tuning `model` (its linears already ScaledLinear) on windows of `seqlen`
    tokens, one at a time, with activation checkpointing; works on the meta device too (plan first,
    read the weights to where the plan puts them after: onload.gptq_tuned)."""
    from .. import placement

    dtype = model.get_input_embeddings().weight.dtype
    return placement.plan_model(model, devices, None, 1, seqlen, dtype, True, blocks=blocks, where=where)


def train(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor, steps: int, lr: float, batch: int = BATCH,
          seed: int = 0, devices: tuple[str, ...] = ("cpu",), progress: bool = False, blocks=None,
          where=None, checkpoint=None) -> tuple[bool, dict]:
    """Train the scales of every ScaledLinear in `model` (its other parameters frozen) to match `targets`, the
    model placed over `devices` (placement.py; `where`: a plan made before, kept while it fits). Each
    ScaledLinear ends with t = 0 and s0 the tuned scales rounded to fp16, as stored; returns (whether they are
    kept, i.e. closer to the unquantized model than GPTQ's, info). `checkpoint` (resume.Training): the state
    after an update is saved when it is `due()` (`_state`), and a killed run's (`resumed()`) is loaded first:
    the steps after it only, on the windows they would have had, to the same scales."""
    from .. import placement

    device = devices[0]
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, ScaledLinear)]
    scaled = [m for _, m in named]
    # The blocks on the devices as far as they hold them, the rest streamed from CPU memory (placement.py;
    # activation checkpointing, which streaming needs, also keeps one window's activations to one block).
    blocks, where, place_info = placement_of(model, blocks, devices, ids.shape[1], where)
    with placement.training_mode(model, True), no_dropout(model), \
            placement.placed(model, blocks, devices, where) as streamed:
        resumed = checkpoint.resumed() if checkpoint is not None else None
        kl_before = resumed["kl_before"] if resumed else _mean_kl(model, ids, targets, device)
        opt = torch.optim.Adam([m.t for m in scaled], lr=lr, betas=(0.9, 0.95))
        warm = max(1, steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(_schedule, warm=warm, steps=steps))
        first = _load(resumed, named, opt, sched) if resumed else 0
        del resumed  # now in the offsets and Adam's state: not held beside them for the whole training (6.4 GB at 70B)
        gen = torch.Generator().manual_seed(seed)
        order = torch.cat([torch.randperm(len(ids), generator=gen) for _ in range(steps * batch // len(ids) + 1)])
        it = range(first, steps)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="tune scales", initial=first, total=steps)
        with torch.enable_grad():  # callers such as gptq_sequential run under no_grad
            for s in it:
                opt.zero_grad(set_to_none=True)
                for i in order[s * batch:(s + 1) * batch].tolist():  # one window at a time: bounded memory
                    (_kl(model, ids[i:i + 1].to(device), targets[i:i + 1]) / batch).backward()
                opt.step()
                sched.step()
                if checkpoint is not None and s + 1 < steps and checkpoint.due():
                    checkpoint.save(_state(s + 1, named, opt, sched, kl_before))
        with torch.no_grad():
            for m in scaled:  # evaluate exactly what will be stored (in place: a streamed s0 is the stored one)
                m.s0.copy_(m.stored_scales().float())
                m.t.zero_()
        kl_after = _mean_kl(model, ids, targets, device)
    kept = kl_after < kl_before
    info = {"steps": steps, "lr": lr, "batch": batch, "windows": len(ids), "loss": "kl to the unquantized model",
            "kl_before": float(f"{kl_before:.5g}"), "kl_after": float(f"{kl_after:.5g}"), "kept": "tuned" if kept else "gptq",
            "placement": {**place_info, "streamed_gb": round(streamed["streamed_bytes"] / 1e9, 3)}}
    return kept, info


def _schedule(s: int, warm: int, steps: int) -> float:
    """Linear warmup over `warm` steps, then cosine decay to 0 at `steps` (a factor of the learning rate)."""
    return min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps))


def _state(step: int, named, opt, sched, kl_before: float) -> dict:
    """What a tuning resumes from after `step` updates: every scale offset t by its layer's name, Adam's and the
    schedule's state, and the KL before tuning (measured once, at t = 0). No randomness: the window order is
    drawn from the seed."""
    return {"step": step, "t": {n: m.t.detach() for n, m in named}, "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "kl_before": kl_before}


def _load(state: dict, named, opt, sched) -> int:
    """A saved `_state` put back into the fresh offsets, optimizer and schedule; returns the steps done."""
    if set(state["t"]) != {n for n, _ in named}:
        raise RuntimeError("internal: the saved tuning state does not name this model's scaled layers")
    with torch.no_grad():
        for n, m in named:
            m.t.copy_(state["t"][n])
    opt.load_state_dict(state["optimizer"])  # (Adam's moments onto each offset's device)
    sched.load_state_dict(state["scheduler"])
    return state["step"]


def tune_scales(model: nn.Module, quantized: dict[str, Quantized], ids: torch.Tensor, targets: torch.Tensor,
                steps: int = 64, lr: float = DEFAULT_LR, batch: int = BATCH, seed: int = 0, device="cpu",
                progress: bool = False, devices: tuple[str, ...] | None = None) -> tuple[dict[str, Quantized], dict]:
    """Train the scales of the `quantized` linears of `model` to match `targets` (teacher_states of the
    unquantized model on `ids`); returns ({name: Quantized with the new scales}, info). Codes and
    zero points are unchanged. The model's named linears end with the returned dequantized weights.
    The model trains on `devices` (default: `device`), placed as far as they hold it (placement.py).
    """
    check(steps, lr)
    if targets.shape[:2] != ids.shape:
        raise LLMPruneError(f"scale tuning: targets {tuple(targets.shape)} do not match the windows {tuple(ids.shape)}")
    t0 = time.perf_counter()
    home = next(model.parameters()).device
    frozen = {p: p.requires_grad for p in model.parameters()}
    blocks = list(blocks_of(model))  # before its linears are replaced: inference looks for them
    originals = {}
    try:
        for p in frozen:
            p.requires_grad_(False)
        originals = scaled_in_place(model, quantized, home)
        kept, info = train(model, ids, targets, steps, lr, batch, seed, tuple(devices or (str(device),)), progress,
                           blocks)
        out = {n: dataclasses.replace(q, scales=model.get_submodule(moe.stored_name(n)).s0.half().cpu()) if kept
               else q for n, q in quantized.items()}
    finally:
        restore(model, originals)
        for p, rg in frozen.items():
            p.requires_grad_(rg)
    with torch.no_grad():
        for n, q in out.items():
            w = target(model, n).weight  # a linear's, or an expert's rows of its fused parameter
            w.copy_(q.dequantize().to(w.device, w.dtype))
    return out, {**info, "seconds": round(time.perf_counter() - t0, 1)}
