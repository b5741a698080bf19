"""Whether two output folders hold the same tensors: names, then each tensor compared one at a time.

    python bench/same_tensors.py FOLDER_A FOLDER_B     (exit 1 when they differ)
"""
import hashlib
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def tensors(folder: Path) -> dict[str, Path]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            names = list(h.keys())
        out.update((n, f) for n in names)
    return out


def digest(folder) -> str:
    """sha256 of every weights file of `folder`, in name order (the first 16 hex digits): same bytes, same digest."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def main(a: str, b: str) -> int:
    ta, tb = tensors(Path(a)), tensors(Path(b))
    if ta.keys() != tb.keys():
        print(f"different names: {sorted(ta.keys() ^ tb.keys())[:5]}")
        return 1
    differ = []
    for n in sorted(ta):
        with safe_open(ta[n], "pt") as ha, safe_open(tb[n], "pt") as hb:
            if not torch.equal(ha.get_tensor(n), hb.get_tensor(n)):
                differ.append(n)
    print(f"{len(ta)} tensors, {len(differ)} differ" + (f": {differ[:5]}" if differ else " (bit-identical)"))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
