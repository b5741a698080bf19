"""Blockwise perplexity (onload.evaluate: one pass over the blocks on disk) with and without reading the
next block ahead on a background thread (lazy.READ_AHEAD), each run in a fresh process.

    python bench/read_ahead.py FOLDER [--device cpu] [--windows 2] [--seqlen 256] [--reps 2] [--cold]

--cold drops the page cache before each run (Linux, root), so the blocks come from the disk. Prints
one line per run (seconds, perplexity, peak RSS, peak GPU memory) and the median of each mode.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def one(folder: str, device: str, windows: int, seqlen: int, mode: str) -> dict:
    import resource

    import torch
    from transformers import AutoTokenizer

    from llmprune import lazy, onload

    lazy.READ_AHEAD = mode == "on"
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    lz, tok = lazy.LazyModel(folder, dtype), AutoTokenizer.from_pretrained(folder)
    t = time.perf_counter()
    r = onload.evaluate(lz, tok, ["wikitext2"], seqlen, windows, device, False, {})["wikitext2"]
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return {"mode": mode, "seconds": round(time.perf_counter() - t, 2), "ppl": r["ppl"],
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "peak_gpu_mib": gpu}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.folder, a.device, a.windows, a.seqlen, a.one)))
        return
    runs = []
    if a.cold and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        print("--cold: cannot drop the page cache here (Linux, root): the runs read a warm cache")
        a.cold = False
    for _ in range(a.reps):
        for mode in ("on", "off"):
            if a.cold:
                os.sync()
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3\n")
            out = subprocess.run([sys.executable, __file__, a.folder, "--device", a.device, "--windows", str(a.windows),
                                  "--seqlen", str(a.seqlen), "--one", mode], capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    for mode in ("on", "off"):
        got = [r for r in runs if r["mode"] == mode]
        print(f"read-ahead {mode}: median {round(statistics.median(r['seconds'] for r in got), 2)} s, peak RSS "
              f"{max(r['peak_rss_mib'] for r in got)} MiB, ppl {got[0]['ppl']:.6f}")


if __name__ == "__main__":
    main()
