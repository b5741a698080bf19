"""argv -> config -> api. No logic of its own beyond printing results."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading


def _float_or_none(s):
    return None if s in (None, "") else float(s)


def _datasets(s: str) -> tuple[str, ...]:
    return tuple(x for x in (s or "").split(",") if x and x != "none")


def _add_compress(sub):
    p = sub.add_parser("compress", help="prune (or slice) a model, save it, evaluate it")
    p.add_argument("--model", default="llama", help="Hub id, local HF folder, .gguf file, or alias (llama, gemma3)")
    p.add_argument("--solver", default="wanda", help="magnitude | wanda | sparsegpt | alps | dsnot | slicegpt")
    p.add_argument("--pattern", default="unstructured", help="unstructured | N:M (e.g. 2:4) | group:G")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of weights zeroed (default 0.5; N:M implies 1-N/M)")
    p.add_argument("--scope", default="layer", choices=["layer", "global"], help="magnitude: rank per layer or globally")
    p.add_argument("--ignore", default=None, help="regex of linear names to leave dense")
    g = p.add_argument_group("Mixture-of-Experts")
    g.add_argument("--expert-min-tokens", type=int, default=64,
                   help="experts routed fewer calibration tokens than this take --expert-fallback (default 64)")
    g.add_argument("--expert-fallback", default="pooled", choices=["pooled", "magnitude"],
                   help="pooled: statistics of every token that reached the layer pushed through the expert; "
                        "magnitude: |W| alone")
    g.add_argument("--prune-gates", action="store_true", help="also prune shared experts' gates (routers stay dense)")
    g = p.add_argument_group("solver options")
    g.add_argument("--damp", type=float, default=None, help="SparseGPT/GPTQ Hessian dampening (fraction of mean diag)")
    g.add_argument("--blocksize", type=int, default=None, help="SparseGPT column block size")
    g.add_argument("--init", default=None, help="DSnoT initial mask: wanda | sparsegpt | alps | magnitude")
    g.add_argument("--max-cycles", type=int, default=None, help="DSnoT grow/prune cycles")
    g.add_argument("--lower-error", action="store_true", default=None,
                   help="DSnoT: accept a swap only if it also lowers the modelled squared error (off: the reference)")
    g.add_argument("--rho", type=float, default=None, help="ALPS initial ADMM penalty (default 0.1)")
    g.add_argument("--max-iter", type=int, default=None, help="ALPS ADMM iterations at most (default 300)")
    g.add_argument("--pcg-steps", type=int, default=None, help="ALPS conjugate-gradient steps on the kept weights (default 10)")
    g.add_argument("--owl", action="store_true", help="OWL non-uniform layer-wise sparsity")
    g.add_argument("--owl-m", type=float, default=None, help="OWL outlier threshold M (default 5)")
    g.add_argument("--owl-lambda", type=float, default=None, help="OWL sparsity range lambda (default 0.08)")
    g = p.add_argument_group("SliceGPT")
    g.add_argument("--slicing", type=float, default=None, help="fraction of the hidden size removed")
    g.add_argument("--rotation", default=None, choices=["per-block", "shared"], help="default per-block")
    g.add_argument("--round-to", type=int, default=None, help="the kept width a multiple of this (default 8)")
    g.add_argument("--slice-head", action="store_true",
                   help="also slice the LM head and the last residual (the reference keeps them at full width)")
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", default="c4", help="c4 | wikitext2 | FILE (.txt .jsonl .parquet .safetensors)")
    g.add_argument("--protocol", default="auto", choices=["auto", "paper", "cpu"],
                   help="defaults for --nsamples/--seqlen/--eval-windows: paper = 128 x 2048 and all windows; "
                        "cpu = 64 x 512 and 16 windows; auto = paper on CUDA, cpu on CPU")
    g.add_argument("--nsamples", type=int, default=None, help="calibration windows (default: from --protocol)")
    g.add_argument("--seqlen", type=int, default=None, help="calibration window length (default: from --protocol)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--calib-batch", type=int, default=8, help="calibration samples pushed through a block at once")
    g = p.add_argument_group("output and evaluation")
    g.add_argument("--out", default=None, help="output folder (default: out/<model>-<solver>-<pattern>-<sparsity>)")
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--format", default="dense", help="dense | sparse24 | w4g128 | w4s24 | w4s50")
    g.add_argument("--quant", default=None, help="rtn | gptq (int4 formats)")
    g.add_argument("--group-size", default="auto", help="int4 scale group: 128, 64, ... or auto")
    g.add_argument("--grid", default="auto", choices=GRIDS, help=GRID_HELP)
    _add_gptq_args(g)
    g.add_argument("--save-dtype", default="auto", help="stored floats: auto (dense: the source's dtype; packed: "
                                                        "float16) | float16 | bfloat16 | float32")
    g.add_argument("--eval", default="wikitext2", help="perplexity datasets: wikitext2,c4 or none")
    g.add_argument("--eval-seqlen", type=int, default=2048)
    g.add_argument("--eval-windows", type=int, default=None, help="windows evaluated (default: from --protocol; 0 = all)")
    g.add_argument("--no-dense-eval", action="store_true", help="skip measuring the dense model first")
    _add_task_flags(g)
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N | a list such as cuda:0,cuda:1: the blocks run "
                                                  "on the first, each block's linears are solved on all at once "
                                                  "(default: every GPU when there is one, else cpu)")
    _add_hessian_gib(g)
    g.add_argument("--dtype", default="auto", help="compute dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, "
                                                   "bfloat16, float16; statistics are accumulated in fp32/fp64")
    g.add_argument("--onload", default="auto", choices=["auto", "blocks", "whole"],
                   help="blocks: the weights stay on disk and are read one decoder block at a time (any size on one "
                        "GPU or a small CPU machine); whole: the model in memory; auto: blocks unless a step needs "
                        "the whole model (SliceGPT; PERP on the CPU)")
    g.add_argument("--checkpoint-every", default="600", metavar="SECONDS",
                   help="while pruning or slicing block by block, in GPTQ's pass after it and while PERP or the "
                        "scale tuning trains, commit a checkpoint every SECONDS (0: after every block or step; off: "
                        "none): rerunning the command of a run that was killed goes on from its last one (default 600)")
    g.add_argument("--recover", default=None, choices=["perp"], help="retrain a tiny subset after pruning (PERP)")
    g.add_argument("--recover-steps", type=int, default=None, help="default 200")
    g.add_argument("--recover-lr", type=float, default=None)
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--export", default=None, choices=["compressed-tensors", "gguf"],
                   help="also export the output for another engine, into OUT-<target> (see `llmprune export -h`)")
    g.add_argument("--export-type", default=None, help="with --export gguf: f16 (default; q4_0 with --export-quant),"
                                                       "q8_0,q4_0,... (one file each)")
    g.add_argument("--export-quant", default=None, help="int4 on export of an unquantized output: compressed-tensors "
                                                        "rtn (default) | gptq; gguf gptq (its codes in the blocks)")
    p.set_defaults(func=cmd_compress)


def cmd_compress(a) -> int:
    from . import api
    from .config import CompressConfig

    opts = {k: v for k, v in {"damp": a.damp, "blocksize": a.blocksize, "init": a.init,
                              "max_cycles": a.max_cycles, "lower_error": a.lower_error, "rho": a.rho,
                              "max_iter": a.max_iter, "pcg_steps": a.pcg_steps}.items() if v is not None}
    slicegpt = None
    if a.solver == "slicegpt" or a.slicing is not None:
        slicegpt = {"slicing": 0.25 if a.slicing is None else a.slicing, "rotation": a.rotation or "per-block",
                    "round_to": 8 if a.round_to is None else a.round_to, **({"slice_head": True} if a.slice_head else {})}
    evals = _datasets(a.eval)
    _unread(a, (_needs(("owl_m", "owl_lambda"), a.owl, "--owl"),
                _needs(("rotation", "round_to", "slice_head"), slicegpt, "--solver slicegpt"),
                _needs(("recover_steps", "recover_lr"), a.recover, "--recover perp"),
                _needs(("export_type",), a.export == "gguf", "--export gguf"),
                _needs(("export_quant",), a.export, "--export"),
                _needs(("scope",), a.solver == "magnitude", "--solver magnitude"),
                *_int4_rules(a.format), _needs(GPTQ_FLAGS, a.quant == "gptq", "--quant gptq"),
                _eval_rules(a, evals),  # (--no-dense-eval beside --eval none is no contradiction: not refused)
                _token_file_rule(a.calib), _whole_rule(a.onload, bool(a.recover))))
    cfg = CompressConfig(
        model=a.model, solver=a.solver, pattern=a.pattern, sparsity=a.sparsity, scope=a.scope, ignore=a.ignore,
        expert_min_tokens=a.expert_min_tokens, expert_fallback=a.expert_fallback, prune_gates=a.prune_gates,
        solver_opts=opts, owl={"m": 5.0 if a.owl_m is None else a.owl_m,
                               "lam": 0.08 if a.owl_lambda is None else a.owl_lambda} if a.owl else None,
        calib=a.calib, nsamples=a.nsamples, seqlen=a.seqlen, protocol=a.protocol, seed=a.seed,
        calib_batch=a.calib_batch,
        device=a.device, dtype=a.dtype, onload=a.onload, out=a.out, overwrite=a.overwrite, progress=not a.no_progress,
        checkpoint_s=_seconds_or_off(a.checkpoint_every, "--checkpoint-every"), hessian_gib=a.hessian_gib,
        eval=evals, eval_seqlen=a.eval_seqlen, eval_windows=a.eval_windows,
        eval_dense=not a.no_dense_eval, tasks=_tasks(a), tasks_limit=a.tasks_limit, slicegpt=slicegpt, format=a.format, quant=a.quant,
        group_size=_group_size(a.group_size), grid=a.grid, save_dtype=a.save_dtype,
        gptq=_gptq_opts(a) or None,
        recover=({"method": a.recover, "steps": 200 if a.recover_steps is None else a.recover_steps,
                  **({"lr": a.recover_lr} if a.recover_lr is not None else {})} if a.recover else None),
        export=a.export, export_types=a.export_type or ("q4_0" if a.export_quant else "f16"),
        export_quant=a.export_quant,
    )
    m = api.compress(cfg, command=a.command_line)
    if m["out"] is None:
        return _replica_done(m)
    print_summary(m)
    if "format" in m:
        print_format(m)
    if m.get("exported"):
        print_export(m["exported"])
    return 0


def _replica_done(m: dict) -> int:
    """A DDP replica other than the first: it trained, the first process writes and measures the output."""
    print(f"replica {m['replica']}: trained; process 0 writes {m['to']}")
    return 0


def _resumed(r: dict) -> str:
    """Where a resumed run went on from (manifest `resumed`, resume.Checkpoints.record)."""
    after = "".join(f", after the {d} pass" for d in r.get("passes_done", []))
    where = [f"at block {r['from_block']} of {r['blocks']} of the {r.get('pass') or 'prune'} pass{after}"] \
        if r.get("from_block") is not None else [after[2:]] if after else []
    if r.get("perp_from_step") is not None:
        where.append(f"PERP's training from step {r['perp_from_step']}")
    if r.get("tune_from_step") is not None:
        where.append(f"the scale tuning from step {r['tune_from_step']}")
    if r.get("tune_recipe_was"):
        was = r["tune_recipe_was"]
        where.append(f"the scale tuning from its start (the run that stopped tuned with --tune-steps {was['steps']} "
                     f"--tune-lr {was['lr']:g})")
    return f"resumed {', '.join(where) or 'after the teacher pass of scale tuning'}, from the checkpoint of " \
           f"{r['checkpoint']}"


def _seconds_or_off(v: str, flag: str) -> float | None:
    from .errors import LLMPruneError

    if v == "off":
        return None
    try:
        return float(v)
    except ValueError:
        raise LLMPruneError(f"{flag} {v!r}: give seconds (e.g. 600; 0: after every block) or off") from None


def _unread(a, rules) -> None:
    """Refuse, before any work, a flag the command line gave (`a.given`, recorded by errors.ArgumentParser: a
    default never counts) whose value nothing reads in the combination given. `rules`: (dests, read, why, fix),
    each flag of `dests` read only when `read`; `why` says the combination ("with --eval none", "without --owl"),
    `fix` what to do instead ({this}: the flag). A flag that asks for nothing (`--checkpoint-every off`,
    `--no-dense-eval` beside `--eval none`: scripts pass them whatever else they pass) is no contradiction."""
    from .errors import LLMPruneError

    given = getattr(a, "given", set())
    for dests, read, why, fix in rules:
        for dest in dests:  # (a flag that asks for nothing, --checkpoint-every off, contradicts nothing)
            if dest in given and not read and getattr(a, dest, None) not in ("off", "none"):
                this = f"--{dest.replace('_', '-')}"
                raise LLMPruneError(f"{this} has no effect {why}: {fix.format(this=this)}")


def _needs(dests: tuple[str, ...], on, flag: str) -> tuple:
    """The rule of flags that count only beside `flag` (`on`: whether it was given)."""
    return dests, bool(on), f"without {flag}", f"add {flag} or drop {{this}}"


def _eval_rules(a, datasets, seqlen: str = "eval_seqlen", windows: str = "eval_windows", flag: str = "--eval") -> tuple:
    """The rule of a perplexity evaluation's window flags: read only when some dataset is evaluated."""
    said = getattr(a, flag.lstrip("-"))
    why = f"with {flag} {said or 'none'}" if flag.lstrip("-") in getattr(a, "given", ()) else f"without {flag}"
    return (seqlen, windows), bool(datasets), why, f"drop {{this}}, or evaluate: {flag} wikitext2"


