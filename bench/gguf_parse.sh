#!/usr/bin/env bash
# A GGUF's conversion into the cache (llmprune/models.py gguf_to_folder), timed at two commits: REV (default
# 3307bd7, which parsed the file five times a try) and the working tree (parsed once: models._GGUF), on the two
# embedded GGUFs (SmolLM2-135M Q4_1, Gemma-3-270M Q4_K_M), each into a fresh cache, the two interleaved.
#   bash bench/gguf_parse.sh [REV]      (~6 min on 2 cores; PY: an absolute path, default the project venv)
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-$PWD/.venv/bin/python}; REV=${1:-3307bd7}; W=${SYN:-/tmp/llmprune-gguf-parse}
rm -rf "$W"; mkdir -p "$W"; git worktree add -q --detach "$W/old" "$REV"
trap 'git worktree remove --force "$W/old"; rm -rf "$W"' EXIT
echo "\$ bash bench/gguf_parse.sh $REV   ($(date -u +%F), $(nproc) cores, HEAD $(git rev-parse --short HEAD)$(git diff --quiet || echo +changes))"
for alias in llama gemma3; do
  f=$($PY -c "from llmprune import models; print(models.alias_gguf('$alias'))")
  for rep in 1 2; do
    for tree in "$W/old" "$PWD"; do
      label=$([ "$tree" = "$PWD" ] && echo now || echo "$REV")
      (cd "$W"; LLMPRUNE_CACHE="$W/cache" PYTHONPATH="$tree" $PY - "$f" "$label") <<'PY'
import sys, time
from pathlib import Path
from llmprune import models
assert Path(models.__file__).parents[1] == Path(sys.path[1]), models.__file__  # (this tree's, not the install's)
f = Path(sys.argv[1])
models._sha256(f)  # (hashing the file is not part of the conversion)
t = time.perf_counter()
models.gguf_to_folder(f)
print(f"  {f.name} at {sys.argv[2]:>8}: {time.perf_counter() - t:6.1f} s", flush=True)
PY
      rm -rf "$W/cache"
    done
  done
done
