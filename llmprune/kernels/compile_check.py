"""Compile every kernel configuration for Hopper (sm_90) without a GPU and inspect the result.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` runs the whole pipeline down to
ptxas, which ships with Triton. For each config default_config() chooses (and any config passed in) we record: registers and
spill bytes (ptxas -v, since metadata.n_spills is only filled when a driver loads the binary),
whether the tile kernels use tensor cores (wgmma / mma) and whether weight loads are vectorized
(ld.global.v4 / v2 or cp.async), and the cost of the K loop: the SASS of its body (nvdisasm, also
shipped with Triton) counted per weight element. Decode is memory-bound only if that count is low:
an H200 SM issues 4 warp instructions per clock, 128 thread instructions, so reading int4 weights at
4 TB/s over 132 SMs at ~1.9 GHz leaves about 4 thread instructions per weight (the first H200 sweep
ran the GEMVs at 10-14 and measured them instruction-bound, at 300-1,400 GB/s).
Run: python -m llmprune.kernels.compile_check [--json PATH]
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict

FORMATS = tuple(__import__("llmprune.formats", fromlist=["names"]).names())
DTYPES = ("fp16", "bf16")
# token counts that select each launch shape (GEMV M=1, 2; decode tile; mid; prefill)
MS = (1, 2, 16, 64, 512)
IN_FEATURES = 4096  # a LLaMA-7B hidden size: every BK divides it
GROUP = 128


_TT = {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32", "torch.uint8": "u8",
       "torch.int16": "i16", "torch.int32": "i32"}


def _signature(fmt: str, dtype: str, kind: str) -> tuple[dict, list[str]]:
    """Argument types (the format's kernel tensors as the runtime passes them: formats registry ->
    triton_gemm.pointer_roles), and the arguments the JIT would find 16-divisible for 7B shapes."""
    import torch

    from llmprune import formats
    from llmprune.kernels.triton_gemm import pointer_roles

    td = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    f = formats.get(fmt)
    args, _ = f.kernel_args(256, f.random(16, 256, td))
    wt = tuple(f"*{_TT[str(t.dtype)]}" for t in pointer_roles(args))
    names = ["x_ptr", "y_ptr", "bias_ptr", "ws_ptr", "cnt_ptr", "A", "B", "C", "D", "sa", "sb", "sc", "M", "N",
             "KIN" if kind in ("tile", "unpack") else "KK", "KG", "sxm", "ITERS", "SPLIT"]
    types = [f"*{dtype}", f"*{dtype}", f"*{dtype}", "*fp32", "*i32", *wt] + ["i32"] * 10
    return dict(zip(names, types)), [n for n in names if n not in ("M", "ITERS", "KG", "SPLIT")]


def _ptxas_usage(ptx: str, arch: str = "sm_90a") -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True, check=True)
    log = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    return {"n_regs": int(regs.group(1)) if regs else None, "spill_bytes": sum(spills)}


def _nvdisasm(cubin: bytes) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    tool = os.path.join(os.path.dirname(get_ptxas(90).path), "nvdisasm")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, "-c", path], capture_output=True, text=True, check=True).stdout


def loop_body(sass: str, whole: bool = False) -> list[str]:
    """The instructions of the longest loop (a backward branch to a label) of a SASS listing; all of
    them with `whole` (a kernel without a K loop: one tile per program)."""
    ins, labels, best = [], {}, []
    for line in sass.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if m:
            ins.append(m.group(1))
            b = re.search(r"\bBRA\b.*?(\.L_x_\d+)", m.group(1))
            if b and labels.get(b.group(1), len(ins)) < len(ins) and len(ins) - labels[b.group(1)] > len(best):
                best = ins[labels[b.group(1)]:]
    return ins if whole else best


def opcode(instr: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", instr).split()[0]


def check_one(fmt: str, dtype: str, M: int, config=None, reduce: bool | None = None, has_z: bool = False,
              has_bias: bool = False, grouped: bool = False) -> dict:
    """Compile `config` (default: the one default_config(fmt, M, 4096) chooses) for sm_90; returns a
    result row. `reduce`: compile the split-K variant (default: decode shapes split, prefill not);
    `has_z`, `has_bias`: the zero-point (asymmetric grid) and bias variants; `grouped`: a GEMV's grouped
    (Mixture-of-Experts) variant, one (token, expert) pair per program, never split."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from llmprune.kernels import triton_gemm as tg

    cfg = config or tg.default_config(fmt, M, IN_FEATURES)
    reduce = (M <= 16 and not grouped) if reduce is None else reduce
    kernel = getattr(tg, f"_{cfg.kind}_kernel")  # by name: bench/sass_model.py runs this on older kernels
    sig, aligned = _signature(fmt, dtype, cfg.kind)
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    const = {"FMT": tg.fmt_id(fmt), "G": GROUP if fmt in ("w4g128", "w4s24") else 16, "HAS_Z": has_z,
             "HAS_BIAS": has_bias, "REDUCE": reduce, "CDT": {"fp16": tl.float16, "bf16": tl.bfloat16}[dtype],
             "BW": cfg.BW, "BT": cfg.BT, "BK": cfg.BK}
    if cfg.kind in ("gemv4", "gemv24"):  # the lean GEMVs pipeline their loop with tl.range(num_stages=)
        const["STAGES"] = cfg.num_stages
    if "ids_ptr" in kernel.arg_names:  # the GEMVs' grouped variant (older kernels, bench/sass_model.py: none)
        sig.update(ids_ptr="*i32", XDIV="i32")
        const["GROUPED"] = grouped
    sig.update({k: "constexpr" for k in const})
    names = kernel.arg_names  # ASTSource wants the kernel's parameter order
    assert sorted(names) == sorted(sig), (names, sig)
    src = ASTSource(fn=kernel, signature={n: sig[n] for n in names},
                    constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    ptx = compiled.asm["ptx"]
    row = {"format": fmt, "dtype": dtype, "M": M, "reduce": reduce, "grouped": grouped, **asdict(cfg), **_ptxas_usage(ptx),
           "wgmma": "wgmma.mma_async" in ptx, "mma": bool(re.search(r"\bmma\.sync", ptx)),
           "ld_v4": "ld.global.v4" in ptx, "ld_v2": "ld.global.v2" in ptx, "cp_async": "cp.async" in ptx,
           "atomic_acq_rel": bool(re.search(r"atom\.global\.(gpu\.)?acq_rel|atom\.acq_rel\.gpu", ptx)),
           "shared_bytes": compiled.metadata.shared, "ptx_lines": ptx.count("\n"),
           "shared_ops": len(re.findall(r"\b(?:st|ld)\.shared", ptx))}
    body = loop_body(_nvdisasm(compiled.asm["cubin"]), whole=cfg.kind == "unpack")
    ops = [opcode(i) for i in body]
    threads = 32 * cfg.num_warps
    walked = tg._walk_len(fmt, IN_FEATURES) if cfg.kind == "gemv" else IN_FEATURES
    per_iter = cfg.BW * cfg.BK * IN_FEATURES / walked  # weight elements (of the dense matrix) per iteration
    row.update(loop_instructions=len(body), instr_per_weight=round(len(body) * threads / per_iter, 3),
               loop_int_to_float=sum(o.startswith("I2F") for o in ops),  # I2F, I2FP: not full-rate on sm_90
               loop_shared=sum(o.startswith(("LDS", "STS", "BAR")) for o in ops))
    row["tensor_cores"] = row["wgmma"] or row["mma"]
    row["vector_loads"] = row["ld_v4"] or row["ld_v2"] or row["cp_async"]
    return row


def run_all(formats=FORMATS, dtypes=DTYPES, Ms=MS) -> list[dict]:
    return [check_one(f, d, m) for f in formats for d in dtypes for m in Ms]


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    a = ap.parse_args(argv)
    rows = run_all(a.formats.split(","), a.dtypes.split(","), [int(m) for m in a.ms.split(",")])
    cols = ("format", "dtype", "M", "kind", "BW", "BT", "BK", "n_regs", "spill_bytes", "tensor_cores",
            "vector_loads", "cp_async", "instr_per_weight")
    print(" ".join(f"{c:>12}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]!s:>12}" for c in cols))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
