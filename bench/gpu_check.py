"""CUDA correctness of the Triton kernels against llmprune.kernels.reference (run by gpu_kernels.sh).

Every format x launch shape (M = 1, 2, 3, 13, 16, 33, 128, 512) x fp16/bf16 on LLaMA-like and odd
shapes; plus the custom op under torch.compile and a CUDA graph. Writes JSON rows; exit 1 on a
mismatch. Usage: python bench/gpu_check.py OUT.json
"""
import json
import sys
import time

import torch

from llmprune.bench import random_packed
from llmprune.kernels import ops, reference

FORMATS = ("sparse24", "w4g128", "w4s24", "w4s50")
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (1000, 1024), (72, 384))
MS = (1, 2, 3, 13, 16, 33, 128, 512)


def main(path):
    dev = torch.device("cuda")
    rows, bad = [], 0
    for fmt in FORMATS:
        for out, n_in in SHAPES:
            if fmt in ("w4g128", "w4s24") and n_in % 128:
                continue
            for dtype in (torch.float16, torch.bfloat16):
                p = random_packed(fmt, out, n_in, dtype, dev, seed=out + n_in)
                w = reference.linear(fmt, torch.eye(n_in, device=dev, dtype=torch.float32),
                                     {k: (v.float() if v.dtype == dtype else v) for k, v in p.items()}).T
                for M in MS:
                    x = torch.randn(M, n_in, device=dev, dtype=dtype)
                    b = torch.randn(out, device=dev, dtype=dtype)
                    t = time.perf_counter()
                    y = ops.linear(fmt, x, p, b)  # CUDA -> the Triton kernel
                    torch.cuda.synchronize()
                    ms = (time.perf_counter() - t) * 1e3
                    ref = x.double() @ w.to(dtype).double().T + b.double()  # fp64 oracle
                    err = ((y.double() - ref).abs().max() / (ref.abs().max() + 1e-6)).item()
                    tol = 3e-3 if dtype == torch.float16 else 2e-2
                    ok = err <= tol and y.dtype == dtype
                    bad += not ok
                    rows.append({"format": fmt, "out": out, "in": n_in, "M": M, "dtype": str(dtype)[6:],
                                 "rel_err": err, "ok": ok, "first_call_ms": ms})
                    if not ok:
                        print("MISMATCH", rows[-1], flush=True)
        print(fmt, "done", flush=True)
    # torch.compile + CUDA graphs through the custom op
    p = random_packed("w4s24", 4096, 4096, torch.float16, dev)
    x = torch.randn(1, 4096, device=dev, dtype=torch.float16)
    f = torch.compile(lambda x: ops.linear("w4s24", x, p), fullgraph=True, mode="reduce-overhead")
    for _ in range(3):
        yc = f(x)
    eager = ops.linear("w4s24", x, p)
    comp_ok = bool(torch.allclose(yc, eager, rtol=1e-3, atol=1e-3))
    bad += not comp_ok
    rows.append({"check": "torch.compile reduce-overhead w4s24", "ok": comp_ok})
    with open(path, "w") as fh:
        json.dump({"device": torch.cuda.get_device_name(), "failures": bad, "rows": rows}, fh, indent=1)
    print(f"{len(rows)} checks, {bad} failures")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
