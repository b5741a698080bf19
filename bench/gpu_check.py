"""CUDA correctness of the Triton kernels against an fp64 oracle (run by gpu_kernels.sh).

Every format x M in {1, 2, 4, 8, 16, 33, 128, 512} x fp16/bf16 on LLaMA-3-8B and 70B layer shapes
and odd shapes, through `ops.linear` (the custom op a model calls: CUDA -> Triton, the tuned or
default launch shape); the output buffer is poisoned with NaN first, so an unwritten element fails.
The lean GEMVs (gemv4, gemv24) are also forced at M <= 4 whatever the tuned table picks. Split-K
launches are repeated and must be bit-identical (the in-kernel reduction is deterministic; a
race would move the result) and leave the ticket counters at zero. Then the custom ops under
torch.compile with CUDA graphs (mode="reduce-overhead"). Writes JSON rows; exit 1 on a failure.

    python3 bench/gpu_check.py OUT.json            (on a CUDA machine)
    TRITON_INTERPRET=1 python bench/gpu_check.py OUT.json cpu     (dry run of the script here)
"""
from __future__ import annotations

import json
import sys
import time

import torch

from llmprune.bench import random_packed
from llmprune.kernels import ops

FORMATS = tuple(__import__("llmprune.formats", fromlist=["names"]).names())
SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336),
          (8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672),
          (1000, 1024), (72, 384), (4000, 2048))
MS = (1, 2, 4, 8, 16, 33, 128, 512)
DTYPES = (torch.float16, torch.bfloat16)
TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}


def cases(shapes=SHAPES):
    for fmt in FORMATS:
        for out, n_in in shapes:
            if fmt in ("w4g128", "w4s24") and n_in % 128:
                continue
            for dtype in DTYPES:
                yield fmt, out, n_in, dtype


def packed_case(fmt, out, n_in, dtype, dev):
    p = random_packed(fmt, out, n_in, dtype, dev, seed=out + n_in)
    b = torch.randn(out, device=dev, dtype=dtype)
    return p, b


def warm(job, device: str = "cuda") -> int:
    """Compile the kernels of one case (a worker of gpu_precompile.py): no checks."""
    fmt, out, n_in, dtype = job
    dev = torch.device(device)
    if dev.type != "cuda":  # dry run: small
        out, n_in, dtype = 96, 512, torch.float32
    p, b = packed_case(fmt, out, n_in, dtype, dev)
    for M in MS:
        ops.triton_linear(fmt, torch.randn(M, n_in, device=dev, dtype=dtype), p, b)
    _sync(dev)
    return len(MS)


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _poison(shape, dtype, dev) -> None:
    """Fill the block the next allocation of this size will likely get with NaN, then free it."""
    torch.full(shape, float("nan"), dtype=dtype, device=dev)


def main(path: str, device: str = "cuda") -> int:
    """`device="cpu"`: a dry run of this script under TRITON_INTERPRET=1 (small shapes, fp32)."""
    from llmprune.formats import get
    from llmprune.kernels import triton_gemm as tg

    global MS, DTYPES
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if not cuda:
        MS, DTYPES = (1, 2, 16, 33), (torch.float32,)
        TOL[torch.float32] = 1e-5
    rows, bad, t0 = [], 0, time.time()
    for fmt, out, n_in, dtype in cases(SHAPES if cuda else ((96, 512), (72, 384))):
        p, b = packed_case(fmt, out, n_in, dtype, dev)
        wd = get(fmt).unpack(p, dtype=dtype).double()  # (out, in): the weight in x's dtype, exact
        for M in MS:
            x = torch.randn(M, n_in, device=dev, dtype=dtype)
            ref = x.double() @ wd.T + b.double()
            _poison((M, out), dtype, dev)
            y = ops.linear(fmt, x, p, b) if cuda else ops.triton_linear(fmt, x, p, b)
            _sync(dev)
            err = ((y.double() - ref).abs().max() / (ref.abs().max() + 1e-6)).item()
            cfg = tg.pick_config(fmt, M, n_in, out, dev)
            ok = bool(torch.isfinite(y).all()) and err <= TOL[dtype] and y.dtype == dtype
            row = {"format": fmt, "out": out, "in": n_in, "M": M, "dtype": str(dtype)[6:], "rel_err": err,
                   "config": cfg.as_list(), "ok": ok}
            if M in (1, 16) and dtype != torch.bfloat16:  # repeat: split-K deterministic, counters re-armed
                same = all(torch.equal(ops.triton_linear(fmt, x, p, b), y) for _ in range(10 if cuda else 2))
                _sync(dev)
                armed = int(tg._counters(dev).abs().sum()) == 0
                row.update(repeat_identical=same, counters_zero=armed)
                ok = ok and same and armed
                row["ok"] = ok
            bad += not ok
            rows.append(row)
            if not ok:
                print("FAIL", row, flush=True)
            lean = "gemv4" if fmt in tg.WORD_FORMATS else "gemv24" if fmt in tg.COMPACT_FORMATS else None
            if lean and M <= 4:  # the lean GEMVs whether or not the tuned table picks them (other GPUs do)
                cfg = tg.Config(lean, 128 if M == 1 else 64, M, 128, 4, 3)
                _poison((M, out), dtype, dev)
                y = ops.triton_linear(fmt, x, p, b, config=cfg)
                _sync(dev)
                err = ((y.double() - ref).abs().max() / (ref.abs().max() + 1e-6)).item()
                ok = bool(torch.isfinite(y).all()) and err <= TOL[dtype] and y.dtype == dtype
                rows.append({**row, "rel_err": err, "config": cfg.as_list(), "forced": True, "ok": ok})
                bad += not ok
                if not ok:
                    print("FAIL", rows[-1], flush=True)
        del p, wd
        print(f"{fmt} {out}x{n_in} {str(dtype)[6:]} done ({time.time() - t0:.0f} s)", flush=True)
    # torch.compile + CUDA graphs through each custom op
    for fmt in FORMATS if cuda else ():
        try:
            p = random_packed(fmt, 4096, 4096, torch.float16, dev)
            x = torch.randn(1, 4096, device=dev, dtype=torch.float16)
            f = torch.compile(lambda x, p=p, fmt=fmt: ops.linear(fmt, x, p), fullgraph=True, mode="reduce-overhead")
            for _ in range(3):
                yc = f(x).clone()
            comp_ok = bool(torch.equal(yc, ops.linear(fmt, x, p)))
            rows.append({"check": f"torch.compile reduce-overhead {fmt}", "ok": comp_ok})
        except Exception as e:  # noqa: BLE001
            comp_ok = False
            rows.append({"check": f"torch.compile reduce-overhead {fmt}", "ok": False, "error": str(e)[:300]})
        bad += not comp_ok
    with open(path, "w") as fh:
        json.dump({"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                   "triton": __import__("triton").__version__, "failures": bad, "rows": rows}, fh, indent=0)
    print(f"{len(rows)} checks, {bad} failures ({time.time() - t0:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
