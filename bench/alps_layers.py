"""ALPS against SparseGPT layer by layer on SmolLM2-135M: reconstruction error and solve time.

    python bench/alps_layers.py     (a few minutes on 2 cores; output: bench/results/alps_layers.txt)

For the seven linears of blocks 2, 10 and 20, both solvers prune the same weight from the same
statistics: C4 64 x 512 (seed 0, the P-cpu calibration) inputs of the DENSE model (not sequential).
Printed per pattern: the relative error (W - W') H (W - W')^T / W H W^T of each solver (H = X^T X,
undamped), their ratio, ALPS's iterations and final rho, and the solve seconds of each.
"""
import time

import torch

from llmprune import calibration, models, patterns
from llmprune.solvers import get
from llmprune.stats import LayerStats

m, tok, _ = models.load("llama")
m.eval()
parts = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
         "mlp.down_proj")
layers = [f"model.layers.{i}.{p}" for i in (2, 10, 20) for p in parts]
calib, _ = calibration.load("c4", tok, 64, 512, 0)
st = {n: LayerStats(m.get_submodule(n).in_features, {"hessian"}) for n in layers}
hk = [m.get_submodule(n).register_forward_pre_hook(lambda mod, a, n=n: st[n].add(a[0].detach())) for n in layers]
with torch.no_grad():
    for b in calib.split(8):
        m(b)
for h in hk:
    h.remove()


def rel_err(w, w2, h):
    d = (w - w2).double()
    return float(((d @ h) * d).sum() / ((w.double() @ h) * w.double()).sum())


for spec, s in (("2:4", 0.5), ("unstructured", 0.5), ("unstructured", 0.7)):
    p = patterns.parse(spec)
    print(f"\n## {spec} {s}", flush=True)
    tot = {"sparsegpt": 0.0, "alps": 0.0}
    ratios = []
    for n in layers:
        w = m.get_submodule(n).weight.detach().float()
        h = st[n].hessian.double()
        res = {}
        for name in ("sparsegpt", "alps"):
            t0 = time.perf_counter()
            r = get(name).fn(w, st[n], p, s)
            res[name] = (rel_err(w, r.weight, h), time.perf_counter() - t0, r.info)
            tot[name] += res[name][1]
        (es, ts, _), (ea, ta, info) = res["sparsegpt"], res["alps"]
        ratios.append(ea / es)
        print(f"{n.replace('model.layers.', 'L'):<22} sparsegpt {es:.4f} ({ts:.2f}s)  alps {ea:.4f} ({ta:.2f}s, "
              f"{info['alps_iters']} it, rho {info['alps_rho']:.3g})  alps/sparsegpt {ea / es:.3f}", flush=True)
    g = torch.tensor(ratios).log().mean().exp()
    print(f"geomean alps/sparsegpt error {g:.3f}; solve s: sparsegpt {tot['sparsegpt']:.1f}, alps {tot['alps']:.1f}",
          flush=True)
