#!/usr/bin/env bash
# A block-scaled FP8 source (llmprune/fp8.py) on the real embedded model: SmolLM2-135M rewritten as DeepSeek-V3
# stores its weights (float8_e4m3fn, a float32 scale per 128 x 128 block; its 576-wide layers cut the last block of
# each row and column short, as DeepSeek-V3's 576-row kv_a_proj does), then compressed as any model: Wanda 50%,
# protocol cpu. Its dense figure is the FP8 model's (the unquantized model reads 20.433, 44.895 pruned).
#   bash bench/fp8_source.sh            (SYN=/some/disk for the FP8 copy; ~5 min on 2 cores)
set -eu
cd "$(dirname "$0")/.."
S=${SYN:-/tmp/llmprune-fp8}; R=bench/results/fp8
mkdir -p "$R" "$S"
python - "$S/smollm2-fp8" <<'PY'
import shutil, sys
from llmprune import models
from llmprune.testing import to_fp8
src, dst = models.resolve("llama").path, sys.argv[1]
shutil.rmtree(dst, ignore_errors=True)
shutil.copytree(src, dst)
to_fp8(dst, (128, 128))
PY
{ echo "\$ llmprune compress --model $S/smollm2-fp8 --sparsity 0.5 --protocol cpu --no-progress --overwrite --out $S/out"
  /usr/bin/time -f "wall %e s, max RSS %M KiB" python -m llmprune.cli compress --model "$S/smollm2-fp8" --sparsity 0.5 \
      --protocol cpu --no-progress --overwrite --out "$S/out" 2>&1; } | tee "$R/llama-fp8-wanda-50.txt"
cp "$S/out/llmprune.json" "$R/llama-fp8-wanda-50.json"
