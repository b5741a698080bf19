"""DSnoT's rules on single linears of SmolLM2-135M at 70% from Wanda's mask: what each rule does to the
mean error it targets and to the squared reconstruction error.

    python bench/dsnot_layers.py     (a few minutes on one core; output: bench/results/dsnot_layers.txt)

For the attention linears of blocks 2, 10, 20 (the reference skips the MLP), statistics of the DENSE
model's inputs (C4 32 x 512, seed 0). Per rule set: the relative squared error
(W - W') H (W - W')^T / W H W^T, the mean |eps| per row on the reference's per-sequence scale (what
DSnoT drives below update_threshold 0.1), and the swaps accepted. `ref`: the reference's rules
(zyxxmu/DSnoT 4c029df: no sign rule for unstructured); `sign`: + the first release's sign rule;
`lower`: + our lower_error check. `allvar`: `ref` with Var(x_j) over all tokens (what llmprune used before it
took the reference's within-sequence variance); `t2048`: `ref` with update_threshold 0.1 x 512/2048, the
reference's tolerance per token with its 2048-token sequences; `c7`: `ref` with max_cycles 7 = 50 x 576/4096,
the share of a row the reference may swap on LLaMA-7B's 4096 inputs. `mean share`: the part of Wanda's squared
error that is the mean term sum_i eps_i^2 (the only part DSnoT's criteria see; the rest is d Cov d^T).
"""
import torch

from llmprune import calibration, models, patterns
from llmprune.solvers import get
from llmprune.stats import LayerStats

torch.set_num_threads(1)
m, tok, _ = models.load("llama")
m.eval()
layers = [f"model.layers.{i}.self_attn.{p}" for i in (2, 10, 20) for p in ("q_proj", "v_proj", "o_proj")]
calib, _ = calibration.load("c4", tok, 64, 512, 0)
calib = calib[:32]
st = {n: LayerStats(m.get_submodule(n).in_features, {"moments", "norms", "hessian"}) for n in layers}
hk = [m.get_submodule(n).register_forward_pre_hook(lambda mod, a, n=n: st[n].add(a[0].detach())) for n in layers]
with torch.no_grad():
    for b in calib.split(8):
        m(b)
for h in hk:
    h.remove()


class AllTokenVar:
    """The statistics with Var(x_j) over all tokens in place of the within-sequence variance."""

    def __init__(self, s):
        self.s = s

    def __getattr__(self, k):
        return self.s.var if k == "seq_var" else getattr(self.s, k)


def mean_share(w, w2, s):
    h, mu, d = s.hessian.double() / 2, s.mean.double(), (w - w2).double()
    return float((d @ mu).pow(2).sum() / ((d @ h) * d).sum())


def errs(w, w2, s):
    """(relative squared error, mean |eps| per row on the per-sequence scale)"""
    h, mu, d = s.hessian.double(), s.mean.double(), (w - w2).double()
    sq = float(((d @ h) * d).sum() / ((w.double() @ h) * w.double()).sum())
    return sq, float((d @ mu).abs().mean() * s.n / s.n_seqs)


p = patterns.parse("unstructured")
for n in layers:
    w, s = m.get_submodule(n).weight.detach().float(), st[n]
    e, ep = errs(w, get("wanda").fn(w, s, p, 0.7).weight, s)
    out = [f"wanda {e:.4f} |eps| {ep:.3f} mean share {mean_share(w, get('wanda').fn(w, s, p, 0.7).weight, s):.3f}"]
    for lab, kw in (("ref", {}), ("allvar", {}), ("t2048", {"update_threshold": 0.1 * 512 / 2048}), ("c7", {"max_cycles": 7}),
                    ("sign", {"same_sign": True}), ("lower", {"lower_error": True})):
        r = get("dsnot").fn(w, AllTokenVar(s) if lab == "allvar" else s, p, 0.7, init="wanda", **kw)
        e, ep = errs(w, r.weight, s)
        out.append(f"{lab} {e:.4f} |eps| {ep:.3f} sw {r.info['dsnot_swaps']}")
    print(n.replace("model.layers.", "L"), " | ".join(out), flush=True)
