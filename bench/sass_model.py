"""Why the first H200 sweep's decode kernels missed, and what the lean GEMVs change, from the SASS alone.

For every launch shape the first sweep timed at M = 1 (bench/results/gpu/run1/tune.json: the fastest
of each kernel kind per format and shape), compile the kernels of the revision that ran it (the git
hash in the run's env.log, extracted with `git archive`) for sm_90 here (no GPU), count the thread
instructions of its K loop per weight element (compile_check), and compare the measured time with
two lower bounds: instruction issue (an SM issues 4 warp instructions = 128 thread instructions per
clock; 132 SMs at 1.98 GHz) and bytes (the packed weight at the 3.3 TB/s cuBLAS reached there).
Then the same bounds for the lean GEMVs (gemv4, gemv24) that replace them at M <= 2, and for the MMA
tiles at M = 16 (the first sweep's fastest, measured, next to today's default). The bounds are static:
the next H200 call measures the kernels themselves.

    python bench/sass_model.py [--run bench/results/gpu/run1/tune.json] [--shapes 8b.down,...]

Counts depend on the Triton version (the layout it picks): run it with the run's Triton (3.6 for run1,
e.g. in a venv with `pip install triton==3.6.0`) to model what ran.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from llmprune.kernels.compile_check import check_one
from llmprune.kernels.triton_gemm import Config, default_config

ROOT = Path(__file__).resolve().parent.parent

SMS, CLOCK, LANES = 132, 1.98e9, 128  # H200 SXM: SMs, boost clock, thread instructions issued per SM-clock
BYTES_PER_S = 3.3e12  # what cuBLAS F.linear reached on the 8B/70B decode shapes in run1


def floors(out: int, n_in: int, ipw: float, nbytes: int) -> tuple[float, float]:
    """(issue floor, byte floor) in microseconds for one (out, in) matmul at one token."""
    return out * n_in * ipw / (LANES * SMS * CLOCK) * 1e6, nbytes / BYTES_PER_S * 1e6


def counts_at(rev: str, jobs: list[tuple[str, list]]) -> list[float]:
    """Instructions per weight of (format, config) jobs compiled from the kernels of git revision
    `rev` (today's compile_check counts them: it finds the kernel by name)."""
    with tempfile.TemporaryDirectory() as d:
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "llmprune"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", d], input=tar.stdout, check=True)
        shutil.copy(ROOT / "llmprune/kernels/compile_check.py", Path(d) / "llmprune/kernels/compile_check.py")
        code = ("import json, sys\nfrom llmprune.kernels.compile_check import check_one\n"
                "from llmprune.kernels.triton_gemm import Config\n"
                "print(json.dumps([check_one(f, 'fp16', 1, Config(*c), reduce=True)['instr_per_weight'] "
                "for f, c in json.loads(sys.argv[1])]))")
        env = {**os.environ, "PYTHONPATH": d}
        env.pop("TRITON_INTERPRET", None)
        out = subprocess.run([sys.executable, "-c", code, json.dumps(jobs)], capture_output=True, text=True,
                             check=True, env=env, cwd=d).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="bench/results/gpu/run1/tune.json")
    ap.add_argument("--shapes", default="8b.q_o,8b.gate_up,8b.down,70b.gate_up,70b.down")
    a = ap.parse_args(argv)
    every = [r for r in json.loads(Path(a.run).read_text())["rows"] if "ms" in r]
    rows = [r for r in every if r.get("M") == 1]
    rows16 = [r for r in every if r.get("M") == 16]
    env_log = Path(a.run).with_name("env.log").read_text()
    rev = re.search(r"^([0-9a-f]{40})$", env_log, re.MULTILINE).group(1)
    shapes = a.shapes.split(",")
    measured = []  # (shape, format, row) the fastest per kernel kind
    for shape in shapes:
        for fmt in ("sparse24", "w4g128", "w4s24"):
            mine = [r for r in rows if r["shape"] == shape and r["format"] == fmt and r.get("config")]
            for kind in ("gemv", "tile"):
                k = sorted((r for r in mine if r["config"][0] == kind), key=lambda r: r["ms"])
                if k:
                    measured.append((shape, fmt, k[0]))

    tiles16 = []  # (shape, format, row): the fastest MMA tile at M = 16
    for shape in shapes:
        for fmt in ("sparse24", "w4g128", "w4s24"):
            k = sorted((r for r in rows16 if r["shape"] == shape and r["format"] == fmt
                        and (r.get("config") or [None])[0] == "tile"), key=lambda r: r["ms"])
            if k:
                tiles16.append((shape, fmt, k[0]))

    def cfg_of(c: list) -> list:
        return [c[0], c[1], 1 if c[0] != "tile" else c[2], *c[3:7]]

    jobs = sorted({(f, tuple(cfg_of(r["config"]))) for _, f, r in measured + tiles16})
    old = dict(zip(jobs, counts_at(rev, [(f, list(c)) for f, c in jobs])))

    import triton

    print(f"triton {triton.__version__} compiling for sm_90a (the run's compiler is in its env.log)")
    print(f"The first sweep at M = 1 (measured; kernels of {rev[:10]}) against its lower bounds")
    print(f"{'shape':12} {'format':9} {'config':34} {'instr/w':>7} {'issue us':>8} {'bytes us':>8} "
          f"{'measured':>8} {'x floor':>7}")
    for shape in shapes:
        dense = next(r for r in rows if r["shape"] == shape and r["format"] == "dense")
        print(f"{shape:12} {'cuBLAS':9} {'':34} {'':>7} {'':>8} {dense['bytes'] / BYTES_PER_S * 1e6:8.1f} "
              f"{dense['ms'] * 1e3:8.1f}")
        for _, fmt, r in (m for m in measured if m[0] == shape):
            n = old[(fmt, tuple(cfg_of(r["config"])))]
            iss, byt = floors(r["out"], r["in"], n, r["bytes"])
            print(f"{shape:12} {fmt:9} {r['config']!s:34} {n:7.2f} {iss:8.1f} {byt:8.1f} {r['ms'] * 1e3:8.1f} "
                  f"{r['ms'] * 1e3 / max(iss, byt):7.2f}")
    print("\nThe lean GEMVs (default launch shape at M = 1): lower bounds only, not yet timed")
    print(f"{'shape':12} {'format':9} {'config':34} {'instr/w':>7} {'issue us':>8} {'bytes us':>8} "
          f"{'cuBLAS us':>9} {'x cuBLAS at the floor':>21}")
    for shape in shapes:
        dense = next(r for r in rows if r["shape"] == shape and r["format"] == "dense")
        for fmt in ("sparse24", "w4g128", "w4s24"):
            r = next(r for r in rows if r["shape"] == shape and r["format"] == fmt)
            cfg = default_config(fmt, 1, r["in"])
            n = check_one(fmt, "fp16", 1, cfg, reduce=True)["instr_per_weight"]
            iss, byt = floors(r["out"], r["in"], n, r["bytes"])
            print(f"{shape:12} {fmt:9} {cfg.as_list()!s:34} {n:7.2f} {iss:8.1f} {byt:8.1f} "
                  f"{dense['ms'] * 1e3:9.1f} {dense['ms'] * 1e3 / max(iss, byt):21.2f}")
    print("\nThe MMA tiles at M = 16: the first sweep's fastest (measured), today's kernel at that launch shape")
    print("and at the default one (lower bounds only; the 2:4 tiles now place their kept values by shifts)")
    print(f"{'shape':12} {'format':9} {'config':34} {'instr/w':>7} {'issue us':>8} {'bytes us':>8} "
          f"{'measured':>8} {'cuBLAS us':>9} {'x cuBLAS':>8}")
    for shape in shapes:
        dense = next((r for r in rows16 if r["shape"] == shape and r["format"] == "dense"), None)
        for _, fmt, r in (t for t in tiles16 if t[0] == shape):
            n = old[(fmt, tuple(cfg_of(r["config"])))]
            iss, byt = floors(r["out"], r["in"], n, r["bytes"])
            print(f"{shape:12} {fmt:9} {r['config']!s:34} {n:7.2f} {iss:8.1f} {byt:8.1f} {r['ms'] * 1e3:8.1f} "
                  f"{dense['ms'] * 1e3:9.1f} {dense['ms'] / r['ms']:8.2f}")
            for label, cfg in (("  now", Config(*cfg_of(r["config"]))), ("  default", default_config(fmt, 16, r["in"]))):
                n = check_one(fmt, "fp16", 16, cfg, reduce=True)["instr_per_weight"]
                iss, byt = floors(r["out"], r["in"], n, r["bytes"])
                print(f"{'':12} {label:9} {cfg.as_list()!s:34} {n:7.2f} {iss:8.1f} {byt:8.1f} {'floor':>8} "
                      f"{dense['ms'] * 1e3:9.1f} {dense['ms'] * 1e3 / max(iss, byt):8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
