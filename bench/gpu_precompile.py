"""Compile every Triton kernel variant the GPU scripts will launch, in parallel worker processes,
so that the timed scripts find them in Triton's on-disk cache (one compile is ~0.5 s; the sweep and
the checks need a few hundred). Launch arguments that change per call (M, split, K-loop length) are
not specialized on, so a small problem with the same alignment compiles the same binary.

    python3 bench/gpu_precompile.py [--workers 14] [--only check,tune,e2e]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

SMALL = (256, 2048)
DEVICE = os.environ.get("PRECOMPILE_DEVICE", "cuda")  # cpu: a dry run under TRITON_INTERPRET=1  # out, in: every stride 16-aligned, as in the LLaMA shapes


def _tune_job(job) -> int:
    import torch

    from llmprune.bench import random_packed
    from llmprune.kernels import ops
    from llmprune.kernels.triton_gemm import Config

    fmt, dtype, M, cfg, split = job
    dev = torch.device(DEVICE)
    p = random_packed(fmt, *SMALL, dtype, dev)
    c = Config(cfg.kind, cfg.BW, cfg.BT, cfg.BK, cfg.num_warps, cfg.num_stages, 1, split)
    ops.triton_linear(fmt, torch.randn(M, SMALL[1], device=dev, dtype=dtype), p, config=c)
    return 1


def _run(job) -> tuple[str, str]:
    kind, payload = job
    try:
        if kind == "check":
            sys.path.insert(0, "bench")
            import gpu_check

            gpu_check.warm(payload, DEVICE)
        elif kind == "grouped":
            sys.path.insert(0, "bench")
            import gpu_check

            gpu_check.warm_grouped(payload, DEVICE)
        else:
            _tune_job(payload)
        return kind, ""
    except Exception as e:  # noqa: BLE001  reported, the timed scripts will meet it again
        return kind, f"{payload}: {type(e).__name__}: {str(e)[:200]}"


def main(argv=None) -> int:
    import torch

    sys.path.insert(0, "bench")
    import gpu_check
    import gpu_tune

    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--only", default="check,tune")
    ap.add_argument("--limit", type=int, default=0, help="only the first N jobs (dry runs)")
    a = ap.parse_args(argv)
    jobs = []
    if "tune" in a.only:
        jobs += [("tune", j) for j in gpu_tune.compile_jobs(dtypes=(torch.float16,))]
    if "check" in a.only:
        jobs += [("check", c) for c in gpu_check.cases()]
        jobs += [("grouped", (f, d)) for f in gpu_check.FORMATS for d in gpu_check.DTYPES]
    if a.limit:
        jobs = jobs[:a.limit] + jobs[-a.limit:]
    t0 = time.time()
    errors = []
    with mp.get_context("spawn").Pool(a.workers) as pool:
        for kind, err in pool.imap_unordered(_run, jobs, chunksize=1):
            if err:
                errors.append(err)
    print(f"precompiled {len(jobs)} jobs in {time.time() - t0:.0f} s, {len(errors)} errors")
    for e in errors[:20]:
        print("  ", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