def _token_file_rule(spec: str, flag: str = "--calib") -> tuple:
    """The rule of --nsamples and --seqlen beside a token-id file, whose windows are used as they are."""
    from .calibration import token_file_width

    return (("nsamples", "seqlen"), token_file_width(spec) is None, f"with {flag} {spec} (token ids, used as they are)",
            "drop {this}")


def _whole_rule(onload: str, trains: bool = False) -> tuple:
    """The rule of --checkpoint-every: the passes over the blocks commit checkpoints, a model loaded whole none
    (but PERP's training: `trains`)."""
    return (("checkpoint_every",), onload != "whole" or trains, "with --onload whole (they are committed block by block)",
            "drop {this}, or use --onload blocks")


GPTQ_FLAGS = ("act_order", "sink_weight", "tune_steps", "tune_lr")
CALIB_FLAGS = ("calib", "nsamples", "seqlen", "seed", "hessian_gib")  # of pack's and export's GPTQ, its alone


def _calib_rule(gptq: bool) -> tuple:
    """The rule of pack's and export's calibration flags: GPTQ is the only step there that reads them."""
    return (CALIB_FLAGS, gptq, "without --quant gptq (nothing else here calibrates)",
            "drop {this}, or quantize with --quant gptq")


def _int4_rules(fmt: str) -> tuple:
    """The rules of --group-size and --grid, read by the int4 formats (a group size fixed by the layout: not)."""
    from .formats import get

    f = None if fmt == "dense" else get(fmt)
    if f is None or not f.quantized:
        return (("group_size", "grid"), False, f"with --format {fmt}, which stores unquantized values",
                "drop {this}, or use an int4 format (w4g128, w4s24, w4s50)"),
    return (("group_size",), f.fixed_group is None, f"with --format {fmt}, whose groups are fixed ({f.fixed_group})",
            "drop {this}"),


