"""transformers' get_gguf_hf_weights_map (the GGUF -> transformers tensor names of a GGUF's conversion,
models._dequantize_gguf) with gguf's get_tensor_name_map built anew in every submodule it recurses into (as
transformers calls it) and built once (models.one_name_map): its seconds and the maps built, for SmolLM2-135M (30
layers) and tiny Llamas (hidden 64) of 16 / 40 / 80 layers, the two maps compared; then the whole conversion
(models.gguf_to_folder, each into a fresh cache) of SmolLM2's Q4_1 GGUF and of the deepest tiny Llama exported as
F32 GGUF, before and after, and the two cached folders compared byte for byte.

    python bench/gguf_namemap.py [--layers 16,40,80] [--map-only] | tee -a bench/results/gguf_namemap.txt
    (~3 min on 2 cores)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import gguf
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM
from transformers.modeling_gguf_pytorch_utils import (
    TENSOR_PROCESSORS,
    TensorProcessor,
    get_gguf_hf_weights_map,
)

from llmprune import models
from llmprune.cli import main as cli
from llmprune.testing import FAST_CLI, tiny_config, tiny_model_dir

BUILDS = [0]


def counted(build):
    def f(arch, n_blocks):
        BUILDS[0] += 1
        return build(arch, n_blocks)
    return f


def skeleton(config):
    with init_empty_weights():
        s = AutoModelForCausalLM.from_config(config)
    s.tie_weights()
    return s


def mapping(label, config, parsed_config: dict, family: str) -> None:
    s, maps = skeleton(config), {}
    for way, ctx in (("before", contextlib.nullcontext), ("after", models.one_name_map)):
        BUILDS[0] = 0
        processor = TENSOR_PROCESSORS.get(family, TensorProcessor)(config=parsed_config)
        t = time.perf_counter()
        with ctx():
            maps[way] = get_gguf_hf_weights_map(s, processor)
        print(f"  map {label:>24} {way:>6}: {time.perf_counter() - t:7.2f} s, {BUILDS[0]:4} name maps built, "
              f"{len(maps[way])} names", flush=True)
    print(f"  map {label:>24}: the same names: {maps['before'] == maps['after']}", flush=True)


def convert(label, f: Path, cache: Path) -> None:
    os.environ["LLMPRUNE_CACHE"] = str(cache)
    models._sha256(f)  # (hashing the file is not part of the conversion; remembered in the cache's sha256.json)
    real, got = models.one_name_map, {}
    for way, ctx in (("before", contextlib.nullcontext), ("after", real)):
        shutil.rmtree(cache / "models", ignore_errors=True)
        models.one_name_map = ctx
        try:
            t = time.perf_counter()
            folder, _ = models.gguf_to_folder(f)
            dt = time.perf_counter() - t
        finally:
            models.one_name_map = real
        got[way] = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
        print(f"  convert {label:>20} {way:>6}: {dt:7.2f} s", flush=True)
    same = got["before"] == got["after"]
    print(f"  convert {label:>20}: {len(got['after'])} files ({', '.join(got['after'])}) byte-identical: {same}",
          flush=True)


def tiny_gguf(n: int, work: Path) -> Path:
    """A tiny Llama of n layers as an F32 GGUF (llmprune compress --sparsity 0, then export --to gguf)."""
    src = tiny_model_dir(work / f"hf{n}", num_hidden_layers=n)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli([str(a) for a in ("compress", "--model", src, "--sparsity", "0", "--solver", "magnitude",
                                     "--out", work / f"d{n}", *FAST_CLI)]) == 0
        assert cli([str(a) for a in ("export", work / f"d{n}", "--to", "gguf", "--type", "f32", "--out",
                                     work / f"g{n}", "--no-progress")]) == 0
    return next((work / f"g{n}").glob("*.gguf"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="16,40,80", help="depths of the tiny Llamas")
    ap.add_argument("--map-only", action="store_true", help="skip the whole conversions")
    a = ap.parse_args()
    layers = [int(x) for x in a.layers.split(",")]
    root = Path(__file__).resolve().parents[1]
    git = lambda *c: subprocess.run(["git", *c], check=False, cwd=root, capture_output=True, text=True)
    head = git("rev-parse", "--short", "HEAD").stdout.strip() + ("" if git("diff", "--quiet").returncode == 0
                                                                  else "+changes")
    print(f"$ python bench/gguf_namemap.py {' '.join(sys.argv[1:])}   ({date.today()}, {os.cpu_count()} cores, "
          f"HEAD {head}, transformers {__import__('transformers').__version__}, gguf "
          f"{__import__('importlib.metadata').metadata.version('gguf')})", flush=True)
    gguf.get_tensor_name_map = counted(gguf.get_tensor_name_map)  # (one_name_map wraps it: builds that got through)

    smol = models.alias_gguf("llama")
    src = models._GGUF(smol)
    mapping(f"SmolLM2 ({src.config().num_hidden_layers} layers)", src.config(), src.parsed["config"], src.family)
    for n in layers:
        mapping(f"tiny llama {n} layers", tiny_config("llama", num_hidden_layers=n), {}, "llama")
    if a.map_only:
        return
    with tempfile.TemporaryDirectory(prefix="llmprune-namemap-") as w:
        work = Path(w)
        convert("SmolLM2 Q4_1", smol, work / "cache")
        convert(f"tiny llama {layers[-1]} F32", tiny_gguf(layers[-1], work), work / "cache")


if __name__ == "__main__":
    main()
