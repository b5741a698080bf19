#!/usr/bin/env bash
# `llmprune sweep` of the real SmolLM2-135M, twice: the model in memory (--onload whole, each point restoring the
# dense weights) and from disk (--onload blocks, auto's choice since 2026-12-05: each point pruned block by block
# into a scratch folder and evaluated from there). Prints each run's rows, wall time and max RSS, and whether the
# figures are identical.
# Usage: bash bench/sweep_onload.sh | tee bench/results/sweep_onload.txt
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/sweep-onload}
echo "# $(date -u +%F), commit $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes'), $(nproc) cores"
for mode in whole blocks; do
  cmd="sweep --model llama --solvers wanda,sparsegpt --sparsity 0.5,0.6 --nsamples 16 --seqlen 512 --eval-windows 8 --onload $mode --out $OUT-$mode"
  echo "\$ llmprune $cmd"
  /usr/bin/time -f "wall %e s, max RSS %M KiB" $PY -m llmprune.cli $cmd --no-progress 2>&1 | grep -v WARNING
done
$PY - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = {m: json.load(open(f"{out}-{m}/sweep.json")) for m in ("whole", "blocks")}
keys = ("solver", "target", "sparsity", "ppl_wikitext2")
print("figures identical:", all({k: a[k] for k in keys} == {k: b[k] for k in keys}
                                for a, b in zip(rows["whole"], rows["blocks"])) and len(rows["whole"]) == len(rows["blocks"]))
for m in ("whole", "blocks"):
    meta = json.load(open(f"{out}-{m}/sweep_meta.json"))
    print(f"{m}: onload {meta['onload']!r}; per point (compress_s, peak_rss_mib):",
          [(r["compress_s"], r["peak_rss_mib"]) for r in rows[m][1:]])
PY
