"""Reading one decoder block's MXFP4 experts of gpt-oss-20b's shape (llmprune/mxfp4.py): its gate_up_proj
(32 experts, 5760 x 2880) and down_proj (32, 2880 x 2880) stored as blocks and scales (random codes, scales
2^-17..2^-3) in a safetensors file, read dequantized by llmprune (lazy.WeightFiles.get, as a block walk reads
them) and by transformers' convert_moe_packed_tensors (what its dequantizing load runs); each read in a fresh
process, so its peak RSS is its own. Checks that both give the same tensors.

    python bench/mxfp4_read.py [--experts 32] [--reps 2] [--dir /tmp/llmprune-mxfp4]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

NAMES = ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj")


def make(folder: Path, experts: int) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    t = {}
    for name, (rows, width) in zip(NAMES, ((5760, 2880), (2880, 2880))):
        t[name + "_blocks"] = torch.randint(0, 256, (experts, rows, width // 32, 16), generator=g, dtype=torch.uint8)
        t[name + "_scales"] = torch.randint(110, 125, (experts, rows, width // 32), generator=g, dtype=torch.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})


def one(folder: Path, who: str, dtype: str) -> dict:
    import resource

    import torch

    from llmprune import lazy

    dt = getattr(torch, dtype)
    files = lazy.WeightFiles(folder)
    files.read_mxfp4()
    sums, t0 = [], time.perf_counter()
    for n in NAMES:
        if who == "llmprune":
            w = files.get(n, dt)
        else:
            from transformers.integrations.mxfp4 import convert_moe_packed_tensors

            w = convert_moe_packed_tensors(files.get(n + "_blocks"), files.get(n + "_scales"), dtype=dt)
        sums.append(sum(float(w[e].double().sum()) for e in range(w.shape[0])))  # (an expert's copy at a time)
        del w
    return {"who": who, "dtype": dtype, "seconds": round(time.perf_counter() - t0, 2), "sums": sums,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/llmprune-mxfp4")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    folder = Path(a.dir)
    if a.one:
        print(json.dumps(one(folder, *a.one)))
        return
    import torch

    make(folder, a.experts)
    print(f"gpt-oss-20b-shaped block, {a.experts} experts; torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for _ in range(a.reps):
        for dtype in ("bfloat16", "float32"):
            for who in ("llmprune", "transformers"):
                out = subprocess.run([sys.executable, __file__, "--dir", str(folder), "--one", who, dtype],
                                     check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                rows.append(r)
                print(f"{who:12s} {dtype:8s} {r['seconds']:6.2f} s  peak RSS {r['peak_rss_mib']:,} MiB")
    for dtype in ("bfloat16", "float32"):
        sums = {tuple(r["sums"]) for r in rows if r["dtype"] == dtype}
        print(f"{dtype}: both read the same weights (sums {'equal' if len(sums) == 1 else 'DIFFER'})")


if __name__ == "__main__":
    main()