def _group_size(v: str) -> int | str:
    """--group-size as the API takes it: a positive integer, or auto."""
    from .errors import LLMPruneError

    if v == "auto":
        return v
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise LLMPruneError(f"--group-size {v!r}: a positive integer (e.g. 128) or auto")
    return n


def print_summary(m: dict) -> None:
    sp = m.get("sparsity", {})
    what = m.get("solver", "?")
    if sp:
        what += f" {m.get('pattern')} target {sp['target']:.2f} measured {sp['measured']:.4f}"
    zeros = (m.get("format") or {}).get("stored_zeros")
    if zeros is not None:  # int4 rounds some kept weights to zero too
        what += f", stored zeros {zeros:.4f}"
    print(f"\nsaved {m['out']}  ({what})")
    r = m.get("resumed")
    if r:
        print(f"{_resumed(r)} ({r['earlier_s']:.0f}s of work done by {r['runs'] - 1} earlier run(s); timings below: "
              f"this run's)")
    t = m.get("timings", {})
    print(f"compress {t.get('compress_s', 0):.1f}s (forward {t.get('forward_s', 0):.1f}s, solve {t.get('solve_s', 0):.1f}s)"
          f"  total {t.get('total_s', 0):.1f}s  peak RSS {m.get('peak_rss_mib', 0):.0f} MiB")
    print_eval(m.get("eval", {}))
    print_zeroshot(m.get("zeroshot") or {})


