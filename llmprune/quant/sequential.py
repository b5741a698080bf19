"""GPTQ over a whole model, block by block: the calibration pass behind `--quant gptq`.

Storage (packed.py) packs the codes this makes, block by block as they come (`on_block`: onload.Output.block
from disk, packed.ModelPacker.block in memory), or all at once when the scale tuning needs them all first; it never
runs an algorithm itself.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .. import formats
from ..config import GPTQConfig
from ..errors import LLMPruneError
from ..stats import last_readers

# GPTQ as llmprune runs it by default. act_order: columns by decreasing H_jj with static group grids.
# sink_weight: each calibration window's first token counts this many times in the Hessian. Both
# answer the same failure on SmolLM2-135M: plain GPTQ cut every layer's error on ordinary tokens
# 2-4x but raised it 5-15x on the first token of a window, the attention sink every later token
# attends to (arXiv 2402.17762, 2403.01241), and ended worse than round-to-nearest (docs/quantization.md).
# tune_steps / tune_lr: end-to-end tuning of the scales after GPTQ (quant/tune.py), off by default.
# The values live in config.GPTQConfig (one source).
GPTQ_DEFAULTS = GPTQConfig().as_dict()


def _tied_names(model: nn.Module) -> set[str]:
    """State-dict names of tensors that share storage with another (tied embeddings): not packed."""
    seen, tied = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.device.type != "meta" and key in seen:
            tied |= {name, seen[key]}
        else:
            seen[key] = name
    return tied


@torch.no_grad()
def gptq_sequential(model: nn.Module, calib_ids: torch.Tensor, fmt: str, group_size: int | str = 128,
                    symmetric: bool | None = None, damp: float = 0.01, blocksize: int = 128, batch_size: int = 8,
                    device="cpu", progress: bool = False, dtype: torch.dtype | None = torch.float16,
                    act_order: bool = GPTQConfig.act_order, sink_weight: float = GPTQConfig.sink_weight,
                    tune_steps: int = GPTQConfig.tune_steps, tune_lr: float = GPTQConfig.tune_lr,
                    info: dict | None = None, on_block=None, devices: tuple[str, ...] | None = None,
                    resume=None, expert_min_tokens: int | None = None, expert_fallback: str = "pooled") -> dict:
    """GPTQ block by block, as the paper runs it (arXiv 2210.17323, sec. 5 setup): each block's
    Hessians come from calibration inputs that went through the already-quantized blocks before
    it, and each quantized linear computes with its dequantized weights from then on. Returns
    {layer name: Quantized} for `packed.write_packed(..., quantized=...)`; layers that do not fit
    the format are left alone (the packer keeps them dense and says why). act_order and
    sink_weight: see GPTQ_DEFAULTS. tune_steps > 0: then train the scales end to end against the
    unquantized model on the same windows (quant/tune.py); what it did goes into `info["tune"]`;
    dampening raised for a layer goes into `info["damp_raised"]`. on_block(index, {name: Quantized}):
    called with each block's codes instead of collecting them, once the block's weights are final (the packer
    takes them block by block, so one block's codes are alive, not the model's: a byte a weight, 70 GB at 70B);
    not with tune_steps, which needs them all. With several `devices` the linears of a block are quantized on all
    of them at once (parallel.py). `resume` (a resume.Checkpoints, sequential onloading without tuning): the pass starts
    at its first unfinished block, `info` seeded with what the blocks before recorded.

    Mixture-of-Experts: each expert's projections are quantized from the Hessian of the tokens routed to that
    expert (moe.py; their inputs have no sequence axis, so sink_weight does not reach them); an expert routed
    fewer than `expert_min_tokens` (moe.MIN_TOKENS) takes `expert_fallback`, as pruning does: `pooled` (every
    token of the layer through this expert) or `magnitude` (round-to-nearest), recorded in `info["experts"]`."""
    from .. import arch, moe, parallel, walker

    expert_min_tokens = moe.MIN_TOKENS if expert_min_tokens is None else expert_min_tokens
    moe.check_fallback(expert_fallback, expert_min_tokens)
    experts: dict[str, dict] = {}

    f = formats.get(fmt)
    f.check_options("gptq", symmetric)
    base = f.options(group_size, symmetric)
    a = arch.arch_of(model)
    tied = _tied_names(model)
    targets = None
    if tune_steps:
        from . import tune

        tune.check(tune_steps, tune_lr)
        targets = tune.teacher_states(model, calib_ids, batch_size, device)  # before any weight changes
        model.to("cpu")
    out = {}
    planner = arch.Planner(model, gates=True)
    budget = walker.stats_budget(devices or (device,))
    start, after = 0, None
    if resume is not None:
        resume.seed(info, {})
        start, after = resume.start, (lambda i, hidden: resume.after(i, hidden, info, {}, 0))
    for block in walker.walk(model, calib_ids, batch_size, device, progress, desc="gptq blocks", start=start,
                             hidden=resume and resume.hidden, after=after):
        prefix = f"{a.blocks}.{block.index}."
        plan = planner(block)
        lins = [n for n in plan.linears if not arch.is_dense(n, gates=True)]  # in the order they run
        mods = {prefix + n: arch.get(block.module, n) for n in lins if f"{prefix}{n}.weight" not in tied}
        views = [n for n in plan.order if isinstance(plan.targets[n], moe.ExpertProj)]  # experts' projections
        mods.update((prefix + n, plan.targets[n]) for n in views)
        if not mods:
            continue
        final = plan.targets[plan.order[-1]] if views else arch.get(block.module, lins[-1])  # computed last
        # every Hessian of a block is of its unquantized weights; when they do not fit `budget` together (a
        # Mixture-of-Experts block's experts), they are collected and solved a run at a time and the weights
        # written once all are solved, so that a later run's inputs are still those of the unquantized block
        parts = walker.chunks(mods, {"hessian"}, budget)
        if len(parts) > 1 and info is not None:
            runs = info.setdefault("hessian_runs", walker.runs_record(budget, 0))
            runs["extra"] += len(parts) - 1
        block_out = {}
        for part in parts:
            sel = {n: mods[n] for n in part}
            with walker.collect(sel, {"hessian"}, sink_weight=sink_weight, devices=devices) as stats:
                block.run(stop_after=arch.owner(final))
            use = moe.fallbacks(sel, stats, expert_min_tokens, expert_fallback, experts)  # name -> how
            walker.pool(block, sel, stats, use, {"hessian"}, devices)  # all tokens through the under-calibrated experts
            jobs = [(stats[n].slot, _job(mods[n], n, stats[n], last, f, base, damp, blocksize, act_order, dtype,
                                         info, rtn_only=use.get(n) == "magnitude", write=len(parts) == 1))
                    for n, last in last_readers(stats, part)]
            block_out.update((n, q) for n, q in zip(part, parallel.run(jobs, devices)) if q is not None)
            del jobs, stats  # this run's Hessians, before the next run collects its own
        if len(parts) > 1:
            for n, q in block_out.items():
                w = mods[n].weight
                w.data.copy_(q.to(w.device).dequantize().to(w.dtype))
        if on_block is not None:
            on_block(block.index, block_out)
        else:  # held to the end; two codes a byte while they wait for the tuning (its peak: 35 GB less at 70B)
            out.update((n, q.compact() if tune_steps else q) for n, q in block_out.items())
        # handing control back: the walker reruns the block with the quantized weights
    if experts and info is not None:
        info["experts"] = {"min_tokens": expert_min_tokens, "fallback": expert_fallback,
                           "fell_back": sum(e["stats"] != "routed" for e in experts.values()), "per_expert": experts}
    if tune_steps and out:
        out, tinfo = tune.tune_scales(model, out, calib_ids, targets, tune_steps, tune_lr, device=device,
                                      progress=progress, devices=devices)
        model.to("cpu")  # (tune_scales returns CPU tensors: the codes it got, scales it made on the CPU)
        if info is not None:
            info["tune"] = tinfo
    for n in out:  # one a byte again, as callers read them (one layer's unpacked beside the others at a time)
        out[n] = out[n].full()
    return out


def _job(mod, name, stats, last: bool, f, base, damp, blocksize, act_order, dtype, info, rtn_only: bool = False,
         write: bool = True):
    """One linear's GPTQ for parallel.run, on its statistics' device: its codes (on the CPU), or None
    when the layer does not fit the format. `last`: it is its statistics' last reader. `rtn_only`: an
    expert too few calibration tokens reached (the `magnitude` fallback): rounded to nearest instead.
    `write`: the layer computes with its dequantized weights at once (else the caller writes them)."""
    from ..packed import plan_layer
    from .gptq import gptq
    from .rtn import rtn

    @torch.no_grad()
    def job():
        stats.disposable = last
        w = mod.weight.detach()
        w = w.to(dtype) if dtype is not None else w  # what the packer starts from
        try:
            k, opts, _ = plan_layer(f, w, None, base)
        except LLMPruneError:
            return None
        w = w.to(stats.device)
        if rtn_only:
            q = rtn(w.float() * k.to(w.device), k.to(w.device), opts["group_size"], opts["symmetric"])
        else:
            q = gptq(w.float() * k.to(w.device), stats.take_hessian(), k.to(w.device), opts["group_size"],
                     opts["symmetric"], damp=damp, blocksize=blocksize, act_order=act_order, overwrite_hessian=True)
        if info is not None and q.damp is not None and q.damp != damp:
            info.setdefault("damp_raised", {})[name] = q.damp
        if write:
            mod.weight.data.copy_(q.dequantize().to(mod.weight.dtype))
        return dataclasses.replace(q, codes=q.codes.cpu(), scales=q.scales.cpu(), zeros=q.zeros.cpu())

    return job


@torch.no_grad()
def gptq_layers(model: nn.Module, hessians: dict[str, torch.Tensor], fmt: str, keep_masks: dict | None = None,
                group_size: int | str = 128, symmetric: bool | None = None, dtype: torch.dtype | None = None,
                **gptq_opts) -> dict:
    """GPTQ of each named layer from a given Hessian (no block-sequential pass): {name: Quantized}."""
    from ..packed import plan_layer
    from .gptq import gptq

    f = formats.get(fmt)
    f.check_options("gptq", symmetric)
    base = f.options(group_size, symmetric)
    out = {}
    for name, h in hessians.items():
        w = model.get_submodule(name).weight.detach()
        w = w.to(dtype) if dtype is not None else w
        keep = None if keep_masks is None else keep_masks[name].bool()
        k, opts, _ = plan_layer(f, w, keep, base)
        out[name] = gptq(w.float() * k, h.to(w.device), k, opts["group_size"], opts["symmetric"], **gptq_opts)
    return out
