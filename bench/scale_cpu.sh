#!/usr/bin/env bash
# Real sizes on this 2-core, 24 GiB CPU machine: a Llama-3-8B-shaped model (random weights, bf16 on
# disk, 16 GB) compressed block by block from disk within a few GiB, and peak RSS against depth.
#   bash bench/scale_cpu.sh [8b] [sgpt4] [depth] [pack_export] [gguf_gptq] [perp] [zeroshot] [moe] [moe_stats] [moe_pack] [moe_tune] [slicegpt] [slicegpt_pack]   (SYN=/some/disk for the synthetic models; ~60 GB free)
# Each run's manifest (timings, peak_rss_mib, io_bytes) and console log go to bench/results/scale/;
# the outputs themselves are deleted after their manifest is kept (they are 8-16 GB each).
set -euo pipefail
cd "$(dirname "$0")/.."
R=bench/results/scale
S=${SYN:-/tmp/llmprune-synthetic}
mkdir -p "$R" "$S"
STAGES=${*:-8b depth}
LOG=$R/scale.log
C="--calib c4 --no-progress --overwrite"

run() {  # run NAME ARGS...: compress, keep the manifest and the log, drop the output
  local name=$1; shift
  [ -f "$R/$name.json" ] && { echo "skip $name"; return 0; }
  { echo; echo "### $name  $(date -u +%FT%TZ)"; echo "\$ llmprune compress $*"; } >> "$LOG"
  python -m llmprune.cli compress "$@" --out "$S/out-$name" >> "$LOG" 2>&1
  cp "$S/out-$name/llmprune.json" "$R/$name.json"
  du -sb "$S/out-$name" | cut -f1 > "$R/$name.bytes"
  rm -rf "$S/out-$name"
}

step() {  # step NAME CMD ARGS... --out DIR: any llmprune command; keeps its manifest (+ /usr/bin/time's max RSS)
  local name=$1; shift
  [ -f "$R/$name.json" ] && { echo "skip $name"; return 0; }
  { echo; echo "### $name  $(date -u +%FT%TZ)"; echo "\$ llmprune $*"; } >> "$LOG"
  /usr/bin/time -f "wall %e s, max RSS %M KiB" python -m llmprune.cli "$@" --no-progress >> "$LOG" 2>&1
  local out="${*: -1}"
  cp "$out/llmprune.json" "$R/$name.json"
  du -sb "$out" | cut -f1 > "$R/$name.bytes"
}

zeroshot() {  # zeroshot NAME FOLDER ARGS...: `llmprune eval FOLDER --tasks ...`; its record + /usr/bin/time's wall and max RSS
  local name=$1 folder=$2; shift 2
  [ -f "$R/$name.json" ] && { echo "skip $name"; return 0; }
  { echo; echo "### $name  $(date -u +%FT%TZ)"; echo "\$ llmprune eval $folder $*"; } >> "$LOG"
  /usr/bin/time -o "$R/$name.time" -f "wall %e s, max RSS %M KiB" \
      python -m llmprune.cli eval "$folder" "$@" --json "$R/$name.json" --no-progress >> "$LOG" 2>&1
  cat "$R/$name.time" >> "$LOG"
}

synth() {  # synth NAME ARGS...: the synthetic source, written once
  [ -f "$S/$1/config.json" ] || python bench/make_synthetic.py "$S/$1" "${@:2}" >> "$LOG" 2>&1
}

keep() {  # keep N: the Wanda 50% output of the N-block 8B-width model (in $k) that pack, export, PERP and zero-shot start from
  synth llama3-8b-l$1 --arch llama3-8b --dtype bfloat16 --layers $1
  k=$S/keep-l$1-wanda-50
  [ -f "$k/llmprune.json" ] || python -m llmprune.cli compress --model "$S/llama3-8b-l$1" --solver wanda \
      --sparsity 0.5 --nsamples 8 --seqlen 256 --eval none $C --out "$k" >> "$LOG" 2>&1
}

