#!/usr/bin/env bash
# The README's 2:4 pruning rows of SmolLM2-135M (P-cpu: bench/p_cpu.sh base/formats) run again on this machine,
# against the figures recorded in bench/results/NAME.json: same commands, same code paths, same library versions,
# another processor's float rounding. Prints both perplexities (and the unpruned model's) with the processors;
# keeps this machine's manifests in bench/results/machines/NAME.json (not read by make_tables).
# Usage: bash bench/machine_spread.sh | tee bench/results/machine_spread.txt       (~8 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p bench/results/machines
echo "# $(date -u +%F), commit $(git rev-parse --short HEAD), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
for run in "llama-wanda-24 --solver wanda --pattern 2:4" "llama-sparsegpt-24 --solver sparsegpt --pattern 2:4 --no-dense-eval"; do
  name=${run%% *}
  echo "\$ llmprune compress --model llama ${run#* } --protocol cpu --no-progress --out /tmp/machine-$name"
  $PY -m llmprune.cli compress --model llama ${run#* } --protocol cpu --no-progress --overwrite --out /tmp/machine-$name \
    | grep -E "^wikitext2|^saved"
  cp /tmp/machine-$name/llmprune.json bench/results/machines/$name.json
  rm -rf /tmp/machine-$name
done
$PY - <<'PY'
import json
from pathlib import Path
for name in ("llama-wanda-24", "llama-sparsegpt-24"):
    a, b = (json.loads(Path(p).read_text()) for p in (f"bench/results/{name}.json", f"bench/results/machines/{name}.json"))
    ea, eb = a["eval"]["wikitext2"], b["eval"]["wikitext2"]
    same = {k: a["versions"].get(k) == b["versions"].get(k) for k in ("torch", "transformers", "gguf", "datasets")}
    args = [[w for w in m["command"].split(" --out ")[0].split() if w != "--overwrite"] for m in (a, b)]
    print(f"{name}: recorded {ea['ppl']:.4f} (cpu {a['versions'].get('cpu', 'not recorded')}) "
          f"here {eb['ppl']:.4f} (cpu {b['versions'].get('cpu')}): {eb['ppl'] / ea['ppl']:.4f}x; "
          f"unpruned {ea.get('dense_ppl')} vs {eb.get('dense_ppl')}; same command {args[0] == args[1]}; "
          f"same versions {all(same.values())}")
PY
