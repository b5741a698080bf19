#!/usr/bin/env bash
# One H100 or H200 call (< 10 min): compile the kernels in parallel, check them against an fp64 oracle on
# CUDA, sweep their launch shapes against cuBLAS / torch 2:4 / torch int4, decode a LLaMA-3-8B-shaped
# model end to end, and time compression on CUDA. Installs nothing; run from the repository root.
#   OUT=/some/dir bash bench/gpu_kernels.sh [stage ...]     stages: env precompile correctness tune
#                                          use_tuned microbench e2e e2e_compiled compress compress_scale compress_moe perp tune_scale read_ahead
#                                          resume e2e_moe moe_train
# (use_tuned copies the sweep's table into llmprune/kernels/tuned/ of this working tree, so the stages
# after it run the launch shapes just measured)
# Logs and JSON go to $OUT (default bench/out); each stage runs under its own time limit. With PACK=DIR,
# $OUT is also packed into DIR/results.tgz after every stage (a caller that gets back a few files).
set -u
OUT=${OUT:-bench/out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
STAGES=${*:-env precompile correctness tune use_tuned e2e compress}
rc=0
stage() {  # stage NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  local t0=$SECONDS
  timeout "$secs" bash -c "$*" > "$OUT/$name.log" 2>&1; local r=$?
  echo "$name rc=$r $((SECONDS - t0))s" | tee -a "$OUT/stages.txt"
  [ $r -ne 0 ] && rc=1
  [ -n "${PACK:-}" ] && tar czf "$PACK/results.tgz" -C "$OUT" .
  return 0
}
envinfo() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  $PY -c "import torch, triton, transformers, accelerate, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__); p = torch.cuda.get_device_properties(0); print(p.name, p.multi_processor_count, 'SMs', round(p.total_memory / 2**30, 1), 'GiB')"
  git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
}
compress() {  # compression on CUDA: a SmolLM2-shaped random model (the real one does not fit the transfer)
  local m=/tmp/smollm2-135m-synthetic
  $PY bench/make_synthetic.py $m --arch smollm2-135m --dtype float32 || return 1
  local common="--model $m --protocol paper --no-progress --overwrite" ev=wikitext2
  # offline C4 (the paper's calibration) is read with pyarrow; without it, calibrate on WikiText-2
  # and skip the evaluation (it would overlap the calibration text)
  $PY -c "import pyarrow" 2>/dev/null || { common="$common --calib wikitext2"; ev=none; echo "no pyarrow: --calib wikitext2"; }
  local rc=0
  one() {  # one NAME ARGS...: compress, keep the manifest whatever the next run does
    $PY -m llmprune.cli compress $common "${@:2}" --out /tmp/o-$1 && cp /tmp/o-$1/llmprune.json "$OUT/compress-$1.json" || rc=1
  }
  one wanda --solver wanda --eval $ev
  one sparsegpt --solver sparsegpt --eval none
  one sparsegpt-w4s24-gptq --solver sparsegpt --pattern 2:4 --format w4s24 --quant gptq --eval none
  one slicegpt --solver slicegpt --slicing 0.25 --rotation shared --eval none  # blocks rotated on the GPU
  return $rc
}
c4() {  # the papers' calibration, C4 (the shipped sample is read with pyarrow; without it: WikiText-2, said so)
  $PY -c "import pyarrow" 2>/dev/null && echo "--calib c4" || { echo "no pyarrow: --calib wikitext2" >&2; echo "--calib wikitext2"; }
}
compress_moe() {  # a Mixture-of-Experts model block by block on CUDA (docs/scale.md): 2 blocks of a Qwen3-30B-A3B-
  # shaped random model (bf16, 128 experts of 768 a block stored one linear per expert, read into place on the GPU),
  # the papers' calibration; Wanda, SparseGPT, and SparseGPT with the experts' Hessians collected a run at a time
  # within 0.5 GiB (--hessian-gib; a block's gate/up Hessians are 2 GiB), which must give the same tensors.
  # Manifests: compress seconds, peak GPU memory, peak RSS, hessian_runs.
  # CPU dry run: DEVICE=cpu NS=2 SL=64 MOE_LAYERS=1 OUT=/tmp/x bash bench/gpu_kernels.sh compress_moe
  local rc=0 d=${DEVICE:-cuda} ns=${NS:-128} sl=${SL:-2048} n=${MOE_LAYERS:-2} m=/tmp/syn-qwen3-30b-a3b cal
  cal=$(c4)
  $PY bench/make_synthetic.py $m --arch qwen3-30b-a3b --layers $n --dtype bfloat16 || return 1
  for run in "wanda" "sparsegpt" "sparsegpt --hessian-gib 0.5"; do
    local name=compress-moe-l$n-${run%% *}$( [[ $run == *gib* ]] && echo -hessian0.5 )
    $PY -m llmprune.cli compress --model $m --solver $run --sparsity 0.5 --device $d --nsamples $ns --seqlen $sl $cal \
        --onload blocks --eval none --no-dense-eval --no-progress --overwrite --out /tmp/o-$name \
        && cp /tmp/o-$name/llmprune.json "$OUT/$name.json" || rc=1
  done
  $PY bench/same_tensors.py /tmp/o-compress-moe-l$n-sparsegpt /tmp/o-compress-moe-l$n-sparsegpt-hessian0.5 || rc=1
  rm -rf /tmp/o-compress-moe-l$n-* $m
  return $rc
}
moe_train() {  # scale tuning and PERP of a Mixture-of-Experts model's experts on CUDA (session 27: each fused experts
  # module trains as one linear per expert projection): 1 block of a Qwen3-30B-A3B-shaped random model (bf16), Wanda
  # 2:4, packed w4s24 with GPTQ and 2 tuning steps read from disk and loaded whole (the tensors must agree), and
  # 2 PERP steps from disk. Manifests: seconds, peak GPU memory, peak RSS, adapted linears.
  # CPU dry run: DEVICE=cpu NS=2 SL=64 MT_S=900 OUT=/tmp/x bash bench/gpu_kernels.sh moe_train
  local rc=0 d=${DEVICE:-cuda} ns=${NS:-16} sl=${SL:-512} m=/tmp/syn-moe-train
  $PY bench/make_synthetic.py $m --arch qwen3-30b-a3b --layers 1 --dtype bfloat16 || return 1
  $PY -m llmprune.cli compress --model $m --solver wanda --pattern 2:4 --device $d --nsamples $ns --seqlen $sl \
      --calib wikitext2 --onload blocks --eval none --no-dense-eval --no-progress --overwrite --out /tmp/o-mt-src || return 1
  for r in blocks whole; do
    $PY -m llmprune.cli pack /tmp/o-mt-src --format w4s24 --quant gptq --calib wikitext2 --nsamples $ns --seqlen $sl \
        --tune-steps 2 --device $d --onload $r --no-progress --overwrite --out /tmp/o-mt-tune-$r \
      && cp /tmp/o-mt-tune-$r/llmprune.json "$OUT/moe-tune-$r.json" || rc=1
  done
  $PY bench/same_tensors.py /tmp/o-mt-tune-blocks /tmp/o-mt-tune-whole || rc=1
  $PY -m llmprune.cli recover /tmp/o-mt-src --steps 2 --batch 1 --seqlen $sl --data wikitext2 --device $d \
      --onload blocks --eval none --no-progress --overwrite --out /tmp/o-mt-perp \
    && cp /tmp/o-mt-perp/llmprune.json "$OUT/moe-perp.json" || rc=1
  rm -rf /tmp/o-mt-* $m
  return $rc
}
compress_scale() {  # block-by-block compression at 8B and 70B width (docs/scale.md): 4 blocks of a
  # Llama-3-8B-shaped and 2 of a Llama-3.3-70B-shaped random model, bf16, the papers' calibration
  # (128 x 2048 C4 tokens); manifests give compress seconds per block and the peak GPU memory.
  # CPU dry run: DEVICE=cpu NS=2 SL=64 SPECS=llama3-8b:1 OUT=/tmp/x bash bench/gpu_kernels.sh compress_scale
  local rc=0 d=${DEVICE:-cuda} ns=${NS:-128} sl=${SL:-2048} cal
  cal=$(c4)
  for spec in ${SPECS:-llama3-8b:4 llama3-70b:2}; do
    local a=${spec%%:*} n=${spec##*:} m=/tmp/syn-${spec%%:*}-l${spec##*:}
    $PY bench/make_synthetic.py $m --arch $a --layers $n --dtype bfloat16 || { rc=1; continue; }
    for s in "wanda --sparsity 0.5" "sparsegpt --pattern 2:4"; do
      local name=compress-$a-l$n-${s%% *}
      $PY -m llmprune.cli compress --model $m --solver $s --device $d --nsamples $ns --seqlen $sl $cal \
          --eval none --no-dense-eval --no-progress --overwrite --out /tmp/o-$name \
        && cp /tmp/o-$name/llmprune.json "$OUT/$name.json" || rc=1
      rm -rf /tmp/o-$name
    done
    rm -rf $m
  done
  return $rc
}
perp() {  # PERP on CUDA with every block on the GPU and with the blocks streamed (llmprune/placement.py):
  # 2 blocks of a Llama-3-8B-shaped model in bf16, Wanda 50%, 4 PERP steps of 2 x 512 tokens, then again with
  # --resident-gib 2.2 (the 2.1 GB embedding and head, no block: both stream from CPU memory), and once more
  # resident with --onload whole (the source loaded into CPU memory first, as before session 16). The manifests
  # give recover seconds, peak GPU memory, peak RSS (blocks read straight to the GPU should keep it far below
  # the whole load's) and the GB streamed; the three folders' weights are compared (the streamed run commits a
  # training checkpoint after every step: resume.Training's save of CUDA tensors and states, which must not change
  # what it trains). Last, `compress --recover`
  # of the same model in one command (blocks path), with its timings and peak memory.
  # CPU dry run: DEVICE=cpu SL=64 PERP_S=600 OUT=/tmp/x bash bench/gpu_kernels.sh perp
  local d=${DEVICE:-cuda} sl=${SL:-512} m=/tmp/syn-perp rc=0
  $PY bench/make_synthetic.py $m --arch llama3-8b --layers 2 --dtype bfloat16 || return 1
  $PY -m llmprune.cli compress --model $m --solver wanda --device $d --nsamples 4 --seqlen 256 --calib wikitext2 \
      --eval none --no-dense-eval --no-progress --overwrite --out /tmp/o-perp-src || return 1
  for r in resident 2.2 whole; do
    local extra="--onload blocks"; [ $r = 2.2 ] && extra="--onload blocks --resident-gib $r --checkpoint-every 0"
    [ $r = whole ] && extra="--onload whole"
    $PY -m llmprune.cli recover /tmp/o-perp-src --out /tmp/o-perp-$r --steps 4 --batch 2 --seqlen $sl \
        --data wikitext2 --device $d --dtype bfloat16 --no-progress --overwrite $extra \
      && cp /tmp/o-perp-$r/llmprune.json "$OUT/perp-$r.json" || rc=1
  done
  # compress --recover in one command: pruned blocks through the scratch folder, PERP read straight to the GPU
  $PY -m llmprune.cli compress --model $m --solver wanda --device $d --nsamples 4 --seqlen 256 --calib wikitext2 \
      --recover perp --recover-steps 2 --onload blocks --eval none --no-dense-eval --no-progress --overwrite \
      --out /tmp/o-perp-compress && cp /tmp/o-perp-compress/llmprune.json "$OUT/perp-compress.json" || rc=1
  $PY -c "import json; m = json.load(open('/tmp/o-perp-compress/llmprune.json')); r = m['recover']; print('compress \
--recover: onload', m['onload'], 'timings', m['timings'], 'peak RSS', m['peak_rss_mib'], 'MiB, peak GPU', \
m.get('peak_gpu_mib'), 'MiB, losses', r['losses'])" || rc=1
  $PY - <<'PYEOF' || rc=1
import json
from safetensors.torch import load_file
from pathlib import Path
runs = {r: Path(f"/tmp/o-perp-{r}") for r in ("resident", "2.2", "whole")}
w = {r: {k: v for f in sorted(p.glob("*.safetensors")) for k, v in load_file(f).items()} for r, p in runs.items()}
m = {r: json.loads((p / "llmprune.json").read_text()) for r, p in runs.items()}
for r in runs:
    x = m[r]["recover"]
    print(f"{r:>8}: onload {x['onload']}, recover {x['wall_s']:.1f} s, peak RSS {m[r]['peak_rss_mib']} MiB, peak GPU "
          f"{m[r].get('peak_gpu_mib')} MiB, streamed {x['placement']['streamed_gb']} GB, losses {x['losses']}")
for r in ("2.2", "whole"):
    diff = max((w["resident"][k].float() - w[r][k].float()).abs().max().item() for k in w["resident"])
    print(f"max |weight difference| resident vs {r}: {diff}")
    assert w["resident"].keys() == w[r].keys() and diff < 1e-2, f"{r} differs from resident training"
PYEOF
  rm -rf $m /tmp/o-perp-*
  return $rc
}
tune_scale() {  # GPTQ's scale tuning on CUDA read from disk (onload.gptq_tuned, the default since session 17)
  # against the source loaded whole: 2 blocks of a Llama-3-8B-shaped model in bf16, Wanda 2:4, packed w4s24 with
  # GPTQ and 4 tuning steps of 2 windows of $SL tokens. The manifests give each pack's peak RSS and peak GPU
  # memory (blocks: CPU memory holds no dense weight of a tuned linear), the tuning's seconds and KL figures;
  # the two folders' tensors are compared (the blocks run commits a checkpoint after every block and tuning step).
  # CPU dry run: DEVICE=cpu SL=64 OUT=/tmp/x bash bench/gpu_kernels.sh tune_scale
  local d=${DEVICE:-cuda} sl=${SL:-512} m=/tmp/syn-tune rc=0
  $PY bench/make_synthetic.py $m --arch llama3-8b --layers 2 --dtype bfloat16 || return 1
  $PY -m llmprune.cli compress --model $m --solver wanda --pattern 2:4 --device $d --nsamples 4 --seqlen 256 \
      --calib wikitext2 --eval none --no-dense-eval --no-progress --overwrite --out /tmp/o-tune-src || return 1
  for r in blocks whole; do  # (blocks: a checkpoint after every block and step, its CUDA tensors saved)
    local every=""; [ $r = blocks ] && every="--checkpoint-every 0"
    $PY -m llmprune.cli pack /tmp/o-tune-src --format w4s24 --quant gptq --calib wikitext2 --nsamples 4 \
        --seqlen $sl --tune-steps 4 --device $d --onload $r $every --no-progress --overwrite --out /tmp/o-tune-$r \
      && cp /tmp/o-tune-$r/llmprune.json "$OUT/tune-$r.json" || rc=1
  done
  $PY - <<'PYEOF' || rc=1
import json
from pathlib import Path
from safetensors.torch import load_file
runs = {r: Path(f"/tmp/o-tune-{r}") for r in ("blocks", "whole")}
w = {r: {k: v for f in sorted(p.glob("*.safetensors")) for k, v in load_file(f).items()} for r, p in runs.items()}
for r, p in runs.items():
    m = json.loads((p / "llmprune.json").read_text())
    t = m["format"]["quant_options"]["tune"]
    print(f"{r:>6}: onload {m['onload']}, pack {m['timings']['pack']}, peak RSS {m['peak_rss_mib']} MiB, peak GPU "
          f"{m.get('peak_gpu_mib')} MiB, tuning {t['seconds']} s, KL {t['kl_before']} -> {t['kl_after']} ({t['kept']})")
assert w["blocks"].keys() == w["whole"].keys(), "the two packs hold different tensors"
same = sum(bool((w["blocks"][k] == w["whole"][k]).all()) for k in w["whole"])
diff = max((w["blocks"][k].float() - w["whole"][k].float()).abs().max().item() for k in w["whole"])
print(f"tensors identical: {same} of {len(w['whole'])}, max |difference| {diff}")
PYEOF
  rm -rf $m /tmp/o-tune-*
  return $rc
}
read_ahead() {  # blockwise perplexity on CUDA reading the next block ahead (lazy.READ_AHEAD, the default on a
  # GPU since 2026-12-05) against not: 8 blocks of a Llama-3-8B-shaped model in bf16, $RA_W windows of 2048 tokens,
  # each run in a fresh process, page cache dropped before each where allowed.
  # CPU dry run: DEVICE=cpu RA_W=1 RA_SL=128 OUT=/tmp/x bash bench/gpu_kernels.sh read_ahead
  local m=/tmp/syn-ra rc=0
  $PY bench/make_synthetic.py $m --arch llama3-8b --layers 8 --dtype bfloat16 || return 1
  $PY bench/read_ahead.py $m --device ${DEVICE:-cuda} --windows ${RA_W:-16} --seqlen ${RA_SL:-2048} --reps 2 --cold || rc=1
  rm -rf $m
  return $rc
}
resume() {  # a compression killed (SIGKILL) after block 1 and resumed, on CUDA (resume.py: the checkpointed
  # activations live on the GPU there), against a run never stopped: 4 blocks of a Llama-3-8B-shaped model in bf16,
  # SparseGPT 2:4, $RS_NS x $RS_SL WikiText-2 tokens (default 128 x 2048: 2.1 GB of activations per checkpoint).
  # CPU dry run: DEVICE=cpu RS_NS=2 RS_SL=64 RS_L=2 OUT=/tmp/x bash bench/gpu_kernels.sh resume
  local m=/tmp/syn-resume rc=0
  $PY bench/make_synthetic.py $m --arch llama3-8b --layers ${RS_L:-4} --dtype bfloat16 || return 1
  $PY bench/resume_check.py $m --device ${DEVICE:-cuda} --nsamples ${RS_NS:-128} --seqlen ${RS_SL:-2048} \
    --kill-at $(( ${RS_L:-4} / 2 - 1 )) || rc=1
  rm -rf $m
  return $rc
}
export -f envinfo c4 compress compress_moe compress_scale perp tune_scale read_ahead resume moe_train
export OUT PY HF_HUB_OFFLINE=1
stage env 30 envinfo
stage precompile 90 $PY bench/gpu_precompile.py --workers 14 ${PRECOMPILE_ONLY:+--only $PRECOMPILE_ONLY}
stage correctness 100 $PY bench/gpu_check.py "$OUT/correctness.json"
stage tune 170 $PY bench/gpu_tune.py "$OUT" --reps 10
stage use_tuned 5 "mkdir -p llmprune/kernels/tuned && cp $OUT/sm90.json llmprune/kernels/tuned/sm90.json"
stage microbench 90 $PY bench/gpu_tune.py "$OUT/micro" --tuned-only --reps 30
stage e2e 150 $PY bench/e2e_decode.py "$OUT/e2e.json" --batch 1,16 --new-tokens 128
stage compress 200 compress
stage compress_scale 420 compress_scale
stage compress_moe ${MOE_S:-300} compress_moe  # the CPU dry run needs MOE_S=900
stage perp ${PERP_S:-300} perp  # the CPU dry run needs PERP_S=600
stage tune_scale ${TUNE_S:-240} tune_scale  # the CPU dry run needs TUNE_S=900
stage read_ahead ${RA_S:-180} read_ahead
stage resume ${RS_S:-240} resume
# a Qwen3-30B-A3B-shaped model's first 8 blocks (random weights): transformers' fused experts against packed experts
# (moe.SplitExperts: grouped launches, and w4s24:loop expert by expert), batch 1 and 16; E2E_MOE_ARGS: the CPU dry run's sizes
stage e2e_moe ${E2E_MOE_S:-150} $PY bench/e2e_decode.py "$OUT/e2e_moe.json" --arch qwen3-30b-a3b --formats w4s24,w4s24:loop,w4g128 \
    ${E2E_MOE_ARGS:---layers 8 --batch 1,16 --new-tokens 32}
stage e2e_compiled 200 $PY bench/e2e_decode.py "$OUT/e2e_compiled.json" --batch 1 --new-tokens 128 \
    --formats w4s24 --compile dense,w4s24 --compiled-only
stage moe_train ${MT_S:-240} moe_train  # optional: run it last, if time is left
cat "$OUT/env.log" 2>/dev/null | head -4
tail -n 40 "$OUT/tune.log" 2>/dev/null
tail -n 12 "$OUT"/correctness.log "$OUT"/e2e*.log "$OUT"/precompile.log 2>/dev/null
grep -H '"compress_s"\|peak_gpu\|hessian_runs' "$OUT"/compress-*.json 2>/dev/null
grep -H '"streamed_gb"\|"wall_s"\|peak_gpu' "$OUT"/perp-*.json 2>/dev/null
tail -n 3 "$OUT/perp.log" 2>/dev/null
tail -n 3 "$OUT/tune_scale.log" 2>/dev/null
tail -n 3 "$OUT/read_ahead.log" 2>/dev/null
cat "$OUT/stages.txt"
exit $rc
