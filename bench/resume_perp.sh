#!/usr/bin/env bash
# PERP's training killed with SIGKILL halfway, then the same `llmprune recover` command run again (resume.py's
# Training), against the same command never interrupted, on the real SmolLM2-135M pruned by Wanda to 50%:
# STEPS steps of 4 x 256-token C4 windows, a checkpoint every 10 s (the default, 600 s, fits runs of hours).
# Prints each run's wall time, what the resumed run says, and whether its output holds the same bytes and
# losses; then the cost of checkpoints: the uninterrupted run again with one after every step (--checkpoint-every 0).
# MODE=compress: the same with `compress --recover perp` (Wanda 50% then PERP in one command: on the CPU alone
# the model is in memory, so the resumed run prunes again before it trains on from the checkpoint).
# Usage: bash bench/resume_perp.sh | tee bench/results/resume_perp.txt
#        MODE=compress bash bench/resume_perp.sh | tee bench/results/resume_perp_compress.txt
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/resume-perp-bench}
STEPS=${STEPS:-40}
KILL_AT=${KILL_AT:-20}  # kill once the checkpoint says this many steps are trained
MODE=${MODE:-recover}
L=($PY -m llmprune.cli)
rm -rf "$OUT"; mkdir -p "$OUT"
echo "# $(date -u +%F), commit $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes'), $(nproc) cores"
secs() { local d=$(( ($(date +%s%N) - $1) / 100000000 )); echo "$((d / 10)).$((d % 10))"; }  # since $1 (ns)
if [ "$MODE" = compress ]; then
  cmd="compress --model llama --solver wanda --sparsity 0.5 --eval none --recover perp --recover-steps $STEPS --no-progress"
else
  echo "\$ llmprune compress --model llama --solver wanda --sparsity 0.5 --eval none --out OUT/pruned"
  "${L[@]}" compress --model llama --solver wanda --sparsity 0.5 --eval none --no-progress --out "$OUT/pruned" > "$OUT/pruned.log" 2>&1
  cmd="recover OUT/pruned --steps $STEPS --seqlen 256 --batch 4 --no-progress"
fi
run() {  # name, extra flags
  local t0=$(date +%s%N)
  "${L[@]}" ${cmd//OUT/$OUT} --out "$OUT/$1" "${@:2}" > "$OUT/$1.log" 2>&1
  echo "$1: wall $(secs $t0) s"
}
echo "\$ llmprune $cmd --out OUT/reference --checkpoint-every off"
run reference --checkpoint-every off
echo "\$ llmprune $cmd --out OUT/resumed --checkpoint-every 10   # killed with SIGKILL once $KILL_AT steps are checkpointed"
t0=$(date +%s%N)
"${L[@]}" ${cmd//OUT/$OUT} --out "$OUT/resumed" --checkpoint-every 10 > "$OUT/killed.log" 2>&1 &
pid=$!
while :; do
  state=$(ls "$OUT"/.resumed.tmp-*/.resume/state.json 2>/dev/null | head -1 || true)
  if [ -n "$state" ] && [ "$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['keep']['train']['step'])" "$state" 2>/dev/null || echo 0)" -ge "$KILL_AT" ]; then
    kill -9 $pid; break
  fi
  kill -0 $pid 2>/dev/null || { echo "the run ended before it could be killed"; exit 1; }
  sleep 0.5
done
wait $pid || true
left=$(dirname "$(dirname "$state")")
echo "killed: wall $(secs $t0) s; left behind: $(basename "$left"), $(du -sh "$left" | cut -f1), of it the training checkpoint $(du -sh "$left"/.resume/train-* | cut -f1)"
echo "\$ llmprune $cmd --out OUT/resumed --checkpoint-every 10   # the same command again"
run resumed --checkpoint-every 10
grep -h "resuming\|resumed " "$OUT/resumed.log"
echo "\$ llmprune $cmd --out OUT/every-step --checkpoint-every 0"
run every-step --checkpoint-every 0
$PY - "$OUT" reference resumed every-step <<'PY'
import json, sys
from pathlib import Path
out = sys.argv[1]
sys.path.insert(0, "bench")
from same_tensors import digest  # sha256 of every weights file, in order
ref = json.load(open(f"{out}/reference/llmprune.json"))["recover"]["losses"]
for name in sys.argv[2:]:
    m = json.load(open(f"{out}/{name}/llmprune.json"))
    r = m["recover"]
    print(f"{name:10s} *.safetensors sha256 {digest(Path(out, name))}  steps {r['steps']}  last loss {r['losses'][-1]:.6f}  "
          f"losses == reference's: {r['losses'] == ref}  trainable {r['n_trainable']:,}  recover wall_s {r.get('wall_s', m['timings'].get('recover_s')):.1f}  "
          f"resumed {m.get('resumed')}")
PY
