"""Why plain GPTQ loses to round-to-nearest on SmolLM2-135M: the attention-sink token (issue 6).

GPTQ minimizes each linear's mean squared output error over the calibration tokens. The first token
of a window (the attention sink: arXiv 2402.17762, 2403.01241) is 1 of 512 of them, so GPTQ moves
error onto it; every later token attends to it. Two measurements on the unpruned model, int4 with
`--group-size auto` (64, 128 for down_proj), asymmetric grid, weights dequantized in memory:

    python bench/gptq_sink.py tokens        # per-token relative error, first token vs the rest
    python bench/gptq_sink.py ppl rtn 1 1act 16 16act 64 64act 512
                                            # WikiText-2 ppl (6 windows of 2048) per variant

A ppl variant is `rtn` or GPTQ's sink weight W (each window's first token counts W times in the
Hessian; 1 = the paper) with an optional `act` suffix (act-order, static groups). Hessians: C4 32 x
512, seed 0, one pass of the unquantized model (not block-sequential, so each variant isolates the
Hessian and the column order). Output: one line per layer or variant. The figures in the README
(Formats) and bench/results/gptq_sink.txt were printed by the session's scratch versions of these
two loops, which computed the same quantities (the sink term added to a cached X^T X; H's scale
does not change GPTQ, whose dampening is relative to its diagonal).
"""
from __future__ import annotations

import sys

import torch

from llmprune.formats import auto_group  # --group-size auto: 64 for 576 inputs, 128 for down_proj's 1536


def setup():
    from llmprune import models, prune

    m, tok, _ = models.load("llama")
    m.eval()
    return m, tok, prune.target_linears(m)


def hessians(m, tok, names, sink: float, cache: dict) -> dict:
    from llmprune import calibration
    from llmprune.quant.gptq import collect_hessians

    if sink not in cache:
        ids, _ = calibration.load("c4", tok, 32, 512, 0)
        cache[sink] = collect_hessians(m, names, list(ids.split(4)), sink_weight=sink)
    return cache[sink]


@torch.no_grad()
def tokens():
    from llmprune import calibration
    from llmprune.quant.gptq import gptq
    from llmprune.quant.rtn import rtn

    m, tok, names = setup()
    probe = [f"model.layers.{i}.self_attn.{p}" for i in (1, 5, 15, 25) for p in ("k_proj", "q_proj", "v_proj")]
    H = hessians(m, tok, probe, 1.0, {})
    ids, _ = calibration.load("c4", tok, 4, 512, 777)  # held-out windows
    xs: dict = {}
    hooks = [m.get_submodule(n).register_forward_pre_hook(lambda mod, a, n=n: xs.setdefault(n, a[0].detach()))
             for n in probe]
    m(ids)
    for h in hooks:
        h.remove()
    for n in probe:
        x, w = xs[n], m.get_submodule(n).weight.float()  # x: (4, 512, in)
        y, g = (x @ w.T).pow(2).sum(-1), auto_group(w.shape[1])  # (4, 512)
        for label, q in (("rtn", rtn(w, group_size=g)), ("gptq", gptq(w, H[n], group_size=g))):
            e = (x @ (w - q.dequantize()).T).pow(2).sum(-1)
            print(f"{n.replace('model.layers.', 'L')} {label}: first token {(e[:, 0] / y[:, 0]).mean():.4f}, "
                  f"the rest {e[:, 1:].sum() / y[:, 1:].sum():.4f}", flush=True)


@torch.no_grad()
def ppl(variants: list[str]):
    from llmprune.eval.perplexity import perplexity
    from llmprune.quant.gptq import gptq
    from llmprune.quant.rtn import rtn

    m, tok, names = setup()
    orig = {n: m.get_submodule(n).weight.detach().float().clone() for n in names}
    cache: dict = {}
    print(f"dense {perplexity(m, tok, 'wikitext2', 2048, 6, progress=False)['ppl']:.3f}", flush=True)
    for v in variants:
        act = v.endswith("act")
        H = None if v == "rtn" else hessians(m, tok, names, float(v.removesuffix("act")), cache)
        for n in names:
            w, g = orig[n], auto_group(orig[n].shape[1])
            q = rtn(w, group_size=g) if H is None else gptq(w, H[n], group_size=g, act_order=act)
            m.get_submodule(n).weight.copy_(q.dequantize())
        print(f"{v} {perplexity(m, tok, 'wikitext2', 2048, 6, progress=False)['ppl']:.3f}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["tokens"]:
        tokens()
    elif sys.argv[1:2] == ["ppl"] and len(sys.argv) > 2:
        ppl(sys.argv[2:])
    else:
        sys.exit(__doc__)
