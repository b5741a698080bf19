"""Which int4 grid keeps a 2:4-pruned model closest to its unquantized perplexity? (issue 6)

Quantizes the pruned linears of a dense llmprune output IN MEMORY (dequantized weights put back in
place, the same codes the w4s24 / w4g128 formats pack) and measures WikiText-2 ppl under P-cpu
(C4 64 x 512 seed 0 calibration, or --nsamples N windows of 512; 16 windows of 2048), one
configuration after another:

    python bench/quant_ablation.py runs/llama-sparsegpt-24 \
        --configs rtn:sym:auto,gptq:sym:auto,gptq:asym:64,gptq:sym:64:seq,gptq:asym:64:seq

A config is quantizer:grid:group[:seq][:act][:sinkW]. `seq` is llmprune's GPTQ pass
(quant.sequential.gptq_sequential, what `--quant gptq` runs): block by block, each block's Hessian from
inputs that went through the quantized blocks before it; without it every Hessian comes from the
unquantized pruned model. `act`: act-order (static groups); `sinkW`: each calibration window's first
token counts W times in the Hessian (default 1, the paper; `--quant gptq` runs seq:act:sink16).
Run on a 2:4 model (the w4s24 layout). Prints one line per config; --json keeps the rows of
configs already in the file and adds or replaces the ones run now.
"""
from __future__ import annotations

import argparse
import json
import time


def quantize_layer(w, keep, quant, sym, group, hessian, act_order=False):
    from llmprune.formats import auto_group
    from llmprune.quant.gptq import gptq
    from llmprune.quant.rtn import rtn

    g = auto_group(w.shape[1]) if group == "auto" else int(group)
    if quant == "gptq":
        return gptq(w.float() * keep, hessian, keep, g, sym, act_order=act_order).dequantize()
    return rtn(w.float() * keep, keep, g, sym).dequantize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src")
    ap.add_argument("--configs", default="rtn:sym:auto,gptq:sym:auto,gptq:asym:64,gptq:asym:64:seq")
    ap.add_argument("--json")
    ap.add_argument("--nsamples", type=int, default=64, help="calibration windows of 512 (P-cpu: 64); rows get ' nN' otherwise")
    a = ap.parse_args(argv)

    from llmprune import calibration, checkpoint, prune
    from llmprune.eval.perplexity import perplexity
    from llmprune.quant.gptq import collect_hessians
    from llmprune.quant.sequential import gptq_sequential

    model, tok, _ = checkpoint.load(a.src)
    names = prune.target_linears(model)
    # fp16 weights first: the packed formats start from them
    orig = {n: model.get_submodule(n).weight.detach().half().float().clone() for n in names}
    keeps = {n: w != 0 for n, w in orig.items()}
    ids, _ = calibration.load("c4", tok, a.nsamples, 512, 0)
    tag = "" if a.nsamples == 64 else f" n{a.nsamples}"
    t0 = time.perf_counter()
    hess = {}  # sink weight -> Hessians of the unquantized model
    rows = []

    def ppl():
        return perplexity(model, tok, "wikitext2", 2048, 16, progress=False)["ppl"]

    def restore():
        for n in names:
            model.get_submodule(n).weight.data.copy_(orig[n])

    restore()
    rows.append({"config": "unquantized (fp16 weights)", "ppl": ppl()})
    print(f"{rows[-1]['config']:28s} ppl {rows[-1]['ppl']:.3f}", flush=True)
    for spec in a.configs.split(","):
        quant, grid, group, *flags = spec.split(":")
        sym, seq, act = grid == "sym", "seq" in flags, "act" in flags
        sink = next((float(x[4:]) for x in flags if x.startswith("sink")), 1.0)
        assert quant == "gptq" or not (seq or act or sink != 1), "seq, act and sink are GPTQ options"
        t = time.perf_counter()
        restore()
        if seq:  # llmprune's own GPTQ pass: block by block, each block after the quantized ones
            gptq_sequential(model, ids, "w4s24", "auto" if group == "auto" else int(group), sym, dtype=None,
                            act_order=act, sink_weight=sink)
        else:
            if quant == "gptq" and sink not in hess:
                th = time.perf_counter()  # one pass of the model as it is
                hess[sink] = collect_hessians(model, names, list(ids.split(8)), sink_weight=sink)
                print(f"hessians {time.perf_counter() - th:.0f}s", flush=True)
            for n in names:
                model.get_submodule(n).weight.data.copy_(quantize_layer(
                    orig[n], keeps[n], quant, sym, group, hess[sink][n] if quant == "gptq" else None, act))
        assert all(bool((model.get_submodule(n).weight[~keeps[n]] == 0).all()) for n in names), "zeros moved"
        rows.append({"config": spec + tag, "ppl": ppl(), "s": round(time.perf_counter() - t, 1)})
        print(f"{spec + tag:28s} ppl {rows[-1]['ppl']:.3f}  ({rows[-1]['s']}s)", flush=True)
    print(f"total {time.perf_counter() - t0:.0f}s")
    if a.json:
        from pathlib import Path

        old = json.loads(Path(a.json).read_text())["rows"] if Path(a.json).exists() else []
        new = {r["config"] for r in rows}
        with open(a.json, "w") as f:
            json.dump({"src": a.src, "rows": rows[:1] + [r for r in old[1:] if r["config"] not in new] + rows[1:]},
                      f, indent=1)


if __name__ == "__main__":
    main()
