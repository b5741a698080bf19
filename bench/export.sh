#!/usr/bin/env bash
# Exports of SmolLM2-135M (dense and Wanda 50%) to compressed-tensors and GGUF, each read back by another
# engine: transformers (compressed-tensors decompressed on the CPU) and llama.cpp (llama-cpp-python), on the
# P-cpu protocol's WikiText-2 windows (16 x 2048). Console output and commands: bench/results/export/export.log;
# llama.cpp figures: bench/results/export/llamacpp.jsonl; manifests: bench/results/export/*.json.
# Resumable: a step whose output exists is skipped. Needs llama-cpp-python in $LLAMACPP_PY's environment:
#   python -m venv /root/venvs/llamacpp && CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
#   -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" /root/venvs/llamacpp/bin/pip install numpy \
#   llama-cpp-python==0.3.36   (AMX off: its matmul segfaults on this machine, bench/README.md)
set -uo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false PYTHONPATH="${PYTHONPATH:-$PWD}"
R=${R:-runs/export}
RES=bench/results/export
L=$RES/export.log
LLAMACPP_PY=${LLAMACPP_PY:-/root/venvs/llamacpp/bin/python}
mkdir -p "$R" "$RES"
run() {  # log the command, its output, wall time and peak RSS
  echo "\$ $* # $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$L"
  /usr/bin/time -f "wall %e s, peak RSS %M KB" "$@" 2>&1 | grep -v -E "it/s\]|s/it\]|^Applying|^Compressing|^Decompressing" \
    | tee -a "$L"
}
lp() { run python -m llmprune.cli "$@"; }
keep() { cp "$1/llmprune.json" "$RES/$2.json"; }

# sources: the unpruned model (magnitude at sparsity 0 prunes nothing) and Wanda 50%, P-cpu
STAGE=${1:-all}  # all | ct | gguf | q4codes | gptqgguf | gemma
if [ $STAGE != gemma ]; then
[ -d $R/llama-dense ] || lp compress --model llama --solver magnitude --sparsity 0 --protocol cpu --no-dense-eval --no-progress --out $R/llama-dense
[ -d $R/llama-wanda-50 ] || lp compress --model llama --sparsity 0.5 --protocol cpu --no-dense-eval --no-progress --out $R/llama-wanda-50
for s in dense wanda-50; do keep $R/llama-$s llama-$s; done
fi

if [ $STAGE = all ] || [ $STAGE = ct ]; then
# llmprune's own int4: w4g128 RTN, symmetric (compressed-tensors' W4A16 grid; transformers reads only symmetric)
for s in dense wanda-50; do
  [ -d $R/llama-$s-w4g128 ] || lp pack $R/llama-$s --format w4g128 --quant rtn --grid sym --eval wikitext2 --eval-windows 16 --no-progress --out $R/llama-$s-w4g128
  keep $R/llama-$s-w4g128 llama-$s-w4g128
done
# compressed-tensors: the int4 outputs' codes as they are; perplexity of each export loaded by transformers'
# from_pretrained (compressed-tensors decompresses on the CPU)
for s in dense-w4g128 wanda-50-w4g128; do
  [ -d $R/llama-$s-ct ] || lp export $R/llama-$s --to compressed-tensors --eval wikitext2 --eval-windows 16 --no-progress --out $R/llama-$s-ct
  keep $R/llama-$s-ct llama-$s-ct
done
# and the dense Wanda output quantized on export (RTN, symmetric, auto groups): the same tensors as the export
# of its w4g128 pack, so its perplexity is that one's (checked tensor by tensor, not re-measured)
[ -d $R/llama-wanda-50-ct ] || lp export $R/llama-wanda-50 --to compressed-tensors --quant rtn --no-progress --out $R/llama-wanda-50-ct
keep $R/llama-wanda-50-ct llama-wanda-50-ct
run python -c "
from safetensors.torch import load_file
import torch, sys
a, b = (load_file(sys.argv[i] + '/model.safetensors') for i in (1, 2))
same = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
print('quantized on export == export of the w4g128 pack, every tensor:', same)" $R/llama-wanda-50-ct $R/llama-wanda-50-w4g128-ct
fi

