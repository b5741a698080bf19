"""Compression time of a synthetic OLMoE-shaped Mixture-of-Experts model (random weights): no real
MoE checkpoint is available offline, so this times the engine, not quality.

    PYTHONPATH=. python bench/moe_synthetic.py [--out bench/results/moe_synthetic.json]

The model: transformers' OlmoeConfig at OLMoE-1B-7B's proportions scaled down (hidden 512, 4
blocks, 32 experts of width 256, 8 per token, 8 heads), random N(0, 0.02) weights; calibration:
16 random-token windows of 256 (4096 tokens: 1024 expert slots per expert on average per block).
For Wanda and SparseGPT, unstructured 50% and 2:4: wall time of prune.prune (forward and solve
split), how many experts fell back (fewer than 64 routed tokens), the measured sparsity.
"""
import argparse
import json
import platform
import sys
import time

import torch

from llmprune import patterns, prune
from llmprune.solvers import get


def model():
    from transformers import AutoModelForCausalLM, OlmoeConfig

    cfg = OlmoeConfig(vocab_size=1024, hidden_size=512, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, num_experts=32, num_experts_per_tok=8,
                      max_position_embeddings=512)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/moe_synthetic.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    calib = torch.randint(0, 1024, (16, 256), generator=torch.Generator().manual_seed(0))
    rows = []
    for solver in ("wanda", "sparsegpt"):
        for pat in ("unstructured", "2:4"):
            m = model()
            names = prune.target_linears(m)
            t0 = time.perf_counter()
            res = prune.prune(m, get(solver), patterns.parse(pat), {n: 0.5 for n in names}, calib, batch_size=4,
                              progress=False)
            wall = time.perf_counter() - t0
            ex = res["experts"]
            rows.append({"solver": solver, "pattern": pat, "wall_s": round(wall, 2), **res["timings"],
                         "targets": len(names), "experts": len(ex),
                         "fell_back": sum(e["stats"] != "routed" for e in ex.values()),
                         "min_routed_tokens": min(e["tokens"] for e in ex.values()),
                         "measured_sparsity": prune.measured_sparsity(m, names)})
            print(json.dumps(rows[-1]), flush=True)
    doc = {"command": "PYTHONPATH=. python " + " ".join(sys.argv), "torch_threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "model": "OlmoeConfig hidden 512, 4 blocks, 32 experts x 256, top-8, random weights",
           "calibration": "16 x 256 random tokens", "rows": rows}
    with open(a.out, "w") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")


if __name__ == "__main__":
    main()