if [[ " $STAGES " == *" 8b "* ]]; then
  synth llama3-8b --arch llama3-8b --dtype bfloat16
  run llama3-8b-wanda-50 --model "$S/llama3-8b" --solver wanda --sparsity 0.5 --nsamples 8 --seqlen 256 \
      --eval wikitext2 --eval-seqlen 256 --eval-windows 2 --no-dense-eval $C
  run llama3-8b-sparsegpt-24 --model "$S/llama3-8b" --solver sparsegpt --pattern 2:4 --nsamples 8 --seqlen 256 \
      --eval wikitext2 --eval-seqlen 256 --eval-windows 2 --no-dense-eval $C
fi
if [[ " $STAGES " == *" sgpt4 "* ]]; then  # SparseGPT at the full 8B width, 4 blocks (per-block memory and time)
  synth llama3-8b-l4 --arch llama3-8b --dtype bfloat16 --layers 4
  run depth-l4-sparsegpt-24 --model "$S/llama3-8b-l4" --solver sparsegpt --pattern 2:4 --nsamples 8 --seqlen 256 \
      --eval wikitext2 --eval-seqlen 256 --eval-windows 2 --no-dense-eval $C
fi
if [[ " $STAGES " == *" depth "* ]]; then  # the same width, 4 / 8 / 16 / 32 blocks: peak RSS should be flat
  for n in 4 8 16; do
    synth llama3-8b-l$n --arch llama3-8b --dtype bfloat16 --layers $n
    run depth-l$n-wanda-50 --model "$S/llama3-8b-l$n" --solver wanda --sparsity 0.5 --nsamples 8 --seqlen 256 \
        --eval none $C
  done
  run depth-l32-wanda-50 --model "$S/llama3-8b" --solver wanda --sparsity 0.5 --nsamples 8 --seqlen 256 --eval none $C
fi
if [[ " $STAGES " == *" pack_export "* ]]; then  # pack and export a saved output at 8B width, 4 and 16 blocks:
  # each reads its source one block at a time, so the peak should not grow with depth; pack --onload whole
  # at 4 blocks for contrast (the whole model in fp32, the compute dtype here)
  for n in 4 16; do
    keep $n
    step pack-l$n-w4g128 pack "$k" --format w4g128 --overwrite --out "$S/pack-l$n"
    step export-l$n-ct export "$S/pack-l$n" --to compressed-tensors --overwrite --out "$S/ct-l$n"
    step export-l$n-gguf export "$k" --to gguf --type q4_0 --overwrite --out "$S/gguf-l$n"
    rm -rf "$S/pack-l$n" "$S/ct-l$n" "$S/gguf-l$n"
  done
  step pack-l4-w4g128-whole pack "$S/keep-l4-wanda-50" --format w4g128 --onload whole --overwrite --out "$S/pack-l4-whole"
  rm -rf "$S/pack-l4-whole"
fi
if [[ " $STAGES " == *" gguf_gptq "* ]]; then  # GPTQ on a GGUF export of the 4-block 8B-width Wanda output: GPTQ's
  # pass from disk writes each block into the file as it finishes it; its peak beside export-l4-gguf-chunked's
  # (gguf's own Q4_0 of the same output)
  keep 4
  step export-l4-gguf-gptq export "$k" --to gguf --quant gptq --calib c4 --nsamples 8 --seqlen 256 --overwrite \
      --out "$S/gguf-gptq-l4"
  # and the same GPTQ pass packing w4g128 instead (the two commands it replaces, first of them): what GPTQ's pass
  # itself holds, without the GGUF writer
  step pack-l4-w4g128-gptq32 pack "$k" --format w4g128 --group-size 32 --grid sym --quant gptq --calib c4 \
      --nsamples 8 --seqlen 256 --overwrite --out "$S/pack-gptq-l4"
  rm -rf "$S/gguf-gptq-l4" "$S/pack-gptq-l4"
fi
if [[ " $STAGES " == *" perp "* ]]; then  # PERP of a saved 8B-width output: the whole model trains (it must), so
  # the peak grows with depth; what it should not hold is an fp32 copy of the frozen bf16 weights or a mask per weight.
  # 2 steps of 1 x 128 tokens: memory, not quality (random weights)
  for n in 4 16; do
    keep $n
    for dt in bfloat16 float32; do
      [ $n = 16 ] && [ $dt = float32 ] && continue  # (18 GB of fp32 weights plus training: past this machine)
      step perp-l$n-$dt recover "$k" --dtype $dt --steps 2 --batch 1 --seqlen 128 --overwrite --out "$S/perp-l$n"
      rm -rf "$S/perp-l$n"
    done
  done
