#!/usr/bin/env bash
# A compression killed with SIGKILL halfway, then the same command run again (resume.py), against the same
# command never interrupted, on the real SmolLM2-135M (30 blocks): SparseGPT 50%, 32 x 512 calibration, 8
# evaluation windows, a checkpoint every 20 s (the default, 600 s, fits runs of hours). Prints each run's wall
# time, what the resumed run says, and whether its output holds the same bytes and figures; then the cost of
# checkpoints: the uninterrupted run again with one after every block (--checkpoint-every 0).
# Usage: bash bench/resume.sh | tee bench/results/resume.txt
# Two passes (GPTQ after the pruning, killed in GPTQ's pass; no every-block run). A packed output commits a
# checkpoint when a file is complete: SHARD_BYTES=8000000 makes SmolLM2's 98 MB fill a file every few blocks,
# as 2 GiB files do at 70B (0.4 GB of w4s24 a block):
#   RECIPE="--pattern 2:4 --format w4s24 --quant gptq --grid asym --group-size 48" STAGE=gptq EVERY_BLOCK=0 \
#     SHARD_BYTES=8000000 bash bench/resume.sh | tee bench/results/resume_gptq.txt
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/resume-bench}
KILL_AT=${KILL_AT:-15}  # kill once the checkpoint says this many blocks of pass STAGE are done
STAGE=${STAGE:-prune}
RECIPE=${RECIPE:---sparsity 0.5}
EVERY_BLOCK=${EVERY_BLOCK:-1}
L=($PY -m llmprune.cli)
if [ -n "${SHARD_BYTES:-}" ]; then  # the output's files at most this size (lazy.SHARD_BYTES; default 2 GiB)
  L=($PY -c "import sys; from llmprune import lazy; lazy.SHARD_BYTES = int(sys.argv[1]); from llmprune.cli import main; sys.exit(main(sys.argv[2:]))" "$SHARD_BYTES")
fi
rm -rf "$OUT"; mkdir -p "$OUT"
echo "# $(date -u +%F), commit $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes'), $(nproc) cores${SHARD_BYTES:+, files of at most $SHARD_BYTES bytes}"
cmd="compress --model llama --solver sparsegpt $RECIPE --nsamples 32 --seqlen 512 --eval-windows 8 --no-progress"
secs() { local d=$(( ($(date +%s%N) - $1) / 100000000 )); echo "$((d / 10)).$((d % 10))"; }  # since $1 (ns)
run() {  # name, extra flags
  local t0=$(date +%s%N)
  "${L[@]}" $cmd --out "$OUT/$1" "${@:2}" > "$OUT/$1.log" 2>&1
  echo "$1: wall $(secs $t0) s"
}
echo "\$ llmprune $cmd --out OUT/reference --checkpoint-every off"
run reference --checkpoint-every off
echo "\$ llmprune $cmd --out OUT/resumed --checkpoint-every 20   # killed with SIGKILL once $KILL_AT blocks of the $STAGE pass are checkpointed"
t0=$(date +%s%N)
"${L[@]}" $cmd --out "$OUT/resumed" --checkpoint-every 20 > "$OUT/killed.log" 2>&1 &
pid=$!
while :; do
  state=$(ls "$OUT"/.resumed.tmp-*/.resume/state.json 2>/dev/null | head -1 || true)
  if [ -n "$state" ] && [ "$($PY -c "import json,sys; s=json.load(open(sys.argv[1])); print(s['next_block'] if s.get('stage', 'prune') == sys.argv[2] else 0)" "$state" "$STAGE" 2>/dev/null || echo 0)" -ge "$KILL_AT" ]; then
    kill -9 $pid; break
  fi
  kill -0 $pid 2>/dev/null || { echo "the run ended before it could be killed"; exit 1; }
  sleep 0.5
done
wait $pid || true
echo "killed: wall $(secs $t0) s; left behind: $(basename "$(dirname "$(dirname "$state")")"), $(du -sh "$(dirname "$(dirname "$state")")" | cut -f1)"
echo "\$ llmprune $cmd --out OUT/resumed --checkpoint-every 20   # the same command again"
run resumed --checkpoint-every 20
grep -h "resuming\|resumed at" "$OUT/resumed.log"
names="reference resumed"
if [ "$EVERY_BLOCK" = 1 ]; then
  echo "\$ llmprune $cmd --out OUT/every-block --checkpoint-every 0"
  run every-block --checkpoint-every 0
  names="$names every-block"
fi
$PY - "$OUT" $names <<'PY'
import json, sys
out = sys.argv[1]
from pathlib import Path
sys.path.insert(0, "bench")
from same_tensors import digest  # sha256 of every weights file, in order
for name in sys.argv[2:]:
    m = json.load(open(f"{out}/{name}/llmprune.json"))
    t = m["timings"]
    print(f"{name:12s} *.safetensors sha256 {digest(Path(out, name))}  sparsity {m['sparsity']['measured']:.6f}  "
          f"ppl {m['eval']['wikitext2']['ppl']:.4f} (dense {m['eval']['wikitext2']['dense_ppl']:.4f})  "
          f"compress_s {t['compress_s']}  total_s {t['total_s']}  resumed {m.get('resumed')}")
PY
