#!/usr/bin/env bash
# The Mixture-of-Experts path on real text: SmolLM2-135M upcycled into a Mixtral of 4 identical experts, top-2, a
# random router (bench/upcycle_moe.py: it computes what SmolLM2 computes, dense 20.433), then compressed as any MoE
# model, protocol cpu: each expert pruned from the tokens its router sends it (Wanda 50%, 2:4), the 2:4 output
# packed expert by expert (sparse24; w4s24 RTN and GPTQ, asymmetric groups of 64) and each figure measured on its
# saved folder (packed: run by moe.SplitExperts); SmolLM2's own rows made again the same way on the same machine, for
# comparison (the README's rows come from another processor).
#   bash bench/moe_upcycled.sh          (SYN=/some/disk for the models; ~30 min on 2 cores)
set -eu
cd "$(dirname "$0")/.."
S=${SYN:-/tmp/llmprune-upcycled}; R=bench/results/moe_upcycled
mkdir -p "$R" "$S"
[ -f "$S/smollm2-moe4/upcycled.json" ] || python bench/upcycle_moe.py "$S/smollm2-moe4" --experts 4 --top-k 2
cp "$S/smollm2-moe4/upcycled.json" "$R/upcycled.json"
step() {  # step NAME ARGS...: an llmprune command whose output is $S/NAME; its console, time and manifest kept
  local name=$1; shift
  [ -f "$R/$name.json" ] && { echo "skip $name (bench/results/moe_upcycled/$name.json exists)"; return 0; }
  { echo "\$ llmprune $* --no-progress --overwrite --out $S/$name"
    /usr/bin/time -f "wall %e s, max RSS %M KiB" python -m llmprune.cli "$@" --no-progress --overwrite \
        --out "$S/$name" 2>&1; } | tee "$R/$name.txt"
  cp "$S/$name/llmprune.json" "$R/$name.json"
}
M=$S/smollm2-moe4
step moe4-wanda-50 compress --model "$M" --sparsity 0.5 --protocol cpu
step moe4-wanda-24 compress --model "$M" --pattern 2:4 --protocol cpu --no-dense-eval
G="--grid asym --group-size 64"
step moe4-wanda-24-sparse24 pack "$S/moe4-wanda-24" --format sparse24 --eval wikitext2 --eval-windows 16 --eval-seqlen 2048
step moe4-wanda-24-w4s24-rtn pack "$S/moe4-wanda-24" --format w4s24 --quant rtn $G --eval wikitext2 --eval-windows 16 \
    --eval-seqlen 2048
step moe4-wanda-24-w4s24-gptq pack "$S/moe4-wanda-24" --format w4s24 --quant gptq $G --nsamples 64 --seqlen 512 \
    --eval wikitext2 --eval-windows 16 --eval-seqlen 2048
# SmolLM2 itself, the same steps
step llama-wanda-50 compress --model llama --sparsity 0.5 --protocol cpu
step llama-wanda-24 compress --model llama --pattern 2:4 --protocol cpu --no-dense-eval
step llama-wanda-24-w4s24-rtn pack "$S/llama-wanda-24" --format w4s24 --quant rtn $G --eval wikitext2 --eval-windows 16 \
    --eval-seqlen 2048
step llama-wanda-24-w4s24-gptq pack "$S/llama-wanda-24" --format w4s24 --quant gptq $G --nsamples 64 --seqlen 512 \
    --eval wikitext2 --eval-windows 16 --eval-seqlen 2048
