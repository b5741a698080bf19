#!/usr/bin/env bash
# GPTQ scale tuning (--tune-steps) of a real SmolLM2-135M SparseGPT 2:4 output, packed twice: the source loaded
# whole (--onload whole) and read from disk to where the tuning trains (--onload blocks, auto's choice since
# 2026-12-05: onload.gptq_tuned). Prints each pack's wall time and max RSS, whether the tensors are identical, and
# the tuning's KL figures. On the CPU every block is resident in both (nothing streams).
# Usage: bash bench/tune_onload.sh [SRC] | tee bench/results/tune_onload.txt   (SRC is made when missing)
set -euo pipefail
PY=${PY:-.venv/bin/python}
SRC=${1:-/tmp/src24}
OUT=${OUT:-/tmp/tune-onload}
echo "# $(date -u +%F), commit $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes'), $(nproc) cores"
if [ ! -f "$SRC/llmprune.json" ]; then
  echo "\$ llmprune compress --model llama --solver sparsegpt --pattern 2:4 --eval none --no-dense-eval --out $SRC"
  $PY -m llmprune.cli compress --model llama --solver sparsegpt --pattern 2:4 --no-progress --eval none \
    --no-dense-eval --out "$SRC" --overwrite
fi
for mode in whole blocks; do
  cmd="pack $SRC --format w4s24 --quant gptq --grid asym --group-size 48 --nsamples 16 --seqlen 512 --tune-steps 4 --onload $mode --out $OUT-$mode"
  echo "\$ llmprune $cmd"
  /usr/bin/time -f "wall %e s, max RSS %M KiB" $PY -m llmprune.cli $cmd --overwrite --no-progress
done
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
import torch
out = sys.argv[1]
t = {m: {k: v for f in sorted(Path(f"{out}-{m}").glob("*.safetensors")) for k, v in load_file(f).items()}
     for m in ("whole", "blocks")}
same = set(t["whole"]) == set(t["blocks"]) and all(torch.equal(t["whole"][k], t["blocks"][k]) for k in t["whole"])
print("tensors identical:", same)
for m in ("whole", "blocks"):
    man = json.loads(Path(f"{out}-{m}/llmprune.json").read_text())
    tune = man["format"]["quant_options"]["tune"]
    print(f"{m}: onload {man.get('onload')!r}, peak_rss_mib {man.get('peak_rss_mib')}, kl {tune['kl_before']} -> "
          f"{tune['kl_after']} ({tune['kept']}), tuning {tune['seconds']} s, resident {tune['placement']['resident_blocks']}")
PY
