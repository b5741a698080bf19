"""CUDA correctness of the Triton kernels against an fp64 oracle (run by gpu_kernels.sh).

Every format x M in {1, 2, 4, 8, 16, 33, 128, 512} x fp16/bf16 on LLaMA-3-8B and 70B layer shapes
and odd shapes, through `ops.linear` (the custom op a model calls: CUDA -> Triton, the tuned or
default launch shape); the output buffer is poisoned with NaN first, so an unwritten element fails.
The lean GEMVs (gemv4, gemv24) are also forced at M <= 4 whatever the tuned table picks. Split-K
launches are repeated and must be bit-identical (the in-kernel reduction is deterministic; a
race would move the result) and leave the ticket counters at zero. Then the custom ops under
torch.compile with CUDA graphs (mode="reduce-overhead"), and the grouped GEMVs of Mixture-of-Experts decode
(`grouped_checks`). Writes JSON rows; exit 1 on a failure.

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


def random_experts(fmt, experts, out, n_in, dtype, dev) -> tuple:
    """The stacked kernel tensors (ops.stack_args) of `experts` random packed (out, n_in) experts."""
    args, _ = ops.stack_args(fmt, n_in, [random_packed(fmt, out, n_in, dtype, dev, seed=e) for e in range(experts)])
    return args


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


def warm_grouped(job, device: str = "cuda") -> int:
    """Compile the grouped GEMV of one format and dtype, with and without a bias (a worker of gpu_precompile.py)."""
    fmt, dtype = job
    dev = torch.device(device)
    out, n_in = (256, 2048) if dev.type == "cuda" else (32, 256)
    dtype = dtype if dev.type == "cuda" else torch.float32
    args = random_experts(fmt, 2, out, n_in, dtype, dev)
    ids = torch.tensor([1, 0], dtype=torch.int32, device=dev)
    x = torch.randn(1, n_in, device=dev, dtype=dtype)
    for bias in (None, torch.randn(2, out, device=dev, dtype=dtype)):
        ops.triton_grouped_linear(fmt, x, ids, 2, args, bias)
    _sync(dev)
    return 2


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _poison(shape, dtype, dev) -> None:
    """Fill the block the next allocation of this size will likely get with NaN, then free it."""
    torch.full(shape, float("nan"), dtype=dtype, device=dev)


# Mixture-of-Experts decode: (experts, out, in) of Qwen3-30B-A3B's gate/up and down; and, fp16 only, as many
# (2048 x 7168) experts as put the last one's first tensor more than 2^31 elements into its stack (the expert
# offsets are int64: int32 would wrap)
GROUPED = ((128, 768, 2048), (128, 2048, 768))
GROUPED_BIG = (2048, 7168)


def _past_int32(fmt: str, out: int, n_in: int, dev) -> int:
    """Experts enough that e * (elements of an expert's first kernel tensor) passes 2^31 for the last one."""
    args, _ = ops.unpack_args(fmt, torch.empty(0, n_in, device="meta"), random_packed(fmt, out, n_in, torch.float16, dev))
    return 2**31 // args[0].numel() + 2


def _grouped_oracle(fmt, args, bias, x, ids, xdiv):
    """fp64: row p = x[p // xdiv] @ W_e^T + b_e, e = ids[p], W_e decoded in x's dtype from the stacks."""
    from llmprune.formats import get

    ref = torch.empty(len(ids), bias.shape[1], dtype=torch.float64, device=x.device)
    for e in ids.unique().tolist():
        w = get(fmt).unpack({k: t[e] for k, t in zip(ops.kernel_names(fmt), args) if t is not None}, dtype=x.dtype)
        p = (ids == e).nonzero().squeeze(-1)
        ref[p] = x[p // xdiv].double() @ w.double().T + bias[e].double()
    return ref


def grouped_checks(dev) -> list[dict]:
    """ops.grouped_linear (the grouped GEMVs: one launch for every (token, expert) pair) against the fp64 oracle
    at 8, 128 and 256 pairs (batch 1, 16, 32 at top-8) with the tokens' rows (xdiv 8) and one row per pair
    (xdiv 1), biased, output poisoned; then the same call captured in a CUDA graph and replayed with other expert
    ids written into its ids buffer: the experts are read on the device."""
    cuda = dev.type == "cuda"
    rows = []
    shapes = GROUPED if cuda else ((4, 40, 256), (4, 256, 128))
    for fmt in FORMATS:
        big = ((_past_int32(fmt, *GROUPED_BIG, dev), *GROUPED_BIG),) if cuda else ()
        for E, out, n_in in shapes + big:
            for dtype in DTYPES if (E, out, n_in) not in big else (torch.float16,):
                args = random_experts(fmt, E, out, n_in, dtype, dev)
                bias = torch.randn(E, out, device=dev, dtype=dtype)
                gen = torch.Generator(dev).manual_seed(E + out)
                for P, xdiv in ((8, 8), (128, 8), (256, 8), (128, 1)) if cuda else ((8, 4), (6, 1)):
                    ids = torch.randint(0, E, (P,), device=dev, generator=gen, dtype=torch.int32)
                    ids[-1] = E - 1  # the last expert: the largest offset
                    x = torch.randn(P // xdiv, n_in, device=dev, dtype=dtype, generator=gen)
                    _poison((P, out), dtype, dev)
                    y = ops.grouped_linear(fmt, x, ids, xdiv, args, bias) if cuda else \
                        ops.triton_grouped_linear(fmt, x, ids, xdiv, args, bias)
                    _sync(dev)
                    ref = _grouped_oracle(fmt, args, bias, x, ids, xdiv)
                    err = ((y.double() - ref).abs().max() / (ref.abs().max() + 1e-6)).item()
                    ok = bool(torch.isfinite(y).all()) and err <= TOL[dtype]
                    row = {"grouped": fmt, "experts": E, "out": out, "in": n_in, "pairs": P, "xdiv": xdiv,
                           "dtype": str(dtype)[6:], "rel_err": err, "ok": ok}
                    if cuda and P == 128 and xdiv == 8:  # captured, replayed with other experts
                        try:
                            graph = torch.cuda.CUDAGraph()
                            with torch.cuda.graph(graph):
                                yg = ops.grouped_linear(fmt, x, ids, xdiv, args, bias)
                            ids.copy_(torch.randint(0, E, (P,), device=dev, generator=gen, dtype=torch.int32))
                            graph.replay()
                            _sync(dev)
                            row["graph_replay_ok"] = bool(torch.equal(yg, ops.grouped_linear(fmt, x, ids, xdiv, args, bias)))
                        except Exception as e:  # noqa: BLE001
                            row["graph_replay_ok"], row["error"] = False, f"{type(e).__name__}: {str(e)[:200]}"
                        row["ok"] = ok and row["graph_replay_ok"]
                    rows.append(row)
                    if not row["ok"]:
                        print("FAIL", row, flush=True)
                del args, bias
        print(f"grouped {fmt} done", flush=True)
    return rows


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
    g_rows = grouped_checks(dev)
    rows += g_rows
    bad += sum(not r["ok"] for r in g_rows)
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
