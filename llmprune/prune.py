"""The pruning pass: walk the blocks, collect what the solver needs, solve each linear.

Solvers that need no statistics (magnitude) skip calibration entirely. Solvers marked
`sequential` are solved group by group inside a block (q,k,v -> o -> gate,up -> down), each group
seeing inputs from the groups already pruned; the others see the dense block's inputs, as in the
Wanda reference. Each statistics pass stops right after the group's last linear has run. In
sequential mode a finished sublayer (attention once o_proj is solved, the MLP once down_proj is)
is replayed from its last linear's recorded inputs rather than recomputed, so the four passes cost
about what Wanda's two do; the result is bit-identical to rerunning it (tested).
"""
from __future__ import annotations

import re
import time
from contextlib import nullcontext

import torch

from . import arch as archmod
from . import moe, parallel, solvers, walker
from .patterns import Pattern
from .solvers import Solver
from .stats import last_readers

# Recorded sublayer inputs kept per block for replay (fp32 bytes). P-cpu on SmolLM2 needs 0.27 GiB; a
# 7B model under the paper protocol would need ~16 GiB, so it falls back to rerunning the sublayers.
REPLAY_BUDGET = 4 * 2**30


def target_linears(model, ignore: str | None = None, gates: bool = False) -> list[str]:
    """Full names of the targets to prune (arch.py: linears, parts of fused linears, experts'
    projections): every one in the blocks not matched by `ignore`; shared experts' gates with gates."""
    names = archmod.linear_names(model, gates)
    if ignore:
        rx = re.compile(ignore)
        names = [n for n in names if not rx.search(n)]
    return names


def check_shapes(model, names: list[str], pattern: Pattern) -> None:
    for n in names:
        pattern.check_shape(archmod.target(model, n).in_features, n)


def _solve(mod, name, solver: Solver, stats, pattern, sparsity, opts) -> dict:
    """Solve one linear in place (on its statistics' device, parallel.py); returns its info."""
    w = mod.weight.data
    dev = stats.device if stats is not None else w.device
    res = solver.fn(w.to(dev).float(), stats, pattern, sparsity, layer=name, **opts)  # layer: its full name
    mod.weight.data.copy_(res.weight.to(w.dtype))
    return {"sparsity": sparsity, "zeros": int((~res.keep).sum()), "numel": res.keep.numel(), **res.info}


def _job(mod, name, solver: Solver, stats, last: bool, pattern, sparsity, opts, how):
    """One linear's solve for parallel.run: its info. `last`: it is its statistics' last reader."""
    def job():
        stats.disposable = last  # its solver may then take X^T X's memory (LayerStats.take_hessian)
        info = _solve(mod, name, solver, stats, pattern, sparsity, opts)
        return {**info, "stats": how} if how else info

    return stats.slot, job


