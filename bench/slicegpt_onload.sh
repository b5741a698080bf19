#!/usr/bin/env bash
# SliceGPT of the real SmolLM2-135M (the README row: per-block rotation, 25%, --round-to 1, protocol P-cpu),
# twice: the model in memory (--onload whole, how SliceGPT ran until 2026-12-06) and from disk (--onload blocks,
# auto's choice since: each block read, rotated, sliced, written and freed; the embedding and the head a chunk
# of rows at a time). Prints each run's wall time and max RSS, whether the two folders hold the same tensors,
# and each one's perplexity (measured on its saved folder, block by block either way; the README row's 130.7800 was
# measured through the whole load).
# Usage: bash bench/slicegpt_onload.sh | tee bench/results/slicegpt_onload.txt
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/slicegpt-onload}
echo "# $(date -u +%F), commit $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes'), $(nproc) cores"
for mode in whole blocks; do
  cmd="compress --model llama --solver slicegpt --slicing 0.25 --rotation per-block --round-to 1 --no-dense-eval --protocol cpu --no-progress --onload $mode --overwrite --out $OUT-$mode"
  echo "\$ llmprune $cmd"
  /usr/bin/time -f "wall %e s, max RSS %M KiB" $PY -m llmprune.cli $cmd 2>&1 | grep -v WARNING | tail -3
done
$PY bench/same_tensors.py $OUT-whole $OUT-blocks
$PY - "$OUT" <<'PY'
import json, sys
for m in ("whole", "blocks"):
    man = json.load(open(f"{sys.argv[1]}-{m}/llmprune.json"))
    e = man["eval"]["wikitext2"]
    print(f"{m}: onload {man['onload']!r}, ppl {e['ppl']:.4f} (blockwise: {bool(e.get('blockwise'))}), "
          f"params {man['slicegpt']['params_after']:,}, timings {man['timings']}")
PY
