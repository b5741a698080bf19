"""Layer-level errors at 70%: SparseGPT, DSnoT(SparseGPT), Wanda, DSnoT(Wanda) on SmolLM2-135M (issue 3).

    python bench/layer_errors.py     (about 4 minutes on one core; output: bench/results/layer_errors.txt)

For 12 linears (blocks 2, 10, 20: q_proj, v_proj, up_proj, down_proj), each solver prunes the
weight to 70% from C4 32 x 512 (seed 0) statistics of the DENSE model's inputs (not sequential:
the same inputs for every solver), and prints: `calib` the reconstruction error
E||(W - W')x||^2 summed over outputs on the calibration statistics (H/2); `hold` the same on
held-out C4 (8 x 512, seed 777) tokens other than each window's first; `first` the relative error
||(W - W')x||^2 / ||Wx||^2 on the first token of each held-out window (the attention sink);
`swaps` DSnoT's accepted swaps.
"""
import torch

from llmprune import calibration, models, patterns
from llmprune.solvers import get
from llmprune.stats import LayerStats

m, tok, _ = models.load("llama"); m.eval()
layers = [f"model.layers.{i}.{p}" for i in (2, 10, 20) for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")]
calib, _ = calibration.load("c4", tok, 32, 512, 0)
hold, _ = calibration.load("c4", tok, 8, 512, 777)
st = {n: LayerStats(m.get_submodule(n).in_features, {"hessian", "moments", "norms"}) for n in layers}
hk = [m.get_submodule(n).register_forward_pre_hook(lambda mod, a, n=n: st[n].add(a[0].detach())) for n in layers]
with torch.no_grad():
    for b in calib.split(4): m(b)
for h in hk: h.remove()
X = {}
hk = [m.get_submodule(n).register_forward_pre_hook(lambda mod, a, n=n: X.setdefault(n, a[0].detach())) for n in layers]
with torch.no_grad(): m(hold)
for h in hk: h.remove()
p = patterns.parse("unstructured")
for n in layers:
    W = m.get_submodule(n).weight.detach().float()
    x = X[n]; y = (x @ W.T).pow(2).sum(-1)
    Hc = st[n].hessian
    out = []
    for lab, s in (("sgpt", get("sparsegpt").fn(W, st[n], p, 0.7)), ("dsnot", get("dsnot").fn(W, st[n], p, 0.7, init="sparsegpt")), ("wanda", get("wanda").fn(W, st[n], p, 0.7)), ("dsnot-w", get("dsnot").fn(W, st[n], p, 0.7, init="wanda"))):
        D = (W - s.weight.float())
        e = (x @ D.T).pow(2).sum(-1)
        calib_err = float(torch.einsum("oi,ij,oj->", D.double(), Hc.double(), D.double()) / 2)
        out.append(f"{lab}: calib {calib_err:.4g} hold {e[:,1:].mean():.4g} first {(e[:,0]/y[:,0]).mean():.3f} swaps {s.info.get('dsnot_swaps','-')}")
    print(n.replace("model.layers.", "L"), " | ".join(out), flush=True)