llamacpp() {  # GGUF file, windows: llama.cpp's perplexity into llamacpp.jsonl (once)
  grep -q "\"$1\"" $RES/llamacpp.jsonl 2>/dev/null && return
  echo "\$ OMP_WAIT_POLICY=PASSIVE $LLAMACPP_PY bench/llamacpp_ppl.py ppl $1 --npy $2 # $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$L"
  OMP_WAIT_POLICY=PASSIVE $LLAMACPP_PY bench/llamacpp_ppl.py ppl $1 --npy $2 2>>"$L" | tee -a "$L" >> $RES/llamacpp.jsonl
}
reference() {  # llmprune output, windows: llmprune's own figure on the same windows (once)
  grep -q "\"src\": \"$1\".*\"windows\": $3," $RES/llamacpp.jsonl 2>/dev/null && return
  echo "\$ python bench/llamacpp_ppl.py ref $1 --npy $2 # $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$L"
  python bench/llamacpp_ppl.py ref $1 --npy $2 2>>"$L" | tee -a "$L" >> $RES/llamacpp.jsonl
}

if [ $STAGE = all ] || [ $STAGE = gguf ]; then
# GGUF F16 / Q8_0 / Q4_0 (tokenizer and chat template copied from the source GGUF), then llama.cpp's perplexity
# on 8 of the P-cpu windows (llama.cpp runs one thread here: 8 x 2048 tokens take ~6 min a file) next to
# llmprune's own figure on the same 8 windows
for s in dense wanda-50; do
  [ -d $R/llama-$s-gguf ] || lp export $R/llama-$s --to gguf --type f16,q8_0,q4_0 --no-progress --out $R/llama-$s-gguf
  keep $R/llama-$s-gguf llama-$s-gguf
done
NPY=$R/wt2-8x2048.npy
[ -f $NPY ] || run python bench/llamacpp_ppl.py windows $R/llama-dense --seqlen 2048 --windows 8 --npy $NPY
for s in dense wanda-50; do reference $R/llama-$s $NPY 8; done
for t in F16 Q8_0 Q4_0; do
  for s in dense wanda-50; do llamacpp $R/llama-$s-gguf/llama-$s-$t.gguf $NPY; done
done
fi

# GGUF Q4_0 holding llmprune's own int4 codes: each output packed as w4g128 by GPTQ on the symmetric grid (Q4_0's),
# exported as Q4_0 (every int4 linear's codes and fp16 scales as Q4_0 blocks, not gguf's rounding of the
# dequantized weights), then llama.cpp's perplexity beside llmprune's figure of the w4g128 folder, same 8 windows
if [ $STAGE = q4codes ]; then
NPY=$R/wt2-8x2048.npy
[ -f $NPY ] || run python bench/llamacpp_ppl.py windows $R/llama-dense --seqlen 2048 --windows 8 --npy $NPY
for s in dense wanda-50; do
  [ -d $R/llama-$s-gptq ] || lp pack $R/llama-$s --format w4g128 --quant gptq --grid sym --eval wikitext2 --eval-windows 16 --no-progress --out $R/llama-$s-gptq
  keep $R/llama-$s-gptq llama-$s-gptq
  [ -d $R/llama-$s-gptq-gguf ] || lp export $R/llama-$s-gptq --to gguf --type q4_0 --no-progress --out $R/llama-$s-gptq-gguf
  keep $R/llama-$s-gptq-gguf llama-$s-gptq-gguf
  reference $R/llama-$s-gptq $NPY 8
  llamacpp $R/llama-$s-gptq-gguf/llama-$s-gptq-Q4_0.gguf $NPY
  # the same file read by transformers' GGUF reader (dequantized, fp32 activations) on the same 8 windows
  [ -d $R/llama-$s-gptq-q4eval ] || lp export $R/llama-$s-gptq --to gguf --type q4_0 --eval wikitext2 --eval-windows 8 --no-progress --out $R/llama-$s-gptq-q4eval
  keep $R/llama-$s-gptq-q4eval llama-$s-gptq-q4eval
  # the check of it: the same export with its codes dropped (gguf_int4.encode None: every int4 tensor quantized
  # again by gguf from its decoded weights, as exports were written before)
  [ -d $R/llama-$s-gptq-requant ] || run python -c "import sys; from llmprune.export import gguf_int4; gguf_int4.encode = lambda *a: None; from llmprune.cli import main; sys.exit(main(sys.argv[1:]))" export $R/llama-$s-gptq --to gguf --type q4_0 --no-progress --out $R/llama-$s-gptq-requant
  llamacpp $R/llama-$s-gptq-requant/llama-$s-gptq-Q4_0.gguf $NPY
