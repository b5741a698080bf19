"""Kernel sweep on a CUDA GPU: every candidate launch shape of every packed format, on LLaMA-3-8B and
70B layer shapes, at decode and prefill token counts; against cuBLAS (dense F.linear), torch's 2:4
(`to_sparse_semi_structured`) and torch's int4 kernel (`aten._weight_int4pack_mm`, tinygemm, the
kernel gpt-fast uses; bf16 activations, groups of 128).

    python3 bench/gpu_tune.py OUTDIR [--formats ...] [--shapes 8b,70b] [--ms 1,2,4,8,16,512] [--reps 10]

Every candidate's output is checked against an fp64 oracle before it is timed (a fast wrong config
cannot win). Timing: the call is captured in a CUDA graph, the L2 is flushed (a 256 MB write)
before every replay, device events around the replay, median of --reps. Writes OUTDIR/tune.json
(every row), OUTDIR/sm90.json (the fastest config per format, token bucket and shape: the file
llmprune/kernels/tuned/ reads) and prints the table of the best rows.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from llmprune.bench import random_packed
from llmprune.kernels import ops
from llmprune.kernels.triton_gemm import Config, m_bucket, pick_config

FORMATS = tuple(__import__("llmprune.formats", fromlist=["names"]).names())
SHAPES = {  # (out, in) of the linears a LLaMA-3 decoder layer runs (HF: q, k, v, o, gate, up, down)
    "8b.q_o": (4096, 4096), "8b.k_v": (1024, 4096), "8b.gate_up": (14336, 4096), "8b.down": (4096, 14336),
    "70b.q_o": (8192, 8192), "70b.k_v": (1024, 8192), "70b.gate_up": (28672, 8192), "70b.down": (8192, 28672),
    "tiny.a": (96, 512),  # CPU dry run (TRITON_INTERPRET=1 --device cpu --shapes tiny)
}
MS = (1, 2, 4, 8, 16, 512)

GEMV = [(16, 256, 4), (32, 128, 4), (32, 256, 4), (64, 128, 8), (32, 512, 8)]  # BW, BK, warps
DECODE_TILE = [(64, 64, 4, 4), (64, 128, 4, 3), (64, 128, 4, 4), (64, 256, 4, 3),  # BW, BK, warps, stages
               (128, 64, 4, 4), (128, 128, 4, 3), (128, 128, 8, 3), (128, 256, 8, 3)]
PREFILL = [(128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
           (128, 128, 128, 8, 3), (128, 256, 64, 8, 3)]  # BW, BT, BK, warps, stages
# the lean GEMVs (w4g128: gemv4; sparse24, w4s24: gemv24), 5-7 thread instructions per weight at
# M = 1 where the first sweep's GEMVs spent 10-14 (compile_check); none spills at M <= 2 (sm_90).
# BW, BK, warps; cp.async 3 deep. At M = 4 only the small shapes (the larger ones spill there).
LEAN = [(64, 128, 4), (128, 128, 4), (128, 128, 8), (256, 128, 8), (32, 128, 2)]  # BK <= G = 128 (launcher)
LEAN_M4 = [(64, 128, 4), (32, 128, 2)]
# At M = 1 the int4 GEMVs also with more rows per thread (each input loaded and scaled for more rows):
# 4.3-4.8 instructions per weight instead of 4.9-5.4, at 168-255 registers (fewer warps per SM,
# the cp.async pipeline keeping the bytes in flight); no spills at M = 1, fp16 or bf16 with zero points
# and bias, under Triton 3.6 (the H200's) and 3.7.1 (sparse24 spills there, M = 2 too: not tried;
# 64 x 1 warp spills w4g128 under 3.6)
LEAN_M1_INT4 = [(128, 128, 2), (256, 128, 4)]
LEAN_WAVES = (2, 4, 8)  # the first sweep's GEMVs were fastest at its largest, 4
WAVES = (1, 2, 4)
UNPACK = [(64, 128, 4), (32, 256, 4), (128, 128, 8)]  # prefill: decode tile BW x BK, warps
# A 32-row tile (2 warps) takes mma.sync with register operands instead of the warpgroup MMA, which waits
# on a shared-memory copy of the decoded tile each step: run1's wgmma tiles at M = 16 ran 1.9-4.1x above
# their larger floor (bench/results/gpu/sass_model.txt), so the shorter chain is worth a timing. No
# spills but for w4s50 (not tried).
DECODE_TILE_MMA2 = [(32, 128, 2, 3)]


def candidates(M: int, fmt: str | None = None) -> list[Config]:
    """The launch shapes tried at M tokens (for `fmt`: the compact 2:4 GEMV where it applies)."""
    from llmprune.kernels.triton_gemm import COMPACT_FORMATS, INT4_WORD_FORMATS, UNPACK_FORMATS, WORD_FORMATS

    if M > 64:
        out = [Config("tile", bw, bt, bk, w, s, 1) for bw, bt, bk, w, s in PREFILL]
        if fmt in UNPACK_FORMATS:  # the dense weight decoded once, then cuBLAS
            out += [Config("unpack", bw, 128, bk, w, 1, 1) for bw, bk, w in UNPACK]
        return out
    out = [Config("tile", bw, 16, bk, w, s, wv) for bw, bk, w, s in DECODE_TILE for wv in WAVES]
    if fmt is not None and fmt != "w4s50":
        out += [Config("tile", bw, 16, bk, w, s, wv) for bw, bk, w, s in DECODE_TILE_MMA2 for wv in WAVES]
    if M <= 4:
        out += [Config("gemv", bw, M, bk, w, 3, wv) for bw, bk, w in GEMV for wv in WAVES]
    lean = "gemv4" if fmt in WORD_FORMATS else "gemv24" if fmt in COMPACT_FORMATS else None
    if M <= 4 and lean:
        shapes = LEAN if M <= 2 else LEAN_M4
        if M == 1 and fmt in INT4_WORD_FORMATS:
            shapes = shapes + LEAN_M1_INT4
        out += [Config(lean, bw, M, bk, w, 3, wv) for bw, bk, w in shapes for wv in LEAN_WAVES]
    return out


def compile_jobs(formats=FORMATS, Ms=MS, dtypes=(torch.float16,)) -> list[tuple]:
    """(fmt, dtype, M, config, split) launches that compile every kernel variant the sweep uses
    (M matters only to the GEMV, whose token tile is M wide)."""
    jobs = set()
    for f in formats:
        for d in dtypes:
            for M in Ms:
                for c in candidates(M, f):
                    base = Config(c.kind, c.BW, c.BT, c.BK, c.num_warps, c.num_stages)
                    m = M if c.kind in ("gemv", "gemv24", "gemv4") else (16 if M <= 64 else 512)
                    for split in ((1,) if M > 64 else (1, 2)):
                        jobs.add((f, d, m, base, split))
    return sorted(jobs, key=str)


def flush_buffer(device) -> torch.Tensor:
    return torch.empty(256 * 2**20, dtype=torch.uint8, device=device)


def time_ms(fn, flush: torch.Tensor, reps: int) -> tuple[float, str]:
    """Median device ms of fn() (CUDA-graph replay when capturable), L2 flushed before each run."""
    fn()
    if flush is None:  # CPU dry run
        t = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            t.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(t), "cpu"
    torch.cuda.synchronize()
    run, mode = fn, "eager"
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run, mode = g.replay, "graph"
    except Exception:  # noqa: BLE001  still timed, eagerly
        torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        flush.zero_()
        a.record()
        run()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev), mode


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y.double() - ref).abs().max() / (ref.abs().max() + 1e-12)).item()


def tinygemm(w: torch.Tensor, group: int = 128):
    """torch's int4 kernel on the same weight (asymmetric int4, groups of `group`): (fn of x, bytes)."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)  # (n, k/group)
    q = ((wg - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
    zero = lo + 8 * scale  # tinygemm: w = (q - 8) * scale + zero
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (k/group, n, 2)
    deq = ((q.reshape(n, k // group, group) - 8) * scale[..., None] + zero[..., None]).reshape(n, k)

    def fn(x):
        return torch.ops.aten._weight_int4pack_mm(x, packed, group, sz)

    return fn, packed.numel() * packed.element_size() + sz.numel() * sz.element_size(), deq


def main(argv=None) -> int:
    import torch.nn.functional as F

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--shapes", default="8b,70b", help="prefixes of SHAPES keys")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--baselines", default="dense,semi,int4")
    ap.add_argument("--tuned-only", action="store_true",
                    help="time only the launch shape ops.linear picks (the recorded table): the microbenchmark")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script under TRITON_INTERPRET=1")
    a = ap.parse_args(argv)
    out = Path(a.outdir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(a.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    formats = a.formats.split(",")
    Ms = [int(m) for m in a.ms.split(",")]
    shapes = {k: v for k, v in SHAPES.items() if k.split(".")[0] in a.shapes.split(",")}
    flush = flush_buffer(dev) if dev.type == "cuda" else None
    rows, t_start = [], time.time()
    for sname, (n_out, n_in) in shapes.items():
        w = (torch.randn(n_out, n_in, device=dev) * 0.02).to(dtype)
        base_fns = {"dense": (lambda x, w=w: F.linear(x, w), w.numel() * 2)}
        if "semi" in a.baselines:
            try:
                from torch.sparse import to_sparse_semi_structured

                w24 = w.view(n_out, n_in // 4, 4).clone()
                w24[..., 2:] = 0
                semi = to_sparse_semi_structured(w24.view(n_out, n_in))
                base_fns["torch_2:4"] = (lambda x, s=semi: F.linear(x, s), w.numel() * 2 * 9 // 16)
            except Exception as e:  # noqa: BLE001
                rows.append({"shape": sname, "format": "torch_2:4", "error": f"{type(e).__name__}: {e}"[:300]})
        int4 = None
        if "int4" in a.baselines:
            try:
                int4 = tinygemm(w.to(torch.bfloat16))
            except Exception as e:  # noqa: BLE001
                rows.append({"shape": sname, "format": "torch_int4", "error": f"{type(e).__name__}: {e}"[:300]})
        for M in Ms:
            x = torch.randn(M, n_in, device=dev).to(dtype)
            base = {"shape": sname, "out": n_out, "in": n_in, "M": M, "bucket": m_bucket(M)}
            dense_ms = None
            for name, (fn, nbytes) in base_fns.items():
                try:
                    ms, mode = time_ms(lambda fn=fn, x=x: fn(x), flush, a.reps)
                    dense_ms = ms if name == "dense" else dense_ms
                    rows.append({**base, "format": name, "ms": ms, "bytes": nbytes, "mode": mode})
                except Exception as e:  # noqa: BLE001
                    rows.append({**base, "format": name, "error": f"{type(e).__name__}: {e}"[:300]})
            if int4 is not None:
                fn, nbytes, deq = int4
                xb = x.to(torch.bfloat16)
                try:
                    err = rel_err(fn(xb), xb.double() @ deq.to(torch.bfloat16).double().T)
                    ms, mode = time_ms(lambda fn=fn, xb=xb: fn(xb), flush, a.reps)
                    rows.append({**base, "format": "torch_int4", "ms": ms, "bytes": nbytes, "mode": mode,
                                 "rel_err": err, "dtype": "bfloat16"})
                except Exception as e:  # noqa: BLE001
                    rows.append({**base, "format": "torch_int4", "error": f"{type(e).__name__}: {e}"[:300]})
            for fmt in formats:
                p = random_packed(fmt, n_out, n_in, dtype, dev, seed=M)
                from llmprune.formats import get

                wd = get(fmt).unpack(p, dtype=dtype)  # (out, in) the weight the kernel must apply
                ref = x.double() @ wd.double().T
                del wd
                nbytes = sum(t.numel() * t.element_size() for t in p.values())
                for cfg in ([None] if a.tuned_only else candidates(M, fmt)):
                    shown = cfg or pick_config(fmt, M, n_in, n_out, dev)
                    r = {**base, "format": fmt, "config": shown.as_list(), "bytes": nbytes,
                         "picked": cfg is None}
                    try:
                        err = rel_err(ops.triton_linear(fmt, x, p, config=cfg), ref)
                        r["rel_err"] = err
                        if err > (3e-3 if dtype == torch.float16 else 1e-5):
                            r["error"] = "wrong result"
                        else:
                            r["ms"], r["mode"] = time_ms(
                                lambda cfg=cfg, fmt=fmt, x=x, p=p: ops.triton_linear(fmt, x, p, config=cfg),
                                flush, a.reps)
                    except Exception as e:  # noqa: BLE001
                        r["error"] = f"{type(e).__name__}: {e}"[:300]
                    if dense_ms and "ms" in r:
                        r["speedup_vs_dense"] = dense_ms / r["ms"]
                    rows.append(r)
                del p
            print(f"{sname} M={M} done ({time.time() - t_start:.0f} s)", flush=True)
        del w, base_fns, int4
        torch.cuda.empty_cache()
    for r in rows:
        if "ms" in r:
            r["GBps"] = r["bytes"] / (r["ms"] / 1e3) / 1e9
    cuda = dev.type == "cuda"
    env = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "triton": __import__("triton").__version__, "cuda": torch.version.cuda,
           "capability": list(torch.cuda.get_device_capability()) if cuda else None, "reps": a.reps,
           "command": "python3 bench/gpu_tune.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    (out / "tune.json").write_text(json.dumps({"env": env, "rows": rows}, indent=0))
    best = best_configs(rows)
    if not a.tuned_only:
        (out / "sm90.json").write_text(json.dumps({"env": env, "source": "bench/results/gpu/tune.json",
                                                   "configs": best}, indent=1))
    print_best(rows)
    return 0


def best_configs(rows: list[dict]) -> dict:
    """format -> bucket -> "OUTxIN" -> fastest config (with "default": the most frequent winner)."""
    best: dict = {}
    for r in rows:
        if "config" not in r or "ms" not in r:
            continue
        b = best.setdefault(r["format"], {}).setdefault(str(r["bucket"]), {})
        key = f"{r['out']}x{r['in']}"
        if key not in b or r["ms"] < b[key][1]:
            b[key] = (r["config"], r["ms"])
    table: dict = {}
    for fmt, buckets in best.items():
        for bucket, shapes in buckets.items():
            winners = [c for c, _ in shapes.values()]
            common = max(winners, key=lambda c: (winners.count(c), str(c)))
            table.setdefault(fmt, {})[bucket] = {"default": common, **{k: c for k, (c, _) in shapes.items()}}
    return table


def print_best(rows: list[dict]) -> None:
    """shape, M, dense ms, then each format's best ms and speedup."""
    keyed: dict = {}
    for r in rows:
        if "ms" in r:
            k = (r["shape"], r["M"], r["format"])
            if k not in keyed or r["ms"] < keyed[k]["ms"]:
                keyed[k] = r
    fmts = sorted({k[2] for k in keyed} - {"dense"})
    print("shape M dense_us " + " ".join(f"{f}_us(x,GB/s)" for f in fmts))
    for shape, M in sorted({(k[0], k[1]) for k in keyed}, key=lambda t: (t[0], t[1])):
        d = keyed.get((shape, M, "dense"))
        cells = []
        for f in fmts:
            r = keyed.get((shape, M, f))
            cells.append("-" if r is None else
                         f"{r['ms'] * 1e3:.1f}({d['ms'] / r['ms'] if d else 0:.2f}x,{r['GBps']:.0f})")
        print(shape, M, f"{d['ms'] * 1e3:.1f}" if d else "-", " ".join(cells), flush=True)


if __name__ == "__main__":
    sys.exit(main())
