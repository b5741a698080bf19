"""Recorded kernel launch shapes per GPU architecture, from the tuning sweep (bench/gpu_tune.py).

`tuned/<arch>.json` (arch = "sm90" for H100/H200) maps format -> token bucket -> layer shape
"OUTxIN" (or "default") -> [kind, BW, BT, BK, num_warps, num_stages, waves]. The JSON records the
device, versions and the sweep file it came from. A shape that was not swept takes the entry of
the swept shape with the nearest weight size; no file, or a bucket not swept, leaves the choice
to triton_gemm.default_config. Read once per process, only when a CUDA kernel launches.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

DIR = Path(__file__).with_name("tuned")


def arch(device: torch.device | None) -> str | None:
    if device is None or device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


@functools.cache
def table(arch_name: str) -> dict:
    path = DIR / f"{arch_name}.json"
    return json.loads(path.read_text())["configs"] if path.is_file() else {}


def lookup(fmt: str, bucket: int, in_features: int, out_features: int | None, device) -> list | None:
    """The tuned entry [kind, BW, BT, BK, num_warps, num_stages, waves] for (fmt, bucket, shape) on
    this device, or None."""
    a = arch(device)
    entries = table(a).get(fmt, {}).get(str(bucket)) if a else None
    if not entries:
        return None
    key = f"{out_features}x{in_features}"
    if key not in entries:
        shapes = [k for k in entries if "x" in k]
        if not shapes or out_features is None:
            key = "default" if "default" in entries else None
        else:  # the swept shape of the nearest size (log of out * in)
            size = math.log(out_features * in_features)
            key = min(shapes, key=lambda k: abs(math.log(math.prod(map(int, k.split("x")))) - size))
    return list(entries[key]) if key else None