done
# the same codes in Q5_0 and Q8_0 blocks (which hold any int4 grid), read by llama.cpp
[ -d $R/llama-dense-gptq-q5q8 ] || lp export $R/llama-dense-gptq --to gguf --type q5_0,q8_0 --no-progress --out $R/llama-dense-gptq-q5q8
for t in Q5_0 Q8_0; do llamacpp $R/llama-dense-gptq-q5q8/llama-dense-gptq-$t.gguf $NPY; done
fi

# GPTQ on export in one command: each output exported as Q4_0 with `--quant gptq` (groups of 32, the default: every
# Q4_0 block stores its own fp16 step, so the file is the size of a Q4_0 of groups of 128), read by llama.cpp and by
# transformers' GGUF reader (--eval) on the same 8 windows
if [ $STAGE = gptqgguf ]; then
NPY=$R/wt2-8x2048.npy
[ -f $NPY ] || run python bench/llamacpp_ppl.py windows $R/llama-dense --seqlen 2048 --windows 8 --npy $NPY
for s in dense wanda-50; do
  [ -d $R/llama-$s-gptq32-gguf ] || lp export $R/llama-$s --to gguf --quant gptq --type q4_0 --eval wikitext2 --eval-windows 8 --no-progress --out $R/llama-$s-gptq32-gguf
  keep $R/llama-$s-gptq32-gguf llama-$s-gptq32-gguf
  llamacpp $R/llama-$s-gptq32-gguf/llama-$s-Q4_0.gguf $NPY
done
fi

# Gemma-3-270M, unpruned, as GGUF F16 and Q8_0 through llama.cpp: 2 windows of 2048 on both sides (its 262k
# vocabulary: 2 GB of logits a window in llama.cpp, 15 s a window in llmprune)
if [ $STAGE = gemma ]; then
[ -d $R/gemma3-dense ] || lp compress --model gemma3 --solver magnitude --sparsity 0 --protocol cpu --no-dense-eval --eval none --no-progress --out $R/gemma3-dense
[ -d $R/gemma3-dense-gguf ] || lp export $R/gemma3-dense --to gguf --type f16,q8_0 --no-progress --out $R/gemma3-dense-gguf
keep $R/gemma3-dense-gguf gemma3-dense-gguf
GNPY=$R/gemma3-wt2-2x2048.npy
[ -f $GNPY ] || run python bench/llamacpp_ppl.py windows $R/gemma3-dense --seqlen 2048 --windows 2 --npy $GNPY
reference $R/gemma3-dense $GNPY 2
for t in F16 Q8_0; do llamacpp $R/gemma3-dense-gguf/gemma3-dense-$t.gguf $GNPY; done
fi
if [ $STAGE = all ]; then ls -l $R/*/model.safetensors $R/*/*.gguf > $RES/sizes.txt
else ls -l $R/*/model.safetensors $R/*/*.gguf | grep -F -v -f $RES/sizes.txt >> $RES/sizes.txt; fi  # a stage adds its files