def prune(model, solver: Solver, pattern: Pattern, sparsities: dict[str, float], calib_ids: torch.Tensor | None,
          opts: dict | None = None, batch_size: int = 8, device="cpu", progress: bool = True,
          expert_min_tokens: int = moe.MIN_TOKENS, expert_fallback: str = "pooled", gates: bool = False,
          devices: tuple[str, ...] | None = None, resume=None) -> dict:
    """Prune the targets named in `sparsities` in place. The blocks run on `device`; with several
    `devices` their linears are solved on all of them at once (parallel.py). Returns {"layers": per-target info,
    "timings": {"forward_s", "solve_s"}[, "replayed_sublayers": how many sublayers were replayed]
    [, "experts": {expert: {"tokens", "stats"}} for Mixture-of-Experts models]}.

    Experts' projections see only the tokens routed to their expert (moe.py); an expert with fewer
    than `expert_min_tokens` takes `expert_fallback` (moe.FALLBACKS), recorded per expert.

    `resume` (a resume.Checkpoints, sequential onloading only): the pass starts at its first unfinished
    block with what the blocks before recorded, and hands it every finished block (timings: this run's)."""
    opts = opts or {}
    moe.check_fallback(expert_fallback, expert_min_tokens)
    infos: dict[str, dict] = {}
    experts: dict[str, dict] = {}
    replayed = extra_runs = 0  # extra_runs: statistics runs beyond one per group (Hessians over the budget)
    if resume is not None:
        replayed, extra_runs = resume.seed(infos, experts)
    start = resume.start if resume is not None else 0
    needs = solver.needs_for(opts)
    t_solve = 0.0
    if not needs:  # no calibration: the weights alone decide
        t0 = time.perf_counter()
        store = walker.store_of(model)
        if store is None:
            for name, s in sparsities.items():
                infos[name] = _solve(archmod.target(model, name), name, solver, None, pattern, s, opts)
        else:  # sequential onloading: one block of weights at a time
            a = archmod.arch_of(model)
            for i in range(start, len(archmod.blocks(model))):
                prefix = f"{a.blocks}.{i}."
                store.load_block(i, device)
                try:
                    for name, s in sparsities.items():
                        if name.startswith(prefix):
                            infos[name] = _solve(archmod.target(model, name), name, solver, None, pattern, s, opts)
                    store.done(i, archmod.blocks(model)[i])
                    if resume is not None:
                        resume.after(i, None, infos, experts, 0)
                finally:
                    store.release_block(i)
        return {"layers": infos, "timings": {"forward_s": 0.0, "solve_s": round(time.perf_counter() - t0, 2)}}

    a = archmod.arch_of(model)
    planner = archmod.Planner(model, gates)
    sequential = solver.sequential_for(opts)
    budget = walker.stats_budget(devices or (device,))
    t0 = time.perf_counter()
    after = ((lambda i, hidden: resume.after(i, hidden, infos, experts, replayed, extra_runs))
             if resume is not None else None)
    for block in walker.walk(model, calib_ids, batch_size, device, progress, desc=f"{solver.name} blocks",
                             start=start, hidden=resume and resume.hidden, after=after):
        prefix = f"{a.blocks}.{block.index}."
        plan = planner(block)  # targets in compute order (traced once per block structure)
        groups = plan.groups if sequential else (plan.order,)
        # sequential solvers: a sublayer whose last linear is solved is replayed from that linear's
        # recorded inputs in the later passes over the block (walker.Block.replay), within a memory budget
        ends = {lin: sub for sub, lin in plan.sublayers} if sequential else {}
        taped = 0
        for group in groups:
            mods = {prefix + n: plan.targets[n] for n in group if prefix + n in sparsities}
            if not mods:
                continue
            last = plan.targets[group[-1]]
            tape_bytes = calib_ids.numel() * last.in_features * 4
            sub = archmod.get(block.module, ends[group[-1]]) if group[-1] in ends else None
            if sub is not None and taped + tape_bytes > REPLAY_BUDGET:
                sub = None
            # a group's members read inputs none of them computes, so a group cut into runs (Hessians over
            # `budget`: a Mixture-of-Experts block's experts) solves to what it solves in one
            parts = walker.chunks(mods, needs, budget)
            extra_runs += len(parts) - 1
            for k, part in enumerate(parts):
                sel = {n: mods[n] for n in part}
                tail = sub if k == len(parts) - 1 else None  # the sublayer's output is recorded on the last run
                with walker.collect(sel, needs, devices=devices) as stats, \
                        (block.record(tail, last) if tail is not None else nullcontext()) as tape:
                    block.run(stop_after=tail if tail is not None else archmod.owner(last))
                use = moe.fallbacks(sel, stats, expert_min_tokens, expert_fallback, experts)  # name -> how
                walker.pool(block, sel, stats, use, needs, devices)  # all tokens through the under-calibrated experts
                t2 = time.perf_counter()
                jobs = []
                for name, taker in last_readers(stats, part):  # a last reader may take its statistics' memory
                    how = use.get(name)
                    s = solvers.get("magnitude") if how == "magnitude" else solver
                    jobs.append(_job(mods[name], name, s, stats[name], taker, pattern, sparsities[name],
                                     opts if s is solver else {}, how))
                infos.update(zip(part, parallel.run(jobs, devices)))  # one thread per device
                del jobs, stats  # this run's statistics, before the next run collects its own
                t_solve += time.perf_counter() - t2
            if sub is not None and block.replay(sub, last, tape):
                taped += tape_bytes
                replayed += 1
        # handing control back: the walker reruns the block with the new weights
    total = time.perf_counter() - t0
    out = {"layers": infos, "timings": {"forward_s": round(total - t_solve, 2), "solve_s": round(t_solve, 2)},
           "replayed_sublayers": replayed}
    if experts:
        out["experts"] = experts
    if extra_runs:
        out["hessian_runs"] = walker.runs_record(budget, extra_runs)
    return out


def zeros_of(model, names) -> tuple[int, int]:
    """(zeros, weights) of the targets `names` (linears, parts of fused projections, experts)."""
    zeros = total = 0
    for n in names:
        w = archmod.target(model, n).weight
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros, total


def measured_sparsity(model, names: list[str]) -> float:
    zeros, total = zeros_of(model, names)
    return zeros / max(total, 1)


def manifest_section(p, res: dict, sec: dict, measured: float, n_linears: int) -> dict:
    """The manifest's record of a pruning pass (`res` from `prune`, `p` a pipeline.Plan), added to
    `sec`: the whole-model (pipeline) and block-by-block (onload) transforms write the same one."""
    c = p.cfg
    sec.update(solver=p.solver.name, solver_opts=c.solver_opts, scope=c.scope, pattern=str(p.pattern),
               ignore=c.ignore, steps=["prune"],
               sparsity={"target": p.sparsity, "measured": measured, "linears": n_linears})
    if res.get("experts"):  # Mixture-of-Experts: routed tokens and statistics used, per expert
        per = res["experts"]
        sec["experts"] = {"min_tokens": c.expert_min_tokens, "fallback": c.expert_fallback,
                          "fell_back": sum(e["stats"] != "routed" for e in per.values()), "per_expert": per}
    if res.get("hessian_runs"):  # groups whose Hessians were collected a run at a time (the same weights)
        sec["hessian_runs"] = res["hessian_runs"]
    raised = {n: i["damp_raised"] for n, i in res["layers"].items() if i.get("damp_raised")}
    if raised:
        sec["damp_raised"] = raised
    return sec
