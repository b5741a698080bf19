"""Markdown tables from the GPU results (bench/results/gpu/): kernel speed against cuBLAS and the
issue's targets, end-to-end decode, correctness. Reads only the recorded JSON.

    python bench/gpu_summary.py [bench/results/gpu] > bench/results/gpu/SUMMARY.md
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

# targets at M = 1..16 (x cuBLAS) and the byte limit (fp16 bytes / format bytes) from issue 17
TARGETS = {"sparse24": (1.5, 1.78), "w4g128": (3.0, 3.88), "w4s24": (4.0, 5.1)}
FORMATS = ("sparse24", "torch_2:4", "w4g128", "torch_int4", "w4s24", "w4s50")


def kernel_table(rows: list[dict]) -> str:
    by = {}
    for r in rows:
        by.setdefault((r["shape"], r["M"]), {})[r["format"]] = r
    out = ["| shape | M | cuBLAS us | " + " | ".join(f"{f} us (x)" for f in FORMATS) + " |",
           "|---|---:|---:|" + "---:|" * len(FORMATS)]
    for (shape, m), fs in sorted(by.items(), key=lambda kv: (kv[0][0][:2] != "8b", kv[0][0], kv[0][1])):
        d = fs["dense"]["ms"]
        cells = [f"{fs[f]['ms'] * 1e3:.1f} ({d / fs[f]['ms']:.2f}x)" if f in fs else "-" for f in FORMATS]
        out.append(f"| {shape} | {m} | {d * 1e3:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def target_table(rows: list[dict]) -> str:
    """Geometric mean over the 8B and 70B layer shapes at M = 1..16 against each target."""
    out = ["| format | x cuBLAS at M=1..16 (geo-mean, min-max) | target | byte limit | x cuBLAS at M=512 (min) | met |",
           "|---|---:|---:|---:|---:|---|"]
    dense = {(r["shape"], r["M"]): r["ms"] for r in rows if r["format"] == "dense"}
    for f in ("sparse24", "w4g128", "w4s24", "w4s50", "torch_2:4", "torch_int4"):
        dec = [dense[(r["shape"], r["M"])] / r["ms"] for r in rows if r["format"] == f and r["M"] <= 16]
        pre = [dense[(r["shape"], r["M"])] / r["ms"] for r in rows if r["format"] == f and r["M"] == 512]
        if not dec:
            continue
        gm = statistics.geometric_mean(dec)
        tgt, lim = TARGETS.get(f, (None, None))
        met = "-" if tgt is None else ("yes" if gm >= tgt and min(pre) >= 0.9 else "**missed**")
        out.append(f"| {f} | {gm:.2f} ({min(dec):.2f}-{max(dec):.2f}) | {tgt or '-'} | {lim or '-'} | "
                   f"{min(pre):.2f} | {met} |")
    return "\n".join(out)


def e2e_table(*docs: dict) -> str:
    out = ["| model | batch | mode | ms/token median | p90 | tokens/s | effective GB/s | peak GiB | x dense |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for d in docs:
        for r in d["rows"]:
            if "batch" not in r:
                out.append(f"| {r['model']} | - | failed: {r['error'][:60]} | | | | | | |")
                continue
            peak = f"{r['peak_mem_MiB'] / 1024:.1f}"
            if "peak_of" not in r and not r["model"].startswith("dense"):
                peak += " (with the dense linears)"  # run2: the script held the dense model alongside
            out.append(f"| {r['model']} | {r['batch']} | {r['mode']} | {r['ms_per_step_median']:.2f} | "
                       f"{r['ms_per_step_p90']:.2f} | {r['tokens_per_s']:.0f} | {r['effective_GBps']:.0f} | "
                       f"{peak} | {r.get('speedup_vs_dense', float('nan')):.2f} |")
    return "\n".join(out)


def profile_table(*docs: dict) -> str:
    """Where one decode step goes: its kernels (one eager step under torch.profiler) against the
    CUDA-graph step time. Empty for runs before the profile was recorded."""
    out = ["| model | batch | step ms (graph) | kernels | GPU-busy ms | gaps ms | costliest kernels (count, ms) |",
           "|---|---:|---:|---:|---:|---:|---|"]
    for d in docs:
        for r in d["rows"]:
            p = r.get("profile")
            if not p:
                continue
            if "error" in p:
                out.append(f"| {r['model']} | {r['batch']} | {r['ms_per_step_median']:.2f} | profile failed: "
                           f"{p['error'][:80]} | | | |")
                continue
            top = "; ".join(f"{t['name'][:48]} ({t['count']}, {t['ms']:.2f})" for t in p["top"][:4])
            out.append(f"| {r['model']} | {r['batch']} | {r['ms_per_step_median']:.2f} | {p['n_kernels']} | "
                       f"{p['busy_ms']:.2f} | {r['ms_per_step_median'] - p['busy_ms']:.2f} | {top} |")
    return "\n".join(out) if len(out) > 2 else ""


def linears_table(d: dict) -> str:
    out = ["| format | batch | all 224 decoder linears, one graph (ms) | bytes read (GB) | GB/s | x dense |",
           "|---|---:|---:|---:|---:|---:|"]
    dense = {r["batch"]: r["ms"] for r in d["linears"] if r["model"] == "dense"}
    for r in d["linears"]:
        out.append(f"| {r['model']} | {r['batch']} | {r['ms']:.2f} | {r['bytes'] / 1e9:.2f} | {r['GBps']:.0f} | "
                   f"{dense[r['batch']] / r['ms']:.2f} |")
    return "\n".join(out)


def latest(root: Path, rel: str) -> tuple[str, dict]:
    """The newest run (highest runN/ folder) that has `rel`, and that file's JSON."""
    runs = sorted((d for d in root.glob("run*") if d.name[3:].isdigit() and (d / rel).exists()),
                  key=lambda d: int(d.name[3:]))
    if not runs:
        raise SystemExit(f"gpu_summary: no run*/{rel} under {root}; put the GPU results there first")
    return runs[-1].name, json.loads((runs[-1] / rel).read_text())