def print_eval(ev: dict) -> None:
    from .manifest import SAVED

    if not ev:
        return
    print(f"\n{'dataset':<10} {'seqlen':>6} {'windows':>7} {'tokens':>8} {'dtype':>9} {'dense ppl':>10} {'ppl':>10}")
    for d, r in ev.items():
        dense = f"{r['dense_ppl']:.3f}" if "dense_ppl" in r else "-"
        print(f"{d:<10} {r['seqlen']:>6} {r['windows']:>7} {r['tokens']:>8} {r.get('dtype') or '-':>9} {dense:>10} "
              f"{r['ppl']:>10.3f}")
    ons = {r.get("measured_on") for r in ev.values()} - {None}
    if ons:
        on = " / ".join(sorted(ons))
        if ons == {SAVED} and all(r.get("blockwise") for r in ev.values()):
            on = "saved output, read block by block from its files (the figures llmprune.load gives)"
        print(f"ppl: of the {on}" + ("; dense ppl: the model before compression"
                                     if any("dense_ppl" in r for r in ev.values()) else ""))


def _add_eval(sub):
    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of an output folder or a model")
    p.add_argument("target", help="an llmprune output folder, or anything --model accepts (e.g. llama)")
    p.add_argument("--ppl", default=None, help="perplexity datasets: wikitext2,c4 (default wikitext2 without --tasks)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=None, help="windows evaluated (default all)")
    p.add_argument("--tasks", default="", help="zero-shot tasks through lm-eval, e.g. boolq,rte,winogrande,arc_easy,"
                                               "arc_challenge,openbookqa,piqa")
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task")
    p.add_argument("--tasks-dir", default=None, help="folder with the offline task files (default: shipped copies)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="compute dtype (default: the one the output was made in, else "
                                                 "float32)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)


def cmd_eval(a) -> int:
    from . import api, outdir

    outdir.check_file_out(a.json, "--json")
    tasks = _tasks(a)
    ppl = tuple(x for x in (a.ppl if a.ppl is not None else ("" if tasks else "wikitext2")).split(",") if x and x != "none")
    _unread(a, (_eval_rules(a, ppl, "seqlen", "windows", "--ppl"),
                _needs(("limit", "tasks_dir", "batch_size"), tasks, "--tasks")))
    res = api.evaluate(a.target, ppl, a.seqlen, a.windows, a.device, progress=not a.no_progress, tasks=tasks,
                       limit=a.limit, tasks_dir=a.tasks_dir, batch_size=a.batch_size, dtype=a.dtype,
                       command=a.command_line)
    card = res.pop("card", None)
    print_eval(res.get("eval", {}))
    print_zeroshot(res.get("zeroshot", {}))
    if card == "rewritten":
        print(f"{a.target}/README.md (the model card push wrote) rewritten with these figures: `llmprune push` "
              f"uploads it")
    elif card == "stale":
        print(f"{a.target}/README.md (the model card push wrote) still shows the figures of before: "
              f"`llmprune push` rewrites it")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res.get("zeroshot", res.get("eval")) if len(res) == 1 else res, f, indent=2)
    return 0


def print_zeroshot(zs: dict) -> None:
    if not zs:
        return
    print(f"\n{'task':<15} {'acc':>7} {'acc_norm':>9} {'n':>6}")
    from .manifest import zeroshot_tasks

    for t, r in zeroshot_tasks(zs).items():
        an = f"{r['acc_norm']:.4f}" if r.get("acc_norm") is not None else "-"
        print(f"{t:<15} {r['acc']:>7.4f} {an:>9} {r['n']:>6}")
    print(f"{'mean':<15} {zs['mean']:>7.4f}" + (f"   (first {zs['limit']} examples of each task)" if zs.get("limit") else ""))


def _add_sweep(sub):
    p = sub.add_parser("sweep", help="a solver x sparsity grid with a CSV, JSON and plot")
    p.add_argument("--model", default="llama")
    p.add_argument("--solvers", default="magnitude,wanda",
                   help="solver specs: name[+key=value...][+owl], e.g. wanda,sparsegpt,dsnot+init=sparsegpt,wanda+owl")
    p.add_argument("--sparsity", default=None,
                   help="start:stop:step (stop included) or a list 0.5,0.6 (default 0.3:0.8:0.1; N:M: the implied one)")
    p.add_argument("--pattern", default="unstructured")
    p.add_argument("--eval", default="wikitext2", help="perplexity datasets")
    p.add_argument("--tasks", default="", help="zero-shot tasks too (slow)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=None)
    p.add_argument("--calib", default="c4")
    p.add_argument("--protocol", default="auto", choices=["auto", "paper", "cpu"])
    p.add_argument("--nsamples", type=int, default=None)
    p.add_argument("--seqlen", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="sweep")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier sweep in --out")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, "
                   "bfloat16, float16")
    p.add_argument("--onload", default="auto", choices=["auto", "blocks", "whole"],
                   help="blocks: each point pruned from disk block by block into a scratch folder in --out and "
                        "evaluated from there (one block in memory); whole: the model in memory; auto: blocks "
                        "unless the checkpoint only loads whole")
    _add_hessian_gib(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sweep)


def parse_range(s: str) -> list[float]:
    from .errors import LLMPruneError

    try:
        if ":" in s:
            a, b, c = (float(x) for x in s.split(":"))
            if not (c > 0 and b >= a):
                raise ValueError
            n = round((b - a) / c) + 1
            return [round(a + i * c, 6) for i in range(n)]
        got = [float(x) for x in s.split(",") if x]
        if not got:
            raise ValueError
        return got
    except ValueError:
        raise LLMPruneError(f"--sparsity {s!r}: use start:stop:step with start <= stop and step > 0 (e.g. 0.3:0.8:0.1) "
                            f"or a list (0.5,0.6)") from None


def cmd_sweep(a) -> int:
    from . import sweep
    from .patterns import parse

    implied = parse(a.pattern).implied_sparsity  # N:M fixes it; other patterns sweep 30-80% by default
    grid = parse_range(a.sparsity) if a.sparsity else (implied,) if implied is not None else parse_range("0.3:0.8:0.1")
    _unread(a, (_needs(("limit",), _tasks(a), "--tasks"), _token_file_rule(a.calib)))
    try:
        res = sweep.sweep(a.model, tuple(a.solvers.split(",")), grid, a.pattern, a.out, a.calib,
                          a.nsamples, a.seqlen, a.seed, tuple(x for x in a.eval.split(",") if x), a.eval_seqlen,
                          a.eval_windows, _tasks(a), a.limit, a.device,
                          progress=not a.no_progress, protocol=a.protocol, onload=a.onload, dtype=a.dtype,
                          hessian_gib=a.hessian_gib, overwrite=a.overwrite)
    except KeyboardInterrupt as e:  # the rows are written after every point (SIGTERM: errors.Terminated)
        from pathlib import Path

        from .errors import Terminated

        done = Path(a.out) / "sweep.csv"
        stopped = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"llmprune: {stopped}; " + (f"the points measured so far are in {done} (no plot)" if done.exists()
                                          else "no point was measured"), file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(e, Terminated) else 130
    from .bench import format_table

    cols = [c for c in res["rows"][0] if c not in ("model",)]
    print(format_table(res["rows"], tuple(cols)))
    print(f"\nwrote {res['csv']}, {res['json']}, {res['png']}")
    return 0


def _add_report(sub):
    p = sub.add_parser("report", help="a Markdown table of several outputs side by side")
    p.add_argument("outs", nargs="+")
    p.add_argument("--md", default=None, help="write the table to this file too")
    p.set_defaults(func=cmd_report)


def cmd_report(a) -> int:
    from . import outdir, report

    outdir.check_file_out(a.md, "--md")
    table = report.markdown_table(*report.load_manifests(a.outs))
    print(table)
    if a.md:
        with open(a.md, "w") as f:
            f.write(table + "\n")
    return 0


def _add_recover(sub):
    p = sub.add_parser("recover", help="PERP: retrain norms and mask-respecting adapters of a pruned output "
                       "(LoRA on every linear of one with no zeros, e.g. a SliceGPT output)")
    p.add_argument("src", help="an llmprune output folder (dense format)")
    p.add_argument("--out", required=True)
    p.add_argument("--method", default="perp", help="perp")
    p.add_argument("--train", default="norms,biases,masklora", help="norms,biases,masklora,scalelora")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-4)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default 10%% of --steps)")
    p.add_argument("--schedule", default="cosine", help="cosine | linear | constant")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--no-grad-checkpointing", action="store_true")
    p.add_argument("--mixed-precision", default="no", help="no | bf16 | fp16 (GPU)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16: the weights while training "
                   "(default: the dtype the source was compressed in); bfloat16 keeps an 8B model at ~16 GB")
    p.add_argument("--data", default="c4", help="c4 | wikitext2 | FILE")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--nsamples", type=int, default=None, help="training windows (default steps x batch x accum)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resident-gib", type=float, default=None,
                   help="GiB of weights each --device keeps while training (default: what fits beside a step's "
                        "activations); the blocks beyond stream from CPU memory (a 70B model on one GPU)")
    p.add_argument("--onload", default="auto", choices=["auto", "blocks", "whole"],
                   help="blocks: each tensor read from disk straight onto the device it trains on (or into CPU "
                        "memory when its block streams) and the new folder written block by block; whole: the "
                        "model loaded into CPU memory first; auto: blocks when training on a GPU and the "
                        "folder allows")
    p.add_argument("--checkpoint-every", default="600", metavar="SECONDS",
                   help="commit the training's state (trained tensors, AdamW's, the steps done) every SECONDS "
                        "(0: after every step; off: none): rerunning the command of a run that was killed goes on "
                        "from its last one (default 600)")
    _add_eval_flags(p)
    p.set_defaults(func=cmd_recover)