fi
if [[ " $STAGES " == *" moe "* ]]; then  # a Qwen3-30B-A3B-shaped model (128 experts of 768, stored one linear per
  # expert as the published checkpoint is), 2 and 4 blocks: compressed block by block (experts fused as each block
  # is read), the peak should not grow with depth; --onload whole at 4 blocks for contrast (how these models ran
  # before 2026-12-06); the 4-block output exported to compressed-tensors (RTN and GPTQ: one int4 linear per expert)
  for n in 2 4; do
    synth qwen3-30b-a3b-l$n --arch qwen3-30b-a3b --dtype bfloat16 --layers $n
    run moe-l$n-wanda-50 --model "$S/qwen3-30b-a3b-l$n" --solver wanda --sparsity 0.5 --nsamples 8 --seqlen 256 \
        --eval none --onload blocks $C
  done
  run moe-l4-wanda-50-whole --model "$S/qwen3-30b-a3b-l4" --solver wanda --sparsity 0.5 --nsamples 8 --seqlen 256 \
      --eval none --onload whole $C
  m=$S/keep-moe-l4-wanda-50
  [ -f "$m/llmprune.json" ] || python -m llmprune.cli compress --model "$S/qwen3-30b-a3b-l4" --solver wanda \
      --sparsity 0.5 --nsamples 8 --seqlen 256 --eval none $C --out "$m" >> "$LOG" 2>&1
  step moe-l4-export-ct-rtn export "$m" --to compressed-tensors --overwrite --out "$S/moe-ct"
  step moe-l4-export-ct-gptq export "$m" --to compressed-tensors --quant gptq --calib c4 --nsamples 8 --seqlen 256 \
      --overwrite --out "$S/moe-ct-gptq"
  rm -rf "$S/moe-ct" "$S/moe-ct-gptq"
fi
if [[ " $STAGES " == *" moe_stats "* ]]; then  # SparseGPT 50% on the 2-block Qwen3-30B-A3B-shaped model: a block's
  # 128 experts' gate/up Hessians (2 GiB in fp32) held at once under the default budget (a quarter of RAM), and
  # collected a run at a time within 0.24 GiB (--hessian-gib; 1% of this machine's RAM): the peak should fall, the
  # weights not move
  synth qwen3-30b-a3b-l2 --arch qwen3-30b-a3b --dtype bfloat16 --layers 2
  for gib in "" 0.24; do
    name=moe-l2-sparsegpt-50${gib:+-hessian$gib}
    step $name compress --model "$S/qwen3-30b-a3b-l2" --solver sparsegpt --sparsity 0.5 --nsamples 8 --seqlen 256 \
        --eval none --onload blocks ${gib:+--hessian-gib $gib} $C --out "$S/out-$name"
  done
  python bench/same_tensors.py "$S/out-moe-l2-sparsegpt-50" "$S/out-moe-l2-sparsegpt-50-hessian0.24" \
      | tee "$R/moe-l2-sparsegpt-50-hessian.txt"
  rm -rf "$S"/out-moe-l2-sparsegpt-50*
fi
if [[ " $STAGES " == *" moe_pack "* ]]; then  # Wanda 2:4 on the 2-block Qwen3-30B-A3B-shaped model, packed as w4s24
  # block by block: every expert's gate/up/down one packed linear (128 x 3 a block), then read back block by block
  # (experts run one module each: moe.SplitExperts) for its perplexity (random weights: the figure means nothing)
  synth qwen3-30b-a3b-l2 --arch qwen3-30b-a3b --dtype bfloat16 --layers 2
  step moe-l2-wanda-24-w4s24 compress --model "$S/qwen3-30b-a3b-l2" --solver wanda --pattern 2:4 --format w4s24 \
      --nsamples 8 --seqlen 256 --eval wikitext2 --eval-seqlen 256 --eval-windows 2 --no-dense-eval --onload blocks \
      $C --out "$S/out-moe-l2-wanda-24-w4s24"
  rm -rf "$S/out-moe-l2-wanda-24-w4s24"