def main(argv=None) -> int:
    root = Path((argv or sys.argv[1:] or ["bench/results/gpu"])[0])
    run_t, tune = latest(root, "micro/tune.json")
    run_c, corr = latest(root, "correctness.json")
    run_e, e2e = latest(root, "e2e.json")
    run_ec, comp = latest(root, "e2e_compiled.json")
    env = tune["env"]
    picked = [r for r in tune["rows"] if r.get("picked", True)]
    devices = {run_t: env.get("device"), run_c: corr.get("device"), run_e: e2e.get("device"),
               run_ec: comp.get("device")}  # the newest run of each file: an H100 and an H200 run may mix
    mixed = len(set(devices.values())) > 1
    print(f"# GPU results\n\n{env.get('device')}, torch {env.get('torch')}, triton {env.get('triton')}, "
          f"CUDA {env.get('cuda')}; driver in {run_t}/env.log. Kernels: {run_t}, correctness: {run_c}, "
          f"decode: {run_e} and {run_ec} (the newest run holding each file).\n")
    if mixed:
        print("Not one machine: " + ", ".join(f"{r} ran on {d}" for r, d in sorted(devices.items()))
              + "; compare figures only within a run.\n")
    print(f"## Correctness\n\n{len(corr['rows'])} checks (formats x shapes x M x fp16/bf16, split-K repeat "
          f"determinism, counters re-armed, torch.compile): {corr['failures']} failures.\n")
    print("## Kernels against the targets (launch shape ops.linear picks, CUDA graph, L2 flushed, median)\n")
    print(target_table(picked) + "\n")
    print("## Kernel times per shape\n\n" + kernel_table(picked) + "\n")
    print("## End-to-end decode, LLaMA-3-8B-shaped, fp16, prompt 128 + 128 tokens\n")
    print(e2e_table(e2e, comp) + "\n")
    prof = profile_table(e2e, comp)
    if prof:
        print("## Where a decode step goes (batch 1: kernels of one eager step against the graph step)\n\n"
              + prof + "\n")
    print("## The decoder linears alone (what the kernels cost inside a step)\n\n" + linears_table(e2e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