def _add_task_flags(p):
    p.add_argument("--tasks", default="", help="zero-shot tasks of the saved output through lm-eval, e.g. "
                                               "boolq,rte,winogrande,arc_easy,arc_challenge,openbookqa,piqa")
    p.add_argument("--tasks-limit", type=int, default=None, help="the first N examples of each task (default all)")


def _add_eval_flags(p):
    p.add_argument("--eval", default="", help="perplexity datasets before and after, e.g. wikitext2")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=None)
    _add_task_flags(p)
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def cmd_recover(a) -> int:
    from . import api

    evals, train = _datasets(a.eval), tuple(x for x in a.train.split(",") if x)
    _unread(a, (_eval_rules(a, evals),
                (("rank",), "masklora" in train, f"with --train {a.train} (the rank is MaskLoRA's)",
                 "add masklora to --train or drop {this}"), _token_file_rule(a.data, "--data")))
    opts = dict(method=a.method, train=train, rank=a.rank, steps=a.steps,
                batch_size=a.batch, grad_accum=a.grad_accum, warmup=a.warmup, schedule=a.schedule,
                weight_decay=a.weight_decay, grad_checkpointing=not a.no_grad_checkpointing,
                mixed_precision=a.mixed_precision, seed=a.seed, resident_gib=a.resident_gib)
    if a.lr is not None:
        opts["lr"] = a.lr
    m = api.recover(a.src, a.out, data=a.data, seqlen=a.seqlen, nsamples=a.nsamples,
                    eval=evals, eval_seqlen=a.eval_seqlen,
                    eval_windows=a.eval_windows, device=a.device, overwrite=a.overwrite,
                    progress=not a.no_progress, command=a.command_line, dtype=a.dtype, tasks=_tasks(a),
                    tasks_limit=a.tasks_limit, onload=a.onload,
                    checkpoint_s=_seconds_or_off(a.checkpoint_every, "--checkpoint-every"), **opts)
    if m["out"] is None:
        return _replica_done(m)
    r = m["recover"]
    print(f"\nsaved {m['out']}  (PERP {r['steps']} steps, {r['n_trainable']:,} trainable = {100 * r['fraction']:.3f}%,"
          f" {r['wall_s']:.0f}s, zeros unchanged: {r['zeros_unchanged']})")
    if m.get("resumed"):
        print(_resumed(m["resumed"]))
    pl = r.get("placement") or {}
    if pl.get("streamed_blocks"):
        n = pl["streamed_blocks"] + sum(pl["resident_blocks"].values())
        print(f"{pl['streamed_blocks']} of {n} blocks streamed from CPU memory ({pl['streamed_gb']:.1f} GB copied to "
              f"{pl['devices'][-1]}); resident: " + ", ".join(f"{d} {k}" for d, k in pl["resident_blocks"].items()))
    ev = m.get("eval", {})
    for d, x in ev.items():
        print(f"{d}: ppl {x['before_recover_ppl']:.3f} -> {x['ppl']:.3f}"
              + (f" (dense {x['dense_ppl']:.3f})" if "dense_ppl" in x else "")
              + f"  [{x['seqlen']}-token windows x {x['windows']}, {x.get('dtype')}]")
    print_zeroshot(m.get("zeroshot") or {})
    return 0


