"""What a sequential (block-by-block) compression holds in memory, from a model's shape: the
arithmetic behind docs/scale.md's per-GPU guidance, checked against the 8B-shaped CPU runs.

    python bench/scale_estimate.py [--nsamples 128] [--seqlen 2048] [--gpu-gib 24,80]

Per decoder block, at its peak (llmprune/onload.py walks one block at a time):
  weights   the block in the compute dtype (bf16 on CUDA, fp32 on CPU)
  acts      the calibration activations, a block's inputs and outputs: 2 x N x S x hidden; kept on
            the GPU when they take <= 25% of it (walker.activation_home), else in CPU memory
  stats     SparseGPT / ALPS / GPTQ: fp32 Gram matrices of the linears solved together (llmprune/prune.py
            collects q,k,v -> o -> gate,up -> down one group at a time), the largest group: max(3 x
            hidden^2, intermediate^2); a Mixture-of-Experts block's experts: experts x hidden^2 (an
            expert's gate and up share one), experts x moe_intermediate^2 for the downs; a group over a
            quarter of the GPU is collected a run at a time within that quarter (walker.chunks). Wanda:
            one fp32 vector per input (negligible)
  solve     the largest linear in fp32 and the solver's copy of it (2 x hidden x intermediate), plus for
            SparseGPT the inverse-Hessian factor of the widest input (down_proj): computed inside its Gram
            matrix on the CPU (llmprune/linalg.py, LAPACK in place: nothing more), on a GPU by torch's chain
            (a working copy and the copy its LAPACK call makes: 2 x intermediate^2)
"""
from __future__ import annotations

import argparse
import sys

GIB = 2**30
MODELS = {  # hidden, intermediate, layers, heads, kv heads, vocab[, head dim, experts, expert width] (public configs)
    "Llama-3-8B": (4096, 14336, 32, 32, 8, 128256),
    "Qwen2.5-32B": (5120, 27648, 64, 40, 8, 152064),
    "Llama-3.3-70B": (8192, 28672, 80, 64, 8, 128256),
    "Qwen3-30B-A3B": (2048, 0, 48, 32, 4, 151936, 128, 128, 768),
    "Mixtral-8x7B": (4096, 0, 32, 32, 8, 32000, 128, 8, 14336),
    "Qwen3-235B-A22B": (4096, 0, 94, 64, 4, 151936, 128, 128, 1536),
}
STATS_SHARE = 0.25  # llmprune.walker.STATS_ON_DEVICE


def shape(h, i, layers, heads, kv, vocab, d=None, experts=0, mi=0):
    """(params of a block, its linears as (out, in), its solved groups as lists of Gram matrix sizes n)."""
    d = d or h // heads
    attn = [(heads * d, h), (kv * d, h), (kv * d, h), (h, heads * d)]
    if experts:
        mlp = [(mi, h), (mi, h), (h, mi)] * experts
        groups = [[h] * 3, [heads * d], [h] * experts, [mi] * experts]  # an expert's gate and up share one
    else:
        mlp = [(i, h), (i, h), (h, i)]
        groups = [[h] * 3, [heads * d], [h] * 2, [i]]
    return sum(o * n for o, n in attn + mlp), attn + mlp, groups


def block_params(h: int, i: int, heads: int, kv: int) -> int:
    return shape(h, i, 1, heads, kv, 0)[0]


def gram_bytes(groups, budget) -> int:
    """The most fp32 Gram matrices alive at once: a group's, or within `budget` when it is over (walker.chunks)."""
    worst = 0
    for g in groups:
        sizes = [4 * n * n for n in g]
        worst = max(worst, sum(sizes) if sum(sizes) <= budget else max(max(sizes), budget))
    return worst


def estimate(h, i, layers, heads, kv, vocab, n, s, item, gpu_bytes=None, solver="sparsegpt", device="cuda",
             d=None, experts=0, mi=0) -> dict:
    per_block, linears, groups = shape(h, i, layers, heads, kv, vocab, d, experts, mi)
    w = per_block * item
    acts = 2 * n * s * h * item
    on_gpu = gpu_bytes is None or acts <= 0.25 * gpu_bytes
    budget = STATS_SHARE * gpu_bytes if gpu_bytes else float("inf")
    widest = max(o * k for o, k in linears)
    if solver == "wanda":
        stats = sum(k for _, k in linears) * 4
    else:
        stats = gram_bytes(groups, budget)
    widest_in = max(k for _, k in linears)
    solve = 2 * widest * 4 + (2 * widest_in ** 2 * 4 if solver != "wanda" and device == "cuda" else 0)
    batch = 2 * min(n, 8) * s * h * item  # one batch's inputs and outputs, when the rest waits on the CPU
    dev = w + stats + solve + (acts if on_gpu else batch)
    total = per_block * layers + 2 * vocab * h
    return {"params_B": total / 1e9, "block_GiB": w / GIB, "acts_GiB": acts / GIB, "acts_on": "gpu" if on_gpu else "cpu",
            "stats_GiB": stats / GIB, "solve_GiB": solve / GIB, "device_peak_GiB": dev / GIB,
            "disk_GiB": total * item / GIB}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--gpu-gib", default="24,80")
    a = ap.parse_args(argv)
    print(f"calibration {a.nsamples} x {a.seqlen}, bf16 compute; activations moved to CPU memory when over 25% "
          f"of the GPU (then one batch of 8 at a time on it)")
    print("| model | params | GPU | solver | block | activations | Gram matrices | solve | GPU peak (est.) |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for name, (h, i, l, hd, kv, v, *moe) in MODELS.items():
        for g in (int(x) for x in a.gpu_gib.split(",")):
            for solver in ("wanda", "sparsegpt"):
                e = estimate(h, i, l, hd, kv, v, a.nsamples, a.seqlen, 2, g * GIB, solver, "cuda", *moe)
                print(f"| {name} | {e['params_B']:.1f}B | {g} GiB | {solver} | {e['block_GiB']:.2f} | "
                      f"{e['acts_GiB']:.2f} ({e['acts_on']}) | {e['stats_GiB']:.2f} | {e['solve_GiB']:.2f} | "
                      f"{e['device_peak_GiB']:.1f} |")
    print("\nThe CPU runs of bench/scale_cpu.sh (fp32, 8 x 256 calibration) for comparison with their measured RSS:")
    h, i, l, hd, kv, v = MODELS["Llama-3-8B"]
    for solver in ("wanda", "sparsegpt"):
        e = estimate(h, i, l, hd, kv, v, 8, 256, 4, None, solver, device="cpu")
        print(f"  Llama-3-8B-shaped, {solver}: block + activations + statistics + solve = "
              f"{e['device_peak_GiB']:.2f} GiB (plus the Python/torch runtime, ~0.6 GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
