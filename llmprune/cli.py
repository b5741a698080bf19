"""argv -> config -> api. No logic of its own beyond printing results."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys


def _float_or_none(s):
    return None if s in (None, "") else float(s)


def _add_compress(sub):
    p = sub.add_parser("compress", help="prune (or slice) a model, save it, evaluate it")
    p.add_argument("--model", default="llama", help="Hub id, local HF folder, .gguf file, or alias (llama, gemma3)")
    p.add_argument("--solver", default="wanda", help="magnitude | wanda | sparsegpt | dsnot | slicegpt")
    p.add_argument("--pattern", default="unstructured", help="unstructured | N:M (e.g. 2:4) | group:G")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of weights zeroed (default 0.5; N:M implies 1-N/M)")
    p.add_argument("--scope", default="layer", choices=["layer", "global"], help="magnitude: rank per layer or globally")
    p.add_argument("--ignore", default=None, help="regex of linear names to leave dense")
    g = p.add_argument_group("solver options")
    g.add_argument("--damp", type=float, default=None, help="SparseGPT/GPTQ Hessian dampening (fraction of mean diag)")
    g.add_argument("--blocksize", type=int, default=None, help="SparseGPT column block size")
    g.add_argument("--init", default=None, help="DSnoT initial mask: wanda | sparsegpt | magnitude")
    g.add_argument("--max-cycles", type=int, default=None, help="DSnoT grow/prune cycles")
    g.add_argument("--owl", action="store_true", help="OWL non-uniform layer-wise sparsity")
    g.add_argument("--owl-m", type=float, default=5.0, help="OWL outlier threshold M")
    g.add_argument("--owl-lambda", type=float, default=0.08, help="OWL sparsity range lambda")
    g = p.add_argument_group("SliceGPT")
    g.add_argument("--slicing", type=float, default=None, help="fraction of the hidden size removed")
    g.add_argument("--rotation", default="per-block", choices=["per-block", "shared"])
    g.add_argument("--round-to", type=int, default=8)
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", default="c4", help="c4 | wikitext2 | FILE (.txt .jsonl .parquet .safetensors)")
    g.add_argument("--nsamples", type=int, default=128)
    g.add_argument("--seqlen", type=int, default=2048)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--calib-batch", type=int, default=8, help="calibration samples pushed through a block at once")
    g = p.add_argument_group("output and evaluation")
    g.add_argument("--out", default=None, help="output folder (default: out/<model>-<solver>-<pattern>-<sparsity>)")
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--format", default="dense", help="dense | sparse24 | w4g128 | w4s24 | w4s50")
    g.add_argument("--quant", default=None, help="rtn | gptq (int4 formats)")
    g.add_argument("--eval", default="", help="perplexity datasets, e.g. wikitext2,c4")
    g.add_argument("--eval-seqlen", type=int, default=2048)
    g.add_argument("--eval-windows", type=int, default=None, help="number of windows (default: all)")
    g.add_argument("--no-dense-eval", action="store_true", help="skip measuring the dense model first")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    g.add_argument("--dtype", default="float32")
    g.add_argument("--recover", default=None, help="perp: retrain a tiny subset after pruning")
    g.add_argument("--recover-steps", type=int, default=200)
    g.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_compress)


def cmd_compress(a) -> int:
    from . import api
    from .config import CompressConfig

    opts = {k: v for k, v in {"damp": a.damp, "blocksize": a.blocksize, "init": a.init,
                              "max_cycles": a.max_cycles}.items() if v is not None}
    slicegpt = None
    if a.solver == "slicegpt" or a.slicing is not None:
        slicegpt = {"slicing": 0.25 if a.slicing is None else a.slicing, "rotation": a.rotation,
                    "round_to": a.round_to}
    cfg = CompressConfig(
        model=a.model, solver=a.solver, pattern=a.pattern, sparsity=a.sparsity, scope=a.scope, ignore=a.ignore,
        solver_opts=opts, owl={"m": a.owl_m, "lam": a.owl_lambda} if a.owl else None,
        calib=a.calib, nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed, calib_batch=a.calib_batch,
        device=a.device, dtype=a.dtype, out=a.out, overwrite=a.overwrite, progress=not a.no_progress,
        eval=tuple(x for x in a.eval.split(",") if x), eval_seqlen=a.eval_seqlen, eval_windows=a.eval_windows,
        eval_dense=not a.no_dense_eval, slicegpt=slicegpt, format=a.format, quant=a.quant,
        recover={"method": a.recover, "steps": a.recover_steps} if a.recover else None,
    )
    m = api.compress(cfg, command=a.command_line)
    print_summary(m)
    return 0


def print_summary(m: dict) -> None:
    sp = m.get("sparsity", {})
    what = m.get("solver", "?")
    if sp:
        what += f" {m.get('pattern')} target {sp['target']:.2f} measured {sp['measured']:.4f}"
    print(f"\nsaved {m['out']}  ({what})")
    t = m.get("timings", {})
    print(f"compress {t.get('compress_s', 0):.1f}s (forward {t.get('forward_s', 0):.1f}s, solve {t.get('solve_s', 0):.1f}s)"
          f"  total {t.get('total_s', 0):.1f}s  peak RSS {m.get('peak_rss_mib', 0):.0f} MiB")
    print_eval(m.get("eval", {}))


def print_eval(ev: dict) -> None:
    if not ev:
        return
    print(f"\n{'dataset':<10} {'seqlen':>6} {'windows':>7} {'tokens':>8} {'dense ppl':>10} {'ppl':>10}")
    for d, r in ev.items():
        dense = f"{r['dense_ppl']:.3f}" if "dense_ppl" in r else "-"
        print(f"{d:<10} {r['seqlen']:>6} {r['windows']:>7} {r['tokens']:>8} {dense:>10} {r['ppl']:>10.3f}")


def _add_eval(sub):
    p = sub.add_parser("eval", help="perplexity (and zero-shot tasks) of an output folder or a model")
    p.add_argument("target", help="an llmprune output folder, or anything --model accepts")
    p.add_argument("--ppl", default=None, help="perplexity datasets, e.g. wikitext2,c4 (default wikitext2 when no --tasks)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)


def cmd_eval(a) -> int:
    from . import api

    ppl = tuple(x for x in (a.ppl or "wikitext2").split(",") if x)
    res = api.evaluate(a.target, ppl, a.seqlen, a.windows, a.device, progress=not a.no_progress)
    print_eval(res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="llmprune", description="Post-training compression for LLMs.")
    p.add_argument("--version", action="version", version=f"llmprune {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_compress(sub)
    _add_eval(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # avoids a 2-3x slowdown of forwards after tokenizing
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    from .errors import LLMPruneError

    hf_logging.disable_progress_bar()  # our own bars say what is happening; theirs repeat per load
    hf_logging.set_verbosity_error()
    args.command_line = shlex.join(["llmprune", *(sys.argv[1:] if argv is None else argv)])

    try:
        return args.func(args)
    except LLMPruneError as e:
        print(f"llmprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmprune: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