CALIB_HELP = ("GPTQ's calibration (default: the source's compress protocol's, cpu 64 x 512, paper 128 x 2048; a "
              "folder from before it was recorded: paper on CUDA, cpu on the CPU)")
GRIDS = ("auto", "sym", "asym")
GRID_HELP = "int4 grid: sym (zero point 8), asym (a zero point per group), auto (w4g128 asym, w4s24/w4s50 sym)"


def _add_gptq_args(g) -> None:
    g.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: quantize columns by decreasing Hessian diagonal (default on)")
    g.add_argument("--sink-weight", type=float, default=None,
                   help="GPTQ: times each calibration window's first token counts in the Hessian (default 16; 1 = paper)")
    g.add_argument("--tune-steps", type=int, default=None,
                   help="after GPTQ, train the int4 scales end to end for this many steps of 2 calibration windows, "
                        "to match the unquantized model (default 0: off; 64 in the README)")
    g.add_argument("--tune-lr", type=float, default=None, help="scale tuning: Adam step, relative (default 1e-3)")


def _add_hessian_gib(g, who: str = "SparseGPT, ALPS, GPTQ") -> None:
    g.add_argument("--hessian-gib", type=float, default=None, metavar="GIB",
                   help=f"GiB of Hessians ({who}) held at once: beyond it a block's linears (mostly a Mixture-of-"
                        "Experts block's experts) are collected and solved a run at a time, to the same weights "
                        "(default: a quarter of the solving devices' memory, RAM on the CPU)")


def _gptq_opts(a) -> dict:
    """The GPTQ flags that were given (the others keep GPTQConfig's defaults)."""
    given = {"act_order": a.act_order, "sink_weight": a.sink_weight, "tune_steps": a.tune_steps, "tune_lr": a.tune_lr}
    return {k: v for k, v in given.items() if v is not None}


def _add_pack(sub):
    p = sub.add_parser("pack", help="pack a pruned output into a smaller format (sparse24, w4g128, w4s24, w4s50)")
    p.add_argument("src")
    p.add_argument("--format", required=True, help="sparse24 | w4g128 | w4s24 | w4s50")
    p.add_argument("--quant", default=None, help="rtn | gptq (int4 formats; default rtn)")
    p.add_argument("--group-size", default="auto", help="int4 scale group: 128, 64, ... or auto (largest that divides)")
    p.add_argument("--grid", default="auto", choices=GRIDS, help=GRID_HELP)
    _add_gptq_args(p)
    p.add_argument("--save-dtype", default="float16", help="floats are stored in float16 | bfloat16 | float32")
    p.add_argument("--out", required=True)
    p.add_argument("--calib", default="c4")
    p.add_argument("--nsamples", type=int, default=None, help=CALIB_HELP)
    p.add_argument("--seqlen", type=int, default=None, help=CALIB_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", default="none", help="perplexity of the packed folder as saved: wikitext2,c4 or none")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=None, help="windows evaluated (default all)")
    _add_task_flags(p)
    p.add_argument("--device", default=None)
    _add_hessian_gib(p, "GPTQ")
    p.add_argument("--checkpoint-every", default="600", metavar="SECONDS",
                   help="while packing block by block (and while the scales train, --tune-steps), commit a "
                        "checkpoint every SECONDS (0: after every block, or every step; off: "
                        "none): rerunning the command of a run that was killed goes on from its last one "
                        "(default 600)")
    p.add_argument("--onload", default="auto", choices=["auto", "blocks", "whole"],
                   help="blocks: the source stays on disk and is packed one decoder block at a time (scale "
                        "tuning reads it to where it trains); whole: in memory; auto: blocks where the folder "
                        "allows it")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_pack)


