"""One scale-tuning step through one linear at Llama-3-8B's MLP shape: the time of its forward and
backward passes and the bytes autograd keeps between them, for whichever llmprune the working
directory imports (run it from two commits' worktrees to compare; results/tune_step.txt).

    python bench/tune_step.py [--rows 14336 --cols 4096 --group 128 --tokens 1024 --reps 7]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from pathlib import Path

import torch

import llmprune
from llmprune.quant import Quantized
from llmprune.quant.tune import ScaledLinear


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=14336)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    torch.manual_seed(0)
    n_groups = a.cols // a.group
    q = Quantized(codes=torch.randint(0, 16, (a.rows, a.cols), dtype=torch.uint8),
                  scales=(torch.rand(a.rows, n_groups) * 0.01 + 1e-3).half(),
                  zeros=torch.full((a.rows, n_groups), 8, dtype=torch.uint8), group_size=a.group, symmetric=True)
    lin = ScaledLinear(q, None, "cpu")
    x = torch.randn(a.tokens, a.cols, requires_grad=True)
    saved = []  # (bytes, whether the tensor is held anyway: the input, the layer's buffers and parameters)
    held = {t.untyped_storage().data_ptr() for t in (x, *lin.buffers(), *lin.parameters())}

    def pack(t):
        saved.append((t.numel() * t.element_size(), t.untyped_storage().data_ptr() in held))
        return t

    times = []
    for rep in range(a.reps + 1):  # the first is a warmup
        saved.clear()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = lin(x)
        y.square().mean().backward()
        if rep:
            times.append(time.perf_counter() - t0)
        lin.t.grad = x.grad = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(llmprune.__file__).parent, check=False,
                            capture_output=True, text=True).stdout.strip()  # of the llmprune imported
    buffers = sum(b.numel() * b.element_size() for b in lin.buffers())
    print(f"commit {commit}: ({a.rows} x {a.cols}) groups of {a.group}, {a.tokens} tokens, fp32, "
          f"{torch.get_num_threads()} threads")
    print(f"  forward + backward: median {statistics.median(times) * 1e3:.0f} ms, min {min(times) * 1e3:.0f} ms "
          f"over {a.reps}")
    extra = sum(n for n, h in saved if not h)
    print(f"  kept for backward: {sum(n for n, _ in saved) / 2**20:.1f} MiB, of it {extra / 2**20:.1f} MiB made by "
          f"the forward (the rest: the input and the layer's own tensors); the layer's buffers: {buffers / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
