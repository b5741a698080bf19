#!/usr/bin/env bash
# One H200 session (one call, < 10 min): kernel correctness on CUDA, kernel microbenchmarks, and
# end-to-end decode of a LLaMA-7B-shaped random model (dense vs sparse24, w4s24).
# Installs nothing; run from the repository root. Results and logs go to $OUT (default bench/out).
# Each stage has its own time limit so one slow stage cannot eat the others' budget.
set -u
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.mem --format=csv; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; git rev-parse HEAD 2>/dev/null; } > "$OUT/env.txt" 2>&1
rc=0
stage() {  # stage NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1; local r=$?
  echo "$name rc=$r $((SECONDS - t0))s" | tee -a "$OUT/stages.txt"
  [ $r -ne 0 ] && rc=1
  return 0
}
stage correctness 150 python bench/gpu_check.py "$OUT/correctness.json"
stage microbench 200 python -m llmprune.bench --kernels --json "$OUT/microbench.json"
stage e2e_7b 200 python bench/e2e_7b.py "$OUT/e2e_7b.json" --batch 1,16 --new-tokens 128
tail -n 3 "$OUT"/*.log
exit $rc
