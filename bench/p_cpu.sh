#!/usr/bin/env bash
# Protocol P-cpu on this repo's 2-core CPU machine: fp32, CPU, calibration C4 64 x 512 seed 0,
# WikiText-2 perplexity over 16 windows of 2048. Runs each figure of the README's tables; a
# step whose output folder exists is skipped, so the script resumes where it stopped.
#   [ONLY="NAME ..."] bash bench/p_cpu.sh [STAGE...]     stages: base formats zeroshot sweep solvers seeds perp slicegpt speed quant gemma plain
#                                      alps alps60 alps_owl50 alps_seeds alps_speed dsnot dsnot_seeds gemma_alps gemma_dsnot rerun
# Outputs go to runs/ (ignored by git); each manifest is copied to bench/results/NAME.json and
# every command's console output is appended to bench/results/p_cpu.log. ONLY="NAME ...": run just those
# outputs of the stages (e.g. the README's rows again, on their saved files).
set -u
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
R=runs; B=bench/results; LOG=$B/p_cpu.log
mkdir -p $R $B
P="--protocol cpu --no-progress"
run() {  # run NAME CMD...: skip when runs/NAME exists (returns 1 then, so `run ... && evalp ...` skips
  # the evaluation too); record the command, its output, the manifest
  local name=$1; shift
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 1; fi
  if [ -e "$R/$name/llmprune.json" ]; then echo "skip $name (exists)"; return 1; fi
  { echo; echo "### $name  $(date -u +%FT%TZ)"; echo "\$ $*"; } >> $LOG
  /usr/bin/time -f "wall %e s, max RSS %M KiB" "$@" >> $LOG 2>&1
  local rc=$?
  [ -e "$R/$name/llmprune.json" ] && cp "$R/$name/llmprune.json" "$B/$name.json" && sizes "$name"
  echo "$name rc=$rc" | tee -a $LOG
}
sizes() {  # sizes NAME: record runs/NAME's safetensors bytes in results/file_sizes.json (runs/ is not kept)
  python - "$1" <<'PY'
import json, sys
from pathlib import Path
name, p = sys.argv[1], Path("bench/results/file_sizes.json")
d = json.loads(p.read_text()) if p.exists() else {}
d[name] = sum(f.stat().st_size for f in Path("runs", name).glob("*.safetensors"))
p.write_text(json.dumps(dict(sorted(d.items())), indent=1) + "\n")
PY
}
evalp() {  # evalp NAME: WikiText-2 ppl of a packed output (through its runtime modules)
  { echo; echo "### eval $1  $(date -u +%FT%TZ)"; echo "\$ llmprune eval $R/$1 --ppl wikitext2 --windows 16"; } >> $LOG
  python -m llmprune.cli eval $R/$1 --ppl wikitext2 --windows 16 --no-progress >> $LOG 2>&1
  cp "$R/$1/llmprune.json" "$B/$1.json"
}
L="python -m llmprune.cli"
stage_base() {
  run llama-wanda-50 $L compress --model llama --solver wanda --sparsity 0.5 $P --out $R/llama-wanda-50
  run llama-wanda-24 $L compress --model llama --solver wanda --pattern 2:4 $P --out $R/llama-wanda-24
  run llama-magnitude-50 $L compress --model llama --solver magnitude --sparsity 0.5 $P --out $R/llama-magnitude-50
  run gemma3-wanda-50 $L compress --model gemma3 --solver wanda --sparsity 0.5 $P --out $R/gemma3-wanda-50
}
stage_formats() {
  # the source of the w4s24 packs (the first one was run by hand, 2026-11-29)
  run llama-sparsegpt-24 $L compress --model llama --solver sparsegpt --pattern 2:4 --no-dense-eval $P --out $R/llama-sparsegpt-24
  # SparseGPT 2:4 + int4 (w4s24): RTN, and GPTQ (block-sequential) on the grid that won the ablation
  G=$(python -c "import json; r={x['config']: x['ppl'] for x in json.load(open('$B/quant_ablation.json'))['rows']}; print('--grid asym --group-size 64' if r.get('gptq:asym:64', 1e9) < r.get('gptq:sym:auto', 1e9) else '')" 2>/dev/null)
  run llama-sparsegpt-24-w4s24-rtn $L pack $R/llama-sparsegpt-24 --format w4s24 --quant rtn $G --out $R/llama-sparsegpt-24-w4s24-rtn --no-progress && evalp llama-sparsegpt-24-w4s24-rtn
  run llama-sparsegpt-24-w4s24-gptq $L pack $R/llama-sparsegpt-24 --format w4s24 --quant gptq $G --nsamples 64 --seqlen 512 --out $R/llama-sparsegpt-24-w4s24-gptq --no-progress && evalp llama-sparsegpt-24-w4s24-gptq
  # groups of 48 inputs: the finest asymmetric grid that fits w4s24's 0.22x budget (3 + 24/48 bits a weight)
  # and the best of bench/quant_ablation.py's grids (README: Formats)
  G48="--grid asym --group-size 48"
  run llama-sparsegpt-24-w4s24-rtn-g48 $L pack $R/llama-sparsegpt-24 --format w4s24 --quant rtn $G48 --out $R/llama-sparsegpt-24-w4s24-rtn-g48 --no-progress && evalp llama-sparsegpt-24-w4s24-rtn-g48
  run llama-sparsegpt-24-w4s24-gptq-g48 $L pack $R/llama-sparsegpt-24 --format w4s24 --quant gptq $G48 --nsamples 64 --seqlen 512 --out $R/llama-sparsegpt-24-w4s24-gptq-g48 --no-progress && evalp llama-sparsegpt-24-w4s24-gptq-g48
  # + end-to-end scale tuning after GPTQ (quant/tune.py): 64 steps of 2 windows, KL to the unquantized model
  T="--nsamples 64 --seqlen 512 --tune-steps 64"
  run llama-sparsegpt-24-w4s24-gptq-g48-tune64 $L pack $R/llama-sparsegpt-24 --format w4s24 --quant gptq $G48 $T --out $R/llama-sparsegpt-24-w4s24-gptq-g48-tune64 --no-progress && evalp llama-sparsegpt-24-w4s24-gptq-g48-tune64
  # the same with calibration seed 1 (other C4 windows for GPTQ and tuning): is 1.03x a lucky draw?
  run llama-sparsegpt-24-w4s24-gptq-g48-tune64-seed1 $L pack $R/llama-sparsegpt-24 --format w4s24 --quant gptq $G48 $T --seed 1 --out $R/llama-sparsegpt-24-w4s24-gptq-g48-tune64-seed1 --no-progress && evalp llama-sparsegpt-24-w4s24-gptq-g48-tune64-seed1
  run llama-sparsegpt-24-w4s24-gptq-g48-seed1 $L pack $R/llama-sparsegpt-24 --format w4s24 --quant gptq $G48 --nsamples 64 --seqlen 512 --seed 1 --out $R/llama-sparsegpt-24-w4s24-gptq-g48-seed1 --no-progress && evalp llama-sparsegpt-24-w4s24-gptq-g48-seed1
  run llama-wanda-24-sparse24 $L pack $R/llama-wanda-24 --format sparse24 --out $R/llama-wanda-24-sparse24 --no-progress && evalp llama-wanda-24-sparse24
  run llama-wanda-24-w4s24-rtn $L pack $R/llama-wanda-24 --format w4s24 --quant rtn --out $R/llama-wanda-24-w4s24-rtn --no-progress && evalp llama-wanda-24-w4s24-rtn
  run llama-wanda-24-w4s24-gptq $L pack $R/llama-wanda-24 --format w4s24 --quant gptq --nsamples 64 --seqlen 512 --out $R/llama-wanda-24-w4s24-gptq --no-progress && evalp llama-wanda-24-w4s24-gptq
  run llama-wanda-g16 $L compress --model llama --solver wanda --pattern group:16 --sparsity 0.5 --no-dense-eval $P --out $R/llama-wanda-g16
  run llama-wanda-g16-w4s50-rtn $L pack $R/llama-wanda-g16 --format w4s50 --quant rtn --out $R/llama-wanda-g16-w4s50-rtn --no-progress && evalp llama-wanda-g16-w4s50-rtn
  run llama-wanda-g16-w4s50-gptq $L pack $R/llama-wanda-g16 --format w4s50 --quant gptq --nsamples 64 --seqlen 512 --out $R/llama-wanda-g16-w4s50-gptq --no-progress && evalp llama-wanda-g16-w4s50-gptq
  # Gemma-3-270M: sizes only (the layout, not the solver, sets the bytes): magnitude needs no calibration
  run gemma3-dense $L compress --model gemma3 --solver magnitude --sparsity 0 --eval none $P --out $R/gemma3-dense
  run gemma3-mag-24 $L compress --model gemma3 --solver magnitude --pattern 2:4 --eval none $P --out $R/gemma3-mag-24
  run gemma3-mag-g16 $L compress --model gemma3 --solver magnitude --pattern group:16 --sparsity 0.5 --eval none $P --out $R/gemma3-mag-g16
  run gemma3-sparse24 $L pack $R/gemma3-mag-24 --format sparse24 --out $R/gemma3-sparse24 --no-progress
  run gemma3-w4s24 $L pack $R/gemma3-mag-24 --format w4s24 --out $R/gemma3-w4s24 --no-progress
  run gemma3-w4g128 $L pack $R/gemma3-dense --format w4g128 --out $R/gemma3-w4g128 --no-progress
  run gemma3-w4s50 $L pack $R/gemma3-mag-g16 --format w4s50 --out $R/gemma3-w4s50 --no-progress
  run llama-dense $L compress --model llama --solver magnitude --sparsity 0 $P --out $R/llama-dense
  run llama-dense-w4g128-rtn $L pack $R/llama-dense --format w4g128 --quant rtn --out $R/llama-dense-w4g128-rtn --no-progress && evalp llama-dense-w4g128-rtn
  run llama-dense-w4g128-gptq $L pack $R/llama-dense --format w4g128 --quant gptq --nsamples 64 --seqlen 512 --out $R/llama-dense-w4g128-gptq --no-progress && evalp llama-dense-w4g128-gptq
  run llama-dense-w4g128-gptq-tune64 $L pack $R/llama-dense --format w4g128 --quant gptq $T --out $R/llama-dense-w4g128-gptq-tune64 --no-progress && evalp llama-dense-w4g128-gptq-tune64
  run llama-wanda-24-w4s24-gptq-tune64 $L pack $R/llama-wanda-24 --format w4s24 --quant gptq $T --out $R/llama-wanda-24-w4s24-gptq-tune64 --no-progress && evalp llama-wanda-24-w4s24-gptq-tune64
}
stage_plain() {  # GPTQ as the paper runs it (no act-order, sink 1), the defaults until 2026-11-30: these rows
  # were packed from transformers 5.23 sources (the `*` rows of docs/formats.md). Not a default stage, and not
  # one to run alone: a source made again on another processor is another model (bench/results/machine_spread.txt),
  # so run it with the sources and every pack of them on one machine: rm -rf runs; bash bench/p_cpu.sh base formats plain
  N="--no-act-order --sink-weight 1 --nsamples 64 --seqlen 512 --no-progress"
  run llama-sparsegpt-24-w4s24-gptq-plain $L pack $R/llama-sparsegpt-24 --format w4s24 --quant gptq --grid asym --group-size 64 $N --out $R/llama-sparsegpt-24-w4s24-gptq-plain && evalp llama-sparsegpt-24-w4s24-gptq-plain
  run llama-wanda-24-w4s24-gptq-plain $L pack $R/llama-wanda-24 --format w4s24 --quant gptq $N --out $R/llama-wanda-24-w4s24-gptq-plain && evalp llama-wanda-24-w4s24-gptq-plain
  run llama-dense-w4g128-gptq-plain $L pack $R/llama-dense --format w4g128 --quant gptq $N --out $R/llama-dense-w4g128-gptq-plain && evalp llama-dense-w4g128-gptq-plain
  run llama-wanda-g16-w4s50-gptq-plain $L pack $R/llama-wanda-g16 --format w4s50 --quant gptq $N --out $R/llama-wanda-g16-w4s50-gptq-plain && evalp llama-wanda-g16-w4s50-gptq-plain
}
stage_gemma() {  # Gemma-3-270M's quality per format (~55 min here, the tuning 26 of them); not a default stage.
  # Its inputs are 640, 1024 and 2048 wide (no groups of 48): asymmetric groups of 64 (0.211x) for w4s24
  run gemma3-sparsegpt-24 $L compress --model gemma3 --solver sparsegpt --pattern 2:4 --no-dense-eval $P --out $R/gemma3-sparsegpt-24
  run gemma3-sparsegpt-24-sparse24 $L pack $R/gemma3-sparsegpt-24 --format sparse24 --out $R/gemma3-sparsegpt-24-sparse24 --no-progress && evalp gemma3-sparsegpt-24-sparse24
  G64="--grid asym --group-size 64"
  run gemma3-sparsegpt-24-w4s24-rtn $L pack $R/gemma3-sparsegpt-24 --format w4s24 --quant rtn $G64 --out $R/gemma3-sparsegpt-24-w4s24-rtn --no-progress && evalp gemma3-sparsegpt-24-w4s24-rtn
  run gemma3-sparsegpt-24-w4s24-gptq $L pack $R/gemma3-sparsegpt-24 --format w4s24 --quant gptq $G64 --nsamples 64 --seqlen 512 --out $R/gemma3-sparsegpt-24-w4s24-gptq --no-progress && evalp gemma3-sparsegpt-24-w4s24-gptq
  run gemma3-sparsegpt-24-w4s24-gptq-tune64 $L pack $R/gemma3-sparsegpt-24 --format w4s24 --quant gptq $G64 --nsamples 64 --seqlen 512 --tune-steps 64 --out $R/gemma3-sparsegpt-24-w4s24-gptq-tune64 --no-progress && evalp gemma3-sparsegpt-24-w4s24-gptq-tune64
  run gemma3-w4g128-rtn $L pack $R/gemma3-dense --format w4g128 --quant rtn --out $R/gemma3-w4g128-rtn --no-progress && evalp gemma3-w4g128-rtn
  run gemma3-w4g128-gptq $L pack $R/gemma3-dense --format w4g128 --quant gptq --nsamples 64 --seqlen 512 --out $R/gemma3-w4g128-gptq --no-progress && evalp gemma3-w4g128-gptq
}
stage_quant() {  # the int4 grid ablation on the SparseGPT 2:4 model (README: Formats), about 45 min; not a default stage
  python bench/quant_ablation.py $R/llama-sparsegpt-24 --json $B/quant_ablation.json --configs \
    rtn:sym:auto,gptq:sym:auto,gptq:asym:64,gptq:asym:64:seq,gptq:asym:64:act:sink16,gptq:sym:32:act:sink16,gptq:asym:48:act:sink8,gptq:asym:48:act:sink16,gptq:asym:48:act:sink32,gptq:asym:32:act:sink16,gptq:asym:24:act:sink16 >> $LOG 2>&1
  python bench/quant_ablation.py $R/llama-sparsegpt-24 --json $B/quant_ablation.json --nsamples 256 --configs gptq:asym:64:act:sink16 >> $LOG 2>&1
}
stage_zeroshot() {  # the dense model through its alias; first 100 examples of each task
  T=boolq,rte,winogrande,arc_easy,arc_challenge,openbookqa,piqa
  for n in llama $R/llama-wanda-50 $R/llama-wanda-24; do
    name=$(basename $n); [ $name = llama ] && name=llama-dense
    [ -e $B/zeroshot-$name.json ] && continue
    { echo; echo "### zeroshot $name  $(date -u +%FT%TZ)"; echo "\$ llmprune eval $n --tasks $T --limit 100"; } >> $LOG
    t0=$(date +%s)
    /usr/bin/time -f "wall %e s" $L eval $n --tasks $T --limit 100 --json $B/zeroshot-$name.json --no-progress >> $LOG 2>&1
    echo "{\"wall_s\": $(( $(date +%s) - t0 ))}" > $B/zeroshot-$name-time.json
  done
}
stage_sweep() {
  { echo; echo "### sweep  $(date -u +%FT%TZ)"; } >> $LOG
  [ -e $B/sweep/sweep.csv ] || $L sweep --model llama --solvers magnitude,wanda --sparsity 0.3:0.8:0.1 $P --out $B/sweep >> $LOG 2>&1
}
stage_solvers() {  # each unstructured row with and without OWL (OWL cannot vary an N:M pattern's sparsity)
  S=magnitude,wanda,sparsegpt,dsnot+init=wanda,dsnot+init=sparsegpt
  O=magnitude+owl,wanda+owl,sparsegpt+owl,dsnot+init=wanda+owl,dsnot+init=sparsegpt+owl
  [ -e $B/solvers-24/sweep.csv ] || $L sweep --model llama --solvers $S --pattern 2:4 --sparsity 0.5 $P --out $B/solvers-24 >> $LOG 2>&1
  for s in 70 60 50; do  # solvers-50 stopped early: its -fix sweep below has the cells it lacked
    [ -e $B/solvers-$s-fix/sweep_meta.json ] || sweep1 solvers-$s --solvers $S,$O --sparsity 0.$s
  done
  sweep1 solvers-50-fix --solvers sparsegpt+owl,dsnot+init=wanda+owl,dsnot+init=sparsegpt+owl,magnitude+owl --sparsity 0.5
  # the 2:4 sweep predates per-point peak RSS: its points again, for that column (DSnoT(SparseGPT)'s is in -fix)
  sweep1 solvers-24-fix2 --solvers magnitude,wanda,sparsegpt,dsnot+init=wanda --pattern 2:4 --sparsity 0.5
  stage_seeds
  stage_speed
}
sweep1() {  # sweep1 FOLDER ARGS...: one llmprune sweep into bench/results/FOLDER unless it finished
  local d=$1; shift
  [ -e $B/$d/sweep_meta.json ] && return
  echo "### sweep $d  $(date -u +%FT%TZ)" >> $LOG
  $L sweep --model llama "$@" $P --out $B/$d >> $LOG 2>&1
}
stage_seeds() {  # the 70% SparseGPT-based cells under other calibration seeds (one seed per cell is not enough)
  sweep1 solvers-70-seed1 --solvers sparsegpt --sparsity 0.7 --seed 1
  sweep1 solvers-70-seed1b --solvers dsnot+init=sparsegpt,sparsegpt+owl,dsnot+init=sparsegpt+owl --sparsity 0.7 --seed 1
  sweep1 solvers-70-seed2 --solvers sparsegpt,dsnot+init=sparsegpt --sparsity 0.7 --seed 2
}
stage_speed() {  # compress wall time of SparseGPT against Wanda (llama-wanda-50), each alone on the machine
  run llama-sparsegpt-50 $L compress --model llama --solver sparsegpt --sparsity 0.5 --no-dense-eval $P --out $R/llama-sparsegpt-50
}
stage_alps() {  # ALPS (arXiv 2406.07831): 2:4, 70%, 50%, 60%, unstructured with and without OWL
  sweep1 solvers-24-alps --solvers alps --pattern 2:4 --sparsity 0.5
  sweep1 solvers-70-alps --solvers alps,alps+owl --sparsity 0.7
  sweep1 solvers-50-alps --solvers alps,alps+owl --sparsity 0.5
}
stage_alps60() {
  sweep1 solvers-60-alps --solvers alps,alps+owl --sparsity 0.6
}
stage_alps_owl50() {  # the first 50% sweep was stopped after its ALPS point (other jobs had the cores): its +OWL point
  sweep1 solvers-50-alps-owl --solvers alps+owl --sparsity 0.5
}
stage_alps_seeds() {  # ALPS against SparseGPT with calibration seed 1, in the same sweep (also their time ratio)
  sweep1 solvers-24-seed1-alps --solvers sparsegpt,alps --pattern 2:4 --sparsity 0.5 --seed 1
  sweep1 solvers-70-seed1-alps --solvers alps --sparsity 0.7 --seed 1  # SparseGPT seed 1 and 2: solvers-70-seed1, -seed2
  sweep1 solvers-50-seed1-alps --solvers sparsegpt,alps --sparsity 0.5 --seed 1
}
stage_dsnot() {  # DSnoT as the reference defines it (zyxxmu/DSnoT 4c029df), and with our extra acceptance rule
  stage_dsnot70; stage_dsnot70_sign; stage_dsnot60; stage_dsnot_noskip
}
stage_dsnot70() {
  sweep1 solvers-70-dsnot --solvers dsnot+init=wanda,dsnot+init=sparsegpt,dsnot+init=wanda+lower_error=1,dsnot+init=sparsegpt+lower_error=1 --sparsity 0.7
}
stage_dsnot70_sign() {  # the first release's sign rule (reject a swap that flips the sign of eps) in the unstructured case too
  sweep1 solvers-70-dsnot-sign --solvers dsnot+init=wanda+same_sign=1,dsnot+init=sparsegpt+same_sign=1 --sparsity 0.7
}
stage_dsnot60() {
  sweep1 solvers-60-dsnot --solvers dsnot+init=wanda,dsnot+init=sparsegpt,dsnot+init=wanda+lower_error=1,dsnot+init=sparsegpt+lower_error=1 --sparsity 0.6
}
stage_dsnot_noskip() {  # every linear refined (the reference's release skips the MLP)
  sweep1 solvers-70-dsnot-noskip --solvers dsnot+init=wanda+skip=none,dsnot+init=sparsegpt+skip=none --sparsity 0.7
}
stage_dsnot_seeds() {  # 70%, calibration seeds 1 and 2: DSnoT against its initial mask under the same seed
  sweep1 solvers-70-seed1-dsnot --solvers wanda,dsnot+init=wanda --sparsity 0.7 --seed 1
  sweep1 solvers-70-seed2-dsnot --solvers wanda,dsnot+init=wanda --sparsity 0.7 --seed 2
}
stage_rerun() {  # the baselines ALPS and DSnoT are compared with, again under transformers 5.25 (the Nov 29
  # cells came from 5.23, which gives other calibration activations: SparseGPT 2:4 80.02 there, 77.18 here)
  sweep1 solvers-24-rerun --solvers wanda,sparsegpt --pattern 2:4 --sparsity 0.5
  for s in 50 60 70; do sweep1 solvers-$s-rerun --solvers wanda,sparsegpt,sparsegpt+owl --sparsity 0.$s; done
  sweep1 solvers-70-seed1-rerun --solvers sparsegpt --sparsity 0.7 --seed 1  # ALPS's seed-1 baseline
}
stage_gemma_dsnot() {  # DSnoT(Wanda) against Wanda at 70% on a second architecture (Gemma-3-270M)
  [ -e $B/gemma3-dsnot-70/sweep_meta.json ] && return
  echo "### sweep gemma3-dsnot-70  $(date -u +%FT%TZ)" >> $LOG
  $L sweep --model gemma3 --solvers wanda,dsnot+init=wanda,dsnot+init=wanda+lower_error=1 --sparsity 0.7 $P --out $B/gemma3-dsnot-70 >> $LOG 2>&1
}
stage_alps_speed() {  # compress wall time of ALPS and SparseGPT back to back (2:4 and 70%), nothing else running
  run llama-alps-24 $L compress --model llama --solver alps --pattern 2:4 --no-dense-eval $P --out $R/llama-alps-24
  run llama-sparsegpt-24-again $L compress --model llama --solver sparsegpt --pattern 2:4 --no-dense-eval $P --out $R/llama-sparsegpt-24-again
  run llama-alps-70 $L compress --model llama --solver alps --sparsity 0.7 --no-dense-eval $P --out $R/llama-alps-70
  run llama-sparsegpt-70 $L compress --model llama --solver sparsegpt --sparsity 0.7 --no-dense-eval $P --out $R/llama-sparsegpt-70
}
stage_gemma_alps() {  # Gemma-3-270M 2:4: ALPS next to SparseGPT (gemma3-sparsegpt-24, stage gemma)
  run gemma3-alps-24 $L compress --model gemma3 --solver alps --pattern 2:4 --no-dense-eval $P --out $R/gemma3-alps-24
}
stage_perp() {  # rank 4: norms + MaskLoRA stay under 1% of the parameters; one 512-token window a step
  Q="--steps 200 --rank 4 --lr 5e-4 --batch 1 --seqlen 512 --no-grad-checkpointing --eval wikitext2 --eval-windows 16 --no-progress"
  run llama-wanda-70 $L compress --model llama --solver wanda --sparsity 0.7 --no-dense-eval $P --out $R/llama-wanda-70
  run llama-wanda-70-perp $L recover $R/llama-wanda-70 $Q --out $R/llama-wanda-70-perp
  run llama-wanda-60 $L compress --model llama --solver wanda --sparsity 0.6 --no-dense-eval $P --out $R/llama-wanda-60
  run llama-wanda-60-perp $L recover $R/llama-wanda-60 $Q --out $R/llama-wanda-60-perp
  # a SliceGPT output has no zeros: PERP adapts every linear of its blocks (LoRA), its shortcuts left alone
  run llama-slicegpt-per-block-0.25 $L compress --model llama --solver slicegpt --slicing 0.25 --rotation per-block --round-to 1 --no-dense-eval $P --out $R/llama-slicegpt-per-block-0.25
  run llama-slicegpt-per-block-0.25-perp $L recover $R/llama-slicegpt-per-block-0.25 $Q --out $R/llama-slicegpt-per-block-0.25-perp
}
stage_slicegpt() {
  # --round-to 1: the width is then a multiple of SmolLM2's 9 heads only (513, 459, 432, 396), closest to
  # the asked fraction; the default 8 would make it a multiple of 72 (504, 432, 432, 360).
  # The LM head and the last residual stay at full width (the reference's default); -slicehead: sliced too
  for s in 0.25 0.1 0.2 0.3; do for r in shared per-block; do
    run llama-slicegpt-$r-$s $L compress --model llama --solver slicegpt --slicing $s --rotation $r --round-to 1 --no-dense-eval $P --out $R/llama-slicegpt-$r-$s
    run llama-slicegpt-$r-$s-slicehead $L compress --model llama --solver slicegpt --slicing $s --rotation $r --round-to 1 --slice-head --no-dense-eval $P --out $R/llama-slicegpt-$r-$s-slicehead
  done; done
  for r in shared per-block; do  # decode speed on this CPU, dense vs sliced, batch 1 (measured with the head sliced)
    [ -e $B/bench-slicegpt-$r-0.25.json ] || { echo "### bench slicegpt $r 0.25" >> $LOG;
      $L bench $R/llama-slicegpt-$r-0.25 --dense llama --batch 1 --prompt-len 128 --new-tokens 64 \
        --json $B/bench-slicegpt-$r-0.25.json >> $LOG 2>&1; }
  done
}
stages=${*:-base formats zeroshot sweep solvers perp slicegpt}
for s in $stages; do "stage_$s"; done