fi
if [[ " $STAGES " == *" moe_tune "* ]]; then  # GPTQ + scale tuning of the experts (quant/tune.py: each fused experts
  # module trains as one ScaledLinear per expert projection) on the 2-block Qwen3-30B-A3B-shaped model pruned Wanda 2:4,
  # packed w4s24: read from disk (the experts' fused weights the codes cover are not read for the tuning) against the
  # source loaded whole; the two folders' tensors compared (random weights: the KL figures mean nothing)
  synth qwen3-30b-a3b-l2 --arch qwen3-30b-a3b --dtype bfloat16 --layers 2
  m=$S/keep-moe-l2-wanda-24
  [ -f "$m/llmprune.json" ] || python -m llmprune.cli compress --model "$S/qwen3-30b-a3b-l2" --solver wanda \
      --pattern 2:4 --nsamples 8 --seqlen 256 --eval none --onload blocks $C --out "$m" >> "$LOG" 2>&1
  for r in blocks whole; do
    step moe-l2-w4s24-gptq-tune2-$r pack "$m" --format w4s24 --quant gptq --calib c4 --nsamples 8 --seqlen 256 \
        --tune-steps 2 --onload $r --overwrite --out "$S/moe-tune-$r"
  done
  python bench/same_tensors.py "$S/moe-tune-blocks" "$S/moe-tune-whole" | tee "$R/moe-l2-w4s24-gptq-tune2.txt"
  rm -rf "$S/moe-tune-blocks" "$S/moe-tune-whole"
fi
if [[ " $STAGES " == *" zeroshot "* ]]; then  # zero-shot of a saved 8B-width output, 4 and 16 blocks, in bf16:
  # walked block by block, the peak should not grow with depth (random weights: the accuracies mean nothing)
  for n in 4 16; do
    keep $n
    zeroshot zeroshot-l$n-bfloat16 "$k" --tasks piqa --limit 10 --dtype bfloat16
  done
fi
if [[ " $STAGES " == *" slicegpt "* ]]; then  # SliceGPT 25% (per-block rotation) at the 8B width: 4 blocks loaded
  # whole (how SliceGPT ran before 2026-12-06) and from disk, the two folders' tensors compared, then 8 blocks from
  # disk (the peak should not grow with depth). 16 x 256 calibration tokens: at least the hidden size (4096), for
  # a full-rank covariance. The 4-block output from disk is evaluated block by block (its residual shortcuts walked;
  # random weights: the figure means nothing)
  for n in 4 8; do synth llama3-8b-l$n --arch llama3-8b --dtype bfloat16 --layers $n; done
  SL="--solver slicegpt --slicing 0.25 --nsamples 16 --seqlen 256 --no-dense-eval"
  step slicegpt-l4-whole compress --model "$S/llama3-8b-l4" $SL --eval none --onload whole $C --out "$S/slicegpt-l4-whole"
  step slicegpt-l4 compress --model "$S/llama3-8b-l4" $SL --eval wikitext2 --eval-seqlen 256 --eval-windows 2 \
      --onload blocks $C --out "$S/slicegpt-l4"
  python bench/same_tensors.py "$S/slicegpt-l4" "$S/slicegpt-l4-whole" | tee "$R/slicegpt-l4.txt"
  rm -rf "$S/slicegpt-l4" "$S/slicegpt-l4-whole"
  step slicegpt-l8 compress --model "$S/llama3-8b-l8" $SL --eval none --onload blocks $C --out "$S/slicegpt-l8"
  rm -rf "$S/slicegpt-l8"
fi

if [[ " $STAGES " == *" slicegpt_pack "* ]]; then  # SliceGPT 25% then w4g128 GPTQ, from disk, at the 8B width (4
  # blocks): sliced into a scratch folder (fp32, the compute dtype) that GPTQ's pass reads block by block (loaded whole
  # until 2026-12-06); the packed output evaluated block by block (random weights: the figure means nothing)
  synth llama3-8b-l4 --arch llama3-8b --dtype bfloat16 --layers 4
  SL="--solver slicegpt --slicing 0.25 --nsamples 16 --seqlen 256 --no-dense-eval"
  step slicegpt-w4g128-gptq-l4 compress --model "$S/llama3-8b-l4" $SL --format w4g128 --quant gptq --eval wikitext2 \
      --eval-seqlen 256 --eval-windows 2 --onload blocks $C --out "$S/slicegpt-w4g128-gptq-l4"
  rm -rf "$S/slicegpt-w4g128-gptq-l4"
fi