def cmd_pack(a) -> int:
    from . import api

    gs = _group_size(a.group_size)
    _unread(a, (*_int4_rules(a.format), _calib_rule(a.quant == "gptq"), _token_file_rule(a.calib),
                _eval_rules(a, _datasets(a.eval)), _whole_rule(a.onload)))
    m = api.pack(a.src, a.out, a.format, a.quant, gs, a.calib, a.nsamples, a.seqlen, a.seed, a.overwrite,
                 progress=not a.no_progress, command=a.command_line, save_dtype=a.save_dtype, grid=a.grid,
                 gptq=_gptq_opts(a), eval=_datasets(a.eval), eval_seqlen=a.eval_seqlen, eval_windows=a.eval_windows,
                 device=a.device, onload=a.onload, tasks=_tasks(a), tasks_limit=a.tasks_limit,
                 checkpoint_s=_seconds_or_off(a.checkpoint_every, "--checkpoint-every"), hessian_gib=a.hessian_gib)
    if m.get("resumed"):
        print(_resumed(m["resumed"]))
    print_format(m)
    print_eval(m.get("eval", {}))
    print_zeroshot(m.get("zeroshot") or {})
    return 0


def _tasks(a) -> tuple[str, ...]:
    """--tasks "a,b" as the API takes it."""
    return tuple(x for x in a.tasks.split(",") if x)


def print_format(m: dict) -> None:
    f = m["format"]
    layers = f.get("layers", {})
    packed = sum(x["bytes"] for x in layers.values())
    dense = sum(x["dense_bytes"] for x in layers.values())
    print(f"saved {m['out']}  format {f['name']}" + (f" ({f.get('quant')})" if f.get("quant") else ""))
    if dense:
        print(f"packed linears: {len(layers)}, {packed / 2**20:.1f} MiB vs {dense / 2**20:.1f} MiB as fp16 "
              f"({packed / dense:.3f}x); left dense: {len(f.get('left_dense', {}))}")
    if f.get("stored_zeros") is not None:
        sp = (m.get("sparsity") or {}).get("measured")
        print(f"weights stored as zero in the packed linears: {f['stored_zeros']:.4f}"
              + (f" (pruning mask {sp:.4f})" if sp is not None else ""))
    t = (f.get("quant_options") or {}).get("tune")
    if t:
        print(f"scales tuned {t['steps']} steps ({t['seconds']:.0f}s): KL to the unquantized model {t['kl_before']:.4g} -> "
              f"{t['kl_after']:.4g}, " + ("tuned scales kept" if t["kept"] == "tuned" else "no gain: GPTQ's scales kept"))


def _add_export(sub):
    p = sub.add_parser("export", help="write an output for another engine: compressed-tensors (vLLM, SGLang) or "
                                      "GGUF (llama.cpp, Ollama)")
    p.add_argument("src", help="an llmprune output folder")
    p.add_argument("--to", required=True, choices=["compressed-tensors", "gguf"])
    p.add_argument("--out", default=None, help="output folder (default: SRC-<target>)")
    p.add_argument("--type", default=None, help="gguf: f32,f16 (default),bf16,q8_0,q4_0,q4_1,q5_0,q5_1 (comma list: "
                                               "one file each)")
    g = p.add_argument_group("an unquantized output (dense, sparse24) quantized to int4 on export: compressed-tensors, "
                             "or GGUF's block types holding GPTQ's codes")
    g.add_argument("--quant", default=None, help="rtn (default) | gptq; gguf: gptq")
    g.add_argument("--group-size", default="auto", help="128, 64, 32 or auto (compressed-tensors: the largest that "
                                                        "divides each layer; gguf: 32)")
    g.add_argument("--grid", default="auto", choices=GRIDS, help="int4 grid (auto: sym, compressed-tensors' W4A16 "
                                                                 "and the grid Q4_0 holds)")
    _add_gptq_args(g)
    g.add_argument("--calib", default="c4")
    g.add_argument("--nsamples", type=int, default=None, help=CALIB_HELP)
    g.add_argument("--seqlen", type=int, default=None, help=CALIB_HELP)
    g.add_argument("--seed", type=int, default=0)
    _add_hessian_gib(g, "GPTQ")
    g.add_argument("--checkpoint-every", default="600", metavar="SECONDS",
                   help="GPTQ's pass (and its scale tuning) commits a checkpoint every SECONDS (0: after every block, "
                        "or every step; off: none): rerunning the command of a run that was "
                        "killed goes on from its last one (default 600)")
    p.add_argument("--save-dtype", default="float16", help="compressed-tensors: the unquantized tensors' dtype")
    p.add_argument("--eval", default="none", help="perplexity of the export read back by transformers: wikitext2,c4")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_export)


def cmd_export(a) -> int:
    from . import export

    gs = _group_size(a.group_size)
    ct, gptq = a.to == "compressed-tensors", a.quant == "gptq"
    _unread(a, (_needs(("type",), a.to == "gguf", "--to gguf"),
                (("save_dtype", "checkpoint_every"), ct, "with --to gguf",
                 "drop {this}: compressed-tensors exports read it (a GGUF file is written in one go)"),
                (("group_size", "grid", *GPTQ_FLAGS), ct or a.quant, "with --to gguf without --quant gptq",
                 "add --quant gptq (GPTQ's int4 codes in the block types) or drop {this}"),
                _calib_rule(gptq), _needs(("checkpoint_every",), gptq, "--quant gptq"),
                _token_file_rule(a.calib),
                _eval_rules(a, _datasets(a.eval))))
    m = export.export(a.src, a.to, a.out, quant=a.quant, group_size=gs, grid=a.grid, types=a.type,
                      save_dtype=a.save_dtype, calib=a.calib, nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed,
                      gptq=_gptq_opts(a), eval=_datasets(a.eval), eval_seqlen=a.eval_seqlen,
                      eval_windows=a.eval_windows, device=a.device, overwrite=a.overwrite,
                      progress=not a.no_progress, command=a.command_line, hessian_gib=a.hessian_gib,
                      checkpoint_s=_seconds_or_off(a.checkpoint_every, "--checkpoint-every"))
    if m.get("resumed"):
        print(_resumed(m["resumed"]))
    print_export(m)
    print_eval(m.get("eval", {}))
    return 0


