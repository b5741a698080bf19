#!/usr/bin/env bash
# The cached copy of a 16-bit GGUF (llmprune/models.py): SmolLM2-135M written by llmprune as GGUF F16 and BF16,
# each dequantized into a fresh cache as llmprune does now (F16 / BF16 tensors kept in their dtype, "kept") and
# with every tensor's cached dtype set to fp32 ("fp32": the cache's dtypes before 2026-12-07, through today's
# code): the folder's bytes, seconds and peak RSS of the conversion, whether the tensors are equal, and the
# perplexity of each copy (WikiText-2, 8 windows of 2048, fp32 on the CPU).
#   bash bench/gguf_cache.sh            (SYN=/some/disk for the copies; ~5 min on 2 cores)
set -eu
cd "$(dirname "$0")/.."
S=${SYN:-/tmp/llmprune-gguf-cache}; R=bench/results/gguf_cache.txt
rm -rf "$S"; mkdir -p "$S"
python -m llmprune.cli compress --model llama --sparsity 0 --solver magnitude --eval none --no-progress \
    --out "$S/dense" > /dev/null
python -m llmprune.cli export "$S/dense" --to gguf --type f16,bf16 --out "$S/g" --no-progress > /dev/null
{
  echo "\$ bash bench/gguf_cache.sh   ($(date -u +%F), $(nproc) cores, $(python -c 'import torch, transformers, gguf; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
  for f in "$S"/g/*.gguf; do
    for how in kept fp32; do
      export LLMPRUNE_CACHE="$S/cache-$(basename "$f" .gguf)-$how"
      /usr/bin/time -f "  convert: wall %e s, max RSS %M KiB" python - "$f" "$how" <<'PY' 2>&1 | grep -v "de-quantizing"
import sys
from pathlib import Path
import torch
from llmprune import models
if sys.argv[2] == "fp32":  # the conversion before 2026-12-07: every tensor in fp32
    models._cached_dtype = lambda kind, keep16: torch.float32
folder, _ = models.gguf_to_folder(Path(sys.argv[1]))
size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
print(f"{Path(sys.argv[1]).name} cached ({sys.argv[2]}): {size / 1e6:.1f} MB of safetensors, "
      f"config dtype {__import__('json').loads((folder / 'config.json').read_text())['dtype']}")
PY
      python -m llmprune.cli eval "$(ls -d "$LLMPRUNE_CACHE"/models/*/)" --windows 8 --no-progress 2>&1 | grep -i "ppl\|wikitext" | sed 's/^/  /'
    done
    python - "$S/cache-$(basename "$f" .gguf)-kept" "$S/cache-$(basename "$f" .gguf)-fp32" <<'PY'
import sys
from pathlib import Path
from safetensors.torch import load_file
def read(c):
    (folder,) = Path(c, "models").iterdir()
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
a, b = read(sys.argv[1]), read(sys.argv[2])
same = set(a) == set(b) and all(a[k].float().equal(b[k]) for k in a)
print(f"  tensors: {len(a)}, kept == fp32 (as floats): {same}; dtypes kept: {sorted({str(v.dtype) for v in a.values()})}")
PY
  done
} | tee "$R"
