"""ShardWriter.copy of one stored tensor into a new output in another dtype (a dense output keeps the source's
embedding and head this way), timed REPS times in one process (each into a fresh temporary folder in /tmp).

    python bench/copy_convert.py FOLDER [TENSOR] [--dtype float32] [--reps 4]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from llmprune import lazy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("tensor", nargs="?", default="lm_head.weight")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=4)
    a = ap.parse_args()
    src = Path(a.folder)
    index = src / lazy.INDEX
    f = src / json.loads(index.read_text())["weight_map"][a.tensor] if index.exists() else src / "model.safetensors"
    head, _ = lazy.safetensors_header(f)
    shape, dtype = tuple(head[a.tensor]["shape"]), getattr(torch, a.dtype)
    for _ in range(a.reps):
        with tempfile.TemporaryDirectory(dir="/tmp") as d:
            w = lazy.ShardWriter(d, [(a.tensor, shape, dtype)], lambda n: None)
            t = time.perf_counter()
            w.copy(a.tensor, f)
            w.finish()
            print(f"copy {head[a.tensor]['dtype']} -> {a.dtype} of {a.tensor} {shape}: {time.perf_counter() - t:.2f} s",
                  flush=True)


if __name__ == "__main__":
    main()