def print_export(m: dict) -> None:
    e = m["export"]
    sizes = e["bytes"] if isinstance(e["bytes"], dict) else {e["files"][0]: e["bytes"]}
    print(f"exported {m['out']}  ({e['to']}, from {e['source_format']})")
    for f, b in sizes.items():
        print(f"  {f}  {b / 2**20:.1f} MiB")
    q = e.get("quant")
    if q:  # (an unquantized source quantized on export)
        g = q["group_size"]
        print(f"  quantized on export: {q['quant'].upper()}, int4 groups of "
              f"{g if g != 'auto' else 'the largest size dividing each layer'}, "
              f"{'symmetric' if q['symmetric'] else 'asymmetric'} grid")
    for t, c in e.get("int4_codes", {}).items():  # (GGUF Q4 of an int4 output: its own codes, or quantized again)
        hint = "; an asymmetric grid: --type q5_0 keeps its codes exactly" if t == "q4_0" else ""
        again = (f", {c['requantized']} quantized again by gguf from their weights (their grid or layout does not "
                 f"fit {t.upper()}'s blocks{hint})" if c["requantized"] else "")
        print(f"  int4 codes: {t.upper()} holds {c['kept']} int4 tensors' own codes{again}")
    if e.get("note"):
        print(f"  note: {e['note']}")


def _add_push(sub):
    p = sub.add_parser("push", help="upload an output folder to the Hugging Face Hub with a model card")
    p.add_argument("src")
    p.add_argument("--repo", required=True, help="user/name")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None, help="branch to push to")
    p.add_argument("--token-env", default=None, help="read the token from this environment variable")
    p.add_argument("--message", default=None, help="commit message")
    p.set_defaults(func=cmd_push)


def cmd_push(a) -> int:
    from . import hub

    token = hub.token_from_env(a.token_env) if a.token_env else None
    url = hub.push(a.src, a.repo, private=a.private, revision=a.revision, token=token, commit_message=a.message)
    print(f"pushed {a.src} to {url}")
    return 0


def _add_bench(sub):
    p = sub.add_parser("bench", help="decode benchmark, dense vs compressed (see `llmprune bench -h`)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: __import__("llmprune.bench", fromlist=["main"]).main(a.rest))


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .errors import ArgumentParser

    p = ArgumentParser(prog="llmprune", description="Post-training compression for LLMs.")
    p.add_argument("--version", action="version", version=f"llmprune {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_compress(sub)
    _add_eval(sub)
    _add_recover(sub)
    _add_pack(sub)
    _add_export(sub)
    _add_push(sub)
    _add_bench(sub)
    _add_sweep(sub)
    _add_report(sub)
    return p


STOPS = (signal.SIGINT, signal.SIGTERM)


def _stopped(signum, frame):
    """Ctrl-C (KeyboardInterrupt) or SIGTERM (errors.Terminated): stop, once. Both are ignored from then on, so that
    another (a second Ctrl-C, a third) cuts short neither the clean-up (a checkpoint being kept) nor the exit (an
    atexit callback's traceback): the run ends with its one line."""
    from .errors import Terminated

    for s in STOPS:
        signal.signal(s, signal.SIG_IGN)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # avoids a 2-3x slowdown of forwards after tokenizing
    program = argv is None  # the process's own command line: it exits when this returns
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # bench parses its own flags; argparse's REMAINDER drops a leading "-h" / "--x"
        args = argparse.Namespace(func=lambda a: __import__("llmprune.bench", fromlist=["main"]).main(argv[1:]))
    else:
        args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    from .errors import LLMPruneError, Terminated

    hf_logging.disable_progress_bar()  # our own bars say what is happening; theirs repeat per load
    hf_logging.set_verbosity_error()
    args.command_line = shlex.join(["llmprune", *argv])

    import torch

    main_thread = threading.current_thread() is threading.main_thread()  # (signal handlers are set only there)
    before = {s: signal.getsignal(s) for s in STOPS} if main_thread else {}
    for s, handler in before.items():
        if handler != signal.SIG_IGN:  # (a background job started with Ctrl-C ignored keeps ignoring it)
            signal.signal(s, _stopped)
    try:
        from .placement import check_one_process

        cmd = argv[0] if argv else ""  # (before any work: every process would write the same output)
        check_one_process(cmd, cmd in ("recover", "compress"))  # (compress's plan checks its --recover)
        return args.func(args)
    except LLMPruneError as e:
        print(f"llmprune: error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as e:  # one line, not a traceback; outputs are written to a temp folder first
        first = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
        print(f"llmprune: error: {first[:200]} -- free the device, lower --batch / --batch-size / --nsamples, "
              f"or use --device cpu; no output was written", file=sys.stderr)
        return 2
    except Terminated:  # (errors.py)
        print("llmprune: terminated (SIGTERM); the output being written was not", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("llmprune: interrupted; the output being written was not", file=sys.stderr)
        return 130
    finally:
        # stopped (_stopped ran), the program keeps ignoring them while it exits; a caller in this process gets its
        # handlers back
        stopped = any(signal.getsignal(s) == signal.SIG_IGN and h != signal.SIG_IGN for s, h in before.items())
        if not (program and stopped):
            for s, handler in before.items():
                signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
